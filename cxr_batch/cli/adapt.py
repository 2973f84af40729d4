"""``cxr-batch adapt``: torch is imported inside the command body only."""

from __future__ import annotations

from pathlib import Path

import click

from cxr_batch.cli.options import library_errors


@click.command("adapt")
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The adapted model (.onnx)."
)
@click.option(
    "--model",
    "base",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The base fp32 model to adapt (default: the shipped model).",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A path,label CSV (paths relative to DATA_DIR) instead of class folders.",
)
@click.option("--name", help="The adapted model's name (default: <base name>-site).")
@click.option("--version", "model_version", help="Its version (default: <base version>+site.1).")
@click.option("--site", help="How the model card names the site (default: the data folders' names).")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: split.csv, checkpoint, test predictions, adapt.json (default: <out>-run beside the model).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out model and run folder.")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(1), help="At most this many epochs.")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--freeze",
    type=click.Choice(["layer2", "layer3", "layer4"]),
    default="layer4",
    show_default=True,
    help="Freeze the network up to and including this block (layer4: train the classifier only; chosen on "
    "the pool's validation part as the recipe that forgets least, README).",
)
@click.option(
    "--distill",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Weight of the distillation term (the base model's own outputs as a target; 0: none).",
)
@click.option(
    "--anchor-weight",
    type=click.FloatRange(min=0),
    help="Weight of the distillation on synthetic embeddings of every class of the base model (drawn from "
    "its OOD guard's class Gaussians; keeps classes you have no films of; 0: none). Default: the value "
    "chosen on the pool's validation part (README; recorded in the adapted model's contract).",
)
@click.option(
    "--anchors",
    type=click.IntRange(1),
    help="Synthetic embeddings drawn per class for --anchor-weight (default: chosen with it).",
)
@click.option(
    "--l2sp",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Pull of the trained weights to the base model's (L2-SP weight; 0: none).",
)
@click.option("--views", default=2, show_default=True, type=click.IntRange(1), help="Clean + augmented copies.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--int8/--no-int8", default=True, show_default=True, help="Also write NAME-int8.onnx when faithful.")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--limit-per-class", type=click.IntRange(1), hidden=True)
@library_errors
def adapt_command(
    data_dirs: tuple[Path, ...],
    out: Path,
    base: Path | None,
    labels_file: Path | None,
    name: str | None,
    model_version: str | None,
    site: str | None,
    run_dir: Path | None,
    overwrite: bool,
    epochs: int,
    patience: int,
    lr: float,
    freeze: str,
    distill: float,
    anchor_weight: float | None,
    anchors: int | None,
    l2sp: float,
    views: int,
    seed: int,
    int8: bool,
    threads: int | None,
    limit_per_class: int | None,
) -> None:
    """Adapt the model to your site's labelled films (needs the train extra).

    DATA_DIRS hold class folders (normal/, viral/, covid/: any subset of the model's classes), or
    pass --labels FILE. The films are split adapt/validation/test; the base model is fine-tuned on
    the adapt part (early layers frozen, its own outputs kept as a target so that classes you have
    no films of keep their behaviour), stopped on validation, exported, and both models are
    measured once on the test part.

    \b
    Example:
      cxr-batch adapt site-films/ --out export/site.onnx --site "St Elsewhere"
    """
    from cxr_batch.training.adapt import AdaptConfig, adapt_model

    chosen = {k: v for k, v in (("anchor_weight", anchor_weight), ("anchors", anchors)) if v is not None}
    cfg = AdaptConfig(
        data_dirs=tuple(str(d) for d in data_dirs),
        out=str(out),
        model=str(base) if base else None,
        labels_file=str(labels_file) if labels_file else None,
        name=name,
        version=model_version,
        site=site,
        run=str(run_dir) if run_dir else None,
        overwrite=overwrite,
        epochs=epochs,
        patience=patience,
        lr=lr,
        freeze=freeze,
        distill=distill,
        l2sp=l2sp,
        views=views,
        seed=seed,
        int8=int8,
        threads=threads,
        limit_per_class=limit_per_class,
        **chosen,  # type: ignore[arg-type]
    )
    adapt_model(cfg)
