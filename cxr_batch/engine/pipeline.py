"""The decode stage of the classify pipeline: what a decoder thread makes of one input file
(:func:`prepare`: the model-sized tensor, the film's facts, the lung verdict, or the file's error),
how a verdict goes into a result, and the batch stacked into a reused array.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cxr_batch.engine.types import Result
from cxr_batch.errors import ImageError
from cxr_batch.io.inputs import InputFile
from cxr_batch.io.lungs import LungVerdict, preprocess_file_lungs
from cxr_batch.io.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from cxr_batch.engine.lungs import LungSegmenter


@dataclass
class Prepared:
    item: InputFile
    tensor: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    not_radiograph: str | None = None
    verdict: LungVerdict | None = None


def prepare(
    item: InputFile,
    spec: PreprocessSpec,
    lungs: LungSegmenter | None = None,
    crop: str | None = None,
    verdicts: bool = True,
) -> Prepared:
    """Runs in a decoder thread. Never raises: any failure becomes the file's error message.

    With ``lungs``, the segmenter reads the decoded film here (one film per call, the decoder
    threads in parallel), before the classifier's preprocessing, which crops to the lungs when
    the classifier's contract asks for it (``crop == "lungs"``). ``verdicts=False`` (the lung
    stage off, a lung-crop classifier): the crop is made, the verdict is not reported.
    """
    if item.error is not None:  # discovery already knows (a folder that can't be listed)
        return Prepared(item, error=item.error)
    try:
        tensor, decoded, verdict = preprocess_file_lungs(item.path, spec, None if lungs is None else lungs.read, crop)
    except ImageError as exc:
        return Prepared(item, error=str(exc))
    except MemoryError:
        return Prepared(item, error="out of memory while decoding the image")
    except Exception as exc:  # a decoder bug must cost one row, never the whole run
        return Prepared(item, error=f"unexpected decoding error: {type(exc).__name__}: {exc}")
    prepared = Prepared(
        item,
        tensor=tensor,
        width=decoded.width,
        height=decoded.height,
        notes=list(decoded.notes),
        fields=dict(decoded.fields),
        verdict=verdict if verdicts else None,
    )
    if decoded.not_radiograph:
        # Still classified (the row keeps its probabilities), but flagged out of distribution
        # whatever the score: the header says it is not what the model knows.
        prepared.not_radiograph = decoded.not_radiograph
        prepared.notes.append(f"out of distribution: {decoded.not_radiograph}")
    return prepared


def apply_verdict(r: Result, prepared: Prepared) -> None:
    """The lung stage's columns; a film that is not assessable keeps its probabilities, loses its label."""
    verdict = prepared.verdict
    if verdict is None:
        return
    r.lung_fraction = verdict.lung_fraction
    r.lung_mask = verdict.mask
    why = verdict.note
    if why is None and prepared.not_radiograph:
        why = prepared.not_radiograph  # the DICOM header says it is not a radiograph
    r.assessable = why is None
    if why is not None:
        r.notes.append(f"not assessable: {why}")
        r.label = None
        r.confidence = None


def stack_tensors(tensors: list[np.ndarray], buffer: list[np.ndarray] | None) -> np.ndarray:
    """``np.stack(tensors)``, into the array ``buffer`` holds when there is one (grown as needed)."""
    if buffer is None:
        return np.stack(tensors)
    shape = (len(tensors), *tensors[0].shape)
    if not buffer or buffer[0].shape[1:] != shape[1:] or buffer[0].shape[0] < shape[0]:
        buffer[:] = [np.empty(shape, dtype=np.float32)]
    return np.stack(tensors, out=buffer[0][: shape[0]])


def as_input(item: InputFile | str | os.PathLike[str]) -> InputFile:
    if isinstance(item, InputFile):
        return item
    path = os.fspath(item)
    return InputFile(path, path)
