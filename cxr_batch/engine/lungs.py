"""The lung-field segmenter at inference time: onnxruntime and numpy, no torch.

The shipped segmenter (``export/cxr-lungs.onnx``, ``cxr_batch.models`` installed) carries its own
contract (kind ``lung-segmenter``: input size, normalisation, resize, threshold, its Dice scores).
``classify`` and ``evaluate`` run it in the decoder threads, on every decoded film, before the
classifier's preprocessing: its mask gives the lung crop (for a classifier whose contract asks
for one) and the assessability verdict (:func:`cxr_batch.io.lungs.assess`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_batch.contract import LUNG_SEGMENTER, ModelMeta, file_sha256, read_contract
from cxr_batch.errors import ImageError, ModelError
from cxr_batch.io.lungs import DEFAULT_RULES, LungRules, LungVerdict, assess, preprocess_file_lungs
from cxr_batch.io.preprocess import Decoded, PreprocessSpec, preprocess_file, resize_grey

if TYPE_CHECKING:
    import onnxruntime as ort

#: The embedded segmenter's file name, beside the classifier's.
DEFAULT_LUNGS_FILE = "cxr-lungs.onnx"
#: The environment variable that names another segmenter file.
LUNGS_ENV = "CXR_BATCH_LUNGS"


def find_segmenter(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$CXR_BATCH_LUNGS``, else the embedded segmenter.

    Raises:
        ModelError: the named file does not exist, or no segmenter is installed.
    """
    if path is None and os.environ.get(LUNGS_ENV):
        path = os.environ[LUNGS_ENV]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"lung segmenter not found: {p}")
        return p
    from cxr_batch.engine.model import package_model_dirs

    for folder in package_model_dirs():
        if (folder / DEFAULT_LUNGS_FILE).is_file():
            return folder / DEFAULT_LUNGS_FILE
    raise ModelError(
        f"no lung segmenter installed ({DEFAULT_LUNGS_FILE}); pass one with {LUNGS_ENV}=PATH, "
        "or run without the lung stage (--no-lungs)"
    )


class LungSegmenter:
    """Reads a film's lung fields. One onnxruntime session, shared by the decoder threads
    (``session.run`` is thread-safe); each call runs one film on ``threads`` threads.

    Raises:
        ModelError: the file is missing, unloadable or not a lung segmenter.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, threads: int = 1, rules: LungRules = DEFAULT_RULES
    ) -> None:
        from cxr_batch.engine.session import create_session

        self.path = find_segmenter(path)
        self.session: ort.InferenceSession
        self.session, _ = create_session(self.path, "cpu", threads)
        self.meta: ModelMeta = read_contract(self.session, str(self.path), kind=LUNG_SEGMENTER)
        self.threshold = float(self.meta.extra["threshold"])
        self.rules = rules
        self._output = self.meta.outputs["mask"]
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def inputs(self, grey: np.ndarray) -> np.ndarray:
        """Grey [0, 1] film (any size) → the segmenter's input (1, H, W)."""
        meta = self.meta
        x = resize_grey(grey, meta.input_size, str(meta.preprocessing.get("resize", "bilinear")))
        return ((x - np.float32(meta.mean[0])) / np.float32(meta.std[0]))[None].astype(np.float32, copy=False)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Lung probability maps (N, H, W) of a batch of inputs (N, 1, H, W)."""
        from cxr_batch.engine.session import _ort_errors

        try:
            (logits,) = self.session.run([self._output], {self.meta.input_name: x})
        except _ort_errors() as exc:
            raise ModelError(f"{self.path}: lung segmentation failed: {exc}") from None
        z = np.clip(np.asarray(logits, dtype=np.float32)[:, 0], -30.0, 30.0)
        return 1.0 / (1.0 + np.exp(-z))

    def read(self, grey: np.ndarray) -> LungVerdict:
        """The verdict for one decoded film."""
        return assess(self.probabilities(self.inputs(grey)[None])[0], self.threshold, self.rules)

    def describe(self) -> dict[str, str]:
        """What the provenance record names: the file, its sha256 and the model."""
        return {"path": str(self.path), "sha256": self.sha256, "model": self.meta.ident}


def pair_dice(segmenter: LungSegmenter, image: str | os.PathLike[str], mask: str | os.PathLike[str]) -> float:
    """Dice of the segmenter's lung mask against a reference mask (0/255 image), at the reference's
    resolution: the probability map is resized (bilinear) to it, then thresholded.

    Raises:
        ImageError: either file can't be decoded.
    """
    from cxr_batch.io.lungs import dice
    from cxr_batch.io.preprocess import decode

    grey = decode(image).grey
    ref = decode(mask).grey >= 0.5
    prob = segmenter.probabilities(segmenter.inputs(grey)[None])[0]
    up = resize_grey(prob, (int(ref.shape[0]), int(ref.shape[1])), "bilinear")
    return dice(up >= segmenter.threshold, ref)


_CROP_SEGMENTERS: dict[str, LungSegmenter] = {}
_CROP_LOCK = threading.Lock()


def crop_reader(
    crop: str | None, path: str | os.PathLike[str] | None = None
) -> Callable[[np.ndarray], LungVerdict] | None:
    """The segmenter's :meth:`LungSegmenter.read` a classifier trained on lung crops needs (one
    segmenter per file, loaded once per process); None for a classifier trained on whole films.

    Raises:
        ModelError: the segmenter can't be loaded.
    """
    if crop is None:
        return None
    key = str(find_segmenter(path))
    with _CROP_LOCK:
        if key not in _CROP_SEGMENTERS:
            _CROP_SEGMENTERS[key] = LungSegmenter(key)
        return _CROP_SEGMENTERS[key].read


def preprocess_for(
    path: str | os.PathLike[str], spec: PreprocessSpec, read: Callable[[np.ndarray], LungVerdict] | None = None
) -> tuple[np.ndarray, Decoded]:
    """:func:`cxr_batch.io.preprocess.preprocess_file` for any classifier: the lung crop first when
    its contract asks for one (``spec.crop``), through ``read`` or the embedded segmenter. What
    training, export, adapt and the benchmarks feed a model; classify takes the same path
    (:func:`cxr_batch.io.lungs.preprocess_file_lungs`).

    Raises:
        ImageError: the file can't be decoded.
        ModelError: the segmenter can't be loaded.
    """
    if spec.crop is None:
        return preprocess_file(path, spec)
    tensor, decoded, _ = preprocess_file_lungs(path, spec, read or crop_reader(spec.crop), spec.crop)
    return tensor, decoded


def preprocess_labelled(items: Iterable[tuple[Path, str]], spec: PreprocessSpec) -> Iterator[tuple[np.ndarray, str]]:
    """(model input, label) for each labelled file that decodes (:func:`preprocess_for`);
    unreadable files are skipped."""
    read = crop_reader(spec.crop)
    for path, label in items:
        try:
            x, _ = preprocess_for(path, spec, read)
        except ImageError:
            continue
        yield x, label


__all__ = [
    "DEFAULT_LUNGS_FILE",
    "LUNGS_ENV",
    "LungSegmenter",
    "crop_reader",
    "find_segmenter",
    "pair_dice",
    "preprocess_for",
    "preprocess_labelled",
]
