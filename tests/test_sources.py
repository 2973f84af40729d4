"""Several data roots (sources): the split, per-source metrics, the recipe pieces, starting from a
released ONNX model. Real X-rays from ../shared/data (two small roots copied from it)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from cxr_batch.evaluation.metrics import metrics_by_source, wilson_interval
from cxr_batch.io.labelled import Split, find_labelled, find_labelled_many, make_split, source_names

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
POOL = SHARED / "covid19-radiography"
KERMANY = SHARED / "kermany-normal"
needs_data = pytest.mark.skipif(
    not (POOL.is_dir() and KERMANY.is_dir()), reason="../shared/data (covid19-radiography, kermany-normal) is absent"
)


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-class root (20 real films a class) and a normal-only root (20 real pediatric normals
    plus one file whose bytes are also in the first root)."""
    if not (POOL.is_dir() and KERMANY.is_dir()):
        pytest.skip("../shared/data (covid19-radiography, kermany-normal) is absent")
    base = tmp_path_factory.mktemp("roots")
    a, b = base / "pool", base / "kids"
    for label in ("normal", "viral", "covid"):
        (a / label).mkdir(parents=True)
        for f in sorted((POOL / label).iterdir())[:20]:
            shutil.copy(f, a / label / f.name)
    (b / "normal").mkdir(parents=True)
    for f in sorted((KERMANY / "normal").glob("*.png"))[:20]:
        shutil.copy(f, b / "normal" / f.name)
    shutil.copy(sorted((a / "normal").iterdir())[0], b / "normal" / "same-bytes-as-pool.png")
    return a, b


def test_source_names_are_unique(tmp_path: Path) -> None:
    assert source_names([tmp_path / "x" / "data", tmp_path / "y" / "data", tmp_path / "z"]) == ["data", "data-2", "z"]


def test_split_of_two_roots_is_stratified_by_source_and_deduplicated(
    two_roots: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_roots
    sets = find_labelled_many([a, b])
    assert [s.source for s in sets] == ["pool", "kids"]
    assert sets[1].labels == ["normal"]
    split = make_split(sets, seed=3, val=0.25, test=0.25)
    assert len(split.rows) == 60 + 21
    cells = Counter((src, label, part) for _, label, part, _, src in split.rows)
    for src, label, n in (("pool", "normal", 20), ("pool", "viral", 20), ("pool", "covid", 20), ("kids", "normal", 20)):
        assert cells[(src, label, "test")] == cells[(src, label, "val")] == n // 4, (src, label, cells)
    # the file present in both roots lands on the side its first copy got
    dup = next(r for r in split.rows if r[0] == "normal/same-bytes-as-pool.png")
    first = next(r for r in split.rows if r[4] == "pool" and r[3] == dup[3])
    assert dup[2] == first[2]
    # the first root's assignment is the same as when it is split alone
    alone = {r[0]: r[2] for r in make_split(find_labelled(a), seed=3, val=0.25, test=0.25).rows}
    assert all(alone[r[0]] == r[2] for r in split.rows if r[4] == "pool")
    # written and read back with the source column; paths resolve under each row's own root
    split.write(tmp_path / "split.csv")
    back = Split.read(tmp_path / "split.csv")
    assert back.rows == split.rows
    with open(tmp_path / "split.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["path", "label", "split", "sha256", "source"]
    for path, label, src in back.items({"pool": a, "kids": b}, "train"):
        assert path.is_file() and path.parent.name == label and path.is_relative_to(a if src == "pool" else b)


def test_a_root_with_a_class_the_first_lacks_is_refused(two_roots: tuple[Path, Path], tmp_path: Path) -> None:
    from cxr_batch.errors import DataError

    odd = tmp_path / "odd" / "bacterial"
    odd.mkdir(parents=True)
    shutil.copy(next((two_roots[1] / "normal").iterdir()), odd / "x.png")
    with pytest.raises(DataError, match="bacterial"):
        find_labelled_many([two_roots[0], odd.parent])


@pytest.mark.slow
@needs_data
def test_the_pool_split_is_the_one_the_shipped_model_was_trained_on() -> None:
    """One root gives the split of earlier versions: the fingerprint the released 1.0.0 contract records."""
    split = make_split(find_labelled(POOL), seed=0)
    assert split.fingerprint() == "70e20da84e5da312fe1fb535832ca77f203b3a7211add6a5312a63b30a25537d"
    both = make_split(find_labelled_many([POOL, KERMANY]), seed=0)
    assert {r[0]: r[2] for r in both.rows if r[4] == "covid19-radiography"} == {r[0]: r[2] for r in split.rows}


def test_metrics_by_source_match_a_hand_count() -> None:
    labels = ["normal", "viral", "covid"]
    y = np.array([0, 0, 1, 2, 0, 0, 0])
    pred = np.array([0, 1, 1, 2, 0, 1, 1])
    src = ["a", "a", "a", "a", "b", "b", "b"]
    probs = np.eye(3)[pred] * 0.9 + 0.1 / 3
    by = metrics_by_source(y, probs, labels, src)
    assert by["a"]["n"] == 4 and by["a"]["accuracy"] == 3 / 4
    assert by["b"]["n"] == 3 and by["b"]["accuracy"] == 1 / 3
    assert by["b"]["per_class"]["normal"]["recall"] == 1 / 3
    assert by["b"]["accuracy_ci95"] == list(wilson_interval(1, 3))
    assert by["b"]["per_class"]["viral"]["support"] == 0


@needs_data
@pytest.mark.slow
def test_evaluate_two_roots_reports_each_source(two_roots: tuple[Path, Path], tmp_path: Path) -> None:
    """evaluate DIR DIR: by_source in the JSON equals a count by hand over the predictions CSV."""
    a, b = two_roots
    out, pred = tmp_path / "m.json", tmp_path / "p.csv"
    proc = run_cli("evaluate", str(a), str(b), "--out", str(out), "--predictions", str(pred), "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "per source" in proc.stderr
    doc = json.loads(out.read_text())
    # films the lung stage found not assessable are left out of the metrics (listed apart)
    apart = Counter(e["path"].split("/")[0] for e in doc["not_assessable"])
    assert doc["not_assessable_count"] == sum(apart.values())
    n_kids, n_pool = 21 - apart["kids"], 60 - apart["pool"]
    assert f"  kids: n={n_kids}, accuracy " in proc.stderr and f"  pool: n={n_pool}, accuracy " in proc.stderr
    assert set(doc["by_source"]) == {"pool", "kids"}
    with open(pred, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 81
    assert sum(r["assessable"] == "false" for r in rows) == doc["not_assessable_count"]
    rows = [r for r in rows if r["assessable"] != "false"]
    for src in ("pool", "kids"):
        mine = [r for r in rows if r["path"].startswith(src + "/")]
        right = sum(r["label"] == r["path"].split("/")[1] for r in mine)
        m = doc["by_source"][src]
        assert m["n"] == len(mine)
        assert m["accuracy"] == pytest.approx(right / len(mine))
        assert m["accuracy_ci95"] == pytest.approx(list(wilson_interval(right, len(mine))))
    assert doc["n"] == len(rows) == 81 - doc["not_assessable_count"] and doc["accuracy"] == pytest.approx(
        sum(r["label"] == r["path"].split("/")[1] for r in rows) / len(rows)
    )


@pytest.mark.slow
@needs_data
def test_evaluate_reads_a_split_file_with_sources(two_roots: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_roots
    split = make_split(find_labelled_many([a, b]), seed=0, val=0.25, test=0.25)
    split.write(tmp_path / "split.csv")
    out = tmp_path / "m.json"
    proc = run_cli(
        "evaluate",
        str(a),
        str(b),
        "--labels",
        str(tmp_path / "split.csv"),
        "--part",
        "test",
        "--out",
        str(out),
        "--precision",
        "fp32",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    n_test = Counter(r[4] for r in split.rows if r[2] == "test")
    n_test.subtract(Counter(e["path"].split("/")[0] for e in doc["not_assessable"]))  # left out of the metrics
    assert {k: v["n"] for k, v in doc["by_source"].items()} == dict(n_test)


def test_class_and_source_balanced_weights() -> None:
    pytest.importorskip("torch")
    from cxr_batch.training.train import sampling_weights

    y = np.array([0] * 30 + [0] * 10 + [1] * 5 + [2] * 50)
    src = ["a"] * 30 + ["b"] * 10 + ["a"] * 5 + ["a"] * 50
    w = sampling_weights(y, src, 3, "class+source")
    assert w.sum() == pytest.approx(1.0)
    assert w[:30].sum() == pytest.approx(1 / 6) and w[30:40].sum() == pytest.approx(1 / 6)
    assert w[40:45].sum() == pytest.approx(1 / 3) and w[45:].sum() == pytest.approx(1 / 3)
    plain = sampling_weights(y, src, 3, "class")
    assert plain[:40].sum() == pytest.approx(1 / 3) and plain[0] == plain[35]


def test_scanner_augmentation_is_seeded_and_in_range() -> None:
    torch = pytest.importorskip("torch")
    from cxr_batch.training.train import augment_scanner

    x = torch.rand(8, 1, 64, 64)
    a = augment_scanner(x, torch.Generator().manual_seed(1), False)
    b = augment_scanner(x, torch.Generator().manual_seed(1), False)
    c = augment_scanner(x, torch.Generator().manual_seed(2), False)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@needs_data
@pytest.mark.slow
def test_training_can_start_from_the_released_onnx_model() -> None:
    """--weights MODEL.onnx: the folded network, BatchNorm recalibrated, computes what the file computes."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from cxr_batch.contract import read_contract
    from cxr_batch.io.preprocess import preprocess_file
    from cxr_batch.training.onnx_init import recalibrate_batchnorm
    from cxr_batch.training.train import build_model

    model_file = REPO / "export" / "cxr-resnet18.onnx"
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    meta = read_contract(sess)
    files = [sorted((POOL / label).iterdir())[i] for label in ("normal", "viral", "covid") for i in range(4)]
    x = np.stack([preprocess_file(f, meta.spec)[0] for f in files])
    want = sess.run([meta.outputs["logits"]], {meta.input_name: x})[0]
    model = build_model(3, str(model_file))
    recalibrate_batchnorm(model, torch.from_numpy(x))
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))
    assert any(
        float(m.running_var.mean()) != pytest.approx(1.0, abs=1e-3)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )


@needs_data
@pytest.mark.slow
def test_train_on_two_roots_reports_the_test_split_per_source(two_roots: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_roots
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_batch.cli",
            "train",
            str(a),
            str(b),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--threads",
            "2",
            "--augment",
            "scanner",
            "--balance",
            "class+source",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    split = Split.read(out / "split.csv")
    n_test = Counter(r[4] for r in split.rows if r[2] == "test")
    assert {k: v["n"] for k, v in metrics["by_source"].items()} == dict(n_test)
    assert sum(v["n"] for v in metrics["by_source"].values()) == metrics["n"]
    config = json.loads((out / "config.json").read_text())
    assert set(config["sources"]) == {"pool", "kids"} and config["augment"] == "scanner"
    assert "per source" in proc.stderr


# --------------------------------------------------------------------------- labels-file roots (issue 19)

MONTGOMERY = SHARED / "lung-masks" / "montgomery"


@pytest.fixture(scope="module")
def labels_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of part of lung-masks/montgomery: 8 normal and 4 tuberculosis films (real files) and its
    SOURCES.csv cut to their rows (file and source_label columns as shipped)."""
    if not (MONTGOMERY / "SOURCES.csv").is_file():
        pytest.skip("../shared/data/lung-masks/montgomery is absent")
    with open(MONTGOMERY / "SOURCES.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    keep = [r for r in rows if r["source_label"] == "normal"][:8] + [r for r in rows if r["source_label"] != "normal"][
        :4
    ]
    root = tmp_path_factory.mktemp("labelsroot") / "montgomery"
    (root / "images").mkdir(parents=True)
    for r in keep:
        shutil.copy(MONTGOMERY / r["file"], root / r["file"])
    with open(root / "SOURCES.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows(keep)
    return root / "SOURCES.csv"


def test_a_labels_file_root_takes_its_normal_films_and_leaves_out_tuberculosis(
    two_roots: tuple[Path, Path], labels_root: Path
) -> None:
    from cxr_batch.io.labelled import find_labelled_csv, roots_by_source

    got = find_labelled_csv(labels_root, ["normal", "viral", "covid"])
    assert got.source == "montgomery" and got.root == labels_root.parent and got.labels == ["normal"]
    assert got.excluded == {"tuberculosis": 4}
    assert len(got.left_out) == 4 and all(v == "tuberculosis" and p.name.endswith("_1.png") for p, v in got.left_out)
    assert len(got.items) == 8 and all(p.is_file() and p.name.endswith("_0.png") for p, _ in got.items)
    # a mapping reads a label value as a class (here, for the test's sake, tuberculosis as covid)
    mapped = find_labelled_csv(labels_root, ["normal", "viral", "covid"], {"tuberculosis": "covid"})
    assert mapped.counts() == {"normal": 8, "covid": 4} and mapped.excluded == {}
    # beside class-folder roots: the first roots' assignment is unchanged, the new rows are under its folder
    a, b = two_roots
    alone = make_split(find_labelled_many([a, b]), seed=3, val=0.25, test=0.25)
    sets = find_labelled_many([a, b, labels_root])
    assert [s.source for s in sets] == ["pool", "kids", "montgomery"]
    split = make_split(sets, seed=3, val=0.25, test=0.25)
    assert [r for r in split.rows if r[4] != "montgomery"] == alone.rows
    mine = [r for r in split.rows if r[4] == "montgomery"]
    assert len(mine) == 8 and Counter(r[2] for r in mine) == {"train": 4, "val": 2, "test": 2}
    assert all(r[0].startswith("images/MCUCXR_") for r in mine)
    # evaluate and export find the files from the source name, given the folder or the labels file
    for given in (labels_root, labels_root.parent):
        roots = roots_by_source([a, b, given])
        assert all(p.is_file() for p, _, _ in split.items(roots, "test"))


def test_labels_file_mistakes_are_clear_errors(labels_root: Path, tmp_path: Path) -> None:
    from cxr_batch.errors import DataError
    from cxr_batch.io.labelled import find_labelled_csv

    bad = tmp_path / "b" / "SOURCES.csv"
    bad.parent.mkdir()
    for text, message in (
        ("name,finding\nx.png,normal\n", "needs a header"),
        ("file,label\n../escape.png,normal\n", "must be a path inside"),
        ("file,label\nmissing.png,normal\n", "is not a file"),
        ("file,label\nx.png,tuberculosis\n", "no row has one of the classes"),
    ):
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            find_labelled_csv(bad, ["normal", "viral", "covid"])
    with pytest.raises(DataError, match="must be a folder of class folders"):
        find_labelled_many([labels_root])


@pytest.mark.slow
def test_the_held_out_source_is_validation_never_training(two_roots: tuple[Path, Path], labels_root: Path) -> None:
    pytest.importorskip("torch")
    from cxr_batch.io.labelled import roots_by_source
    from cxr_batch.training.references import validation_items
    from cxr_batch.training.train import holdout_parts

    a, b = two_roots
    split = make_split(find_labelled_many([a, b, labels_root]), seed=3, val=0.25, test=0.25)
    roots = roots_by_source([a, b, labels_root])
    train, val = holdout_parts(split.items(roots, "train"), split.items(roots, "val"), "montgomery")
    assert not [t for t in train if t[2] == "montgomery"]
    held = [t for t in val if t[2] == "montgomery"]
    assert len(held) == 6  # its 4 train rows and 2 val rows; its 2 test rows stay test
    assert len(train) == len(split.items(roots, "train")) - 4
    assert sorted(validation_items(roots, split, "montgomery")) == sorted(val)
    assert holdout_parts(split.items(roots, "train"), split.items(roots, "val"), None)[0] == split.items(roots, "train")


# --------------------------------------------------------------------------- "not normal" films (issue 19)


def test_not_normal_films_are_drawn_as_often_as_their_hospitals_normals() -> None:
    pytest.importorskip("torch")
    from cxr_batch.training.train import NOT_NORMAL, sampling_weights

    # normal: 30 pool, 10 "h" (a hospital); covid: 20 pool; 4 "not normal" films of h, 6 of "g"
    # (g has no normal film: never drawn)
    y = np.array([0] * 30 + [0] * 10 + [2] * 20 + [NOT_NORMAL] * 4 + [NOT_NORMAL] * 6)
    src = ["pool"] * 30 + ["h"] * 10 + ["pool"] * 20 + ["h"] * 4 + ["g"] * 6
    w = sampling_weights(y, src, 3, "class+source", normal=0)
    # by hand: normal 1/3 split over 2 sources: pool 1/6, h 1/6; covid 1/3; h's not-normal 1/6 in all
    assert w[:30].sum() == pytest.approx(1 / 6) and w[30:40].sum() == pytest.approx(1 / 6)
    assert w[40:60].sum() == pytest.approx(1 / 3)
    assert w[60:64].sum() == pytest.approx(1 / 6) and w[60] == pytest.approx(1 / 24)
    assert not w[64:].any()
    with pytest.raises(ValueError, match="index of the normal class"):
        sampling_weights(y, src, 3, "class+source")
    # without not-normal films nothing changes
    plain = np.array([0] * 3 + [1, 2])
    assert sampling_weights(plain, ["a"] * 5, 3, "class", normal=0) == pytest.approx(
        sampling_weights(plain, ["a"] * 5, 3, "class")
    )


def test_the_not_normal_loss_matches_a_hand_computation() -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from cxr_batch.training.train import NOT_NORMAL, training_loss

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.3, 0.1, 1.2], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, NOT_NORMAL, 2])
    p = torch.softmax(logits, 1)
    # by hand: -log p(normal) for row 0, -log(1 - p(normal)) for row 1, -log p(covid) for row 2
    expected = (-torch.log(p[0, 0]) - torch.log(1 - p[1, 0]) - torch.log(p[2, 2])) / 3
    assert float(training_loss(logits, y, 0)) == pytest.approx(float(expected), rel=1e-6)
    # no not-normal film in the batch, or no normal class: plain cross-entropy
    both = torch.tensor([0, 1, 2])
    assert float(training_loss(logits, both, 0)) == pytest.approx(float(F.cross_entropy(logits, both)))
    # the gradient only lowers P(normal) of the not-normal film: its other logits are not pulled apart
    x = logits[1:2].clone().requires_grad_(True)
    training_loss(x, torch.tensor([NOT_NORMAL]), 0).backward()
    assert x.grad is not None and float(x.grad[0, 0]) > 0 and float(x.grad[0, 1]) < 0 and float(x.grad[0, 2]) < 0
    q = torch.softmax(logits[1], 0)
    assert float(x.grad[0, 1] / x.grad[0, 2]) == pytest.approx(float(q[1] / q[2]), rel=1e-5)


@pytest.mark.slow
def test_train_with_not_normal_films_trains_on_them_but_never_the_held_out_sources(
    two_roots: tuple[Path, Path], labels_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    a, b = two_roots
    common = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--threads", "2", "--no-test-report"]
    common += ["--balance", "class+source", "--not-normal", "tuberculosis"]
    proc = run_cli("train", str(a), str(b), str(labels_root), "--out", str(tmp_path / "run"), *common)
    assert proc.returncode == 0, proc.stderr
    assert "trained as not normal: montgomery 4" in " ".join(proc.stderr.split())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["not_normal"] == ["tuberculosis"]
    # held out, its films are never trained on: no other source has that label, so it is refused
    held = run_cli(
        "train",
        str(a),
        str(b),
        str(labels_root),
        "--out",
        str(tmp_path / "held"),
        "--holdout-source",
        "montgomery",
        *common,
    )
    assert held.returncode != 0
    assert "--not-normal tuberculosis: no labels-file row of a trained source has that label" in " ".join(
        held.stderr.split()
    )
    assert "Traceback" not in held.stderr
