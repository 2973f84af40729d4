"""The ``cxr-batch`` command line. Thin: parse options, call the library, map errors to exit codes.

Keep this module light: ``cxr-batch --help`` imports it, so no torch and no onnxruntime here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cxr_batch.cli.dicomweb import dicomweb_list_command, dicomweb_options, dicomweb_settings
from cxr_batch.cli.doctor import doctor_command, version_option
from cxr_batch.cli.dryrun import dry_run_report
from cxr_batch.cli.options import (  # noqa: F401  (the exit codes are part of this module's API)
    CLASSIFY_SECTIONS,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    SectionedCommand,
    _model_options,
    engine_config,
    engine_options,
    interruptible,
    library_errors,
)
from cxr_batch.cli.report import check_html_dir, html_after_classify, report_command
from cxr_batch.io.shard import Shard  # hashlib and re only
from cxr_batch.text import shown

if TYPE_CHECKING:
    from cxr_batch.engine.ray import RayConfig

FC = TypeVar("FC", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
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


@main.command("classify", cls=SectionedCommand, sections=CLASSIFY_SECTIONS)
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
    help="Read more inputs from FILE, one path a line ('-' for stdin), or NUL-separated; UTF-8, UTF-16 or "
    "UTF-32 (with or without a byte-order mark). A folder it names is an error row unless --files-from-dirs.",
)
@click.option(
    "--files-from-dirs",
    is_flag=True,
    help="Walk the folders named in --files-from (by default a folder in the list gets an error row).",
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
@click.option(
    "--dry-run",
    is_flag=True,
    help="List the files that would be classified (stdout, one a line) and, on stderr, their count by type, "
    "the unreadable ones and what the filters left out; loads no model and writes nothing.",
)
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
    covid_threshold: float | None,
    lungs: bool,
    recursive: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    files_from: Any,
    files_from_dirs: bool,
    absolute_paths: bool,
    overwrite: bool,
    resume: bool,
    heatmaps: str | None,
    drop_ood: bool,
    provenance: str | None,
    html_dir: str | None,
    quiet: bool,
    dry_run: bool,
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
    if files_from_dirs and files_from is None:
        raise click.UsageError("--files-from-dirs needs --files-from")
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

    from cxr_batch.io.inputs import InputSpec, read_path_list
    from cxr_batch.report.writer import ReportConfig, output_format

    listed: tuple[str, ...] = ()
    if files_from is not None:
        listed = tuple(read_path_list(files_from))
    spec = InputSpec(
        paths=inputs,
        recursive=recursive,
        include=include,
        exclude=exclude,
        absolute_paths=absolute_paths,
        listed=listed,
        list_dirs=files_from_dirs,
    )
    if dry_run:  # the same inputs the run would take; run_classify leaves out its outputs the same way
        outputs = tuple(p for p in (out, heatmaps, dicomweb["sr"]) if p is not None and p != "-")
        dry_run_report(dataclasses.replace(spec, outputs=outputs), shard, web, out, overwrite, resume, quiet)
        return

    from cxr_batch.classify import ClassifyConfig, run_classify  # loads numpy, Pillow, onnxruntime

    config = ClassifyConfig(
        inputs=spec,
        engine=engine_config(model, device, precision, batch_size, threads, covid_threshold, lungs),
        report=ReportConfig(out=out, format=output_format(out, fmt), overwrite=overwrite, resume=resume),
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
    if stats.all_errors or stats.output_failures:
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print everything as one JSON document: the whole contract, "
    "the graph's inputs and outputs, the providers, the CPU and the self-check.",
)
@library_errors
def info_command(model: str | None, precision: str, as_json: bool) -> None:
    """Show which model classify would use, its precision and why, the CPU, the model card and the
    self-check; --json for the whole contract.

    MODEL defaults to $CXR_BATCH_MODEL, else the embedded default model.

    Example: cxr-batch info export/cxr-resnet18.onnx
    """
    import json

    from cxr_batch.engine.model import model_info

    info = model_info(model, precision)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for key, value in info_lines(info):  # plain lines: a hash or a path must never be wrapped or cut
        click.echo(f"{key}: {shown(value)}")


def info_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The short ``info``: a dozen lines a user reads; the rest is in ``--json``."""
    contract = info["contract"]
    cpu = info["cpu"]
    check = info["self_check"]
    outputs = ", ".join(o["name"] for o in info["outputs"])
    height, width = contract["input_size"]
    precision = info["precision"]
    lines = [
        ("model", f"{info['model']} ({precision['in_use']})"),
        ("file", f"{info['path']} ({info['origin']}, {info['size_bytes'] / 1e6:.1f} MB)"),
        ("sha256", info["sha256"]),
        ("model card", info["card"] or "none beside the model file"),
        ("labels", f"{', '.join(contract['labels'])}; input {height}x{width}; outputs {outputs}"),
        ("precision", precision["why"]),
    ]
    if precision["auto_on_this_cpu"] != precision["why"]:
        lines.append(("--precision auto on this cpu", precision["auto_on_this_cpu"]))
    lines += [
        ("cpu", f"{cpu['model']} ({cpu['arch']}; flags: {', '.join(cpu['flags']) or 'none relevant'})"),
        ("providers available", ", ".join(info["providers_available"])),
        (
            "self-check",
            check["in_words"].removeprefix("self-check ") if check else "none (the contract has no reference images)",
        ),
        ("the whole contract", "cxr-batch info --json"),
    ]
    return lines


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

from cxr_batch.cli.adapt import adapt_command  # noqa: E402

main.add_command(adapt_command)

from cxr_batch.cli.evaluate import evaluate_command  # noqa: E402

main.add_command(evaluate_command)
main.add_command(dicomweb_list_command)
main.add_command(report_command)
main.add_command(doctor_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
