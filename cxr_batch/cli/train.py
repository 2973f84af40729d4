"""``cxr-batch train`` and ``cxr-batch export``: torch is imported inside the command bodies only."""

from __future__ import annotations

from pathlib import Path

import click

from cxr_batch.cli.options import library_errors
from cxr_batch.contract import INT8_MAX_F1_DROP, INT8_MIN_AGREEMENT, SCREEN_SENSITIVITY
from cxr_batch.engine.types import DEVICES  # no numpy, no onnxruntime
from cxr_batch.text import shown


@click.command("train")
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: checkpoints, split.csv, config.json, history.json, metrics.json.",
)
@click.option("--classes", help="Comma-separated classes to use, in model order (default: all; database order).")
@click.option(
    "--split",
    "split_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Reuse a split.csv (path,label,split) instead of drawing a new one.",
)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--lr",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate of the one-cycle schedule (AdamW).",
)
@click.option("--weight-decay", default=0.05, show_default=True, type=click.FloatRange(min=0))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Decode threads for the image cache (0: one per core).",
)
@click.option(
    "--weights",
    default="none",
    show_default=True,
    help="Initial weights: 'imagenet' (torchvision download/cache), 'none' (random), a state-dict file, "
    "or a cxr-batch fp32 .onnx model to continue from.",
)
@click.option(
    "--augment",
    type=click.Choice(["light", "scanner"]),
    default="light",
    show_default=True,
    help="light: affine + brightness/contrast; scanner: also resolution loss, JPEG, gamma, noise, stronger crops.",
)
@click.option(
    "--balance",
    type=click.Choice(["class", "class+source"]),
    default="class",
    show_default=True,
    help="Draw each class equally often; class+source also each data root equally often within a class.",
)
@click.option(
    "--epoch-images", type=click.IntRange(1), help="Images drawn per epoch (default: the training split's size)."
)
@click.option("--warmup", default=0.15, show_default=True, type=click.FloatRange(0, 1), help="One-cycle warm-up share.")
@click.option(
    "--label-map",
    "label_map",
    multiple=True,
    metavar="VALUE=CLASS",
    help="For labels-file roots: read the label VALUE as CLASS (repeatable). Values that are no class "
    "after this and the usual aliases are left out and counted.",
)
@click.option(
    "--holdout-source",
    metavar="NAME",
    help="Keep this source (a data root's name) out of training and validate on its train and val rows: "
    "a hospital the model has never seen. Its test rows stay test.",
)
@click.option(
    "--not-normal",
    "not_normal",
    metavar="LABEL",
    multiple=True,
    help="Train the films a labels file gives this label, which is no class (e.g. tuberculosis), as "
    "'not normal': P(normal) is trained down, no class is added. Each source's are drawn as often as its "
    "normal films, so a hospital's identity does not say normal. Never the --holdout-source's. Repeatable.",
)
@click.option(
    "--crop",
    type=click.Choice(["none", "lungs"]),
    default="none",
    show_default=True,
    help="lungs: train on the lung crop of every film (the embedded lung segmenter finds it); the "
    "contract records it and classify crops the same way.",
)
@click.option(
    "--test-report/--no-test-report",
    default=True,
    show_default=True,
    help="Measure the best checkpoint on the test split at the end. Recipe comparisons: --no-test-report, "
    "choose on validation (history.json), then measure only the chosen run (cxr-batch evaluate).",
)
@click.option("--hflip/--no-hflip", default=False, show_default=True, help="Random horizontal flips.")
@click.option(
    "--patience",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Stop after this many epochs without validation improvement.",
)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the stopped run in --out from its last checkpoint.")
@library_errors
def train_command(
    data_dirs: tuple[Path, ...],
    out: Path,
    classes: str | None,
    split_file: Path | None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    image_size: int,
    seed: int,
    device: str,
    workers: int,
    weights: str,
    hflip: bool,
    augment: str,
    balance: str,
    epoch_images: int | None,
    warmup: float,
    label_map: tuple[str, ...],
    holdout_source: str | None,
    not_normal: tuple[str, ...],
    crop: str,
    test_report: bool,
    patience: int,
    threads: int | None,
    resume: bool,
) -> None:
    """Fine-tune a ResNet-18 on class folders of chest X-rays (needs the train extra).

    Several DATA_DIRS are merged into one class list; each is a source: split.csv records it, the
    split is stratified by source and class, and the test report breaks every metric down by source.
    A later DATA_DIR may be a labels file (CSV with path or file, and label or source_label columns;
    paths relative to its folder; the source is named after that folder): rows whose label is no
    class (e.g. tuberculosis) are left out.

    \b
    Example:
      cxr-batch train ../data/COVID-19_Radiography_Dataset --out runs/r18 --epochs 20
      cxr-batch train ../shared/data/covid19-radiography ../shared/data/kermany-normal --out runs/r18-2src
      cxr-batch train ../shared/data/covid19-radiography ../shared/data/kermany-normal \\
        ../shared/data/lung-masks/shenzhen/SOURCES.csv ../shared/data/lung-masks/montgomery/SOURCES.csv \\
        --holdout-source montgomery --out runs/r18-4src
    """
    from cxr_batch.errors import CxrBatchError
    from cxr_batch.training.train import TrainConfig, train_model

    pairs = []
    for item in label_map:
        value, sep, cls = item.rpartition("=")
        if not sep or not value.strip() or not cls.strip():
            raise CxrBatchError(f"--label-map {item!r}: expected VALUE=CLASS, e.g. 'viral pneumonia (pediatric)=viral'")
        pairs.append((value.strip(), cls.strip()))

    cfg = TrainConfig(
        data_dirs=tuple(str(d) for d in data_dirs),
        out=str(out),
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None,
        split=str(split_file) if split_file else None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        image_size=image_size,
        seed=seed,
        device=device,
        workers=workers,
        weights=weights,
        hflip=hflip,
        augment=augment,
        balance=balance,
        epoch_images=epoch_images,
        warmup=warmup,
        label_map=tuple(pairs),
        holdout_source=holdout_source,
        not_normal=tuple(not_normal),
        crop=None if crop == "none" else crop,
        patience=patience,
        threads=threads,
    )
    train_model(cfg, resume=resume, report_test=test_report)
    click.echo(
        f"run folder: {shown(out)} (best.ckpt, last.ckpt, split.csv, config.json, history.json, metrics.json); "
        f"export the best checkpoint with: cxr-batch export {shown(out / 'best.ckpt')}",
        err=True,
    )


@click.command("export")
@click.argument("checkpoint", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="ONNX file to write (default: export/<run name>.onnx).",
)
@click.option(
    "--name",
    default="cxr-resnet18-custom",
    show_default=True,
    help="Model name in the contract (your own model's, not the released model's).",
)
@click.option(
    "--version", "model_version", default="0.0.0+local", show_default=True, help="Model version in the contract."
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Also write NAME-int8.onnx (static QDQ, U8S8 with 7-bit weights: right with and without VNNI).",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Also write NAME-fp16.onnx, the model classify prefers on CUDA (float16 inside, float32 input and outputs).",
)
@click.option("--calibration-images", default=300, show_default=True, type=click.IntRange(1))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The run's data folder, if it moved since training.",
)
@click.option(
    "--split",
    "split_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With an .onnx CHECKPOINT: the split.csv to calibrate and test the int8 model on.",
)
@click.option(
    "--force",
    is_flag=True,
    help=f"Write the int8 model even if it loses more than {100 * INT8_MAX_F1_DROP:.1f} macro-F1 points or agrees "
    f"with fp32 on under {100 * INT8_MIN_AGREEMENT:.1f}%.",
)
@click.option(
    "--selection",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A recipe comparison's JSON (benchmarks/augment_sweep.py or recipe_compare.py) to record how the recipe was chosen.",
)
@click.option(
    "--ood/--no-ood",
    default=True,
    show_default=True,
    help="Fit the out-of-distribution guard on the run's training images (needs the data).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (otherwise refused).")
@click.option(
    "--int8-scheme",
    type=click.Choice(["7bit", "7bit-ends", "7bit-ends-percentile", "8bit-ends", "8bit-ends-percentile"]),
    default="7bit",
    show_default=True,
    help="How --quantize int8 quantises: 7- or 8-bit weights, 'ends': first conv and fc kept in fp32, "
    "'percentile': activation ranges clipped at the 99.999th percentile (benchmarks/int8_schemes.py).",
)
@click.option("--note", "notes", multiple=True, help="A line for the model card's recipe section (repeatable).")
@click.option(
    "--ood-fit-images",
    type=click.IntRange(100),
    help="Fit the OOD guard on a seeded sample of this many training images (default: all; a CPU budget).",
)
@click.option(
    "--screen-sensitivity",
    type=click.FloatRange(0.5, 1.0),
    default=SCREEN_SENSITIVITY,
    show_default=True,
    help="The screening operating point: the highest P(covid) threshold whose sensitivity on the run's "
    "validation images reaches this.",
)
@click.option(
    "--screen-holdout-specificity",
    type=click.FloatRange(0.5, 1.0),
    default=None,
    help="Raise that sensitivity target (0.95, 0.97, 0.98, 0.99) as far as the run's held-out source "
    "(train --holdout-source) keeps this specificity on its validation normals: a lower threshold for "
    "a new hospital's COVID-19 films, priced on a hospital the model never saw.",
)
@library_errors
def export_command(
    checkpoint: Path | None,
    out: Path | None,
    name: str,
    model_version: str,
    quantize: str | None,
    fp16: bool,
    calibration_images: int,
    data_dir: Path | None,
    split_file: Path | None,
    force: bool,
    ood: bool,
    selection: Path | None,
    overwrite: bool,
    int8_scheme: str,
    notes: tuple[str, ...],
    ood_fit_images: int | None,
    screen_sensitivity: float,
    screen_holdout_specificity: float | None,
) -> None:
    """Export a checkpoint to ONNX with the model contract and a model card (needs the train extra).

    With no CHECKPOINT, exports the best checkpoint of the most recent run under runs/.
    With an exported fp32 .onnx instead of a checkpoint (the master copy), --ood fits the
    out-of-distribution guard into it and --quantize int8 derives the int8 model from it;
    both need --data and --split.

    \b
    Example:
      cxr-batch export runs/r18/best.ckpt --out export/cxr-resnet18.onnx --quantize int8
    """
    from cxr_batch.training.export import ExportConfig, derive_from_master, export_checkpoint, latest_checkpoint

    if checkpoint is not None and checkpoint.suffix == ".onnx":
        if data_dir is None or split_file is None:
            raise click.UsageError("an .onnx input needs --data DIR and --split FILE")
        from rich.console import Console

        from cxr_batch.io.labelled import Split

        cfg = ExportConfig(
            checkpoint=str(checkpoint),
            out=str(checkpoint),
            quantize=quantize,
            calibration_images=calibration_images,
            force=force,
            ood=ood,
            fp16=fp16,
            int8_scheme=int8_scheme,
            ood_fit_images=ood_fit_images,
            screen_sensitivity=screen_sensitivity,
            screen_holdout_specificity=screen_holdout_specificity,
        )
        derive_from_master(checkpoint, data_dir, Split.read(split_file), cfg, Console(stderr=True))
        return
    ckpt = checkpoint or latest_checkpoint()
    target = out or Path("export") / f"{ckpt.parent.name}.onnx"
    cfg = ExportConfig(
        checkpoint=str(ckpt),
        out=str(target),
        name=name,
        version=model_version,
        quantize=quantize,
        calibration_images=calibration_images,
        force=force,
        data_dir=str(data_dir) if data_dir else None,
        ood=ood,
        fp16=fp16,
        selection=str(selection) if selection else None,
        overwrite=overwrite,
        int8_scheme=int8_scheme,
        notes=notes,
        ood_fit_images=ood_fit_images,
        screen_sensitivity=screen_sensitivity,
        screen_holdout_specificity=screen_holdout_specificity,
    )
    export_checkpoint(cfg)


@click.command("add-cam")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.argument("out", required=False, type=click.Path(dir_okay=False, path_type=str))
@library_errors
def add_cam_command(model: str, out: str | None) -> None:
    """Add the 'cam' output (heatmaps) to a model file, in place or into OUT (needs the train extra).

    No retraining: the class activation maps are computed in the graph from the model's own weights.

    \b
    Example:
      cxr-batch add-cam my-model.onnx && cxr-batch classify studies --heatmaps maps --model my-model.onnx
    """
    from cxr_batch.training.cam import add_cam_to_file

    written = add_cam_to_file(model, out)
    click.echo(f"{written}: has the 'cam' output (heatmaps: cxr-batch classify ... --heatmaps DIR --model {written})")


@click.command("train-lungs")
@click.argument("mask_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: config.json, split.csv, history.json, metrics.json, last.pt, best.pt.",
)
@click.option("--epochs", default=25, show_default=True, type=click.IntRange(1))
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(32))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the stopped run in --out from its last checkpoint.")
@library_errors
def train_lungs_command(
    mask_dirs: tuple[Path, ...], out: Path, epochs: int, image_size: int, seed: int, threads: int | None, resume: bool
) -> None:
    """Train the lung-field segmenter (a small U-Net) on MASK_DIRS (needs the train extra).

    Each folder holds images/NAME.png and masks/NAME.png (0 background, 255 lung) and is a source;
    a seeded validation part is drawn from each. Train only on masks whose licence allows what you
    ship (the Shenzhen masks are non-commercial: validate on them instead, with export-lungs --unseen).

    \b
    Example:
      cxr-batch train-lungs ../shared/data/lung-masks/montgomery \\
          ../shared/data/lung-masks/covid19-radiography-viral --out runs/lungs --threads 2
    """
    from cxr_batch.training.lungs import LungTrainConfig, train_lungs

    cfg = LungTrainConfig(
        mask_dirs=tuple(str(d) for d in mask_dirs),
        out=str(out),
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        threads=threads,
    )
    train_lungs(cfg, resume=resume)


@click.command("export-lungs")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option(
    "--unseen",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A mask folder the segmenter never saw: its Dice on every pair goes into the contract (repeatable).",
)
@click.option("--run-files", type=click.Path(file_okay=False, path_type=Path), help="Copy the run's small files here.")
@library_errors
def export_lungs_command(run: Path, out: Path, version: str, unseen: tuple[Path, ...], run_files: Path | None) -> None:
    """Export a train-lungs run to ONNX with the lung-segmenter contract (needs the train extra).

    \b
    Example:
      cxr-batch export-lungs runs/lungs --out export/cxr-lungs.onnx \\
          --unseen ../shared/data/lung-masks/shenzhen --run-files export/run-lungs-1.0.0
    """
    from cxr_batch.training.lungs import LungExportConfig, export_lungs

    export_lungs(
        LungExportConfig(
            run=str(run),
            out=str(out),
            version=version,
            unseen=tuple(str(u) for u in unseen),
            run_files=None if run_files is None else str(run_files),
        )
    )
