"""What a film's header says about how it was made: size, bit depth, photometric interpretation and,
for DICOM, the manufacturer. ``adapt`` compares them between class folders: when one class's films
come from another scanner than the others', a fine-tune can learn the scanner instead of the disease.

Headers only: no pixel data is decoded. Every file is opened through :mod:`cxr_batch.io.safe_open`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from cxr_batch.io.safe_open import open_regular

#: The facts compared, in the order warnings name them.
FACTS = ("size", "bit_depth", "photometric", "manufacturer")

#: A class whose distribution of one fact is at least this far (total variation distance) from the
#: other classes' together gets a warning.
SHORTCUT_DISTANCE = 0.5

_PIL_DEPTH = {"1": "1", "L": "8", "LA": "8", "P": "8", "RGB": "8", "RGBA": "8", "I;16": "16", "I;16B": "16", "I": "32"}


def _size_bucket(width: int, height: int) -> str:
    """The long side, in octaves (≤256, ≤512, ... ), so one scanner's slightly varying sizes agree."""
    side, edge = max(width, height), 256
    while side > edge and edge < 16384:
        edge *= 2
    return f"≤{edge}px"


def film_facts(path: Path) -> dict[str, str]:
    """The header facts of one file (``""`` where unknown, ``"?"`` where the file can't be read)."""
    unknown = dict.fromkeys(FACTS, "?")
    try:
        fh = open_regular(path)
    except OSError:
        return unknown
    with fh:
        try:
            head = fh.read(132)
            fh.seek(0)
        except OSError:
            return unknown
        if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
            return _dicom_facts(fh) or unknown
        try:
            from PIL import Image

            with Image.open(fh) as img:
                mode = img.mode
                return {
                    "size": _size_bucket(*img.size),
                    "bit_depth": _PIL_DEPTH.get(mode, mode),
                    "photometric": "colour" if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "grey",
                    "manufacturer": "",
                }
        except Exception:  # Pillow raises many types on a damaged header
            return unknown


def _dicom_facts(fh: object) -> dict[str, str] | None:
    try:
        from pydicom import dcmread

        ds = dcmread(
            fh,  # type: ignore[arg-type]
            force=True,
            stop_before_pixels=True,
            specific_tags=["Rows", "Columns", "BitsStored", "PhotometricInterpretation", "Manufacturer"],
        )
        return {
            "size": _size_bucket(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)),
            "bit_depth": str(ds.get("BitsStored", "") or ""),
            "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
            "manufacturer": " ".join(str(ds.get("Manufacturer", "") or "").split())[:64],
        }
    except Exception:  # pydicom missing, or a header it can't parse: the facts stay unknown
        return None


def distance(a: Counter[str], b: Counter[str]) -> float:
    """Total variation distance between two value counts (0: same distribution, 1: disjoint)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def shortcut_warnings(facts: Mapping[str, Sequence[dict[str, str]]]) -> list[dict[str, object]]:
    """For each class and fact, a warning when that class's films differ from the other classes'
    (total variation distance ≥ :data:`SHORTCUT_DISTANCE`). ``facts``: class → its films' facts."""
    out: list[dict[str, object]] = []
    if len(facts) < 2:
        return out
    for label, rows in facts.items():
        others = [r for other, rs in facts.items() if other != label for r in rs]
        for fact in FACTS:
            mine = Counter(r[fact] for r in rows if r[fact] not in ("", "?"))
            rest = Counter(r[fact] for r in others if r[fact] not in ("", "?"))
            d = distance(mine, rest)
            if d >= SHORTCUT_DISTANCE:
                out.append(
                    {
                        "class": label,
                        "fact": fact,
                        "distance": round(d, 3),
                        "class_values": dict(mine.most_common(3)),
                        "other_values": dict(rest.most_common(3)),
                    }
                )
    return out
