"""The screening operating point (issue 19): the threshold chosen on a small real validation set,
checked against a count by hand over the predictions; the report's covid_screen column; the
--covid-threshold override in the provenance; evaluate's sensitivity and specificity at the point;
and the int8 gate that decides whether --precision auto may take the int8 file."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cxr_batch.cli.main import main
from cxr_batch.contract import (
    INT8_GATE_MAX_PROB_DIFF,
    INT8_GATE_MIN_AGREEMENT,
    ModelMeta,
    ScreeningPoint,
    int8_gate,
    int8_gate_verdict,
)
from cxr_batch.errors import ModelError
from cxr_batch.evaluation.metrics import operating_point, screening_threshold, wilson_interval

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "export"
POOL = REPO.parent / "shared" / "data" / "covid19-radiography"


def test_threshold_and_operating_point_match_a_hand_count() -> None:
    # 10 COVID-19 images and 6 others; sensitivity >= 0.90 needs 9 of the 10 at or above the threshold,
    # so the highest such threshold is the 9th highest COVID-19 score: 0.30.
    covid = [0.99, 0.95, 0.90, 0.80, 0.72, 0.60, 0.55, 0.41, 0.30, 0.05]
    other = [0.50, 0.31, 0.30, 0.29, 0.10, 0.01]
    scores = np.array(covid + other)
    positive = np.array([True] * 10 + [False] * 6)
    t = screening_threshold(scores, positive, 0.90)
    assert t == 0.30
    op = operating_point(scores, positive, t)
    # by hand: covid >= 0.30: 9 (tp), 1 below (fn); others >= 0.30: 0.50, 0.31, 0.30 (fp 3), below: 3 (tn)
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (9, 1, 3, 3)
    assert op["sensitivity"] == 0.9 and op["specificity"] == 0.5
    assert op["sensitivity_ci95"] == list(wilson_interval(9, 10))
    # one step higher loses a COVID-19 image: 8/10 < 0.90
    assert operating_point(scores, positive, 0.31)["sensitivity"] == 0.8
    assert screening_threshold(scores, positive, 1.0) == 0.05
    assert screening_threshold(scores, positive, 0.5) == 0.72
    with pytest.raises(ValueError, match="no positive"):
        screening_threshold(scores, np.zeros(16, bool))


def test_the_contract_field_round_trips_and_is_validated() -> None:
    from conftest import contract

    doc = contract(screening={"label": "covid", "threshold": 0.25, "target_sensitivity": 0.9, "validation": {"n": 3}})
    meta = ModelMeta.from_dict(doc)
    assert meta.screening == ScreeningPoint("covid", 0.25, 0.9, {"n": 3})
    assert ModelMeta.from_json(meta.to_json()) == meta
    assert "screening" not in json.loads(ModelMeta.from_dict(contract()).to_json())
    for bad, message in (
        ({"label": "tb", "threshold": 0.2, "target_sensitivity": 0.9}, "not among"),
        ({"label": "covid", "threshold": 1.5, "target_sensitivity": 0.9}, "threshold between 0 and 1"),
        ({"label": "covid", "threshold": 0.2}, "target_sensitivity"),
        ([0.2], "must be an object"),
    ):
        with pytest.raises(ModelError, match=message):
            ModelMeta.from_dict(contract(screening=bad))


def test_the_int8_gate_is_defined_once_and_read_from_the_contract() -> None:
    from conftest import contract

    assert int8_gate(INT8_GATE_MIN_AGREEMENT, INT8_GATE_MAX_PROB_DIFF)
    assert not int8_gate(0.9961, 0.073) and not int8_gate(1.0, 0.051) and not int8_gate(0.997, 0.01)

    def meta(q: dict | None) -> ModelMeta:
        return ModelMeta.from_dict(contract(precision="int8", extra={"quantization": q} if q else {}))

    assert not int8_gate_verdict(meta(None))[0]
    good = {"top1_agreement_with_fp32": 0.999, "max_abs_prob_diff": 0.03}
    assert not int8_gate_verdict(meta(good))[0]  # numbers alone, no recorded pass: an older export
    assert int8_gate_verdict(meta({**good, "gate": {"passed": True}}))[0]
    ok, why = int8_gate_verdict(meta({**good, "max_abs_prob_diff": 0.087, "gate": {"passed": True}}))
    assert not ok and "misses the gate" in why  # a recorded pass with numbers outside the limits


def _shipped(*names: str) -> None:
    missing = [n for n in names if not (EXPORT / n).is_file()]
    if missing:
        pytest.skip(f"shipped model(s) not in this tree: {missing}")


def test_auto_takes_int8_only_when_its_contract_passed_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    _shipped("cxr-resnet18.onnx", "cxr-resnet18-int8.onnx")
    from cxr_batch.engine import cpu
    from cxr_batch.engine import model as model_loading
    from cxr_batch.engine.classifier import Classifier
    from cxr_batch.training.onnx_file import read_contract_file

    pytest.importorskip("onnx")
    passed, why = int8_gate_verdict(read_contract_file(EXPORT / "cxr-resnet18-int8.onnx")[1])
    monkeypatch.setattr(model_loading, "default_model_dirs", lambda: [EXPORT])
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, "avx2 avx512f avx512_vnni")
    clf = Classifier(device="cpu", threads=1)
    if passed:
        assert clf.meta.precision == "int8"
    else:
        assert clf.meta.precision == "fp32" and "did not pass the export gate" in clf.precision_reason
        assert why in clf.precision_reason
    explicit = Classifier(device="cpu", threads=1, precision="int8")  # asked for: no gate
    assert explicit.meta.precision == "int8"


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of the shipped fp32 model with an operating point fitted (export's fit_validation) on a
    small real validation set: 10 COVID-19, 8 normal and 4 viral films of the pool."""
    pytest.importorskip("onnx")
    _shipped("cxr-resnet18.onnx")
    if not POOL.is_dir():
        pytest.skip("../shared/data/covid19-radiography is absent")
    from rich.console import Console

    from cxr_batch.io.labelled import Split, file_digest
    from cxr_batch.training.export import ExportConfig
    from cxr_batch.training.references import fit_validation

    base = tmp_path_factory.mktemp("screen")
    root = base / "val"
    rows = []
    for label, n in (("covid", 10), ("normal", 8), ("viral", 4)):
        (root / label).mkdir(parents=True)
        for f in sorted((POOL / label).iterdir())[-n:]:
            shutil.copy(f, root / label / f.name)
            rows.append((f"{label}/{f.name}", label, "val", file_digest(f), "val"))
    split = Split(rows)
    split.write(base / "split.csv")
    model = base / "model.onnx"
    shutil.copyfile(EXPORT / "cxr-resnet18.onnx", model)
    fit_validation(model, {"val": root}, split, ExportConfig(checkpoint="", out=str(model)), Console(quiet=True))
    return {"model": model, "root": root, "split": base / "split.csv", "base": base}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_the_operating_point_is_the_hand_counted_threshold_and_the_report_calls_it(
    screened: dict[str, Path], runner: CliRunner
) -> None:
    from cxr_batch.training.onnx_file import read_contract_file

    meta = read_contract_file(screened["model"])[1]
    sp = meta.screening
    assert sp is not None and sp.label == "covid" and sp.target_sensitivity == 0.9
    # the model's own P(covid) for each file, through evaluate's predictions (the classify path)
    base = screened["base"]
    result = runner.invoke(
        main,
        [
            "evaluate",
            str(screened["root"]),
            "--model",
            str(screened["model"]),
            "--out",
            str(base / "m.json"),
            "--predictions",
            str(base / "p.csv"),
            "--plots",
            str(base / "plots"),
            "--overwrite",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = _rows(base / "p.csv")
    assert len(rows) == 22
    covid = sorted((float(r["prob_covid"]) for r in rows if r["path"].startswith("covid/")), reverse=True)
    k = math.ceil(0.9 * len(covid))  # 9 of 10
    # the 9th highest, rounded down to 1e-5 (the report's probabilities have 6 significant digits)
    assert covid[k - 1] - 2e-5 <= sp.threshold <= covid[k - 1] + 1e-6
    tp = sum(p >= sp.threshold for p in covid)
    others = [float(r["prob_covid"]) for r in rows if not r["path"].startswith("covid/")]
    tn = sum(p < sp.threshold for p in others)
    assert (sp.validation["tp"], sp.validation["tn"]) == (tp, tn) and tp >= 9
    # every ok row gets the call at the contract's threshold; label stays the argmax
    for r in rows:
        if r["assessable"] == "false":  # the lung stage: no label and no screening call
            assert r["covid_screen"] == "" and r["label"] == ""
            continue
        assert r["covid_screen"] == ("positive" if float(r["prob_covid"]) >= sp.threshold else "negative")
        probs = {x: float(r[f"prob_{x}"]) for x in ("normal", "viral", "covid")}
        assert r["label"] == max(probs, key=lambda x: probs[x])
    doc = json.loads((base / "m.json").read_text())
    scr = doc["screening"]
    assert scr["source"] == "model contract" and scr["threshold"] == sp.threshold
    # evaluate counts the assessable films only (the lung stage's others are reported apart)
    seen = [r for r in rows if r["assessable"] != "false"]
    pos = [float(r["prob_covid"]) for r in seen if r["path"].startswith("covid/")]
    neg = [float(r["prob_covid"]) for r in seen if not r["path"].startswith("covid/")]
    tp_a, tn_a = sum(p >= sp.threshold for p in pos), sum(p < sp.threshold for p in neg)
    assert (scr["tp"], scr["fn"], scr["tn"], scr["fp"]) == (tp_a, len(pos) - tp_a, tn_a, len(neg) - tn_a)
    assert scr["specificity_ci95"] == pytest.approx(list(wilson_interval(tn_a, len(neg))))
    assert "screening (covid if P >= " in " ".join(result.stderr.split())
    assert (base / "plots" / "roc_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_covid_threshold_overrides_and_is_recorded(
    screened: dict[str, Path], runner: CliRunner, tmp_path: Path
) -> None:
    bad = tmp_path / "in"
    shutil.copytree(screened["root"] / "covid", bad)
    (bad / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "r.csv"
    result = runner.invoke(
        main,
        [
            "classify",
            str(bad),
            "--model",
            str(screened["model"]),
            "--out",
            str(out),
            "--covid-threshold",
            "0.999",
            "-q",
        ],
    )
    assert result.exit_code in (0, 3), result.output
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["covid_screen"] == ""
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 10
    for r in ok:
        if r["assessable"] == "false":  # the lung stage: no screening call
            assert r["covid_screen"] == ""
            continue
        assert r["covid_screen"] == ("positive" if float(r["prob_covid"]) >= 0.999 else "negative")
    record = json.loads(Path(str(out) + ".provenance.json").read_text())
    scr = record["runs"][-1]["screening"]
    assert scr["threshold"] == 0.999 and scr["source"] == "--covid-threshold"
    from cxr_batch.training.onnx_file import read_contract_file

    assert scr["model_threshold"] == read_contract_file(screened["model"])[1].screening.threshold
    refused = runner.invoke(main, ["classify", str(bad), "--out", str(tmp_path / "x.csv"), "--covid-threshold", "2"])
    assert refused.exit_code == 2 and "--covid-threshold" in refused.output


def test_the_raised_target_matches_a_hand_count() -> None:
    from cxr_batch.evaluation.metrics import screening_target_for_specificity

    # 10 COVID-19 films; the held-out hospital's 5 normals score 0.02, 0.04, 0.10, 0.20, 0.60.
    covid = [0.99, 0.95, 0.90, 0.80, 0.72, 0.60, 0.55, 0.41, 0.30, 0.05]
    held = [0.02, 0.04, 0.10, 0.20, 0.60]
    scores = np.array(covid + held)
    positive = np.array([True] * 10 + [False] * 5)
    negative = ~positive
    # by hand, 10 positives: target 0.90 -> 9th highest 0.30 (held below it: 4 of 5, 0.8);
    # 0.95, 0.97, 0.98 and 0.99 all need 10 of 10 -> 0.05 (held below: 0.02, 0.04: 0.4)
    chosen, tried = screening_target_for_specificity(scores, positive, negative, 0.8)
    assert chosen == 0.90
    assert [(t["target"], t["threshold"], t["tn"], t["n"]) for t in tried] == [
        (0.90, 0.30, 4, 5),
        (0.95, 0.05, 2, 5),
        (0.97, 0.05, 2, 5),
        (0.98, 0.05, 2, 5),
        (0.99, 0.05, 2, 5),
    ]
    assert screening_target_for_specificity(scores, positive, negative, 0.4)[0] == 0.99
    # no target keeps 0.9: None, and the caller keeps its base target
    assert screening_target_for_specificity(scores, positive, negative, 0.9)[0] is None
    # the base is always tried, and only targets above it
    assert [t["target"] for t in screening_target_for_specificity(scores, positive, negative, 0.5, base=0.96)[1]] == [
        0.96,
        0.97,
        0.98,
        0.99,
    ]
    with pytest.raises(ValueError, match="no held-out negative"):
        screening_target_for_specificity(scores, positive, np.zeros(15, bool), 0.8)


@pytest.mark.slow
@pytest.mark.skipif(not POOL.is_dir(), reason="needs ../shared/data/covid19-radiography")
def test_export_raises_the_target_on_a_held_out_source_hand_counted(tmp_path: Path) -> None:
    """fit_validation with --screen-holdout-specificity on real films: a pool source and a held-out
    one (its train rows are validation); the threshold and target equal a count over the model's own
    probabilities, and the contract and the card say how they were chosen."""
    from rich.console import Console

    from cxr_batch.io.labelled import Split, file_digest
    from cxr_batch.training.card import write_card
    from cxr_batch.training.export import ExportConfig
    from cxr_batch.training.onnx_file import read_contract_file
    from cxr_batch.training.references import fit_validation, model_probs, validation_items

    rows = []
    roots = {"pool": tmp_path / "pool", "held": tmp_path / "held"}
    for source, label, n in (("pool", "covid", 12), ("pool", "normal", 4), ("held", "normal", 10)):
        (roots[source] / label).mkdir(parents=True, exist_ok=True)
        files = sorted((POOL / label).iterdir())
        for f in files[-n:] if source == "pool" else files[:n]:
            shutil.copy(f, roots[source] / label / f.name)
            rows.append((f"{label}/{f.name}", label, "val" if source == "pool" else "train", file_digest(f), source))
    split = Split(rows)
    model = tmp_path / "model.onnx"
    shutil.copyfile(EXPORT / "cxr-resnet18.onnx", model)
    cfg = ExportConfig(checkpoint="", out=str(model), holdout_source="held", screen_holdout_specificity=0.7)
    fit_validation(model, roots, split, cfg, Console(quiet=True))
    meta = read_contract_file(model)[1]

    # the count by hand over the model's own probabilities
    labels = list(meta.labels)
    y, p, src = model_probs(model, validation_items(roots, split, "held"), meta.spec, labels)
    k = labels.index("covid")
    pos = np.sort(p[y == k, k])[::-1]  # 12 COVID-19 films
    held = p[(np.asarray(src) == "held") & (y != k), k]
    assert len(pos) == 12 and len(held) == 10
    best = None
    for target in (0.90, 0.95, 0.97, 0.98, 0.99):
        kth = pos[math.ceil(target * 12 - 1e-9) - 1]
        t = min(kth, math.floor(kth / 1e-5 + 1e-6) * 1e-5)
        if (held < t).sum() / 10 >= 0.7:
            best = (target, t)
    sp = meta.screening
    assert sp is not None and best is not None  # pool normals from the embedded model's sources: it is raised
    assert (sp.target_sensitivity, sp.threshold) == pytest.approx(best)
    assert sp.validation["raised"]["chosen"] == best[0]
    assert sp.validation["raised"]["holdout_source"] == "held"
    assert "held-out source held" in sp.validation["rule"]
    card = write_card(model, meta, None).read_text(encoding="utf-8")
    assert "How the target was chosen" in card and "| held specificity |" in card


@pytest.mark.skipif(not POOL.is_dir(), reason="needs ../shared/data/covid19-radiography")
def test_a_raised_target_without_a_held_out_source_is_refused(tmp_path: Path) -> None:
    from rich.console import Console

    from cxr_batch.errors import CxrBatchError
    from cxr_batch.io.labelled import Split, file_digest
    from cxr_batch.training.export import ExportConfig
    from cxr_batch.training.onnx_file import read_contract_file
    from cxr_batch.training.references import fit_validation

    rows = []
    for label in ("covid", "normal"):
        (tmp_path / "val" / label).mkdir(parents=True)
        for f in sorted((POOL / label).iterdir())[:2]:
            shutil.copy(f, tmp_path / "val" / label / f.name)
            rows.append((f"{label}/{f.name}", label, "val", file_digest(f), "val"))
    model = tmp_path / "model.onnx"
    shutil.copyfile(EXPORT / "cxr-resnet18.onnx", model)
    cfg = ExportConfig(checkpoint="", out=str(model), screen_holdout_specificity=0.85)
    with pytest.raises(CxrBatchError, match="needs a run with a held-out source"):
        fit_validation(model, {"val": tmp_path / "val"}, Split(rows), cfg, Console(quiet=True))
    assert read_contract_file(model)[1].screening is None  # nothing written
