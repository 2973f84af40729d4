"""Training, split, layouts and export. Needs the train extra (torch, torchvision, onnx)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from cxr_batch.errors import DataError
from cxr_batch.io.labelled import find_labelled, make_split

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")
pytest.importorskip("onnx", reason="the train extra (onnx) is not installed")

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "covid19-radiography"


def _png(path: Path, seed: int, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 real X-rays per class from the shared pool (copied), or generated images when it is absent."""
    root = tmp_path_factory.mktemp("pool")
    for label in ("normal", "viral", "covid"):
        if POOL.is_dir():
            for src in sorted((POOL / label).iterdir())[:12]:
                (root / label).mkdir(parents=True, exist_ok=True)
                (root / label / src.name).write_bytes(src.read_bytes())
        else:
            for i in range(12):
                _png(root / label / f"{label}-{i}.png", hash((label, i)) % 2**32)
    return root


# ---------------------------------------------------------------- layouts


def test_layout_release2(tmp_path: Path) -> None:
    for folder in ("COVID", "NORMAL", "Viral Pneumonia"):
        _png(tmp_path / folder / f"{folder} (1).png", 1)
    ds = find_labelled(tmp_path)
    assert ds.labels == ["normal", "viral", "covid"]
    assert ds.layout == "covid19-radiography (release 2)"
    assert {label for _, label in ds.items} == {"normal", "viral", "covid"}


def test_layout_release4_ignores_lung_opacity_and_masks(tmp_path: Path) -> None:
    for i, folder in enumerate(("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity")):
        _png(tmp_path / folder / "images" / f"{folder}-1.png", i)
        _png(tmp_path / folder / "masks" / f"{folder}-1.png", 10 + i)
    ds = find_labelled(tmp_path)
    assert ds.labels == ["normal", "viral", "covid"]
    assert ds.layout == "covid19-radiography (release 4+)"
    assert len(ds.items) == 3
    assert all("masks" not in p.parts for p, _ in ds.items)
    assert ds.ignored == ["Lung_Opacity"]
    with_lo = find_labelled(tmp_path, ["normal", "viral", "covid", "Lung_Opacity"])
    assert with_lo.labels == ["normal", "viral", "covid", "lung_opacity"]
    assert len(with_lo.items) == 4


def test_layout_plain_and_generic(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    for label in ("covid", "normal", "viral"):
        _png(plain / label / "a.png", 1)
    assert find_labelled(plain).labels == ["normal", "viral", "covid"]
    generic = tmp_path / "generic"
    for label in ("pa", "lateral"):
        _png(generic / label / "a.png", 2)
    (generic / ".hidden").mkdir()
    assert find_labelled(generic).labels == ["lateral", "pa"]
    assert find_labelled(generic, ["pa", "lateral"]).labels == ["pa", "lateral"]
    with pytest.raises(DataError, match="no folder for class"):
        find_labelled(generic, ["covid"])


@pytest.mark.skipif(not POOL.is_dir(), reason="../shared/data/covid19-radiography is absent")
def test_layout_shared_pool() -> None:
    ds = find_labelled(POOL)
    assert ds.labels == ["normal", "viral", "covid"]
    assert ds.counts() == {"normal": 2200, "viral": 1153, "covid": 2200}


# ---------------------------------------------------------------- split


def test_split_is_seeded_stratified_and_keeps_duplicates_together(tmp_path: Path) -> None:
    for label in ("normal", "viral", "covid"):
        for i in range(40):
            _png(tmp_path / label / f"{i}.png", hash((label, i)) % 2**32, size=16)
    # identical content under three names, in two classes' folders
    dup = (tmp_path / "normal" / "0.png").read_bytes()
    (tmp_path / "normal" / "dup-a.png").write_bytes(dup)
    (tmp_path / "covid" / "dup-b.png").write_bytes(dup)
    ds = find_labelled(tmp_path)
    a, b, c = make_split(ds, seed=1), make_split(ds, seed=1), make_split(ds, seed=2)
    assert a.rows == b.rows
    assert a.rows != c.rows
    side_of: dict[str, set[str]] = {}
    for _, _, part, digest, _ in a.rows:
        side_of.setdefault(digest, set()).add(part)
    assert all(len(s) == 1 for s in side_of.values()), "identical files on two sides of the split"
    assert len(side_of[a.rows[[r[0] for r in a.rows].index("normal/dup-a.png")][3]]) == 1
    for label in ("viral",):
        parts = [p for _, lab, p, _, _ in a.rows if lab == label]
        assert parts.count("test") == 6 and parts.count("val") == 6 and parts.count("train") == 28
    path = tmp_path / "split.csv"
    a.write(path)
    assert type(a).read(path).rows == a.rows


# ---------------------------------------------------------------- train → export → classify


def _train_args(pool: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    """``cxr-batch train`` at 64×64 in a subprocess (a real process, so it can be killed)."""
    return [
        sys.executable,
        "-m",
        "cxr_batch.cli",
        "train",
        str(pool),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--threads",
        "2",
        *extra,
    ]


def _train(pool: Path, out: Path, epochs: int = 1, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_train_args(pool, out, epochs, *extra), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(small_pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smoke"
    proc = _train(small_pool, out, epochs=1)
    assert proc.returncode == 0, proc.stderr
    (out.parent / "train-stderr.txt").write_text(proc.stderr)
    return out


@pytest.mark.slow
def test_train_writes_the_run_folder(trained_run: Path) -> None:
    for name in ("config.json", "split.csv", "last.ckpt", "best.ckpt", "history.json", "metrics.json"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] > 0
    assert set(metrics["per_class"]) == {"normal", "viral", "covid"}
    assert np.asarray(metrics["confusion_matrix"]).sum() == metrics["n"]
    for key in ("accuracy", "macro_f1", "ece"):
        assert 0.0 <= metrics[key] <= 1.0
    config = json.loads((trained_run / "config.json").read_text())
    assert config["image_size"] == 64 and config["labels"] == ["normal", "viral", "covid"]
    stderr = (trained_run.parent / "train-stderr.txt").read_text()
    assert f"run folder: {trained_run}" in stderr  # where the run went, at the start and at the end
    assert f"cxr-batch export {trained_run / 'best.ckpt'}" in stderr


def test_the_epoch_table_stays_aligned() -> None:
    from cxr_batch.training.train import epoch_lines

    labels = ("normal", "viral", "covid")
    row = {"epoch": 1, "train_loss": 1.23456, "val_loss": 0.5, "val_accuracy": 0.9, "val_macro_f1": 0.8}
    row |= {f"val_recall_{x}": 1.0 for x in labels} | {"images_per_s": 12.3, "seconds": 4.5}
    wide = row | {"epoch": 10, "images_per_s": 1234.5, "seconds": 1234.5, "train_loss": 10.0}
    lines = epoch_lines([row], labels, header=True) + epoch_lines([wide], labels, header=False)
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    header = lines[0]
    ends = [m.end() for m in re.finditer(r"\S+(?= {2}|$)", header)]  # each column ends where its header ends
    for line in lines[1:]:
        assert [m.end() for m in re.finditer(r"\S+", line)] == ends


@pytest.mark.slow
def test_export_parity_and_classify_matches_torch(trained_run: Path, small_pool: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from cxr_batch.contract import read_contract
    from cxr_batch.io.labelled import Split
    from cxr_batch.training.train import build_model, evaluate_files

    onnx_path = tmp_path / "smoke.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_batch.cli",
            "export",
            str(trained_run / "best.ckpt"),
            "--out",
            str(onnx_path),
            "--version",
            "0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ONNX parity" in proc.stderr
    assert (tmp_path / "smoke.md").read_text().count("not a medical device") >= 1

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = read_contract(sess, str(onnx_path))
    assert meta.labels == ("normal", "viral", "covid") and meta.input_size == (64, 64)
    assert meta.outputs == {
        "logits": "logits",
        "features": "features",
        "embedding": "embedding",
        "cam": "cam",
        "ood_score": "ood_score",
    }
    assert meta.training_data["files"] == 36 and len(meta.training_data["split_sha256"]) == 64
    shapes = {o.name: o.shape[1:] for o in sess.get_outputs()}
    assert shapes == {"logits": [3], "features": [512, 2, 2], "embedding": [512], "cam": [3, 2, 2], "ood_score": []}
    assert meta.ood is not None and meta.ood["n_fit"] == len(
        Split.read(trained_run / "split.csv").paths(small_pool, "train")
    )

    # The torch evaluation path (train's test report) on the test files ...
    split = Split.read(trained_run / "split.csv")
    items = split.paths(small_pool, "test")
    ck = torch.load(trained_run / "best.ckpt", map_location="cpu", weights_only=True)
    model = build_model(3)
    model.load_state_dict(ck["model"])
    y, probs, errors, _ = evaluate_files(model, items, meta.labels, meta.spec, torch.device("cpu"))
    assert not errors and len(y) == len(items)
    # ... and cxr-batch classify --model on the same files agree.
    out_csv = tmp_path / "out.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_batch.cli",
            "classify",
            *[str(p) for p, _ in items],
            "--model",
            str(onnx_path),
            "--out",
            str(out_csv),
            "--absolute-paths",
            "--no-lungs",  # the parity of the exported model; synthetic films have no lung fields to find
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = {r["path"]: r for r in csv.DictReader(out_csv.open(newline="", encoding="utf-8"))}
    for (path, _), p in zip(items, probs, strict=True):
        row = rows[str(path.resolve())] if str(path.resolve()) in rows else rows[str(path)]
        got = np.array([float(row[f"prob_{label}"]) for label in meta.labels])
        assert np.abs(got - p).max() < 1e-4
        assert row["label"] == meta.labels[int(p.argmax())]


@pytest.mark.slow
def test_export_no_ood_leaves_the_guard_out(trained_run: Path, tmp_path: Path) -> None:
    """``export --no-ood`` on a checkpoint (issue 12, item 21: it used to be ignored there)."""
    import onnxruntime as ort

    from cxr_batch.contract import read_contract

    onnx_path = tmp_path / "no-ood.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_batch.cli",
            "export",
            str(trained_run / "best.ckpt"),
            "--out",
            str(onnx_path),
            "--no-ood",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = read_contract(sess, str(onnx_path))
    assert meta.ood is None and "ood_score" not in meta.outputs
    # A user's own export is not the released model: its own default name and version.
    assert (meta.name, meta.version) == ("cxr-resnet18-custom", "0.0.0+local")
    assert "ood_score" not in {o.name for o in sess.get_outputs()}


def test_export_without_runs_says_what_to_pass(tmp_path: Path) -> None:
    proc = run_cli("export", cwd=tmp_path)
    assert proc.returncode == 1
    assert "no checkpoint found" in proc.stderr and "cxr-batch export runs/NAME/best.ckpt" in proc.stderr


def test_imagenet_weights_offline_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from cxr_batch.errors import CxrBatchError
    from cxr_batch.training.train import build_model

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "resnet18", lambda weights=None: offline())
    with pytest.raises(CxrBatchError, match="--weights none"):
        build_model(3, "imagenet")


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    import torchvision

    from cxr_batch.training.train import build_model

    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = build_model(3, str(path))
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 3


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(small_pool: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert _train(small_pool, full, epochs=3).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _train_args(small_pool, cut, 3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (cut / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = (
        len(json.loads((cut / "history.json").read_text())["epochs"]) if (cut / "history.json").exists() else 0
    )
    resumed = _train(small_pool, cut, 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((full / "history.json").read_text())["epochs"]
    b = json.loads((cut / "history.json").read_text())["epochs"]
    assert [r["epoch"] for r in b] == [1, 2, 3], f"resumed after {done_before} epochs"
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4
        assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-4


@pytest.mark.slow
def test_train_refuses_to_clobber_a_run(trained_run: Path, small_pool: Path) -> None:
    proc = _train(small_pool, trained_run)
    assert proc.returncode == 1
    assert "already holds a run" in proc.stderr


# ---------------------------------------------------------------- a labels-file root held out (issue 19)

MONTGOMERY = REPO.parent / "shared" / "data" / "lung-masks" / "montgomery"


@pytest.mark.slow
def test_train_holds_out_a_labels_file_root_and_export_fits_the_operating_point(
    small_pool: Path, tmp_path: Path
) -> None:
    """train POOL montgomery/SOURCES.csv --holdout-source montgomery, then export: validation per source
    with the held-out hospital, the screening point in the contract and on the card, the int8 gate."""
    import csv

    if not (MONTGOMERY / "SOURCES.csv").is_file() or not POOL.is_dir():
        pytest.skip("../shared/data (covid19-radiography, lung-masks/montgomery) is absent")
    root = tmp_path / "montgomery"
    (root / "images").mkdir(parents=True)
    with open(MONTGOMERY / "SOURCES.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if r["source_label"] == "normal"][:8] + [r for r in rows if r["source_label"] != "normal"][
        :2
    ]
    with open(root / "SOURCES.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["file", "source_label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(keep)
    for r in keep:
        (root / r["file"]).write_bytes((MONTGOMERY / r["file"]).read_bytes())
    out = tmp_path / "run"
    args = _train_args(small_pool, out, 1, "--holdout-source", "montgomery")
    args.insert(args.index(str(small_pool)) + 1, str(root / "SOURCES.csv"))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "montgomery: left out (not a class): tuberculosis 2" in " ".join(proc.stderr.split())
    config = json.loads((out / "config.json").read_text())
    assert config["holdout_source"] == "montgomery" and config["excluded"] == {"montgomery": {"tuberculosis": 2}}
    history = json.loads((out / "history.json").read_text())
    assert "val_accuracy[montgomery]" in history["epochs"][0]
    bad = subprocess.run(
        _train_args(small_pool, tmp_path / "bad", 1, "--holdout-source", "nowhere"), capture_output=True, text=True
    )
    assert bad.returncode == 1 and "--holdout-source nowhere: not a source" in bad.stderr

    onnx_path = tmp_path / "held.onnx"
    export = ["export", str(out / "best.ckpt"), "--out", str(onnx_path), "--quantize", "int8", "--force"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_batch.cli",
            *export,
            "--ood-fit-images",
            "100",
            "--note",
            "lung crop not evaluated",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    from cxr_batch.training.onnx_file import read_contract_file

    meta = read_contract_file(onnx_path)[1]
    val = meta.metrics["validation"]
    assert val["holdout_source"] == "montgomery" and set(val["by_source"]) == {small_pool.name, "montgomery"}
    assert val["by_source"]["montgomery"]["n"] == 7  # of its 8 normals: 6 train + 1 val rows; 1 is test
    sp = meta.screening
    assert sp is not None and sp.label == "covid" and 0.0 <= sp.threshold <= 1.0
    assert sp.validation["sensitivity"] >= 0.9 and "montgomery" in sp.validation["by_source"]
    assert meta.metrics["screening_test"]["split"] == "test"
    int8 = read_contract_file(tmp_path / "held-int8.onnx")[1]
    gate = int8.extra["quantization"]["gate"]
    assert (
        gate["min_top1_agreement"] == 0.998 and gate["max_abs_prob_diff"] == 0.05 and isinstance(gate["passed"], bool)
    )
    assert int8.screening == sp  # derived files carry the master's operating point
    card = (tmp_path / "held.md").read_text()
    for text in ("## Validation metrics", "montgomery (held out of training)", "## Screening operating point",
                 "Faithfulness gate", "lung crop not evaluated", "No adult viral"):  # fmt: skip
        assert text in card, text
