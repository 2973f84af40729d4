"""What an exported model's contract records about the training run it came from.

The run's metrics (``metrics.json``), its training data and split counts, the recipe, the released
model it started from (``train --weights MODEL.onnx``), a recipe sweep's selection, and the
portable form of paths and command lines (no machine's layout reaches a shipped model).
Used by :mod:`cxr_batch.training.export`; reads files only, never runs a model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cxr_batch.errors import DataError
from cxr_batch.evaluation.evaluate import json_safe
from cxr_batch.io.labelled import Split
from cxr_batch.io.safe_open import read_json
from cxr_batch.training.onnx_file import read_contract_file


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of the run folder, through the one bounded opener (NaN allowed: metrics cells)."""
    try:
        doc = read_json(path, what=what, allow_nan=True)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: {what} is not a JSON object")
    return doc


def _read_metrics(run: Path) -> dict[str, Any]:
    p = run / "metrics.json"
    if not p.exists():
        return {}
    m = json_safe(_read_json(p, "the run's metrics.json"))  # per-source cells can be NaN: strict JSON in the contract
    return {
        k: m[k]
        for k in (
            "split",
            "n",
            "accuracy",
            "accuracy_ci95",
            "macro_f1",
            "ece",
            "per_class",
            "confusion_matrix",
            "best_epoch",
            "ci_method",
            "by_source",
        )
        if k in m
    }


def _training_data(config: dict[str, Any], split: Split | None, tcfg: dict[str, Any]) -> dict[str, Any]:
    dirs = tcfg.get("data_dirs") or [tcfg.get("data_dir", "")]
    names = list(config.get("sources") or {}) or [Path(str(d)).name for d in dirs]
    d: dict[str, Any] = {"source": " + ".join(names), "sources": names, "layout": config.get("layout")}
    if split is not None:
        parts: dict[str, dict[str, int]] = {}
        by_source: dict[str, dict[str, dict[str, int]]] = {}
        for _, label, s, _, src in split.rows:
            parts.setdefault(s, {}).setdefault(label, 0)
            parts[s][label] += 1
            cell = by_source.setdefault(src or names[0], {}).setdefault(s, {})
            cell[label] = cell.get(label, 0) + 1
        if len(by_source) > 1:
            d["split_counts_by_source"] = by_source
        d.update(
            {
                "files": len(split.rows),
                "split_counts": parts,
                "split_sha256": split.fingerprint(),
                "file_list_sha256": _file_list_hash(split),
            }
        )
    return d


def _file_list_hash(split: Split) -> str:
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(r[0] for r in split.rows):
        h.update((rel + "\n").encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _recipe(tcfg: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "image_size",
        "seed",
        "weights",
        "hflip",
        "patience",
        "augment",
        "epoch_images",
        "warmup",
    )
    weights = str(tcfg.get("weights") or "none")
    extra = {"crop": tcfg["crop"]} if tcfg.get("crop") else {}
    if tcfg.get("not_normal"):
        extra["not_normal"] = list(tcfg["not_normal"])
    balance = tcfg.get("balance") or "class"
    return (
        {k: tcfg.get(k) for k in keys if k in tcfg or k in keys[:9]}
        | {
            "weights": Path(weights).name if weights.endswith(".onnx") else weights,
            "optimizer": "AdamW + OneCycle",
            "sampling": "class-balanced" if balance == "class" else "class- and source-balanced",
        }
        | extra
    )


def _init_facts(tcfg: dict[str, Any]) -> dict[str, Any] | None:
    """The released model a run started from (``train --weights MODEL.onnx``), as the card names it."""
    weights = str(tcfg.get("weights") or "")
    if not weights.endswith(".onnx") or not Path(weights).is_file():
        return None
    from cxr_batch.contract import file_sha256

    _, start = read_contract_file(Path(weights))
    r = start.extra.get("recipe", {}) or {}
    how = "random initialisation" if str(r.get("weights", "none")) == "none" else f"`{r.get('weights')}` initialisation"
    td = start.training_data or {}
    return {
        "file": Path(weights).name,
        "model": start.ident,
        "sha256": file_sha256(Path(weights)),
        "origin": f"trained from {how} on the training split of `{td.get('source')}` "
        f"(split sha256 `{td.get('split_sha256')}`)",
    }


def _selection(path: str) -> dict[str, Any]:
    doc = _read_json(Path(path), "the selection file")
    chosen = doc.get("chosen")
    return {
        "chosen": chosen,
        "rule": doc.get("rule"),
        "command": portable_command(doc.get("command")),
        "cpu": doc.get("cpu"),
        "summary": doc.get("summary")
        or f"Each recipe was fine-tuned briefly and scored on the validation split, clean and stressed "
        f"(passed once through a fixed, seeded scanner-like degradation); rule: {doc.get('rule')}. Chosen: `{chosen}`.",
        "recipes": doc.get("recipes"),
    }


_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"]+")


def portable_path(path: str, base: str | None = None) -> str:
    """An absolute path as a shipped contract may hold it: relative to ``base`` (the current folder)
    when it lies under ``base`` or its parent (``../shared/data/x``), ``~/...`` under the home folder,
    else only its last component (``<...>/name``): no machine's layout reaches a shipped model."""
    base = os.path.abspath(base or os.getcwd())
    path = os.path.normpath(path)
    for root in (base, os.path.dirname(base)):
        if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
            return os.path.relpath(path, base)
    home = os.path.expanduser("~")
    if home not in ("/", "~") and path.startswith(home.rstrip("/") + "/"):
        return "~/" + os.path.relpath(path, home)
    return f"<...>/{os.path.basename(path)}"


def portable_command(command: Any, base: str | None = None) -> Any:
    """A recorded command line with every absolute path made portable (:func:`portable_path`);
    anything that is not a string is returned as is."""
    if not isinstance(command, str):
        return command
    return _ABS_PATH.sub(lambda m: portable_path(m.group(0), base), command)
