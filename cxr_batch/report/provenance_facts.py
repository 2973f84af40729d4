"""The facts a provenance record states: when, which machine, which software, which model, which inputs.

What :mod:`cxr_batch.report.provenance_record` writes into each run of a record (and
``merge`` into its ``merge`` entry): the time (:func:`utc_now`) and the run id
(:func:`new_run_id`); the hash of the input list (:func:`input_list_sha256`,
:class:`InputListHash`, :data:`INPUT_HASH_METHOD`); the machine (:func:`cpu_facts`,
:func:`gpu_facts`, :func:`host_facts`) and the software (:func:`versions`); the model, its
preprocessing contract, its out-of-distribution guard and screening operating point
(:func:`model_facts`, :func:`preprocessing_facts`, :func:`ood_facts`, :func:`screening_facts`);
and the engine's settings (:func:`engine_settings`). Each is a plain dict or string, ready for JSON;
nothing here reads or writes a record.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cxr_batch import __version__
from cxr_batch.contract import ModelMeta, file_sha256

if TYPE_CHECKING:
    from cxr_batch.engine.types import Engine, EngineConfig

#: How :func:`input_list_sha256` hashes, recorded with the hash so it can be recomputed. Records
#: written before issue 24 name the earlier method, "sha256 of each path as UTF-8 (surrogateescape)
#: followed by a NUL byte, paths sorted by those bytes", which needs every path in memory at once.
INPUT_HASH_METHOD = (
    "sum modulo 2**256 of the sha256 of each path as UTF-8 (surrogateescape), as 64 hex digits "
    "(independent of the order, computed streaming)"
)


# ---- time, run id, inputs


def utc_now(when: datetime | None = None) -> str:
    """``when`` (default now) in UTC, ISO 8601 with milliseconds and a ``Z``."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A time-sortable run id: a UUID version 7 (48-bit Unix milliseconds, then 74 random bits)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


class InputListHash:
    """:data:`INPUT_HASH_METHOD`, one path at a time: constant memory for any number of inputs."""

    def __init__(self) -> None:
        self.count = 0
        self._sum = 0

    def add(self, path: str) -> None:
        import hashlib

        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
        self._sum = (self._sum + int.from_bytes(digest, "big")) & ((1 << 256) - 1)
        self.count += 1

    def hexdigest(self) -> str:
        return f"{self._sum:064x}"


def input_list_sha256(paths: Iterable[str]) -> str:
    """The input-list hash of ``paths`` (see :data:`INPUT_HASH_METHOD`).

    ``paths`` are the report's ``path`` values (or, for other sources, whatever names each input
    in the report). The sum of the paths' sha256 does not depend on their order, so it is
    computed as they stream by (the walk never holds the list: issue 24).
    """
    h = InputListHash()
    for path in paths:
        h.add(path)
    return h.hexdigest()


# ---- the machine


def cpu_facts() -> dict[str, Any]:
    """The CPU: model, inference-relevant ISA flags (:mod:`cxr_batch.engine.cpu`, read once),
    architecture, the logical CPUs this process may use, physical cores."""
    from cxr_batch.engine.cpu import cpu_facts as host
    from cxr_batch.engine.cpu import physical_cores, usable_cpus

    facts = host()
    return {
        "model": facts.model or platform.processor() or None,
        "isa_flags": list(facts.flags),
        "architecture": facts.arch or platform.machine() or None,
        "usable_cpus": usable_cpus(),
        "physical_cores": physical_cores(),
    }


def gpu_facts() -> list[dict[str, Any]] | None:
    """The NVIDIA GPUs ``nvidia-smi`` lists (name, driver, memory); None when it can't be asked."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    gpus: list[dict[str, Any]] = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 4:
            memory = int(cells[3]) if cells[3].isdigit() else None
            gpus.append({"index": int(cells[0]) if cells[0].isdigit() else None, "name": cells[1],
                         "driver": cells[2], "memory_mib": memory})  # fmt: skip
    return gpus or None


def versions() -> dict[str, str | None]:
    """cxr-batch, onnxruntime, Python, numpy, Pillow, and pydicom when this run imported it."""
    import numpy
    import onnxruntime
    import PIL

    found: dict[str, str | None] = {
        "cxr_batch": __version__,
        "onnxruntime": str(onnxruntime.__version__),
        "python": platform.python_version(),
        "numpy": str(numpy.__version__),
        "pillow": str(PIL.__version__),
    }
    pydicom = sys.modules.get("pydicom")
    if pydicom is not None:
        found["pydicom"] = str(getattr(pydicom, "__version__", None))
    return found


def host_facts() -> dict[str, Any]:
    return {"hostname": socket.gethostname() or None, "platform": platform.platform(), "pid": os.getpid()}


# ---- the model


def model_facts(
    meta: ModelMeta, path: str | os.PathLike[str], origin: str | None = None, *, sha256: bool | str = True
) -> dict[str, Any]:
    """The model's identity: name, version, precision, the sha256 of the file, where it came from.

    ``sha256``: the file's digest when the caller has it (an engine's ``model_sha256``: the file
    is hashed once per run, in the background from the load on); True hashes the file here; False
    records none.
    """
    if sha256 is True:
        sha256 = file_sha256(path)
    return {
        "name": meta.name,
        "version": meta.version,
        "ident": meta.ident,
        "precision": meta.precision,
        "sha256": sha256 or None,
        "path": os.fspath(path),
        "origin": origin,
        "created": meta.created,
        "contract_version": meta.contract_version,
        "labels": list(meta.labels),
    }


def preprocessing_facts(meta: ModelMeta) -> dict[str, Any]:
    """The preprocessing contract the images went through (from the model's contract)."""
    return {
        "input_size": list(meta.input_size),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "steps": dict(meta.preprocessing),
    }


def ood_facts(meta: ModelMeta) -> dict[str, Any] | None:
    """The out-of-distribution guard's threshold and method; None for a model without one."""
    ood = meta.ood
    if not ood:
        return None
    return {
        "threshold": meta.ood_threshold,
        "method": ood.get("method"),
        "output": ood.get("output"),
        "calibration": ood.get("calibration"),
    }


def screening_facts(meta: ModelMeta, in_use: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The screening call behind ``covid_screen``: the threshold in use, where it came from
    (``model contract`` or ``--covid-threshold``) and the model's own operating point."""
    own = meta.screening
    if in_use is None and own is None:
        return None
    return {
        "label": (in_use or {}).get("label") or (own.label if own else None),
        "threshold": (in_use or {}).get("threshold"),
        "source": (in_use or {}).get("source"),
        "model_threshold": own.threshold if own else None,
        "model_target_sensitivity": own.target_sensitivity if own else None,
    }


# ---- the engine


def engine_settings(classifier: Engine, engine: EngineConfig) -> dict[str, Any]:
    """The settings part of a run: what the engine really runs with (its ``run_settings``: the batch
    size that really runs, streams, threads; Ray: the CPUs per actor), the device, precision and
    threads asked for, and the engine (``local`` or ``ray``)."""
    settings: dict[str, Any] = {"batch_size": engine.batch_size, "threads_requested": engine.threads}
    settings.update(classifier.run_settings())
    settings.update(device=engine.device, engine=classifier.kind, precision_requested=engine.precision)
    return settings
