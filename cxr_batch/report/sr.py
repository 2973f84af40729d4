"""DICOM Structured Reports: one Comprehensive SR per classified DICOM image (``classify --sr DIR``).

Built with highdicom (the ``dicom`` extra), imported only when SRs are asked for. Each SR is a
TID 1500 "Imaging Measurement Report" in the study of its image, with one TID 1501 measurement
group that holds:

- the predicted label, as the group's finding type (TID 1501 ``(121071, DCM, "Finding")``);
- one numeric measurement per class, ``(P-<label>, 99CXRBATCH, "Probability of <label>")``, unit
  ``(1, UCUM, "no units")``, values in [0, 1];
- the out-of-distribution verdict, ``(IN-DISTRIBUTION, 99CXRBATCH, ...)`` = SNOMED Yes/No (or
  Unknown when the model has no guard), and the guard's score when there is one;
- the intended use, ``(INTENDED-USE, 99CXRBATCH)`` = ``(RUO-NOT-DX, 99CXRBATCH, "Research use only,
  not for diagnosis")`` (also the SR series description);
- the model as the algorithm identification (TID 4019): name, version, and ``sha256=<hex>`` and
  ``precision=<p>`` as its parameters;
- the source image (SOP class and instance UID) as the group's source image, and in the
  Current Requested Procedure Evidence Sequence.

Label codes: ``normal`` → SNOMED CT 17621005 "Normal", ``viral`` → 75570004 "Viral pneumonia",
``covid`` → 840539006 "COVID-19"; any other label of another model gets a private code
``(<LABEL>, 99CXRBATCH, <label>)``. The private scheme is declared in the Coding Scheme
Identification Sequence.

Patient data: only the Patient and General Study module elements the SR IOD needs to sit in the
patient's study (patient name, ID, birth date, sex; study UID, date, time, ID, accession number,
referring physician) are read from the source image, copied as they are (empty when the
source has them empty, never made up), and written only into the SR, never into the report.

UIDs are derived from the source instance and the model's sha256 (and the series from the study
and the model), so classifying the same image with the same model again gives the same SR UID:
storing it again replaces (or is refused as a duplicate by) the archive instead of piling up
copies. Each SR file is ``DIR/<report path>.sr.dcm`` (``dicomweb:`` dropped from the report path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_batch import __version__
from cxr_batch.errors import MissingExtraError, OutputError
from cxr_batch.report.heatmap import heatmap_relpath

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from cxr_batch.contract import ModelMeta
    from cxr_batch.engine.types import Result

#: The private coding scheme of the probability, verdict and intended-use concepts.
SCHEME = "99CXRBATCH"
SCHEME_NAME = "cxr-batch private codes"
#: Standard codes for the shipped model's labels (SNOMED CT).
LABEL_CODES: dict[str, tuple[str, str, str]] = {
    "normal": ("17621005", "SCT", "Normal"),
    "viral": ("75570004", "SCT", "Viral pneumonia"),
    "covid": ("840539006", "SCT", "COVID-19"),
}
INTENDED_USE = "Research use only, not for diagnosis"
SERIES_DESCRIPTION = "cxr-batch AI result - research use only, not for diagnosis"
SERIES_NUMBER = 9901
#: The elements read from the source image for the SR: identification, and the Patient and
#: General Study module elements the SR needs to join the patient's study. Nothing else.
SOURCE_TAGS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class ModelIdent:
    """What the SR says about the model (its algorithm identification)."""

    name: str
    version: str
    sha256: str
    precision: str
    labels: tuple[str, ...]

    @classmethod
    def of(cls, meta: ModelMeta, sha256: str) -> ModelIdent:
        return cls(name=meta.name, version=meta.version, sha256=sha256, precision=meta.precision, labels=meta.labels)


def require_highdicom() -> None:
    """Raises MissingExtraError unless highdicom (and pydicom) are installed."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        raise MissingExtraError("--sr (DICOM Structured Reports)", "dicom", "highdicom") from None


def quiet_patient_warnings() -> None:
    """Keep patient values out of stderr: highdicom warns about odd person names quoting them,
    and pydicom's value validation quotes the values it finds odd. Called once an SR run starts
    (a process-wide setting: the other elements cxr-batch reads are not validated either then)."""
    import warnings

    from pydicom import config

    warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
    config.settings.reading_validation_mode = config.IGNORE


def read_source(path: str | os.PathLike[str]) -> Dataset:
    """The source image's elements of :data:`SOURCE_TAGS` (no pixel data, nothing else)."""
    from pydicom import dcmread

    return dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(SOURCE_TAGS))


def _private(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=SCHEME, meaning=meaning[:64])


def label_code(label: str) -> Any:
    """The coded concept of a label (SNOMED CT for the shipped labels, else a private code)."""
    from highdicom.sr import CodedConcept

    if label in LABEL_CODES:
        value, scheme, meaning = LABEL_CODES[label]
        return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
    return _private(label.upper().replace(" ", "-"), label)


def sr_uids(source: Dataset, sha256: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SR of ``source`` by the model with ``sha256``."""
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["cxr-batch-sr-series", str(source.StudyInstanceUID), sha256])
    instance = generate_uid(entropy_srcs=["cxr-batch-sr", str(source.SOPInstanceUID), sha256])
    return str(series), str(instance)


def build_sr(source: Dataset, result: Result, model: ModelIdent) -> Dataset:
    """The Comprehensive SR of one ok result of the DICOM image ``source`` (see the module docstring).

    Raises:
        ValueError: the result is not ok, or ``source`` lacks its UIDs or has an unknown SOP class.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset as PydicomDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes

    if not result.ok or result.label is None:
        raise ValueError("only classified results get an SR")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(source.get(keyword, "")).strip():
            raise ValueError(f"the source image has no {keyword}")
    source = _with_type2_elements(source)
    series_uid, sop_uid = sr_uids(source, model.sha256)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"sha256={model.sha256}", f"precision={model.precision}"],
        manufacturer="cxr-batch",
    )
    no_units = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    measurements = [
        hd.sr.Measurement(
            name=_private(f"P-{label.upper()}", f"Probability of {label}"),
            value=float(result.probs[label]),
            unit=no_units,
            algorithm_id=algorithm,
        )
        for label in model.labels
    ]
    if result.ood_score is not None:
        measurements.append(
            hd.sr.Measurement(
                name=_private("OOD-SCORE", "Out-of-distribution score"),
                value=float(result.ood_score),
                unit=no_units,
                algorithm_id=algorithm,
            )
        )
    if result.in_distribution is None:
        verdict = hd.sr.CodedConcept(value="261665006", scheme_designator="SCT", meaning="Unknown")
    elif result.in_distribution:
        verdict = hd.sr.CodedConcept(value="373066001", scheme_designator="SCT", meaning="Yes")
    else:
        verdict = hd.sr.CodedConcept(value="373067005", scheme_designator="SCT", meaning="No")
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=_private("IN-DISTRIBUTION", "Within the model's training distribution"), value=verdict
        ),
        hd.sr.QualitativeEvaluation(
            name=_private("INTENDED-USE", "Intended use"), value=_private("RUO-NOT-DX", INTENDED_USE)
        ),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(sr_uids(source, model.sha256 + "-group")[1]), identifier="cxr-batch chest X-ray classification"
        ),
        finding_type=label_code(result.label),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
            )
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(sr_uids(source, model.sha256 + "-device")[0]),
            name="cxr-batch",
            manufacturer_name="cxr-batch",
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray"),
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="cxr-batch",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        software_versions=f"cxr-batch {__version__}",
    )
    scheme = PydicomDataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = "cxr-batch"
    sr.add_new(0x00080110, "SQ", DicomSequence([scheme]))  # Coding Scheme Identification Sequence
    if "SpecificCharacterSet" in source:
        sr.SpecificCharacterSet = source.SpecificCharacterSet
    return sr


#: Type 2 Patient and General Study elements: present in every SR, empty when the source lacks them.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_type2_elements(source: Dataset) -> Dataset:
    """A copy of ``source`` with each missing :data:`_TYPE2` element added empty (never made up)."""
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset as PydicomDataset

    out = PydicomDataset()
    out.update(source)
    for keyword in _TYPE2:
        if keyword not in out:
            out.add_new(keyword, dictionary_VR(keyword), None)
    return out


def sr_relpath(report_path: str) -> Path:
    """Where a result's SR goes under the SR folder: ``<report path>.sr.dcm`` (``dicomweb:`` dropped)."""
    path = report_path.removeprefix("dicomweb:")
    png = heatmap_relpath(path)  # the same safety rules (no root, no '..')
    return png.with_name(png.name.removesuffix(".png") + ".sr.dcm")


@dataclass
class SRStats:
    written: int = 0
    stored: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


class SRWriter:
    """Write the SR of every ok result of a DICOM image; each result gets a note that names it.

    Args:
        folder: the SR folder (created on the first SR).
        model: the model's identification.
        store: with ``--stow``, a callable that stores a batch's SR datasets (see
            :meth:`cxr_batch.io.dicomweb.DicomwebSource.store`); it returns one error message (or
            None) per dataset.

    A result whose SR can't be made keeps its classification; the note and :attr:`stats` say why.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        model: ModelIdent,
        store: Any = None,
    ) -> None:
        require_highdicom()
        quiet_patient_warnings()
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--sr {self.folder}: exists and is not a folder")
        self.model = model
        self.store = store
        self.stats = SRStats()

    def target(self, report_path: str) -> Path:
        return self.folder / sr_relpath(report_path)

    def write(self, results: Sequence[Result]) -> None:
        """Write (and store) the SRs of one batch, before its rows are written (the notes go in them)."""
        made: list[tuple[Result, Dataset]] = []
        for r in results:
            if not r.ok or not r.fields.get("sop_instance_uid"):
                continue  # error rows, and images that are not DICOM (they have no study to join)
            if r.assessable is False:  # the lung stage gave it no label: there is no finding to report
                r.notes.append("no SR written: not assessable")
                continue
            try:
                sr = build_sr(read_source(r.file), r, self.model)
            except Exception as exc:  # one SR that can't be made must never cost the row
                self._fail(r, f"cannot build the SR: {type(exc).__name__}: {exc}")
                continue
            target = self.target(r.path)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                sr.save_as(target, enforce_file_format=True)
            except OSError as exc:
                self._fail(r, f"cannot write {target}: {exc.strerror or exc}")
                continue
            self.stats.written += 1
            r.notes.append(f"SR {sr.SOPInstanceUID} written")
            made.append((r, sr))
        if self.store is not None and made:
            errors = self.store([sr for _, sr in made])
            for (r, _), error in zip(made, errors, strict=True):
                if error is None:
                    self.stats.stored += 1
                    r.notes[-1] = r.notes[-1].replace(" written", " written and stored")
                else:
                    self._fail(r, f"SR not stored (the file is kept): {error}")

    def _fail(self, r: Result, error: str) -> None:
        self.stats.failures.append((r.path, error))
        r.notes.append(error)

    def report(self, console: Any, show: int = 10, quiet: bool = False) -> None:
        from rich.markup import escape

        if not quiet:
            stored = f", {self.stats.stored} stored by STOW-RS" if self.store is not None else ""
            console.print(
                f"SRs: {self.stats.written} written under {escape(str(self.folder))}{stored}",
                highlight=False,
                soft_wrap=True,
            )
        for path, error in self.stats.failures[:show]:
            console.print(f"[yellow]warning:[/] SR of {escape(path)}: {escape(error)}", highlight=False, soft_wrap=True)
        if len(self.stats.failures) > show:
            console.print(f"[yellow]warning:[/] {len(self.stats.failures) - show} more SR failures", highlight=False)


def describe_sr(ds: Dataset) -> dict[str, str]:
    """What a cxr-batch SR says, as text (``dicomweb-list --content`` and the tests read SRs with it).

    Raises:
        ValueError: ``ds`` is not an SR with a TID 1500 measurement group.
    """
    import highdicom as hd

    require_highdicom()
    sr = hd.sr.ComprehensiveSR.from_dataset(ds, copy=True)
    content: Any = sr.content  # a MeasurementReport (TID 1500) for the SRs written here
    groups = content.get_image_measurement_groups()
    if not groups:
        raise ValueError("not a measurement report with a measurement group")
    group = groups[0]
    out: dict[str, str] = {}
    finding = group.finding_type
    out["finding"] = f"{finding.meaning} ({finding.value}, {finding.scheme_designator})" if finding else ""
    for m in group.get_measurements():
        out[m.name.meaning] = f"{m.value:.6g}"
    for e in group.get_qualitative_evaluations():
        out[e.name.meaning] = e.value.meaning
    algorithm = group.get_algorithm_identification() if hasattr(group, "get_algorithm_identification") else None
    if algorithm is None:
        from highdicom.sr.utils import find_content_items

        for item in find_content_items(group[0], recursive=True):
            meaning = item.name.meaning
            if meaning in ("Algorithm Name", "Algorithm Version", "Algorithm Parameters"):
                key, value = meaning.lower(), str(item.value)
                if key not in out:
                    out[key] = value
                elif value not in out[key].split("; "):  # the group's and each measurement's: the same model
                    out[key] = f"{out[key]}; {value}"
    source = group.source_images
    if source:
        out["source image"] = str(source[0].referenced_sop_instance_uid)
    out["study"] = str(ds.StudyInstanceUID)
    return out
