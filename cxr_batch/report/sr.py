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

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_batch import __version__
from cxr_batch.errors import MissingExtraError, OutputError
from cxr_batch.io.dicom import valid_uid
from cxr_batch.io.safe_open import open_regular
from cxr_batch.io.safe_write import OutputDir
from cxr_batch.io.warning_capture import capture
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
    """The source image's elements of :data:`SOURCE_TAGS` (no pixel data, nothing else).

    Raises:
        OSError: the file is not a regular file or can't be read.
    """
    from pydicom import dcmread

    with open_regular(path) as fh:
        return dcmread(fh, force=True, stop_before_pixels=True, specific_tags=list(SOURCE_TAGS))


class SRSourceError(ValueError):
    """The source image can't give an SR. The message names elements, never their values."""


#: The UIDs an SR takes from its source: each must pass the report's own UID check.
SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _element_name(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def check_source(source: Dataset, sop_instance_uid: str | None = None) -> None:
    """Refuse a source whose UIDs an SR would copy fail the report's UID check, or whose
    SOPInstanceUID is not the one of its row (``sop_instance_uid``).

    Raises:
        SRSourceError: naming the element, never its value.
    """
    for keyword in SOURCE_UIDS:
        try:
            value = str(source.get(keyword) or "").strip()
        except Exception:
            value = "\0"  # can't even be read: as invalid
        if not value:
            raise SRSourceError(f"the source image has no {_element_name(keyword)}")
        if not valid_uid(value):
            raise SRSourceError(f"the source image's {_element_name(keyword)} is not a valid UID")
    if sop_instance_uid is not None and str(source.SOPInstanceUID).strip() != sop_instance_uid:
        raise SRSourceError(
            f"the source image's {_element_name('SOPInstanceUID')} is not the one in its report row (the file changed)"
        )


def invalid_elements(source: Dataset) -> list[str]:
    """The elements of ``source`` (keyword and tag) whose values their VR does not allow."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    bad: list[str] = []
    for keyword in SOURCE_TAGS:
        try:
            elem = source.data_element(keyword)
            if elem is None:
                continue
            values = elem.value if isinstance(elem.value, list | tuple) or elem.VM > 1 else [elem.value]
            for value in values:
                if value not in (None, ""):
                    validate_value(elem.VR, value, config.RAISE)
        except Exception:
            bad.append(_element_name(keyword))
    return bad


def why_not_built(exc: BaseException, source: Dataset | None) -> str:
    """Why an SR could not be built, naming the offending elements and never quoting a value
    (the libraries' messages quote the patient's own values, so they are never shown)."""
    if isinstance(exc, SRSourceError):
        return f"cannot build the SR: {exc}"
    if isinstance(exc, OSError):
        return f"cannot build the SR: can't read the source image ({exc.strerror or type(exc).__name__})"
    bad = invalid_elements(source) if source is not None else []
    if bad:
        verb = "is not a valid value" if len(bad) == 1 else "are not valid values"
        return f"cannot build the SR: the source image's {', '.join(bad)} {verb} for its VR"
    return f"cannot build the SR ({type(exc).__name__}; the details are not shown: they may quote header values)"


def _private(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    if len(value) > 16:
        raise ValueError(f"private code value longer than 16 characters: {value!r}")
    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


_PLAIN_LABEL = re.compile(r"[a-z0-9][a-z0-9-]{0,13}")


def label_key(label: str) -> str:
    """The private code of a label (at most 14 characters, so ``P-<key>`` fits a code value's 16).

    A plain label (lower-case letters, digits and ``-``, at most 14 characters) is its own key in
    upper case (``normal`` → ``NORMAL``); any other label gets a readable prefix and 8 hex digits
    of its sha256 (``COVID_1a2b3c4d``), so labels that differ only in case, in characters a code
    can't hold, or after 14 characters get different codes (a ``_`` never appears in a plain key).
    """
    if _PLAIN_LABEL.fullmatch(label):
        return label.upper()
    prefix = re.sub(r"[^A-Z0-9-]", "", label.upper().replace(" ", "-"))[:5]
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{prefix}_{digest}"


def label_code(label: str) -> Any:
    """The coded concept of a label (SNOMED CT for the shipped labels, else a private code)."""
    from highdicom.sr import CodedConcept

    if label in LABEL_CODES:
        value, scheme, meaning = LABEL_CODES[label]
        return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
    return _private(label_key(label), label)


def sr_uids(source: Dataset, sha256: str) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the SR of ``source`` by the model with ``sha256``."""
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["cxr-batch-sr-series", str(source.StudyInstanceUID), sha256])
    instance = generate_uid(entropy_srcs=["cxr-batch-sr", str(source.SOPInstanceUID), sha256])
    return str(series), str(instance)


def verdict_code(in_distribution: bool | None) -> Any:
    """The coded out-of-distribution verdict: SNOMED Yes / No, or Unknown without a guard."""
    from highdicom.sr import CodedConcept

    if in_distribution is None:
        return CodedConcept(value="261665006", scheme_designator="SCT", meaning="Unknown")
    if in_distribution:
        return CodedConcept(value="373066001", scheme_designator="SCT", meaning="Yes")
    return CodedConcept(value="373067005", scheme_designator="SCT", meaning="No")


def build_sr(source: Dataset, result: Result, model: ModelIdent) -> Dataset:
    """The Comprehensive SR of one ok result of the DICOM image ``source`` (see the module docstring).

    Raises:
        ValueError: the result is not ok, or ``source`` lacks its UIDs or has an unknown SOP class.
    """
    if not result.ok or result.label is None:
        raise SRSourceError("only classified results get an SR")
    check_source(source)
    return build_sr_with(source, result, model, label_code(result.label), verdict_code(result.in_distribution))


def build_sr_with(source: Dataset, result: Result, model: ModelIdent, finding: Any, verdict: Any) -> Dataset:
    """:func:`build_sr` with the finding and verdict codes given (:mod:`.sr_template` builds its
    template with placeholder codes through this, so the template is this function's own output)."""
    import highdicom as hd
    from pydicom.dataset import Dataset as PydicomDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes

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
            name=_private(f"P-{label_key(label)}", f"Probability of {label}"),
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
        finding_type=finding,
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
    if "SpecificCharacterSet" in out:
        # An empty value is the default repertoire: dropped when it is the only one, written
        # ISO 2022 IR 6 when it is the first of several (code extensions), as PS3.3 C.12.1.1.2 says.
        raw = out.SpecificCharacterSet
        values = [
            str(v or "").strip() for v in (raw if isinstance(raw, list | tuple) or hasattr(raw, "append") else [raw])
        ]
        if not any(values) or values in (["ISO_IR 6"], ["ISO 2022 IR 6"]):
            del out.SpecificCharacterSet
        else:
            values = [v or "ISO 2022 IR 6" for v in values]
            out.SpecificCharacterSet = values if len(values) > 1 else values[0]
    for keyword in _TYPE2:
        if keyword not in out:
            out.add_new(keyword, dictionary_VR(keyword), None)
    return out


def sr_relpath(report_path: str) -> Path:
    """Where a result's SR goes under the SR folder: ``<report path>.sr.dcm`` (``dicomweb:`` dropped)."""
    path = report_path.removeprefix("dicomweb:")
    png = heatmap_relpath(path)  # the same safety rules (no root, no '..')
    return png.with_name(png.name.removesuffix(".png") + ".sr.dcm")


def wants_sr(r: Result) -> bool:
    """Whether a result gets an SR: ok rows of DICOM images (others have no study to join) that the
    lung stage did not find unassessable (no label, so no finding to report: the row's notes say so)."""
    if not r.ok or not r.fields.get("sop_instance_uid"):
        return False
    if r.assessable is False:
        r.notes.append("no SR written: not assessable")
        return False
    return True


@dataclass(frozen=True)
class BuiltSR:
    """One SR as written: its SOP instance UID and its bytes (a DICOM file)."""

    uid: str
    data: bytes


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
        store: with ``--stow``, a callable that stores a batch's SRs, given as (SOP instance UID,
            bytes) pairs (see :meth:`cxr_batch.io.dicomweb.DicomwebSource.store_encoded`); it
            returns one error message (or None) per SR.
        fast: fill each SR in from a template highdicom built once for its kind of source
            (:mod:`cxr_batch.report.sr_template`: the same bytes, creation times aside); False
            builds every SR with highdicom.

    A result whose SR can't be made keeps its classification; the note and :attr:`stats` say why.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        model: ModelIdent,
        store: Any = None,
        fast: bool = True,
    ) -> None:
        require_highdicom()
        quiet_patient_warnings()
        from cxr_batch.report.sr_template import SRTemplates

        self.templates = SRTemplates(model) if fast else None
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--sr {self.folder}: exists and is not a folder")
        keys = [label_key(x) for x in model.labels]
        if len(set(keys)) != len(keys):  # a sha256 prefix collision: never two labels under one code
            raise OutputError("--sr: two of the model's labels get the same SR code")
        self.model = model
        self.store = store
        self.stats = SRStats()
        self._out: OutputDir | None = None

    def target(self, report_path: str) -> Path:
        return self.folder / sr_relpath(report_path)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _save(self, data: bytes, report_path: str) -> None:
        """Write one SR atomically under the folder, never through a link (raises OSError)."""
        if self._out is None:
            self._out = OutputDir(self.folder)
        self._out.write_bytes(sr_relpath(report_path), data)

    def write(self, results: Sequence[Result]) -> None:
        """Write (and store) the SRs of one batch, before its rows are written (the notes go in them).

        In this thread; ``classify`` runs :meth:`make` in a pool of processes instead
        (:class:`cxr_batch.report.sr_pool.SRPool`) and hands the outcomes to :meth:`record`.
        """
        made: list[tuple[Result, BuiltSR]] = []
        for r in results:
            if not wants_sr(r):
                continue
            sr, error = self.make(r)
            if self.record(r, None if sr is None else sr.uid, error):
                assert sr is not None
                made.append((r, sr))
        if self.store is not None and made:
            self.record_stored(made, self.store([(sr.uid, sr.data) for _, sr in made]))

    def make(self, r: Result) -> tuple[BuiltSR | None, str | None]:
        """Build and save the SR of one result: (the SR, None), or (None, why it could not be made).

        From its kind's template when there is one (:mod:`cxr_batch.report.sr_template`); else
        built by highdicom, and the first of its kind makes the template (used only if it gives
        these very bytes)."""
        from cxr_batch.report.sr_template import encode

        source: Dataset | None = None
        # The libraries' warnings quote header values: they never reach stderr or a note.
        with capture():
            try:
                source = read_source(r.file)
                check_source(source, r.fields["sop_instance_uid"])
                filled = self.templates.fill(source, r) if self.templates is not None else None
                sr = build_sr(source, r, self.model) if filled is None else None
            except Exception as exc:  # one SR that can't be made must never cost the row
                return None, why_not_built(exc, source)
            try:
                if filled is not None:
                    uid, data = filled
                else:
                    assert sr is not None
                    uid, data = str(sr.SOPInstanceUID), encode(sr)
                    if self.templates is not None:
                        self.templates.learn(source, r, sr, data)
                self._save(data, r.path)
            except OSError as exc:
                return None, f"cannot write {self.target(r.path)}: {exc.strerror or exc}"
            except Exception as exc:
                return None, f"cannot write {self.target(r.path)} ({type(exc).__name__})"
        return BuiltSR(uid, data), None

    def record(self, r: Result, uid: str | None, error: str | None) -> bool:
        """Count one outcome of :meth:`make` (the SR's SOP instance UID, or the error) and note it
        in the row; True when the SR was written."""
        if error is not None or uid is None:
            self._fail(r, error or "cannot build the SR")
            return False
        self.stats.written += 1
        r.notes.append(f"SR {uid} written")
        return True

    def record_stored(self, made: Sequence[tuple[Result, BuiltSR]], errors: Sequence[str | None]) -> None:
        """Count and note the STOW-RS outcome of the SRs :meth:`record` noted as written."""
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
