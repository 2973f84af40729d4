"""Both engines behind one ``Engine`` protocol (issue 22, item 2); values passed on, not derived again
(item 4): the model hashed once per run, the export's contract read once and each file saved once."""

from __future__ import annotations

import csv
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import LABELS

import cxr_batch.classify
import cxr_batch.engine.lungs
import cxr_batch.evaluation.evaluate
import cxr_batch.report.provenance
import cxr_batch.report.sr  # noqa: F401 - imported before file_sha256 is counted in every module
from cxr_batch import contract
from cxr_batch.classify import ClassifyConfig, run_classify
from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.engine.types import Engine
from cxr_batch.io.inputs import InputSpec
from cxr_batch.report.provenance import read_record
from cxr_batch.report.writer import ReportConfig


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> Counter[Path]:
    """Count every call of ``file_sha256``, by file, in every module of the package that imported it."""
    real = contract.file_sha256
    calls: Counter[Path] = Counter()

    def counting(path: Any) -> str:
        calls[Path(path).resolve()] += 1
        return real(path)

    for name, module in list(sys.modules.items()):
        if name.startswith("cxr_batch") and getattr(module, "file_sha256", None) is real:
            monkeypatch.setattr(module, "file_sha256", counting)
    return calls


def run(tmp_path: Path, model: Path, images: Path, **changes: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """One classify run; its provenance record's run and its report's rows."""
    out = tmp_path / "report.csv"
    config = ClassifyConfig(
        inputs=InputSpec(paths=(str(images),)),
        engine=EngineConfig(model=str(model), device="cpu", threads=1, batch_size=2),
        report=ReportConfig(out=str(out)),
        quiet=True,
        **changes,
    )
    run_classify(config)
    record = read_record(str(out) + ".provenance.json")
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return record["runs"][-1], rows


def test_both_engines_implement_the_protocol(tiny_onnx: Path) -> None:
    clf = Classifier.from_config(EngineConfig(model=str(tiny_onnx), device="cpu", threads=1))
    engine: Engine = clf  # mypy checks the protocol; here the values it promises
    assert engine.kind == "local" and engine.model_origin == "--model"
    assert engine.model_sha256 == contract.file_sha256(tiny_onnx)
    assert engine.model_path == tiny_onnx and engine.meta.labels == LABELS
    assert {"batch_size", "streams", "decode_workers"} <= set(engine.run_settings())


def test_a_local_run_hashes_the_model_once(
    tiny_onnx: Path, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's model_sha256, the SR writer's and the provenance record's: one hash of the file."""
    calls = count_hashes(monkeypatch)
    run_record, rows = run(tmp_path, tiny_onnx, image_dir, sr=str(tmp_path / "sr"))
    digest = contract.file_sha256(tiny_onnx)
    assert calls[tiny_onnx.resolve()] == 1 + 1  # the run's one, and the line above
    assert len(rows) == 3 and {r["model_sha256"] for r in rows} == {digest}
    assert run_record["model"]["sha256"] == digest and run_record["model"]["origin"] == "--model"
    assert run_record["execution"]["engine"] == "local" and run_record["settings"]["streams"] >= 1


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_run_records_the_model_origin(
    tiny_onnx: Path, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray run's provenance names where the model came from (it used to be null) and its sha256,
    hashed once on the driver (the actors are given the file and never hash it)."""
    pytest.importorskip("ray")
    from cxr_batch.engine.ray import RayConfig

    calls = count_hashes(monkeypatch)
    run_record, rows = run(tmp_path, tiny_onnx, image_dir, ray=RayConfig(num_cpus=1, actors=1))
    assert calls[tiny_onnx.resolve()] == 1
    digest = contract.file_sha256(tiny_onnx)
    assert run_record["model"]["origin"] == "--model" and run_record["model"]["sha256"] == digest
    assert run_record["execution"]["engine"] == "ray" and run_record["settings"]["cpus_per_actor"] == 1
    assert "on Ray (1 actor)" in run_record["execution"]["provider"]
    assert len(rows) == 3 and {r["model_sha256"] for r in rows} == {digest}


@pytest.mark.slow
def test_export_reads_the_contract_once_and_saves_each_file_once(
    tiny_onnx: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export MASTER.onnx --quantize int8 --fp16`` (with the OOD guard): the master's contract is
    read from disk once, and the master, the int8 and the fp16 files are each written once."""
    pytest.importorskip("onnx")
    from rich.console import Console

    from cxr_batch.io.labelled import find_labelled, make_split
    from cxr_batch.training import export, onnx_file, run_facts

    root = tmp_path / "data"
    for label in LABELS:  # 12 real X-rays a class: enough for the OOD guard's covariance
        (root / label).mkdir(parents=True)
        for src in sorted((shared_data / "covid19-radiography" / label).glob("*.png"))[:12]:
            shutil.copy(src, root / label / src.name)
    split = make_split(find_labelled(root), val=0.25, test=0.25, seed=0)
    master = tmp_path / "m.onnx"
    master.write_bytes(tiny_onnx.read_bytes())

    reads: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    real_read, real_write = onnx_file.read_contract_file, onnx_file.write_file_atomic

    def read(path: Path) -> Any:
        reads[Path(path).name] += 1
        return real_read(path)

    def write(path: Any, data: bytes, *args: Any, **kwargs: Any) -> Any:
        writes[Path(path).name] += 1
        return real_write(path, data, *args, **kwargs)

    for module in (onnx_file, run_facts):  # run_facts._init_facts reads a start model's contract
        monkeypatch.setattr(module, "read_contract_file", read)
    monkeypatch.setattr(onnx_file, "write_file_atomic", write)  # save_model and OnnxModel.save write through it

    cfg = export.ExportConfig(
        checkpoint=str(master), out=str(master), quantize="int8", fp16=True, force=True, calibration_images=8
    )
    info = export.derive_from_master(master, root, split, cfg, Console(quiet=True))
    assert info is not None and info["test_n"] > 0
    assert reads == Counter({"m.onnx": 1})
    assert writes == Counter({"m.onnx": 1, "m-int8.onnx": 1, "m-fp16.onnx": 1})

    # What each step found is in the files, handed on in memory.
    monkeypatch.undo()
    from cxr_batch.engine.selfcheck import SELF_CHECK_KEY

    fp32, int8, fp16 = (onnx_file.read_contract_file(tmp_path / n)[1] for n in ("m.onnx", "m-int8.onnx", "m-fp16.onnx"))
    assert "validation" in fp32.metrics and "screening_test" in fp32.metrics and fp32.ood is not None
    assert (int8.precision, fp16.precision) == ("int8", "fp16")
    assert int8.extra["quantization"] == info and int8.ood is not None
    assert fp16.ood == fp32.ood and int8.screening == fp32.screening == fp16.screening
    assert all(SELF_CHECK_KEY in m.extra for m in (fp32, int8, fp16))
    assert (tmp_path / "m.md").is_file()
