"""The model contract: the JSON document an ONNX file carries under ``metadata_props["cxr_batch"]``.

Inference reads everything it needs from here (labels, input size, normalisation, resize
method, output names), so nothing is hard-coded twice. :func:`read_contract` validates the
document against the graph and refuses a model that doesn't match, saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_batch.errors import ModelError
from cxr_batch.io.preprocess import RESAMPLE, PreprocessSpec
from cxr_batch.io.safe_open import DamagedFileError, open_regular, parse_json

if TYPE_CHECKING:  # onnxruntime is a runtime dependency, but keep imports of this module cheap
    import onnxruntime as ort

CONTRACT_KEY = "cxr_batch"
CONTRACT_VERSION = 1

#: Contract role names of the graph outputs beyond the logits.
CAM_ROLE = "cam"
OOD_ROLE = "ood_score"

#: Contract kinds: the classifier (the default, so older contracts name none) and the lung-field
#: segmenter (:mod:`cxr_batch.engine.lungs`).
CLASSIFIER = "classifier"
LUNG_SEGMENTER = "lung-segmenter"
KINDS = (CLASSIFIER, LUNG_SEGMENTER)
#: The class the screening operating point calls (the report's ``covid_screen``).
SCREEN_LABEL = "covid"
#: Export's default: the operating point reaches this COVID-19 sensitivity on validation (issue 19).
SCREEN_SENSITIVITY = 0.90

#: Largest model input side accepted: a contract asking for 60000×60000 would need 43 GB for
#: one image's input tensor alone.
MAX_INPUT_SIDE = 4096

#: The preprocessing recipe written into every model we export; see cxr_batch.io.preprocess.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "grey": "bt601_luma",  # colour → grey: 0.299 R + 0.587 G + 0.114 B
    "alpha": "composite_over_black",
    "scale": "bit_depth",  # integer data / (2**bits - 1), so 16-bit data is never clipped
    "resize": "bilinear",  # Pillow antialiased filter on float32 data, reduce() first for big images
    "channels": 3,  # the grey image repeated
    "range": [0.0, 1.0],
}


#: The int8 faithfulness gate, the one definition: ``cxr-batch export`` measures the int8 file
#: against its fp32 master on the test split and records whether it passed; ``--precision auto``
#: takes the int8 file (on a CPU with 8-bit dot products) only when the contract says it did.
INT8_GATE_MIN_AGREEMENT = 0.998
INT8_GATE_MAX_PROB_DIFF = 0.05
#: The looser export gate, the one definition: ``cxr-batch export --quantize int8`` writes the int8
#: file (unless ``--force``) only when its test macro-F1 is at most INT8_MAX_F1_DROP below the
#: master's and its top-1 agreement with the master on the test split is at least INT8_MIN_AGREEMENT.
INT8_MAX_F1_DROP = 0.005
INT8_MIN_AGREEMENT = 0.995


def int8_gate(agreement: float, max_prob_diff: float) -> bool:
    """Whether an int8 file with this top-1 agreement and largest |Δprob| against fp32 passes."""
    return agreement >= INT8_GATE_MIN_AGREEMENT and max_prob_diff <= INT8_GATE_MAX_PROB_DIFF


def int8_gate_verdict(meta: ModelMeta) -> tuple[bool, str]:
    """Whether the contract records that this int8 file passed :func:`int8_gate`, and why (one line).

    The recorded numbers are checked again here, so an old contract (without ``gate``) and one whose
    numbers miss the limits both fail."""
    q = meta.extra.get("quantization") if isinstance(meta.extra, dict) else None
    if not isinstance(q, dict):
        return False, "its contract records no measurement against fp32"
    agree, diff = q.get("top1_agreement_with_fp32"), q.get("max_abs_prob_diff")
    if not isinstance(agree, int | float) or not isinstance(diff, int | float):
        return False, "its contract records no top-1 agreement or largest |Δprob| against fp32"
    gate = q.get("gate")
    recorded = isinstance(gate, dict) and gate.get("passed") is True
    what = f"top-1 agreement {100 * agree:.2f}%, largest |Δprob| {diff:.3f} on the test split"
    limits = f"(limits {100 * INT8_GATE_MIN_AGREEMENT:.1f}%, {INT8_GATE_MAX_PROB_DIFF})"
    if recorded and int8_gate(float(agree), float(diff)):
        return True, f"{what} {limits}"
    return False, f"{what} misses the gate {limits}" if not int8_gate(float(agree), float(diff)) else (
        f"{what}, but its contract does not record that it passed the gate"
    )


def ood_threshold_of(ood: Any, source: str = "model") -> float | None:
    """The out-of-distribution guard's threshold (``ood.threshold``; a score above it flags the image),
    the one place it is read: None for a contract without a guard or without a threshold yet.

    Raises:
        ModelError: ``ood`` is not an object, or its threshold is not a finite number.
    """
    if ood is None:
        return None
    if not isinstance(ood, dict):
        raise ModelError(f"{source}: invalid model contract: 'ood' must be an object")
    threshold = ood.get("threshold")
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ModelError(f"{source}: invalid model contract: 'ood.threshold' must be a finite number")
    return float(threshold)


@dataclass(frozen=True)
class ScreeningPoint:
    """A screening operating point: ``label`` is called positive when its probability is at least
    ``threshold`` (the report's ``covid_screen``), whatever the argmax ``label`` column says.

    Chosen on validation images: the highest threshold whose sensitivity there is at least
    ``target_sensitivity``; ``validation`` keeps what was measured (counts, sensitivity,
    specificity, the images used)."""

    label: str
    threshold: float
    target_sensitivity: float
    validation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, labels: Sequence[str], source: str = "model") -> ScreeningPoint:
        def bad(msg: str) -> ModelError:
            return ModelError(f"{source}: invalid model contract: 'screening' {msg}")

        if not isinstance(d, dict):
            raise bad("must be an object")
        label, threshold, target = d.get("label"), d.get("threshold"), d.get("target_sensitivity")
        if label not in labels:
            raise bad(f"names label {label!r}, which is not among {list(labels)}")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise bad("needs a threshold between 0 and 1")
        if not isinstance(target, int | float) or isinstance(target, bool) or not 0.0 < target <= 1.0:
            raise bad("needs a target_sensitivity in (0, 1]")
        validation = d.get("validation") or {}
        if not isinstance(validation, dict):
            raise bad("'validation' must be an object")
        return cls(str(label), float(threshold), float(target), dict(validation))


@dataclass(frozen=True)
class ModelMeta:
    """The contract of one model file."""

    name: str
    version: str
    created: str
    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    input_name: str = "input"
    #: Graph output names by role: "logits" (required), "features" (layer4 maps), "embedding".
    outputs: dict[str, str] = field(default_factory=lambda: {"logits": "logits"})
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    #: Out-of-distribution guard parameters, when the model has been fitted with one.
    ood: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    contract_version: int = CONTRACT_VERSION
    #: the screening operating point (the report's ``covid_screen``), when one was chosen
    screening: ScreeningPoint | None = None
    #: "classifier" or "lung-segmenter" (see :data:`KINDS`)
    kind: str = CLASSIFIER

    @property
    def crop(self) -> str | None:
        """``"lungs"`` when the model was trained on lung crops (:func:`cxr_batch.io.lungs.crop_to_lungs`)."""
        crop = self.preprocessing.get("crop")
        return str(crop) if crop else None

    @property
    def ood_threshold(self) -> float | None:
        """The OOD guard's threshold, checked (:func:`ood_threshold_of`); None without one."""
        return ood_threshold_of(self.ood)

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing settings :func:`cxr_batch.io.preprocess.prepare` needs."""
        return PreprocessSpec(
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            resize=str(self.preprocessing.get("resize", "bilinear")),
            crop=self.crop,
        )

    @property
    def ident(self) -> str:
        """``name@version``, the value of the report's ``model`` column."""
        return f"{self.name}@{self.version}"

    def to_json(self) -> str:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.screening is None:
            d.pop("screening")
        if self.kind == CLASSIFIER:
            del d["kind"]  # a classifier's contract reads as it did before kinds existed
        return json.dumps(d, sort_keys=True)

    def with_updates(self, **changes: Any) -> ModelMeta:
        return replace(self, **changes)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelMeta:
        """Parse and validate the contract document. Raises ModelError saying what is wrong."""
        try:
            d = parse_json(text, allow_nan=True, what=f"the '{CONTRACT_KEY}' metadata")  # depth-limited
        except DamagedFileError as exc:
            raise ModelError(f"{source}: the '{CONTRACT_KEY}' metadata is not valid JSON ({exc.reason})") from None
        if not isinstance(d, dict):
            raise ModelError(f"{source}: the '{CONTRACT_KEY}' metadata must be a JSON object")
        return cls.from_dict(d, source)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model") -> ModelMeta:
        required = ("labels", "input_size", "mean", "std", "preprocessing", "name", "version", "created")
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelError(f"{source}: the model contract lacks {', '.join(missing)}")

        def bad(msg: str) -> ModelError:
            return ModelError(f"{source}: invalid model contract: {msg}")

        labels = d["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise bad("'labels' must be a non-empty list of names")
        if len(set(labels)) != len(labels):
            raise bad("'labels' has duplicates")
        size = d["input_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise bad("'input_size' must be [H, W] with positive integers")
        if max(size) > MAX_INPUT_SIDE:
            raise bad(f"'input_size' {size} is larger than {MAX_INPUT_SIDE} pixels a side")
        for key in ("mean", "std"):
            v = d[key]
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise bad(f"'{key}' must be 3 numbers")
        if any(float(s) <= 0 for s in d["std"]):
            raise bad("'std' must be positive")
        pre = d["preprocessing"]
        if not isinstance(pre, dict):
            raise bad("'preprocessing' must be an object")
        kind = d.get("kind", CLASSIFIER)
        if kind not in KINDS:
            raise bad(f"unknown kind {kind!r}; expected one of {list(KINDS)}")
        if pre.get("crop") not in (None, "lungs"):
            raise bad(f"unknown crop {pre.get('crop')!r}; expected 'lungs' or none")
        if pre.get("resize", "bilinear") not in RESAMPLE:
            raise bad(f"unknown resize method {pre.get('resize')!r}; expected one of {sorted(RESAMPLE)}")
        outputs = d.get("outputs", {"logits": "logits"})
        role = "mask" if kind == LUNG_SEGMENTER else "logits"
        if not isinstance(outputs, dict) or role not in outputs:
            raise bad(f"'outputs' must name the '{role}' output")
        for key in ("metrics", "training_data"):
            if key in d and not isinstance(d[key], dict):
                raise bad(f"'{key}' must be an object")
        ood_threshold_of(d.get("ood"), source)  # refuses a malformed guard when the file is read
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            created=str(d["created"]),
            labels=tuple(labels),
            input_size=(int(size[0]), int(size[1])),
            mean=(float(d["mean"][0]), float(d["mean"][1]), float(d["mean"][2])),
            std=(float(d["std"][0]), float(d["std"][1]), float(d["std"][2])),
            preprocessing=dict(pre),
            input_name=str(d.get("input_name", "input")),
            outputs={str(k): str(v) for k, v in outputs.items()},
            metrics=dict(d.get("metrics") or {}),
            training_data=dict(d.get("training_data") or {}),
            precision=str(d.get("precision", "fp32")),
            ood=d.get("ood"),
            extra=dict(d.get("extra") or {}),
            contract_version=int(d.get("contract_version", CONTRACT_VERSION)),
            screening=ScreeningPoint.from_dict(d["screening"], labels, source) if d.get("screening") else None,
            kind=str(kind),
        )


def read_contract(session: ort.InferenceSession, source: str = "model", kind: str = CLASSIFIER) -> ModelMeta:
    """Read the contract from an onnxruntime session and check it against the graph.

    Raises:
        ModelError: no contract, an invalid one, one of another ``kind``, or one that doesn't
            match the graph.
    """
    custom = session.get_modelmeta().custom_metadata_map
    if CONTRACT_KEY not in custom:
        raise ModelError(
            f"{source}: not a cxr-batch model: its ONNX metadata has no '{CONTRACT_KEY}' entry "
            "(export models with 'cxr-batch export', or add the contract described in the README)"
        )
    meta = ModelMeta.from_json(custom[CONTRACT_KEY], source)
    if meta.kind != kind:
        raise ModelError(f"{source}: this is a {meta.kind} model, not a {kind}")
    if kind == LUNG_SEGMENTER:
        check_segmenter_graph(meta, session, source)
    else:
        check_graph(meta, session, source)
    return meta


def check_segmenter_graph(meta: ModelMeta, session: ort.InferenceSession, source: str = "segmenter") -> None:
    """A lung segmenter: one N×1×H×W float input, a ``mask`` output of lung logits N×1×H×W."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != meta.input_name or inputs[0].type != "tensor(float)":
        raise ModelError(f"{source}: the segmenter must have one float input named '{meta.input_name}'")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 1):
        raise ModelError(f"{source}: the segmenter's input must be N×1×H×W, it is {shape}")
    for axis, want in zip(shape[2:], meta.input_size, strict=True):
        if isinstance(axis, int) and axis != want:
            raise ModelError(f"{source}: the contract's input_size {list(meta.input_size)} doesn't match {shape[2:]}")
    outs = {o.name for o in session.get_outputs()}
    if meta.outputs.get("mask") not in outs:
        raise ModelError(
            f"{source}: the contract must name the segmenter's 'mask' output; the graph has {sorted(outs)}"
        )
    threshold = meta.extra.get("threshold")
    if not isinstance(threshold, int | float) or not 0 < float(threshold) < 1:
        raise ModelError(f"{source}: the segmenter's contract needs extra.threshold in (0, 1)")


def check_graph(meta: ModelMeta, session: ort.InferenceSession, source: str = "model") -> None:
    """The contract must describe the graph: one N×3×H×W float input, logits N×C with C labels."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"{source}: the model must have exactly one input, it has {len(inputs)}")
    inp = inputs[0]
    if inp.name != meta.input_name:
        raise ModelError(f"{source}: the contract names input '{meta.input_name}' but the graph's is '{inp.name}'")
    if inp.type != "tensor(float)":
        raise ModelError(f"{source}: the input must be float32, it is {inp.type}")
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelError(f"{source}: the input must have rank 4 (N×3×H×W), it has rank {len(shape)} {shape}")
    if isinstance(shape[0], int) and shape[0] != -1:
        raise ModelError(f"{source}: the input's batch axis must be dynamic, it is fixed at {shape[0]}")
    if isinstance(shape[1], int) and shape[1] != 3:
        raise ModelError(f"{source}: the input must have 3 channels, it has {shape[1]}")
    for axis, want in zip(shape[2:], meta.input_size, strict=True):
        if isinstance(axis, int) and axis != want:
            raise ModelError(
                f"{source}: the contract's input_size {list(meta.input_size)} doesn't match the graph's {shape[2:]}"
            )
    outs = {o.name: o for o in session.get_outputs()}
    for role, name in meta.outputs.items():
        if name not in outs:
            raise ModelError(f"{source}: the contract names output '{name}' ({role}) but the graph has {sorted(outs)}")
    logits = outs[meta.outputs["logits"]]
    lshape = list(logits.shape)
    if len(lshape) != 2:
        raise ModelError(f"{source}: the logits output must be N×C, it has shape {lshape}")
    if isinstance(lshape[1], int) and lshape[1] != len(meta.labels):
        raise ModelError(
            f"{source}: the model has {len(meta.labels)} labels {list(meta.labels)} "
            f"but its logits output has {lshape[1]} classes"
        )


def check_output_shapes(
    session: ort.InferenceSession, meta: ModelMeta, roles: Sequence[str] = (), source: str = "model"
) -> None:
    """Run the model once on a blank batch of two and check what it returns against the contract.

    The graph's declared shapes may be symbolic or wrong; this catches, at load and with a clear
    message, outputs that would otherwise fail mid-run: logits that are not N×C, an
    ``ood_score`` that is not one number per image (e.g. N×0), a ``cam`` that is not N×C×h×w.

    Raises:
        ModelError: the test run fails or an output has the wrong shape.
    """
    import numpy as np

    n, classes = 2, len(meta.labels)
    checked = ["logits", *(r for r in roles if r != "logits"), *([OOD_ROLE] if OOD_ROLE in meta.outputs else [])]
    checked = [r for i, r in enumerate(checked) if r in meta.outputs and r not in checked[:i]]
    x = np.zeros((n, 3, *meta.input_size), dtype=np.float32)
    try:
        outs = session.run([meta.outputs[r] for r in checked], {meta.input_name: x})
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
        raise ModelError(f"{source}: the model fails a test run on a blank batch of {n}: {exc}") from None
    for role, out in zip(checked, outs, strict=True):
        shape = list(np.shape(out))
        if role == "logits":
            ok, want = shape == [n, classes], f"[N, {classes}]"
        elif role == OOD_ROLE:
            ok, want = shape in ([n], [n, 1]), "[N] or [N, 1]"
        elif role == CAM_ROLE:
            ok, want = len(shape) == 4 and shape[:2] == [n, classes] and min(shape[2:]) > 0, f"[N, {classes}, h, w]"
        else:
            ok, want = len(shape) >= 1 and shape[0] == n and 0 not in shape, "[N, ...] with no empty axis"
        if not ok:
            raise ModelError(
                f"{source}: the model's '{role}' output ({meta.outputs[role]}) has shape {shape} for a batch "
                f"of {n}, expected {want}"
            )


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open_regular(path) as fh:  # never a FIFO or a device: that would hash without end
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FileDigest:
    """The sha256 of one file, computed once: in a background thread from :meth:`start` (so loading
    the model overlaps it), or on the first :meth:`hexdigest` call. Every part of a run (the report's
    ``model_sha256``, the provenance record, the SRs) takes it from here: the file is hashed once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._value: str | None = None
        self._error: Exception | None = None

    def start(self) -> FileDigest:
        """Begin hashing in a background thread (idempotent); returns ``self``."""
        with self._lock:
            if self._thread is None and self._value is None and self._error is None:
                self._thread = threading.Thread(target=self._compute, name="cxr-model-hash", daemon=True)
                self._thread.start()
        return self

    def _compute(self) -> None:
        try:
            value = file_sha256(self.path)
        except Exception as exc:  # raised to whoever asks for the digest, in their thread
            self._error = exc
        else:
            self._value = value

    def hexdigest(self) -> str:
        """The digest (waiting for the background thread, or hashing now when none was started).

        Raises:
            OSError: the file can't be read (or what :func:`file_sha256` raised).
        """
        with self._lock:
            thread = self._thread
            if thread is None and self._value is None and self._error is None:
                self._compute()
        if thread is not None:
            thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def embedded_models_dir() -> Path:
    """Where the package keeps its shipped models (copied from export/ at build time)."""
    return Path(__file__).resolve().parent / "models"
