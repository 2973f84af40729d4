"""The ``cxr-batch`` command line. Thin: parse options, call the library, map errors to exit codes.

Keep this module light: ``cxr-batch --help`` imports it, so no torch and no onnxruntime here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cxr_batch import __version__
from cxr_batch.cli.dicomweb import dicomweb_list_command, dicomweb_options, dicomweb_settings
from cxr_batch.cli.options import (  # noqa: F401  (the exit codes are part of this module's API)
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    _model_options,
    engine_config,
    engine_options,
    interruptible,
    library_errors,
)
from cxr_batch.cli.report import check_html_dir, html_after_classify, report_command
from cxr_batch.io.shard import Shard  # hashlib and re only

if TYPE_CHECKING:
    from cxr_batch.engine.ray import RayConfig

FC = TypeVar("FC", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-batch")
def main() -> None:
    """Screen chest X-rays (normal / viral pneumonia / COVID-19) in batch with ONNX Runtime.

    A research tool, not a medical device: never use its output for diagnosis.
    """


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> Shard | None:
    """``--shard K/N`` → :class:`Shard`; a bad value is a usage error (exit 2)."""
    if value is None:
        return None
    try:
        return Shard.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _ray_config(engine_kind: str, address: str | None) -> RayConfig | None:
    if engine_kind != "ray":
        return None
    from cxr_batch.engine.ray import RayConfig  # ray itself is imported only when the run starts

    return RayConfig(address=address)


def _provenance_option(default_help: str) -> Callable[[FC], FC]:
    return click.option(
        "--provenance",
        type=click.Path(dir_okay=False, path_type=str),
        default=None,
        metavar="FILE",
        help=f"Write the provenance record (what produced the report: model and its sha256, versions, "
        f"machine, settings, inputs, counts) to FILE. {default_help}",
    )


@main.command("classify")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=str))
@click.option(
    "--out",
    "-o",
    required=True,
    metavar="FILE",
    help="The report: .csv, or .jsonl for JSON lines; '-' writes CSV (or --format) to stdout.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="Report format. Default: from --out's suffix (.jsonl → jsonl), else csv.",
)
@engine_options
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Walk folders recursively.")
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Only files matching GLOB (file name, or relative path if GLOB has a '/'). Repeatable.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="GLOB",
    help="Skip files and folders matching GLOB (any path part, or the relative path if GLOB has a '/'). Repeatable.",
)
@click.option(
    "--files-from",
    type=click.File("rb"),
    default=None,
    metavar="FILE",
    help="Read more inputs from FILE, one path a line ('-' for stdin).",
)
@click.option("--absolute-paths", is_flag=True, help="Write absolute paths instead of paths relative to each input.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
@click.option(
    "--resume",
    is_flag=True,
    help="Keep an existing report's rows and classify only the files not in it yet (after an interruption).",
)
@click.option(
    "--heatmaps",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    metavar="DIR",
    help="Also write, per classified image, a PNG overlaying the class activation map of the predicted class: "
    "DIR/<report path>.png. Needs a model with the 'cam' output.",
)
@click.option(
    "--drop-ood",
    is_flag=True,
    help="Leave images the out-of-distribution guard flags out of the summary's label counts "
    "(their rows stay in the report, with in_distribution=false).",
)
@_provenance_option("Default: <report>.provenance.json beside the report; with --out -, none unless given.")
@click.option(
    "--html",
    "html_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    metavar="OUT_DIR",
    help="Also write the HTML report of the run into OUT_DIR (as 'cxr-batch report --html' does).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@dicomweb_options
@click.option(
    "--shard",
    metavar="K/N",
    default=None,
    callback=_parse_shard,
    help="Classify only shard K of N (numbered from 0), chosen by a stable hash of each file's report path: "
    "for job arrays. Join the parts with 'cxr-batch merge'.",
)
@click.option(
    "--engine",
    "engine_kind",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help='local: this process. ray: Ray Data actors (pip install "cxr-batch[ray]"), on a Ray started here '
    "or the cluster at --ray-address.",
)
@click.option(
    "--ray-address",
    metavar="ADDRESS",
    default=None,
    help="With --engine ray: join this Ray cluster (auto, HOST:6379 or ray://HOST:10001) instead of starting Ray here.",
)
@interruptible("the rows written so far are kept; rerun with --resume to finish.")
@library_errors
def classify_command(
    inputs: tuple[str, ...],
    out: str,
    fmt: str | None,
    model: str | None,
    device: str,
    precision: str,
    batch_size: int,
    threads: int,
    lungs: bool,
    recursive: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    files_from: Any,
    absolute_paths: bool,
    overwrite: bool,
    resume: bool,
    heatmaps: str | None,
    drop_ood: bool,
    provenance: str | None,
    html_dir: str | None,
    quiet: bool,
    shard: Shard | None,
    engine_kind: str,
    ray_address: str | None,
    **dicomweb: Any,
) -> None:
    """Classify chest X-rays (files and folders) into a CSV or JSON-lines report.

    Every input file gets one row: status ok with the label, its confidence and one
    probability per label, or status error with the reason. Exit status: 0 all files
    classified, 3 finished with some error rows, 1 fatal error, 2 usage error.

    Example: cxr-batch classify sample_images --out results.csv
    """
    web, sr, stow = dicomweb_settings(inputs, files_from, engine_kind, dicomweb)
    if not inputs and files_from is None and web is None:
        raise click.UsageError("give at least one INPUT (file or folder), or --files-from FILE, or --dicomweb URL")
    if overwrite and resume:
        raise click.UsageError("--overwrite and --resume exclude each other")
    if resume and out == "-":
        raise click.UsageError("--resume needs a report file, not --out -")
    if shard is not None and absolute_paths:
        raise click.UsageError(
            "--shard works on the paths relative to each input (so the parts can be checked and merged "
            "whatever the machine); leave out --absolute-paths"
        )
    if ray_address is not None and engine_kind != "ray":
        raise click.UsageError("--ray-address needs --engine ray")
    if heatmaps is not None and engine_kind == "ray":
        raise click.UsageError("--heatmaps needs --engine local")
    check_html_dir(html_dir, out)

    from cxr_batch.classify import ClassifyConfig, run_classify  # loads numpy, Pillow, onnxruntime
    from cxr_batch.io.inputs import InputSpec, read_path_list
    from cxr_batch.report.writer import ReportConfig, report_format

    listed: tuple[str, ...] = ()
    if files_from is not None:
        listed = tuple(read_path_list(files_from))
    config = ClassifyConfig(
        inputs=InputSpec(
            paths=inputs,
            recursive=recursive,
            include=include,
            exclude=exclude,
            absolute_paths=absolute_paths,
            listed=listed,
        ),
        engine=engine_config(model, device, precision, batch_size, threads, lungs),
        report=ReportConfig(out=out, format=report_format(out, fmt), overwrite=overwrite, resume=resume),
        quiet=quiet,
        shard=shard,
        ray=_ray_config(engine_kind, ray_address),
        heatmaps=heatmaps,
        drop_ood=drop_ood,
        provenance=provenance,
        dicomweb=web,
        sr=sr,
        stow=stow,
    )
    stats = run_classify(config)
    html_after_classify(html_dir, out, inputs + listed, heatmaps, quiet)
    if stats.all_errors:
        sys.exit(EXIT_PARTIAL)


@main.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--out", "-o", required=True, metavar="FILE", help="The merged report (same format as the parts).")
@click.option(
    "--expect",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="The run had N shards: check that every part is one of them and none is missing.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing merged report.")
@_provenance_option("Default: <merged report>.provenance.json; it combines the parts' <part>.provenance.json records.")
@click.option("--quiet", "-q", is_flag=True, help="No summary.")
@interruptible("nothing was written (the merged report is written only when complete).")
@library_errors
def merge_command(
    parts: tuple[str, ...], out: str, expect: int | None, overwrite: bool, provenance: str | None, quiet: bool
) -> None:
    """Merge the reports of a sharded classify run (--shard K/N) into one report.

    Checks that the parts share columns and model, that no path appears twice and, with
    --expect N, that all N shards are there; then writes the rows in the order an unsharded
    run writes them and prints the summary of the whole. Exit status as for classify.

    Example: cxr-batch merge part-*.csv --out results.csv --expect 16
    """
    from cxr_batch.report.merge import MergeConfig, merge_reports

    merged = merge_reports(
        MergeConfig(parts=parts, out=out, expect=expect, overwrite=overwrite, quiet=quiet, provenance=provenance)
    )
    if merged.stats.all_errors:
        sys.exit(EXIT_PARTIAL)


@main.command("info")
@click.argument("model", required=False, metavar="[MODEL]")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@library_errors
def info_command(model: str | None, precision: str, as_json: bool) -> None:
    """Show a model's contract, sha256, graph inputs and outputs, and the available providers.

    MODEL defaults to $CXR_BATCH_MODEL, else the embedded default model.

    Example: cxr-batch info export/cxr-resnet18.onnx
    """
    import json

    from cxr_batch.engine.classifier import model_info

    info = model_info(model, precision)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    facts = [(key, str(info[key])) for key in ("model", "path", "origin", "sha256", "size_bytes")]
    facts.append(("providers available", ", ".join(info["providers_available"])))
    cpu = info["cpu"]
    facts.append(("cpu", f"{cpu['model']} ({cpu['arch']}; flags: {', '.join(cpu['flags']) or 'none relevant'})"))
    facts.append(("precision", info["precision"]["why"]))
    facts.append(("--precision auto on this cpu", info["precision"]["auto_on_this_cpu"]))
    check = info["self_check"]
    facts.append(("self-check", check["summary"] if check else "none (the contract has no reference images)"))
    for key, value in facts:  # plain lines: a hash or a path must never be wrapped or cut
        console.print(f"[bold]{key}:[/] {escape(value)}", soft_wrap=True)
    graph = Table(title="graph", title_justify="left")
    for col in ("", "name", "type", "shape"):
        graph.add_column(col)
    for kind in ("inputs", "outputs"):
        for io in info[kind]:
            graph.add_row(kind[:-1], io["name"], io["type"], str(io["shape"]))
    console.print(graph)
    console.print("contract:", style="bold")
    contract = info["contract"]
    images = contract.get("extra", {}).get("self_check", {}).get("images")
    if isinstance(images, dict) and "data" in images:  # a blob nobody reads; --json has it whole
        images["data"] = f"<{len(images['data'])} characters>"
    console.print_json(json.dumps(contract, sort_keys=True))


from cxr_batch.cli.train import (  # noqa: E402
    add_cam_command,
    export_command,
    export_lungs_command,
    train_command,
    train_lungs_command,
)

main.add_command(train_command)
main.add_command(export_command)
main.add_command(add_cam_command)
main.add_command(train_lungs_command)
main.add_command(export_lungs_command)

from cxr_batch.cli.evaluate import evaluate_command  # noqa: E402

main.add_command(evaluate_command)
main.add_command(dicomweb_list_command)
main.add_command(report_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
