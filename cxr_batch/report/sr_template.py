"""SRs at the speed of the model: highdicom builds one SR a run, each film's SR is filled in.

Building a Comprehensive SR with highdicom and writing it with pydicom costs tens of milliseconds
of pure Python an image (its per-call validation, deep copies and content-tree searches), more
than classifying the image. Yet every SR of a run has the same structure: only the film's values
change (its UIDs and the UIDs derived from them, the patient and study elements copied from it,
the finding, the probabilities, the verdict, and the creation times).

So :class:`SRTemplates` builds the SR once for each kind of source (SOP class, character set,
modality, and whether the model has an out-of-distribution score), with :func:`.sr.build_sr_with`
itself and placeholder values, and encodes it once: every element without a placeholder is kept
as the bytes pydicom wrote for it, every placeholder becomes a slot. A film's SR is those bytes
with the film's values encoded into the slots by pydicom (``write_data_element``, with the SR's
character set), and the sequence and item lengths computed as pydicom computes them.

The bytes are those ``build_sr(...).save_as(...)`` writes, creation times aside; three checks hold
it to that:

- a template is used only once its own placeholder values, filled back in, give exactly the bytes
  pydicom writes for the highdicom SR it came from (:func:`_nodes` walks as pydicom walks);
- the first film of each kind is built with highdicom as before, and the template must give
  exactly its bytes (with highdicom's creation times) before it serves any other film: a
  highdicom or pydicom that builds or writes differently turns the template off for the run;
- a film's values go through the same checks highdicom makes of them (:func:`_highdicom_checks`);
  any value the template can't take as highdicom would (an invalid date or sex, a code that
  isn't a plain code value, a number pydicom can't write as a DS) sends the film to highdicom,
  which builds it, or refuses it with the message it gives today.
"""

from __future__ import annotations

import copy
import datetime
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.valuerep import DA, DS, DT, TM

from cxr_batch.report.sr import (
    ModelIdent,
    _with_type2_elements,
    build_sr_with,
    label_code,
    sr_uids,
    verdict_code,
)

if TYPE_CHECKING:
    from cxr_batch.engine.types import Result

#: The creation times of an SR (highdicom's "now"): slots by tag, whatever their value.
TIME_TAGS = {
    0x00080012: "InstanceCreationDate",
    0x00080013: "InstanceCreationTime",
    0x00080023: "ContentDate",
    0x00080033: "ContentTime",
    0x0018A002: "ContributionDateTime",
}
#: Elements of the source that the template's key holds (the SR depends on them, never a slot).
KEY_TAGS = ("SOPClassUID", "SpecificCharacterSet", "Modality")
#: Placeholder values (valid for their VR, found nowhere else in an SR).
_SOURCE_UIDS = {"SOPInstanceUID": "2.25.9001", "SeriesInstanceUID": "2.25.9002", "StudyInstanceUID": "2.25.9003"}
_SOURCE_VALUES = {
    "PatientName": "SLOT^PATIENT",
    "PatientID": "SLOT-PATIENT-ID",
    "PatientBirthDate": "19010203",
    "PatientSex": "O",
    "StudyDate": "19020304",
    "StudyTime": "010203",
    "StudyID": "SLOT-STUDY",
    "AccessionNumber": "SLOT-ACCESSION",
    "ReferringPhysicianName": "SLOT^REFERRER",
}
_CODE_KEYWORDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Slot:
    """One element whose value is the film's: ``name`` says which value, ``tag`` and ``vr`` are
    the template's (a ``copy:`` slot takes the source's own element, VR and all, as highdicom does)."""

    name: str
    tag: int
    vr: str


@dataclass
class _Seq:
    """A sequence with a slot somewhere inside: its items are encoded for each film."""

    tag: int
    undefined: bool
    items: list[tuple[bool, list[Any]]]  # (undefined-length item, its nodes)


def _leaf(elem: Any, encodings: Any) -> bytes:
    """One element as pydicom writes it (explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _nodes(ds: Dataset, encodings: Any, slot_of: Any) -> list[Any]:
    """The nodes of ``ds`` in tag order: bytes, :class:`Slot` or :class:`_Seq` (as pydicom's
    ``write_dataset`` walks it: group lengths dropped, each item in its parent's character set)."""
    encodings = ds.get("SpecificCharacterSet", encodings)
    out: list[Any] = []
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue
        elem = ds[tag]
        slot = slot_of(elem)
        if slot is not None:
            out.append(slot)
        elif elem.VR == "SQ" and not elem.is_empty:
            items = [
                (bool(getattr(item, "is_undefined_length_sequence_item", False)), _nodes(item, encodings, slot_of))
                for item in elem.value
            ]
            seq = _Seq(int(tag), bool(elem.is_undefined_length), items)
            if all(isinstance(n, bytes) for _, nodes in items for n in nodes):
                out.append(_render([seq], {}, encodings))  # nothing of the film's inside: bytes once
            else:
                out.append(seq)
        else:
            out.append(_leaf(elem, encodings))
    merged: list[Any] = []
    for node in out:
        if isinstance(node, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += node
        else:
            merged.append(node)
    return merged


def _render(nodes: list[Any], values: dict[str, Any], encodings: Any) -> bytes:
    """The bytes of ``nodes`` with ``values`` in the slots (lengths as pydicom writes them)."""
    parts: list[bytes] = []
    for node in nodes:
        if isinstance(node, bytes):
            parts.append(node)
        elif isinstance(node, Slot):
            value = values[node.name]
            elem = value if isinstance(value, DataElement) else DataElement(node.tag, node.vr, value)
            if elem.tag != node.tag:
                raise ValueError("a slot's element has another tag")
            parts.append(_leaf(elem, encodings))
        else:
            body = []
            for undefined, item_nodes in node.items:
                data = _render(item_nodes, values, encodings)
                if undefined:
                    body.append(_ITEM + struct.pack("<I", _UNDEFINED) + data + _ITEM_END)
                else:
                    body.append(_ITEM + struct.pack("<I", len(data)) + data)
            value_bytes = b"".join(body)
            head = struct.pack("<HH", node.tag >> 16, node.tag & 0xFFFF) + b"SQ\0\0"
            if node.undefined:
                parts.append(head + struct.pack("<I", _UNDEFINED) + value_bytes + _SEQ_END)
            else:
                parts.append(head + struct.pack("<I", len(value_bytes)) + value_bytes)
    return b"".join(parts)


def encode(sr: Dataset) -> bytes:
    """The bytes ``sr.save_as(fh, enforce_file_format=True)`` writes (pydicom's own encoding)."""
    fp = DicomBytesIO()
    sr.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


@dataclass
class Template:
    """The encoded SR of one kind of source, with slots; ``verified`` once a film built by
    highdicom gave the same bytes."""

    meta: list[Any]
    body: list[Any]
    encodings: Any
    codes: dict[str, tuple[str, ...]]  # slot prefix -> the keywords of its code item, in order
    verified: bool = False
    broken: bool = False

    def fill(self, values: dict[str, Any]) -> bytes:
        meta = _render(self.meta, values, None)
        group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(meta))
        return b"\0" * 128 + b"DICM" + group_length + meta + _render(self.body, values, self.encodings)


def _key(source: Dataset, ood: bool) -> tuple[Any, ...]:
    """The kind of a source (with its type 2 elements added: its character set as the SR writes it)."""

    def value(keyword: str) -> Any:
        v = source.get(keyword)
        return tuple(v) if isinstance(v, list | tuple) or hasattr(v, "append") else (None if v is None else str(v))

    return (*(value(k) for k in KEY_TAGS), ood)


def _placeholder_source(source: Dataset) -> Dataset:
    """A source with ``source``'s key elements and placeholders for everything of the film's."""
    proto = Dataset()
    for keyword in KEY_TAGS:
        if keyword in source:
            proto.add(copy.deepcopy(source.data_element(keyword)))  # type: ignore[arg-type]
    for keyword, value in {**_SOURCE_UIDS, **_SOURCE_VALUES}.items():
        setattr(proto, keyword, value)
    return proto


def _placeholder_code(prefix: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(
        value=f"SLOT{prefix.upper()}"[:16], scheme_designator=f"99SLOT{prefix[0].upper()}", meaning=f"slot {prefix}"
    )


def _nums(model: ModelIdent) -> dict[str, float]:
    """A distinct placeholder number for each probability and the OOD score (short, exact decimals)."""
    names = [f"p:{label}" for label in model.labels] + ["ood"]
    return {name: 0.3125 + (i + 1) / 1024 for i, name in enumerate(names)}


def build_template(source: Dataset, result: Result, model: ModelIdent) -> Template:
    """The template of ``source``'s kind, built with highdicom from placeholders.

    Raises:
        Exception: whatever highdicom raises for this kind of source, or ValueError when the
            template's own values don't give back highdicom's bytes.
    """
    from dataclasses import replace

    proto_source = _placeholder_source(source)
    nums = _nums(model)
    proto_result = replace(
        result,
        probs={label: nums[f"p:{label}"] for label in model.labels},
        ood_score=None if result.ood_score is None else nums["ood"],
        notes=[],
    )
    finding, verdict = _placeholder_code("finding"), _placeholder_code("verdict")
    sr = build_sr_with(proto_source, proto_result, model, finding, verdict)
    expected = encode(sr)

    copied = {id(proto_source[keyword]): f"copy:{keyword}" for keyword in _SOURCE_VALUES}
    copied[id(proto_source["StudyInstanceUID"])] = "copy:StudyInstanceUID"
    by_value: dict[str, str] = {v: f"src:{k}" for k, v in _SOURCE_UIDS.items()}
    for suffix, index, name in (
        ("", 0, "sr:series"),
        ("", 1, "sr:sop"),
        ("-group", 1, "sr:group"),
        ("-device", 0, "sr:device"),
    ):
        by_value[sr_uids(proto_source, model.sha256 + suffix)[index]] = name
    for prefix, code in (("finding", finding), ("verdict", verdict)):
        for keyword in _CODE_KEYWORDS:
            by_value[str(getattr(code, keyword))] = f"{prefix}:{keyword}"
    by_number = {v: k for k, v in nums.items()}
    found: dict[str, int] = {}

    def slot_of(elem: Any) -> Slot | None:
        tag = int(elem.tag)
        name: str | None = None
        if tag in TIME_TAGS:
            name = f"time:{tag:08X}"
        elif id(elem) in copied:
            name = copied[id(elem)]
        elif elem.VR in ("DS", "FD") and not elem.is_empty and elem.VM == 1:
            name = by_number.get(float(elem.value))
            if name is not None:
                name = f"{elem.VR}:{name}"
        elif isinstance(elem.value, str) and elem.value in by_value:
            name = by_value[elem.value]
        if name is None:
            return None
        found[name] = found.get(name, 0) + 1
        return Slot(name, tag, elem.VR)

    encodings = sr.get("SpecificCharacterSet", "iso8859")
    meta = Dataset()
    meta.update({tag: elem for tag, elem in sr.file_meta.items() if int(tag) != 0x00020000})
    template = Template(
        meta=_nodes(meta, None, slot_of),
        body=_nodes(sr, encodings, slot_of),
        encodings=encodings,
        codes={"finding": _CODE_KEYWORDS, "verdict": _CODE_KEYWORDS},
    )
    needed = {f"copy:{k}" for k in (*_SOURCE_VALUES, "StudyInstanceUID")} | {"sr:sop", "sr:series"}
    needed |= {f"{vr}:p:{label}" for label in model.labels for vr in ("DS", "FD")}
    needed |= {f"{p}:{k}" for p in ("finding", "verdict") for k in _CODE_KEYWORDS}
    if result.ood_score is not None:
        needed |= {"DS:ood", "FD:ood"}
    if not needed <= set(found):
        raise ValueError(f"the template lacks slots: {sorted(needed - set(found))}")
    if template.fill(_values_of(sr, proto_source, proto_result, model, finding, verdict, template)) != expected:
        raise ValueError("the template does not give back highdicom's bytes")
    return template


def _times_of(sr: Dataset) -> dict[str, Any]:
    """The creation times in an SR highdicom built (to compare a template's bytes with its)."""
    out: dict[str, Any] = {}

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if int(elem.tag) in TIME_TAGS:
                out.setdefault(f"time:{int(elem.tag):08X}", elem.value)
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(sr)
    return out


def _now() -> dict[str, Any]:
    now = datetime.datetime.now()
    date, time = DA(now.date()), TM(now.time())
    return {
        "time:00080012": date,
        "time:00080013": time,
        "time:00080023": date,
        "time:00080033": time,
        "time:0018A002": DT(now),
    }


def _highdicom_checks(source: Dataset) -> None:
    """The checks highdicom's SOPClass makes of a film's patient and study values (raises as it does)."""
    from highdicom.enum import PatientSexValues

    DA(source.PatientBirthDate)
    sex = source.PatientSex
    if sex is not None and sex != "":
        PatientSexValues(sex)
    if source.StudyDate is not None:
        DA(source.StudyDate)
    if source.StudyTime is not None:
        TM(source.StudyTime)


def _values_of(
    sr_or_none: Dataset | None,
    source: Dataset,
    result: Result,
    model: ModelIdent,
    finding: Any,
    verdict: Any,
    template: Template,
) -> dict[str, Any]:
    """The slot values of one film (``source`` with its type 2 elements already added); the
    creation times of ``sr_or_none`` when given (a comparison), else now."""
    values: dict[str, Any] = _times_of(sr_or_none) if sr_or_none is not None else _now()
    for keyword in (*_SOURCE_VALUES, "StudyInstanceUID"):
        values[f"copy:{keyword}"] = source[keyword]
    for keyword in _SOURCE_UIDS:
        values[f"src:{keyword}"] = str(source[keyword].value)
    values["sr:series"], values["sr:sop"] = sr_uids(source, model.sha256)
    values["sr:group"] = sr_uids(source, model.sha256 + "-group")[1]
    values["sr:device"] = sr_uids(source, model.sha256 + "-device")[0]
    for prefix, code in (("finding", finding), ("verdict", verdict)):
        if sorted(int(e.tag) for e in code) != [0x00080100, 0x00080102, 0x00080104]:
            raise ValueError("not a plain code (value, scheme, meaning)")
        for keyword in template.codes[prefix]:
            values[f"{prefix}:{keyword}"] = getattr(code, keyword)
    numbers = {f"p:{label}": float(result.probs[label]) for label in model.labels}
    if result.ood_score is not None:
        numbers["ood"] = float(result.ood_score)
    for name, number in numbers.items():
        values[f"DS:{name}"] = DS(number, auto_format=True)
        values[f"FD:{name}"] = number
    return values


@dataclass
class SRTemplates:
    """The templates of a run (one per kind of source), and each film's SR from them."""

    model: ModelIdent
    _templates: dict[tuple[Any, ...], Template | None] = field(default_factory=dict)
    _codes: dict[Any, Any] = field(default_factory=dict)

    def _code(self, key: Any, make: Any) -> Any:
        if key not in self._codes:
            self._codes[key] = make()
        return self._codes[key]

    def fill(self, source: Dataset, result: Result, times: Dataset | None = None) -> tuple[str, bytes] | None:
        """(SOP instance UID, bytes) of the film's SR from its template; None when the film must
        be built by highdicom (the first of its kind, a template that could not be made, or a
        value the template can't take as highdicom would). ``source`` passed :func:`.sr.check_source`.
        The creation times are now's, or those of the SR ``times`` (to compare with it)."""
        try:
            full = _with_type2_elements(source)
            template = self._templates.get(_key(full, result.ood_score is not None))
            if template is None or not template.verified or template.broken:
                return None
            _highdicom_checks(full)
            values = self._values(full, result, times, template)
            return values["sr:sop"], template.fill(values)
        except Exception:
            return None

    def _values(self, full: Dataset, result: Result, sr: Dataset | None, template: Template) -> dict[str, Any]:
        assert result.label is not None
        finding = self._code(("label", result.label), lambda: label_code(result.label))
        verdict = self._code(("verdict", result.in_distribution), lambda: verdict_code(result.in_distribution))
        return _values_of(sr, full, result, self.model, finding, verdict, template)

    def learn(self, source: Dataset, result: Result, sr: Dataset, data: bytes) -> None:
        """After highdicom built ``sr`` (written as ``data``) for a film: make the template of its
        kind if there is none yet, and use it only if it gives exactly these bytes."""
        try:
            full = _with_type2_elements(source)
            key = _key(full, result.ood_score is not None)
            if key in self._templates:
                return
            self._templates[key] = None  # one try a kind: a source highdicom refuses never retries
            template = build_template(full, result, self.model)
            _highdicom_checks(full)
            if template.fill(self._values(full, result, sr, template)) == data:
                template.verified = True
                self._templates[key] = template
        except Exception:
            return


__all__ = ["SRTemplates", "Template", "build_template", "encode"]
