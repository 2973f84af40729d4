"""The engine's light types: what callers pass in (:class:`EngineConfig`), get back (:class:`Result`),
and the :class:`Engine` protocol both engines (the local :class:`~cxr_batch.engine.classifier.Classifier`
and :class:`~cxr_batch.engine.ray.RayEngine`) implement for ``classify``, provenance and the outputs.

No numpy, no onnxruntime: the report writer, ``merge`` and the HTML report import these without
loading the engine.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from cxr_batch.contract import ModelMeta
    from cxr_batch.engine.lungs import LungSegmenter
    from cxr_batch.io.inputs import InputFile

#: The devices and precisions, the one definition: the CLI's ``--device``/``--precision`` choices,
#: :class:`EngineConfig`'s checks, the classifier and the Ray engine all take them from here.
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "int8", "fp16"]

DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)

DEFAULT_BATCH_SIZE = 16
#: The most input bytes one model batch may hold (N × 3 × H × W float32). A model whose contract
#: asks for large inputs (``input_size`` 4096² is 201 MB an image) runs smaller batches: at the
#: default 16 images a batch it would need 3.2 GB of input and ~10 GB in all.
MAX_BATCH_BYTES = 512 << 20


def bounded_batch(batch_size: int, input_size: tuple[int, int] | list[int], channels: int = 3) -> int:
    """``batch_size``, made smaller (never under 1) so that a batch holds at most :data:`MAX_BATCH_BYTES`."""
    per_image = max(1, channels * int(input_size[0]) * int(input_size[1]) * 4)
    return max(1, min(batch_size, MAX_BATCH_BYTES // per_image))


@dataclass(frozen=True)
class EngineConfig:
    """How to run the model; built from the ``classify`` options."""

    model: str | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    #: onnxruntime threads in all; 0 means one per physical core.
    threads: int = 0
    #: decoder threads; None means :func:`default_workers`.
    decode_workers: int | None = None
    #: extra model outputs to return with each result, by contract role ("features", "embedding").
    extra_outputs: tuple[str, ...] = ()
    #: batches run at once, each in its own session with ``threads // streams`` threads;
    #: 0 means :func:`default_streams`.
    streams: int = 0
    #: the COVID-19 screening threshold (``--covid-threshold``); None: the contract's operating point
    covid_threshold: float | None = None
    #: run the lung stage (segmenter → ``lung_fraction``, ``assessable``, the lung crop)
    lungs: bool = True
    #: the segmenter file; None: ``$CXR_BATCH_LUNGS``, else the embedded one
    lungs_model: str | None = None

    def __post_init__(self) -> None:
        if self.streams < 0:
            raise ValueError("streams must be 0 (automatic) or more")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.threads < 0:
            raise ValueError("threads must be 0 (automatic) or more")
        if self.decode_workers is not None and self.decode_workers < 1:
            raise ValueError("decode_workers must be at least 1")
        if self.covid_threshold is not None and not 0.0 <= self.covid_threshold <= 1.0:
            raise ValueError("covid_threshold must be between 0 and 1")


@dataclass
class Result:
    """The outcome for one file. ``status`` is ``"ok"`` or ``"error"`` (then ``error`` says why).

    ``fields`` holds the extra report columns a reader filled in (DICOM: ``modality``,
    ``view_position``, ``sop_instance_uid``, ``study_instance_uid``); ``outputs`` the extra
    model outputs asked for with ``extra_outputs`` (one row of each, by role).
    """

    path: str  #: the report's path (see :class:`cxr_batch.io.inputs.InputFile`)
    file: str  #: the path that was opened
    status: str
    model: str
    label: str | None = None
    confidence: float | None = None
    probs: dict[str, float] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    ood_score: float | None = None
    in_distribution: bool | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    #: ``positive`` / ``negative`` at the screening operating point; None where no call is made
    #: (an error row, a model without an operating point, a film that is not assessable)
    covid_screen: str | None = None
    #: the lung stage (:mod:`cxr_batch.engine.lungs`): the lung mask's share of the film, whether
    #: the film shows two plausible lung fields (None: the stage did not run), and the mask itself
    #: (the segmenter's resolution, True = lung) for heatmaps
    lung_fraction: float | None = None
    assessable: bool | None = None
    lung_mask: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def error_reason(self) -> str | None:
        """The error without its details (the text before the first ': '): the summary's grouping key."""
        if self.error is None:
            return None
        return self.error.split(": ", 1)[0]


class Engine(Protocol):
    """What a run needs of an engine, whichever runs the model (``--engine local`` or ``ray``).

    ``run_classify``, the provenance record, the report, the heatmaps and the SRs read an engine
    only through these members.
    """

    @property
    def kind(self) -> str:
        """``local`` (this process) or ``ray`` (Ray Data actors)."""
        ...

    @property
    def meta(self) -> ModelMeta:
        """The model's contract."""
        ...

    @property
    def model_path(self) -> Path:
        """The model file in use (after ``--precision`` and any fallback)."""
        ...

    @property
    def model_origin(self) -> str:
        """Where the file came from: ``--model``, ``$CXR_BATCH_MODEL`` or ``embedded default``."""
        ...

    @property
    def model_sha256(self) -> str:
        """The model file's sha256, hashed once per engine (in the background from the load on)."""
        ...

    @property
    def provider(self) -> str:
        """The execution provider(s) that run the model (Ray: known in full once the actors reported)."""
        ...

    @property
    def precision_reason(self) -> str:
        """The precision in use and why, in one line."""
        ...

    @property
    def notices(self) -> tuple[str, ...]:
        """What the user must be told once (a fallback to fp32, smaller batches)."""
        ...

    @property
    def segmenter(self) -> LungSegmenter | None:
        """The lung segmenter that runs (the lung stage's, or a lung-crop classifier's); None: none."""
        ...

    @property
    def screening(self) -> dict[str, Any] | None:
        """The screening call in use (``{"label", "threshold", "source"}``); None when none is made."""
        ...

    def run_settings(self) -> dict[str, Any]:
        """The batch, thread and worker settings as they really run (for the provenance record)."""
        ...

    def iter_batches(self, files: Iterable[InputFile]) -> Generator[list[Result], None, None]:
        """One result per file, in input order, a list per batch; ``close()`` stops the workers."""
        ...


__all__ = ["DEFAULT_BATCH_SIZE", "DEVICES", "PRECISIONS", "Device", "Engine", "EngineConfig", "Precision", "Result"]
