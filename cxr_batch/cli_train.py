"""``cxr-batch train`` and ``cxr-batch export``: torch is imported inside the commands only."""

from __future__ import annotations

import click


@click.command("train")
def train_command() -> None:
    """Fine-tune a ResNet-18 on class folders of chest X-rays (needs the train extra)."""
    raise click.ClickException("not implemented yet")


@click.command("export")
def export_command() -> None:
    """Export a checkpoint to ONNX with the model contract (needs the train extra)."""
    raise click.ClickException("not implemented yet")
