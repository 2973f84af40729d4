"""--shard K/N and merge: a deterministic partition, resume per shard, and a merge that checks everything."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import contract, strip_run_ids, write_png

from cxr_batch.cli.main import main
from cxr_batch.errors import MergeError
from cxr_batch.io.inputs import InputSpec, discover
from cxr_batch.io.shard import Shard, shard_of
from cxr_batch.report.merge import MergeConfig, merge_reports, walk_key

#: Names that put a folder between files a plain string sort would order differently
#: ("x-1.png" < "x.png" < "x/a.png" as strings; the walk gives x/a.png, x/sub/b.png, x-1.png, x.png).
TRAPS = ["x/a.png", "x/sub/b.png", "x-1.png", "x.png", "a b/c.png", "a.png", "Z.png"]
#: A name that is not valid UTF-8 (Latin-1 "café.png").
LATIN1 = b"caf\xe9.png"


def build_folder(root: Path, images: Sequence[Path]) -> Path:
    """``images`` copied under names that catch a wrong merge order (the rest under their class folder),
    one name that is not UTF-8, and three bad files: zero bytes, text named .png, a truncated PNG."""
    images = list(images)
    assert len(images) > len(TRAPS) + 1
    for name, src in zip(TRAPS, images, strict=False):
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    rest = images[len(TRAPS) :]
    shutil.copyfile(rest[0], os.path.join(os.fsencode(root), LATIN1))
    for src in rest[1:]:
        dst = root / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image\n")
    data = images[0].read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """30 small synthetic PNGs (two class folders) in the layout of :func:`build_folder`."""
    src = tmp_path / "src"
    images = [
        write_png(src / ("pos" if i % 2 else "neg") / f"img-{i:02d}.png", i, size=(40 + i, 36)) for i in range(30)
    ]
    return build_folder(tmp_path / "folder", images)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def classify(runner: CliRunner, model: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(main, ["classify", *args, "--model", str(model), "--threads", "1"])
    return result.exit_code, result.stdout, result.stderr


def merge(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(main, ["merge", *args])
    return result.exit_code, result.stdout, result.stderr


def run_shards(runner: CliRunner, model: Path, folder: Path, out_dir: Path, n: int, suffix: str = "csv") -> list[Path]:
    parts = []
    for k in range(n):
        part = out_dir / f"part-{k}.{suffix}"
        code, _, err = classify(runner, model, str(folder), "--shard", f"{k}/{n}", "--out", str(part), "-q")
        assert code in (0, 3), err
        parts.append(part)
    return parts


# --------------------------------------------------------------------------- the partition


def test_shard_of_is_stable_and_spreads() -> None:
    # Frozen values: a change here would mix parts written by two versions of cxr-batch.
    paths = ("covid/COVID-1.png", "a.png", "sub/c.png", "caf\udce9.png")
    assert [shard_of(p, 16) for p in paths] == [0, 8, 14, 0]
    for p, raw in zip(paths, (b"covid/COVID-1.png", b"a.png", b"sub/c.png", b"caf\xe9.png"), strict=True):
        assert shard_of(p, 1000) == int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") % 1000
    counts = [0] * 8
    for i in range(8000):
        counts[shard_of(f"covid/COVID-{i}.png", 8)] += 1
    assert min(counts) > 900 and max(counts) < 1100


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "K must be 0…2"),
        ("1/0", "at least 1"),
        ("x", "is not K/N"),
        ("-1/3", "is not K/N"),
        ("1/2/3", "is not K/N"),
    ],
)
def test_bad_shard_is_a_usage_error(
    runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path, text: str, message: str
) -> None:
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--shard", text, "--out", str(tmp_path / "r.csv"))
    assert code == 2 and "--shard" in err and message in err
    assert not (tmp_path / "r.csv").exists()
    with pytest.raises(ValueError, match=message):
        Shard.parse(text)


def test_usage_errors(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "r.csv")
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--shard", "0/2", "--absolute-paths", "--out", out)
    assert code == 2 and "leave out --absolute-paths" in err
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--ray-address", "auto", "--out", out)
    assert code == 2 and "--ray-address needs --engine ray" in err


@pytest.mark.slow
def test_every_file_in_exactly_one_shard(runner: CliRunner, tiny_onnx: Path, folder: Path, tmp_path: Path) -> None:
    found = [f.display for f in discover(InputSpec(paths=(str(folder),))).files]
    assert len(found) == 33
    for n in (1, 3, 7):
        parts = run_shards(runner, tiny_onnx, folder, tmp_path / f"n{n}", n)
        seen = [[r["path"] for r in read_rows(p)] for p in parts]
        assert sorted(p for rows in seen for p in rows) == sorted(found)  # all, each once
        for k, rows in enumerate(seen):
            assert all(shard_of(p, n) == k for p in rows)
            assert rows == [p for p in found if shard_of(p, n) == k]  # in walk order
        if n == 3:
            assert all(seen)


# --------------------------------------------------------------------------- merge = one unsharded run


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_merged_shards_are_byte_identical_to_an_unsharded_run(
    runner: CliRunner, tiny_onnx: Path, folder: Path, tmp_path: Path, suffix: str
) -> None:
    whole = tmp_path / f"whole.{suffix}"
    code, _, _ = classify(runner, tiny_onnx, str(folder), "--out", str(whole), "-q")
    assert code == 3  # the bad files
    parts = run_shards(runner, tiny_onnx, folder, tmp_path, 3, suffix)
    merged = tmp_path / f"merged.{suffix}"
    code, out, err = merge(runner, *map(str, reversed(parts)), "--out", str(merged), "--expect", "3")
    assert code == 3, err  # error rows in the whole, like the unsharded run
    assert out == ""
    # Byte for byte but for the run ids: each shard is its own run, and its rows say so.
    assert strip_run_ids(merged.read_bytes()) == strip_run_ids(whole.read_bytes())
    rows = read_rows(merged) if suffix == "csv" else [json.loads(line) for line in merged.read_text().splitlines()]
    assert len({r["run_id"] for r in rows}) == 3
    # The summary of the whole, on stderr: three error reasons, 33 in total, no speed line.
    table = [[cell.strip() for cell in line.split("│")[1:-1]] for line in err.splitlines() if "│" in line]
    assert ["total", "33", "100.0", ""] in table
    assert "error: empty file (0 bytes)" in err and "images/s" not in err
    assert "merged 3 part(s), 33 rows" in err and "all 3 shards" in err


def test_walk_key_reproduces_the_walk(folder: Path) -> None:
    found = [f.display for f in discover(InputSpec(paths=(str(folder),))).files]
    assert sorted(found, key=walk_key) == found
    assert sorted(found) != found  # a plain string sort would not do


def test_parts_in_another_order_are_sorted_in_memory(
    runner: CliRunner, tiny_onnx: Path, folder: Path, tmp_path: Path
) -> None:
    """A part not in walk order (files listed by hand) still merges into walk order."""
    whole = tmp_path / "whole.csv"
    classify(runner, tiny_onnx, str(folder), "--out", str(whole), "-q")
    rows = whole.read_bytes().split(b"\r\n")
    header, body = rows[0], [r for r in rows[1:] if r]
    scrambled = tmp_path / "scrambled.csv"
    scrambled.write_bytes(b"\r\n".join([header, *reversed(body)]) + b"\r\n")
    merged = tmp_path / "merged.csv"
    code, _, err = merge(runner, str(scrambled), "--out", str(merged))
    assert code == 3, err
    assert merged.read_bytes() == whole.read_bytes()


# --------------------------------------------------------------------------- resume and empty shards


def test_resume_a_shard(runner: CliRunner, tiny_onnx: Path, folder: Path, tmp_path: Path) -> None:
    done = tmp_path / "done.csv"
    classify(runner, tiny_onnx, str(folder), "--shard", "1/3", "--out", str(done), "-q")
    lines = done.read_bytes().split(b"\r\n")
    assert len(lines) > 6
    part = tmp_path / "part-1.csv"
    part.write_bytes(b"\r\n".join(lines[:4]) + b"\r\n" + lines[4][:10])  # 3 rows and a partial one: killed
    code, _, err = classify(runner, tiny_onnx, str(folder), "--shard", "1/3", "--out", str(part), "--resume")
    assert code in (0, 3), err
    assert "resumed: kept 3 rows" in err and "shard 1/3:" in err
    assert strip_run_ids(part.read_bytes()) == strip_run_ids(done.read_bytes())
    ids = [r["run_id"] for r in read_rows(part)]
    assert ids[:3] == [r["run_id"] for r in read_rows(done)][:3] and len(set(ids[3:])) == 1 and ids[3] != ids[0]
    # Resuming into the report of another shard is refused: it would mix two shards in one part.
    code, _, err = classify(runner, tiny_onnx, str(folder), "--shard", "2/3", "--out", str(part), "--resume")
    assert code == 1 and "other shards than 2/3" in err


def test_empty_shard_succeeds_and_merges(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    n = 16
    found = [f.display for f in discover(InputSpec(paths=(str(image_dir),))).files]
    owned = {shard_of(p, n) for p in found}
    empty = next(k for k in range(n) if k not in owned)
    parts = []
    for k in range(n):
        part = tmp_path / f"part-{k:02d}.csv"
        code, _, err = classify(runner, tiny_onnx, str(image_dir), "--shard", f"{k}/{n}", "--out", str(part))
        assert code == 0, err
        parts.append(part)
    again = classify(runner, tiny_onnx, str(image_dir), "--shard", f"{empty}/{n}", "--out", str(tmp_path / "again.csv"))
    assert again[0] == 0 and f"shard {empty}/{n}: 0 of 3 files" in again[2]
    assert len(read_rows(parts[empty])) == 0 and parts[empty].read_bytes().startswith(b"path,status,")
    merged = tmp_path / "merged.csv"
    code, _, err = merge(runner, *map(str, parts), "--out", str(merged), "--expect", str(n))
    assert code == 0, err
    assert [r["path"] for r in read_rows(merged)] == found
    # One part fewer: which shards are missing is said, and that the empty parts may be some of them.
    code, _, err = merge(runner, *map(str, parts[:-1]), "--out", str(tmp_path / "m2.csv"), "--expect", str(n))
    assert code == 1 and f"15 part(s) given, {n} expected" in err and "no part holds rows of shard(s)" in err
    assert "part(s) have no rows" in err


# --------------------------------------------------------------------------- merge conflicts


@pytest.fixture
def three_parts(runner: CliRunner, tiny_onnx: Path, folder: Path, tmp_path: Path) -> list[Path]:
    return run_shards(runner, tiny_onnx, folder, tmp_path / "parts", 3)


def test_merge_missing_shard(runner: CliRunner, three_parts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    code, _, err = merge(runner, str(three_parts[0]), str(three_parts[2]), "--out", str(out), "--expect", "3")
    assert code == 1 and "2 part(s) given, 3 expected: no part holds rows of shard(s) 1" in err
    assert not out.exists()
    # Without --expect the same parts merge (a subset is a valid report).
    assert merge(runner, str(three_parts[0]), str(three_parts[2]), "--out", str(out))[0] == 3


def test_merge_duplicate_path(
    runner: CliRunner, tiny_onnx: Path, folder: Path, three_parts: list[Path], tmp_path: Path
) -> None:
    whole = tmp_path / "whole.csv"
    classify(runner, tiny_onnx, str(folder), "--out", str(whole), "-q")
    out = tmp_path / "m.csv"
    code, _, err = merge(runner, *map(str, three_parts), str(whole), "--out", str(out))
    assert code == 1 and "appears in both" in err and str(whole) in err
    assert any(str(p) in err for p in three_parts)
    assert not out.exists()
    # The same file named twice, and a part with a row twice.
    code, _, err = merge(runner, str(three_parts[0]), str(three_parts[0]), "--out", str(out))
    assert code == 1 and "the same part is given twice" in err
    doubled = tmp_path / "doubled.csv"
    lines = three_parts[0].read_bytes().split(b"\r\n")
    doubled.write_bytes(b"\r\n".join([lines[0], lines[1], *lines[1:]]))
    code, _, err = merge(runner, str(doubled), "--out", str(out))
    assert code == 1 and f"twice in {doubled} (rows 1 and 2)" in err


def test_merge_different_model(
    runner: CliRunner, tiny_onnx: Path, other_onnx: Path, folder: Path, three_parts: list[Path], tmp_path: Path
) -> None:
    other = tmp_path / "other-1.csv"
    classify(runner, other_onnx, str(folder), "--shard", "1/3", "--out", str(other), "-q")
    code, _, err = merge(runner, str(three_parts[0]), str(other), str(three_parts[2]), "--out", str(tmp_path / "m.csv"))
    assert code == 1 and "'tiny@2'" in err and "'tiny@1'" in err and str(other) in err and "one model only" in err


def test_merge_different_columns(
    runner: CliRunner, make_model: object, folder: Path, three_parts: list[Path], tmp_path: Path
) -> None:
    two = make_model("two.onnx", meta=contract(labels=["normal", "covid"]), n_classes=2)  # type: ignore[operator]
    other = tmp_path / "other-1.csv"
    classify(runner, two, str(folder), "--shard", "1/3", "--out", str(other), "-q")
    code, _, err = merge(runner, str(three_parts[0]), str(other), "--out", str(tmp_path / "m.csv"))
    assert code == 1 and f"{other} has other columns than {three_parts[0]}" in err and "prob_viral" in err


def test_merge_mixed_up_parts(
    runner: CliRunner, tiny_onnx: Path, folder: Path, three_parts: list[Path], tmp_path: Path
) -> None:
    halves = run_shards(runner, tiny_onnx, folder, tmp_path / "halves", 2)
    out = str(tmp_path / "m.csv")
    # Parts of N=2 merged as N=3: a part's rows fall in several shards of 3.
    code, _, err = merge(runner, *map(str, halves), "--out", out, "--expect", "3")
    assert code == 1 and "is not one shard of 3" in err and str(halves[0]) in err
    # Parts of N=3 checked as N=2.
    code, _, err = merge(runner, *map(str, three_parts), "--out", out, "--expect", "2")
    assert code == 1 and "is not one shard of 2" in err


def test_merge_refuses_damaged_parts_and_outputs(runner: CliRunner, three_parts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    cut = tmp_path / "cut.csv"
    cut.write_bytes(three_parts[1].read_bytes()[:-7])
    code, _, err = merge(runner, str(three_parts[0]), str(cut), "--out", str(out))
    assert code == 1 and f"{cut} ends in a partial row" in err and "--resume" in err
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert "is empty" in merge(runner, str(empty), "--out", str(out))[2]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("")
    assert "merge parts of one format" in merge(runner, str(three_parts[0]), str(jsonl), "--out", str(out))[2]
    # The output: never silently replaced, never one of the parts.
    out.write_text("keep me")
    code, _, err = merge(runner, *map(str, three_parts), "--out", str(out))
    assert code == 1 and "--overwrite" in err and out.read_text() == "keep me"
    assert merge(runner, *map(str, three_parts), "--out", str(out), "--overwrite", "-q")[0] == 3
    code, _, err = merge(runner, *map(str, three_parts), "--out", str(three_parts[0]), "--overwrite")
    assert code == 1 and "is also one of the parts" in err
    assert not list(tmp_path.glob(".m.csv.*"))  # no temporary files left behind


def test_merge_library_api(three_parts: list[Path], tmp_path: Path) -> None:
    merged = merge_reports(
        MergeConfig(parts=tuple(map(str, three_parts)), out=str(tmp_path / "m.csv"), expect=3, quiet=True)
    )
    assert merged.parts == 3 and sorted(v for v in merged.shards.values() if v is not None) == [0, 1, 2]
    assert merged.stats.total == 33 and merged.stats.all_errors == 3
    with pytest.raises(MergeError, match="2 part"):
        merge_reports(MergeConfig(parts=tuple(map(str, three_parts[:2])), out=str(tmp_path / "n.csv"), expect=3))
