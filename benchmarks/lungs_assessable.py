"""How often the lung stage calls films assessable: frontal chest films against everything else.

    python benchmarks/lungs_assessable.py                       # the shipped segmenter, ../shared/data
    python benchmarks/lungs_assessable.py --per-source 200 --part check --json out.json

Positives (must be >= 98% assessable): frontal chest films from every source we hold: the pool's
normal, viral and covid films (covid19-radiography), kermany-normal, near-ood bacterial
pneumonia (pediatric), the Montgomery and Shenzhen films of lung-masks/, sample_images/, the RSNA
and pydicom chest DICOMs.

Negatives (must be >= 95% not assessable):
- real: the CT and MR slices of pydicom's test files (decoded pixels only: the DICOM header's
  modality, which classify also uses, is left out here so the pixels alone are measured);
- blank images (constant grey levels, gradients) and noise (uniform, Gaussian, smoothed);
- "photograph-like" proxies: random 1/f ("pink") noise textures and random shapes on textured
  backgrounds, in colour, converted to grey as classify does. They are not photographs;
  we hold no photographs;
- "lateral-like" proxies: one horizontal half of a frontal film stretched to the full width.
  They are not lateral views (we hold none): they test "one lung field", not a lateral's anatomy.

Every set is split by a seeded draw into a ``calibrate`` part (the rules in
``cxr_batch.io.lungs.LungRules`` were set looking at it) and a ``check`` part (reported; never
looked at while setting them). Synthetic images of the check part use other seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from cxr_batch.engine.lungs import LungSegmenter  # noqa: E402
from cxr_batch.errors import ImageError  # noqa: E402
from cxr_batch.io.preprocess import decode, to_grey  # noqa: E402

Film = tuple[str, Callable[[], np.ndarray]]


def _files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(
        p for p in folder.rglob(pattern) if p.is_file() and p.suffix.lower() in {".png", ".jpg", ".jpeg", ".dcm"}
    )


def _part(items: list[Path], part: str, per_source: int, seed: int) -> list[Path]:
    """A seeded half of ``items`` (calibrate / check), then at most ``per_source`` of it."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    half = len(items) // 2
    chosen = order[:half] if part == "calibrate" else order[half:]
    if len(items) == 1:
        chosen = order  # a single file counts in both parts
    return [items[i] for i in sorted(chosen[:per_source])]


def positives(part: str, per_source: int) -> dict[str, list[Path]]:
    pool = SHARED / "covid19-radiography"
    sets = {
        "pool normal": _files(pool / "normal"),
        "pool viral": _files(pool / "viral"),
        "pool covid": _files(pool / "covid"),
        "kermany-normal": _files(SHARED / "kermany-normal"),
        "near-ood bacterial": _files(SHARED / "near-ood" / "bacterial"),
        "montgomery": _files(SHARED / "lung-masks" / "montgomery" / "images"),
        "shenzhen": _files(SHARED / "lung-masks" / "shenzhen" / "images"),
        "sample_images": _files(REPO / "sample_images"),
        "rsna dicom": _files(SHARED / "dicom" / "rsna-pneumonia-challenge_lungbox"),
        "pydicom chest dicom": _files(SHARED / "dicom" / "pydicom-data"),
    }
    return {k: _part(v, part, per_source, i) for i, (k, v) in enumerate(sets.items()) if v}


def _pink(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    f = np.fft.fftfreq(size)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    r[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / r**beta
    img = np.real(np.fft.ifft2(spectrum))
    img -= img.min()
    return img / max(float(img.max()), 1e-9)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import ImageDraw

    rgb = (np.stack([_pink(rng, size, 1.5) for _ in range(3)], -1) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(10, size // 2), y0 + rng.integers(10, size // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=colour)
    return to_grey(img)


def synthetic(part: str, n: int) -> dict[str, list[Film]]:
    """Blank, noise and photograph-like proxies; other seeds for each part."""
    base = 1000 if part == "check" else 0
    blank: list[Film] = []
    for i, level in enumerate(np.linspace(0, 1, 6)):
        blank.append((f"blank {level:.1f}", lambda v=level: np.full((512, 512), v, np.float32)))
        blank.append(
            (f"gradient {i}", lambda k=i: np.tile(np.linspace(0, 1, 512, dtype=np.float32), (512, 1)).T ** (k + 1))
        )
    noise: list[Film] = []
    photo: list[Film] = []
    for i in range(n):
        seed = base + i

        def uniform(s: int = seed) -> np.ndarray:
            return np.random.default_rng(s).random((512, 512), dtype=np.float32)

        def smooth(s: int = seed) -> np.ndarray:
            rng = np.random.default_rng(s)
            small = rng.random((int(rng.integers(4, 64)),) * 2).astype(np.float32)
            return np.asarray(Image.fromarray(small).resize((512, 512), Image.Resampling.BICUBIC)).clip(0, 1)

        def gauss(s: int = seed) -> np.ndarray:
            rng = np.random.default_rng(s)
            return (0.5 + 0.15 * rng.standard_normal((512, 512))).clip(0, 1).astype(np.float32)

        noise += [
            (f"uniform noise {seed}", uniform),
            (f"smoothed noise {seed}", smooth),
            (f"gaussian noise {seed}", gauss),
        ]
        photo += [
            (f"pink texture {seed}", lambda s=seed: _pink(np.random.default_rng(s), 512, 1.0 + (s % 5) * 0.25)),
            (f"shapes {seed}", lambda s=seed: _shapes(np.random.default_rng(s), 512)),
        ]
    return {"blank": blank, "noise": noise, "photograph-like (proxy)": photo}


def lateral_like(films: list[Path]) -> list[Film]:
    """One horizontal half of a frontal film, stretched to the full width (a proxy)."""
    out: list[Film] = []
    for i, p in enumerate(films):

        def half(path: Path = p, right: bool = i % 2 == 1) -> np.ndarray:
            g = decode(path).grey
            w = g.shape[1]
            part = g[:, w // 2 :] if right else g[:, : w // 2]
            return np.asarray(Image.fromarray(part).resize((w, g.shape[0]), Image.Resampling.BILINEAR))

        out.append((f"half of {p.name}", half))
    return out


def as_films(paths: list[Path]) -> list[Film]:
    return [(str(p), lambda path=p: decode(path).grey) for p in paths]


def run(seg: LungSegmenter, films: list[Film]) -> Iterator[tuple[str, bool | None, str | None, float]]:
    for name, load in films:
        try:
            grey = load()
        except ImageError as exc:
            yield name, None, f"unreadable: {exc}", 0.0
            continue
        v = seg.read(grey)
        yield name, v.assessable, v.note, v.lung_fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenter", default=None, help="the segmenter (default: the shipped one)")
    ap.add_argument("--part", choices=["calibrate", "check"], default="check")
    ap.add_argument("--per-source", type=int, default=150, help="films per positive source (default 150)")
    ap.add_argument("--synthetic", type=int, default=40, help="images per synthetic family (default 40)")
    ap.add_argument("--json", help="write the per-set results here")
    ap.add_argument("--show", type=int, default=3, help="name this many misses per set")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: this benchmark reads ../shared/data")
    seg = LungSegmenter(args.segmenter, threads=2)
    t0 = time.time()
    pos = positives(args.part, args.per_source)
    frontal = [p for k in ("montgomery", "shenzhen", "pool normal", "kermany-normal") for p in pos.get(k, [])[:25]]
    neg: dict[str, list[Film]] = {
        "CT/MR slices (pixels only)": as_films(
            [SHARED / "dicom" / "pydicom-testfiles" / "other" / n for n in ("CT_small.dcm", "MR_small.dcm")]
        ),
        **synthetic(args.part, args.synthetic),
        "lateral-like (proxy: half film stretched)": lateral_like(frontal),
    }
    results: dict[str, dict[str, object]] = {}
    totals = {"positive": [0, 0], "negative": [0, 0]}
    for kind, sets in (("positive", {k: as_films(v) for k, v in pos.items()}), ("negative", neg)):
        for name, films in sets.items():
            rows = list(run(seg, films))
            read = [r for r in rows if r[1] is not None]
            good = sum(1 for r in read if r[1] == (kind == "positive"))
            totals[kind][0] += good
            totals[kind][1] += len(read)
            misses = [r for r in read if r[1] != (kind == "positive")]
            why = Counter(r[2] or "assessable" for r in misses)
            results[name] = {
                "kind": kind,
                "n": len(read),
                "correct": good,
                "rate": round(good / len(read), 4) if read else None,
                "misses_by_reason": dict(why),
                "misses": [r[0] for r in misses][: args.show],
                "unreadable": len(rows) - len(read),
                "lung_fraction_median": round(float(np.median([r[3] for r in read])), 4) if read else None,
            }
            want = "assessable" if kind == "positive" else "not assessable"
            print(
                f"{name:45s} {good:4d}/{len(read):<4d} {want:15s} {100 * good / max(len(read), 1):6.1f}%  "
                + ", ".join(f"{k}: {v}" for k, v in why.most_common()),
                flush=True,
            )
    pos_rate = totals["positive"][0] / max(totals["positive"][1], 1)
    neg_rate = totals["negative"][0] / max(totals["negative"][1], 1)
    print(
        f"\nfrontal films assessable: {totals['positive'][0]}/{totals['positive'][1]} = {100 * pos_rate:.1f}% (target >= 98%)"
    )
    print(
        f"non-frontal inputs not assessable: {totals['negative'][0]}/{totals['negative'][1]} = {100 * neg_rate:.1f}% "
        "(target >= 95%)"
    )
    worst = min((r["rate"] for r in results.values() if r["rate"] is not None), default=None)
    print(
        f"worst set: {worst}; segmenter {seg.meta.ident} ({seg.path.name}), part {args.part}, {time.time() - t0:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "segmenter": seg.describe(),
                    "part": args.part,
                    "frontal_assessable": [*totals["positive"], pos_rate],
                    "other_not_assessable": [*totals["negative"], neg_rate],
                    "sets": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
