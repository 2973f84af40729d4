"""Which model file runs and how it is loaded: the embedded defaults and ``--precision auto``,
``--model``/``$CXR_BATCH_MODEL``, the contract read and checked, the int8 export gate, the load-time
self-check with its fallback to fp32, the screening call, and ``cxr-batch info``'s facts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_batch.contract import (
    SCREEN_LABEL,
    FileDigest,
    ModelMeta,
    check_output_shapes,
    file_sha256,
    int8_gate_verdict,
    read_contract,
)
from cxr_batch.engine.cpu import cpu_facts, int8_choice
from cxr_batch.engine.selfcheck import CheckResult, run_self_check
from cxr_batch.engine.session import CPU, CUDA, available_providers, create_session, cuda_possible
from cxr_batch.engine.types import Device, EngineConfig, Precision
from cxr_batch.errors import ModelError, NoDefaultModelError

if TYPE_CHECKING:
    import onnxruntime as ort

#: The environment variable that names a model when ``--model`` is not given.
MODEL_ENV = "CXR_BATCH_MODEL"
#: The embedded default models (``export/`` in the source tree, ``cxr_batch.models`` installed).
DEFAULT_MODEL_FILES = {"fp32": "cxr-resnet18.onnx", "int8": "cxr-resnet18-int8.onnx", "fp16": "cxr-resnet18-fp16.onnx"}
#: What ``--precision auto`` takes, first installed wins: int8 runs 3x faster than fp32 on CPUs
#: with 8-bit dot products (VNNI, AMX, ARM dot product; :func:`cxr_batch.engine.cpu.int8_choice`),
#: fp32 is as fast and exact on the others; fp16 uses the GPU's tensor cores; fp16 on a CPU is
#: emulated, so it comes last there. See :func:`auto_order`.
AUTO_ORDER = {
    "cpu": ("int8", "fp32", "fp16"),
    "cpu-no-int8": ("fp32", "int8", "fp16"),
    "cuda": ("fp16", "fp32", "int8"),
}


# --------------------------------------------------------------------------- model resolution


@dataclass(frozen=True)
class ModelChoice:
    """Which model file to load, and why."""

    path: Path
    #: "--model", "$CXR_BATCH_MODEL" or "embedded default"
    origin: str


def default_model_dirs() -> list[Path]:
    """Where the embedded default models may be: the installed ``cxr_batch.models`` package,
    then ``<repo>/export/`` when running from a source tree."""
    return package_model_dirs()


def package_model_dirs() -> list[Path]:
    """:func:`default_model_dirs`' answer, for the lung segmenter too (tests replace the former only)."""
    dirs: list[Path] = []
    try:
        from importlib.resources import files

        found = files("cxr_batch.models")
        if isinstance(found, Path):
            dirs.append(found)
        else:  # a MultiplexedPath (namespace package) or a zip; only real folders can be used
            with contextlib.suppress(Exception):
                candidate = Path(str(found))
                if candidate.is_dir():
                    dirs.append(candidate)
    except ModuleNotFoundError:
        pass
    source_tree = Path(__file__).resolve().parents[2] / "export"  # cxr_batch/engine/ -> the repository
    if source_tree.is_dir():
        dirs.append(source_tree)
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def auto_order(cuda: bool = False) -> tuple[str, ...]:
    """The precisions ``--precision auto`` tries, first installed wins: fp16 first on CUDA; on a
    CPU int8 first only when the CPU has 8-bit dot products (:func:`~cxr_batch.engine.cpu.int8_choice`)."""
    if cuda:
        return AUTO_ORDER["cuda"]
    return AUTO_ORDER["cpu"] if int8_choice()[0] else AUTO_ORDER["cpu-no-int8"]


def find_default_model(precision: Precision = "auto", cuda: bool = False) -> Path:
    """The embedded default model file for ``precision``.

    ``auto`` takes the fp16 model on CUDA when it is installed; on a CPU the int8 model when the
    CPU has 8-bit dot products (VNNI, AMX, ARM dot product) and it is installed; the fp32 master
    otherwise (see :func:`auto_order`).

    Raises:
        NoDefaultModelError: no default model is installed (or not the precision asked for).
    """
    for folder in default_model_dirs():
        files = {p: folder / name for p, name in DEFAULT_MODEL_FILES.items()}
        have = [p for p, f in files.items() if f.is_file()]
        if not have:
            continue
        if precision == "auto":
            return files[next(p for p in auto_order(cuda) if p in have)]
        if precision in have:
            return files[precision]
        raise NoDefaultModelError(
            f"the embedded {precision} model ({DEFAULT_MODEL_FILES[precision]}) is not installed in {folder}; "
            "use --precision auto, or pass a model with --model PATH"
        )
    raise NoDefaultModelError(
        "no model given and no default model is installed: pass --model PATH (an ONNX model with the "
        f"cxr-batch contract) or set {MODEL_ENV}=PATH. This build of cxr-batch ships without "
        f"{DEFAULT_MODEL_FILES['fp32']}; 'cxr-batch export' creates one."
    )


def choose_model(
    model: str | os.PathLike[str] | None, precision: Precision = "auto", cuda: bool = False
) -> ModelChoice:
    """``model``, else ``$CXR_BATCH_MODEL``, else the embedded default.

    Raises:
        ModelError: the named file does not exist.
        NoDefaultModelError: nothing named and no default installed.
    """
    if model is not None:
        path, origin = Path(model), "--model"
    elif os.environ.get(MODEL_ENV):
        path, origin = Path(os.environ[MODEL_ENV]), f"${MODEL_ENV}"
    else:
        return ModelChoice(find_default_model(precision, cuda), "embedded default")
    if not path.exists():
        raise ModelError(f"model file not found: {path} (from {origin})")
    if path.is_dir():
        raise ModelError(f"{path} (from {origin}) is a folder; pass the .onnx file")
    return ModelChoice(path, origin)


@dataclass
class LoadedModel:
    """A validated model, ready to run."""

    session: ort.InferenceSession
    meta: ModelMeta
    path: Path
    origin: str
    provider: str
    #: the precision in use and why (``fp32: AMD EPYC has no VNNI ...``)
    reason: str = ""
    #: what the user must be told once (a fallback to fp32)
    notices: tuple[str, ...] = ()
    #: the load-time self-check (None: the contract has no reference images)
    check: CheckResult | None = None
    #: the file's sha256, computed once (started in the background when the file was chosen)
    digest: FileDigest | None = None

    def sha256(self) -> str:
        """The model file's sha256 (hashed once, whoever asks first; see :func:`model_sha256`)."""
        if self.digest is None:
            self.digest = FileDigest(self.path)
        return model_sha256(self.digest)


def model_sha256(digest: FileDigest) -> str:
    """A model file's sha256 from its one :class:`~cxr_batch.contract.FileDigest`.

    Raises:
        ModelError: the file can't be read any more.
    """
    try:
        return digest.hexdigest()
    except OSError as exc:
        raise ModelError(f"cannot read the model file {digest.path} to hash it: {exc.strerror or exc}") from None


def screening_in_use(meta: ModelMeta, covid_threshold: float | None, source: str = "model") -> dict[str, Any] | None:
    """The screening call the ``covid_screen`` column makes: ``--covid-threshold`` when given, else
    the contract's operating point; ``{"label", "threshold", "source"}``, or None (no call).

    Raises:
        ModelError: ``--covid-threshold`` with a model that has no ``covid`` label.
    """
    if covid_threshold is not None:
        if SCREEN_LABEL not in meta.labels:
            raise ModelError(
                f"{source}: --covid-threshold needs a model with a '{SCREEN_LABEL}' label (it has {list(meta.labels)})"
            )
        return {"label": SCREEN_LABEL, "threshold": float(covid_threshold), "source": "--covid-threshold"}
    if meta.screening is not None and meta.screening.label == SCREEN_LABEL:
        return {"label": SCREEN_LABEL, "threshold": meta.screening.threshold, "source": "model contract"}
    return None


def precision_reason(meta: ModelMeta, origin: str, precision: Precision, provider: str) -> str:
    """Why this model's precision is the one in use, in one line."""
    if origin != "embedded default":
        return f"{meta.precision}: the file's own (from {origin})"
    if precision != "auto":
        return f"{meta.precision}: --precision {precision}"
    if provider == CUDA:
        return f"{meta.precision}: on CUDA" + (
            " (the GPU's tensor cores)" if meta.precision == "fp16" else ", no fp16 model installed"
        )
    use_int8, why = int8_choice()
    if (meta.precision == "int8") == use_int8:
        return why
    return f"{meta.precision}: the {'int8' if use_int8 else 'fp32'} model is not installed; " + why.split(": ", 1)[1]


def open_model(
    config: EngineConfig, session_device: Device | None = None, cuda: bool | None = None, *, hash_model: bool = True
) -> LoadedModel:
    """Resolve, load and validate the model ``config`` names, then run its self-check
    (:func:`apply_self_check`): what ``classify``, ``evaluate`` and the Ray driver share.

    Args:
        session_device: the device of the session made here (default ``config.device``).
        cuda: whether to choose the model CUDA prefers (default: CUDA is possible here).
        hash_model: start hashing the chosen file in a background thread, overlapping the rest of
            the load (:attr:`LoadedModel.digest`); False hashes it only if someone asks (a Ray actor never does).

    Raises:
        ModelError, NoDefaultModelError: see :func:`choose_model` and :func:`read_contract`;
            also a failed self-check that can't fall back.
        DeviceError: see :func:`create_session`.
    """
    device = config.device if session_device is None else session_device
    for_cuda = cuda_possible(config.device) if cuda is None else cuda
    choice = choose_model(config.model, config.precision, cuda=for_cuda)
    session, provider = create_session(choice.path, device, config.threads)
    if (
        choice.origin == "embedded default"
        and config.precision == "auto"
        and provider != CUDA
        and for_cuda
        and device != "cpu"
    ):
        # CUDA was expected but did not start: take the CPU's default instead.
        on_cpu = find_default_model("auto", cuda=False)
        if on_cpu != choice.path:
            choice = ModelChoice(on_cpu, choice.origin)
            session, provider = create_session(choice.path, device, config.threads)
    meta = read_contract(session, str(choice.path))
    if choice.origin != "embedded default" and config.precision != "auto" and meta.precision != config.precision:
        raise ModelError(
            f"{choice.path} is a {meta.precision} model but --precision {config.precision} was asked; "
            "--precision picks between the embedded default models, so leave it at auto with --model"
        )
    reason_provider = CUDA if (cuda is not None and cuda) else provider
    gate_reason = ""
    if choice.origin == "embedded default" and config.precision == "auto" and meta.precision == "int8":
        passed, why = int8_gate_verdict(meta)
        if not passed:  # the int8 file is not as faithful as fp32: auto takes the fp32 master
            with contextlib.suppress(NoDefaultModelError):
                fp32 = find_default_model("fp32")
                if fp32 != choice.path:
                    choice = ModelChoice(fp32, choice.origin)
                    session, provider = create_session(choice.path, device, config.threads)
                    meta = read_contract(session, str(choice.path))
                    gate_reason = f"fp32: the int8 model did not pass the export gate ({why}) (--precision auto)"
    loaded = LoadedModel(
        session=session,
        meta=meta,
        path=choice.path,
        origin=choice.origin,
        provider=provider,
        reason=gate_reason or precision_reason(meta, choice.origin, config.precision, reason_provider),
        # the file is chosen: hash it while the self-check, the output check and the segmenter load
        digest=FileDigest(choice.path).start() if hash_model else FileDigest(choice.path),
    )
    return apply_self_check(loaded, config, device, hash_model=hash_model)


def apply_self_check(
    loaded: LoadedModel, config: EngineConfig, device: Device | None = None, *, hash_model: bool = True
) -> LoadedModel:
    """Run the contract's reference images (:mod:`cxr_batch.engine.selfcheck`) and act on the result.

    Passed, or a contract without references: ``loaded``, with the result. Failed: under
    ``--precision auto`` with the embedded default, the embedded fp32 model instead (when it
    passes), with a notice for the user; otherwise (``--precision int8``/``fp16`` asked,
    ``--model`` or ``$CXR_BATCH_MODEL``, or fp32 failing itself) a ModelError naming the
    deviation and the way out.
    """
    check = run_self_check(loaded.session, loaded.meta)
    loaded = replace(loaded, check=check)
    if check is None or check.ok:
        return loaded
    precision = loaded.meta.precision
    if loaded.origin == "embedded default" and config.precision == "auto" and precision != "fp32":
        with contextlib.suppress(NoDefaultModelError):
            fp32 = find_default_model("fp32")
            if fp32 != loaded.path:
                session, provider = create_session(fp32, config.device if device is None else device, config.threads)
                meta = read_contract(session, str(fp32))
                fp32_check = run_self_check(session, meta)
                if fp32_check is None or fp32_check.ok:
                    notice = (
                        f"the {precision} model {loaded.path.name} gives wrong results on this machine "
                        f"({check.describe()}); using the fp32 model {fp32.name} instead"
                    )
                    return LoadedModel(
                        session=session,
                        meta=meta,
                        path=fp32,
                        origin=loaded.origin,
                        provider=provider,
                        reason=f"fp32: the {precision} model failed its self-check here (--precision auto)",
                        notices=(*loaded.notices, notice),
                        check=fp32_check,
                        digest=FileDigest(fp32).start() if hash_model else FileDigest(fp32),
                    )
    if precision == "fp32":
        way_out = "the file is damaged or was changed after export: reinstall it or export it again"
    else:
        way_out = (
            f"run with --precision fp32 (the embedded fp32 model), or pass the fp32 master with --model; "
            f"{precision} kernels of this CPU or onnxruntime build don't compute it as exported, or the file is damaged"
        )
    raise ModelError(
        f"{loaded.path}: the {precision} model gives wrong results on this machine: {check.describe()}. {way_out}"
    )


def load_model(config: EngineConfig, *, hash_model: bool = True) -> LoadedModel:
    """Resolve, load, validate and self-check the model ``config`` names (see :func:`open_model`),
    with the extra outputs ``config`` asks for.

    Raises:
        ModelError, NoDefaultModelError: see :func:`choose_model` and :func:`read_contract`.
        DeviceError: see :func:`create_session`.
    """
    loaded = open_model(config, hash_model=hash_model)
    meta, path = loaded.meta, loaded.path
    for role in config.extra_outputs:
        if role not in meta.outputs:
            hint = (
                ", so it can't make heatmaps (it still classifies without --heatmaps). Add the output to the "
                "model file, no retraining needed (needs the train extra): cxr-batch add-cam MODEL.onnx"
                if role == "cam"
                else ""
            )
            raise ModelError(f"{path}: the model has no '{role}' output (it has {sorted(meta.outputs)}){hint}")
    check_output_shapes(loaded.session, meta, config.extra_outputs, str(path))  # one tiny run (issue 12)
    return loaded


def model_info(model: str | os.PathLike[str] | None = None, precision: Precision = "auto") -> dict[str, Any]:
    """What ``cxr-batch info`` prints: the contract, sha256, graph inputs/outputs, providers, the
    CPU and the precision ``auto`` takes on it, and the model's self-check run here (reported, not
    enforced: ``classify`` and ``evaluate`` act on it).

    Raises:
        ModelError, NoDefaultModelError: the model can't be found, loaded or validated.
    """
    choice = choose_model(model, precision)
    session, _ = create_session(choice.path, "cpu", threads=0)
    meta = read_contract(session, str(choice.path))
    check = run_self_check(session, meta)

    def shape(s: Sequence[object]) -> list[object]:
        return [d if isinstance(d, int) else str(d) for d in s]

    return {
        "path": str(choice.path),
        "origin": choice.origin,
        "sha256": file_sha256(choice.path),
        "size_bytes": choice.path.stat().st_size,
        "model": meta.ident,
        "card": model_card(choice.path, meta),
        "contract": meta_dict(meta),
        "inputs": [{"name": i.name, "type": i.type, "shape": shape(i.shape)} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": shape(o.shape)} for o in session.get_outputs()],
        "providers_available": available_providers(),
        "cpu": cpu_facts().as_dict(),
        "precision": {
            "in_use": meta.precision,
            "why": precision_reason(meta, choice.origin, precision, CPU),
            "auto_on_this_cpu": int8_choice()[1],
        },
        "self_check": None
        if check is None
        else {
            "passed": check.ok,
            "images": check.images,
            "deviation": check.deviation,
            "tolerance": check.tolerance,
            "max_prob_diff": check.max_prob_diff,
            "seconds": round(check.seconds, 4),
            "summary": check.describe(),
            "in_words": check.in_words(meta.precision),
        },
    }


def model_card(path: Path, meta: ModelMeta) -> str | None:
    """The model card beside a model file (``<file stem>.md``, else ``<contract name>.md``), or None."""
    for name in (f"{path.stem}.md", f"{meta.name}.md"):
        card = path.parent / name
        if card.is_file():
            return str(card)
    return None


def meta_dict(meta: ModelMeta) -> dict[str, Any]:
    """The contract as a plain JSON-ready dict."""
    import json

    loaded: dict[str, Any] = json.loads(meta.to_json())
    return loaded
