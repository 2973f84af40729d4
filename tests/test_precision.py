"""Precision per CPU and the load-time self-check (issue 11): the CPU facts, what
``--precision auto`` takes by the CPU's flags, the self-check of the shipped models, and a damaged
int8 model caught at load (fallback to fp32 under auto, refusal when asked for explicitly)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import contract

from cxr_batch.cli.main import main
from cxr_batch.engine import classifier as inference
from cxr_batch.engine import cpu
from cxr_batch.engine import model as model_loading
from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.engine.selfcheck import SELF_CHECK_KEY, run_self_check
from cxr_batch.errors import ModelError

EXPORT = Path(__file__).resolve().parents[1] / "export"
SHIPPED = {p: EXPORT / name for p, name in inference.DEFAULT_MODEL_FILES.items()}
VNNI = "avx2 avx512f avx512_vnni"


def _need_shipped(*precisions: str) -> None:
    missing = [str(SHIPPED[p]) for p in precisions if not SHIPPED[p].is_file()]
    if missing:
        pytest.skip(f"shipped model(s) not in this tree: {missing}")


# --------------------------------------------------------------------------- CPU facts

X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni avx512_vnni
"""
X86_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512bw avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def _facts(text: str, arch: str = "x86_64") -> cpu.CpuFacts:
    model, flags = cpu._from_proc(text)
    return cpu.CpuFacts(model=model or "unknown CPU", arch=arch, flags=cpu._normalise(flags), source="/proc/cpuinfo")


def test_cpuinfo_is_read_from_the_first_processor_and_decides_int8() -> None:
    avx2 = _facts(X86_AVX2)
    assert avx2.model == "AMD EPYC 7B12" and avx2.flags == ("avx2",)  # the second block's VNNI is not read
    use, why = cpu.int8_choice(avx2)
    assert not use and why.startswith("fp32: AMD EPYC 7B12 has no VNNI, AMX or ARM dot-product")
    amx = _facts(X86_AMX)
    assert amx.flags == ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
    assert cpu.int8_choice(amx) == (True, cpu.int8_choice(amx)[1]) and "AVX512_VNNI" in cpu.int8_choice(amx)[1]
    arm = _facts(ARM, "aarch64")
    assert arm.flags == ("asimddp",) and cpu.int8_choice(arm)[0]
    assert "asimddp" in arm.describe() and "aarch64" in arm.describe()
    avx512_only = cpu.CpuFacts("Xeon", "x86_64", cpu._normalise(["AVX2", "AVX512F"]), "sysctl")
    assert avx512_only.flags == ("avx2", "avx512f") and not cpu.int8_choice(avx512_only)[0]
    assert cpu._normalise(["AVX512VNNI", "dotprod"]) == ("avx512_vnni", "asimddp")


def test_this_machines_flags_are_what_proc_cpuinfo_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.CPU_FLAGS_ENV, raising=False)
    proc = Path("/proc/cpuinfo")
    if not proc.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    text = proc.read_text(encoding="utf-8", errors="replace")
    first = text.split("\n\n")[0]
    line = re.search(r"^(?:flags|Features)\s*:(.*)$", first, re.M)
    words = set(line.group(1).split()) if line else set()
    facts = cpu.cpu_facts()
    assert set(facts.flags) == words & set(cpu.RELEVANT_FLAGS)
    assert facts.source == "/proc/cpuinfo" and facts is cpu.cpu_facts()  # read once, cached
    use, _ = cpu.int8_choice(facts)
    assert use == bool(words & set(cpu.INT8_FLAGS))


def test_the_flags_override_and_auto_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, "avx2,avx512_vnni")
    facts = cpu.cpu_facts()
    assert facts.flags == ("avx2", "avx512_vnni") and facts.source == "$CXR_BATCH_CPU_FLAGS"
    assert inference.auto_order(cuda=False)[0] == "int8"
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, "avx2")
    assert inference.auto_order(cuda=False)[0] == "fp32"
    assert inference.auto_order(cuda=True)[0] == "fp16"
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, "")
    assert cpu.cpu_facts().flags == () and not cpu.int8_choice()[0]


def test_host_helpers_stay_importable_from_the_classifier_module() -> None:
    assert inference.usable_cpus is cpu.usable_cpus and inference.physical_cores is cpu.physical_cores
    assert inference.default_workers is cpu.default_workers


# --------------------------------------------------------------------------- the shipped models


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_every_shipped_model_passes_its_self_check_here(precision: str) -> None:
    _need_shipped(precision)
    clf = Classifier(SHIPPED[precision], device="cpu", threads=1)
    check = clf.self_check
    assert check is not None, "the shipped models carry reference images"
    assert check.ok, check.describe()
    assert check.images >= 3
    # The references are the test images where int8 deviates most from fp32 (chosen at export), so one
    # borderline image may change label within the tolerance; fp32 and fp16 agree on all of them.
    assert check.top1_agree >= (check.images - 1 if precision == "int8" else check.images)
    assert clf.notices == () and clf.precision_reason == f"{precision}: the file's own (from --model)"
    doc = clf.meta.extra[SELF_CHECK_KEY]
    assert len(json.dumps(doc)) < 10_000, "the references must keep the contract small"


def test_auto_takes_fp32_on_an_avx2_cpu_and_int8_with_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    _need_shipped("fp32", "int8")
    monkeypatch.setattr(model_loading, "default_model_dirs", lambda: [EXPORT])
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, "avx2")
    clf = Classifier(device="cpu", threads=1)
    assert (
        clf.meta.precision == "fp32" and clf.precision_reason.startswith("fp32: ") and "no VNNI" in clf.precision_reason
    )
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, "avx2 avx_vnni")
    clf = Classifier(device="cpu", threads=1)
    # with VNNI, int8 only when the shipped int8 file's contract records that it passed the export gate
    from cxr_batch.contract import int8_gate_verdict
    from cxr_batch.training.onnx_file import read_contract_file

    if int8_gate_verdict(read_contract_file(SHIPPED["int8"])[1])[0]:
        assert clf.meta.precision == "int8" and "AVX_VNNI" in clf.precision_reason
    else:
        assert clf.meta.precision == "fp32" and "did not pass the export gate" in clf.precision_reason
    assert clf.notices == () and clf.self_check is not None and clf.self_check.ok


def test_info_reports_the_cpu_the_precision_and_the_self_check(runner: CliRunner) -> None:
    _need_shipped("int8")
    result = runner.invoke(main, ["info", str(SHIPPED["int8"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["cpu"]["flags"] == list(cpu.cpu_facts().flags)
    assert info["precision"]["in_use"] == "int8" and info["precision"]["auto_on_this_cpu"] == cpu.int8_choice()[1]
    assert info["self_check"]["passed"] is True and info["self_check"]["deviation"] <= info["self_check"]["tolerance"]
    text = runner.invoke(main, ["info", str(SHIPPED["int8"])])
    assert text.exit_code == 0
    assert "cpu: " in text.stdout and "self-check: passed: int8 gives the same label as fp32 on " in text.stdout
    assert "--precision auto on this cpu: " in text.stdout and "model card: " in text.stdout
    assert "characters>" not in text.stdout and '"self_check"' not in text.stdout  # the contract is in --json


# --------------------------------------------------------------------------- a damaged int8 model


def _damage(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with one int8 weight tensor of the first residual stage negated; the
    contract (and its self-check references) left as they are."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) >= 32_768]
    assert weights, "no int8 weight tensor in the model"
    target = weights[1]
    values = numpy_helper.to_array(target)
    target.CopyFrom(numpy_helper.from_array((-values.astype(np.int16)).clip(-127, 127).astype(np.int8), target.name))
    # an int8 file --precision auto would take: its contract records a passed export gate (issue 19)
    from cxr_batch.training.onnx_file import read_contract_file, write_contract

    meta = read_contract_file(src)[1]
    q = {**meta.extra.get("quantization", {}), "top1_agreement_with_fp32": 1.0, "max_abs_prob_diff": 0.0}
    q["gate"] = {"passed": True}
    write_contract(proto, meta.with_updates(extra={**meta.extra, "quantization": q}))
    onnx.save(proto, str(dst))
    return dst


@pytest.fixture
def damaged_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Embedded defaults: the shipped fp32 master and a damaged int8 copy; a CPU with VNNI."""
    _need_shipped("fp32", "int8")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(SHIPPED["fp32"], folder / inference.DEFAULT_MODEL_FILES["fp32"])
    _damage(SHIPPED["int8"], folder / inference.DEFAULT_MODEL_FILES["int8"])
    monkeypatch.setattr(model_loading, "default_model_dirs", lambda: [folder])
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)
    monkeypatch.setenv(cpu.CPU_FLAGS_ENV, VNNI)  # a CPU where auto takes int8
    yield folder


def test_damaged_int8_still_loads_but_fails_its_self_check(damaged_default: Path) -> None:
    import onnxruntime as ort

    from cxr_batch.contract import read_contract

    path = damaged_default / inference.DEFAULT_MODEL_FILES["int8"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = run_self_check(session, read_contract(session, str(path)))
    assert check is not None and not check.ok and check.deviation > check.tolerance


@pytest.mark.slow
def test_damaged_int8_under_auto_falls_back_to_fp32_with_one_notice(
    damaged_default: Path, runner: CliRunner, sample_images: Path, tmp_path: Path
) -> None:
    clf = Classifier(device="cpu", threads=1)
    assert clf.meta.precision == "fp32" and clf.model_path.name == inference.DEFAULT_MODEL_FILES["fp32"]
    assert len(clf.notices) == 1 and "using the fp32 model" in clf.notices[0]
    assert "failed its self-check" in clf.precision_reason
    out = tmp_path / "r.csv"
    result = runner.invoke(main, ["classify", str(sample_images), "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("notice:") == 1 and "gives wrong results on this machine" in result.stderr
    assert "largest logit deviation from fp32" in result.stderr
    assert "precision fp32: the int8 model failed its self-check here" in " ".join(result.stderr.split())
    rows = out.read_text().splitlines()
    assert len(rows) == 10 and all(",ok," in r for r in rows[1:])
    quiet = runner.invoke(main, ["classify", str(sample_images), "--out", str(tmp_path / "q.csv"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr.count("notice:") == 1  # said even with --quiet


def test_damaged_int8_asked_for_explicitly_is_refused(
    damaged_default: Path, runner: CliRunner, sample_images: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=r"gives wrong results on this machine.*--precision fp32"):
        Classifier(device="cpu", precision="int8", threads=1)
    out = tmp_path / "r.csv"
    for extra in (["--precision", "int8"], ["--model", str(damaged_default / "cxr-resnet18-int8.onnx")]):
        result = runner.invoke(main, ["classify", str(sample_images), "--out", str(out), *extra])
        assert result.exit_code == 1, result.output
        message = " ".join(result.stderr.split())
        assert message.startswith("Error: ") and "Traceback" not in result.output
        assert "largest logit deviation from fp32" in message and "--precision fp32" in message
        assert not out.exists()
    evaluate = runner.invoke(
        main, ["evaluate", str(sample_images), "--out", str(tmp_path / "e.json"), "--precision", "int8"]
    )
    assert evaluate.exit_code == 1 and "--precision fp32" in " ".join(evaluate.stderr.split())


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_driver_applies_the_same_self_check(damaged_default: Path) -> None:
    pytest.importorskip("ray.data")
    from cxr_batch.engine.ray import RayConfig, RayEngine

    engine = RayEngine(EngineConfig(device="cpu"), RayConfig())
    assert engine.model_path.name == inference.DEFAULT_MODEL_FILES["fp32"] and engine.meta.precision == "fp32"
    assert len(engine.notices) == 1 and "failed its self-check" in engine.precision_reason
    with pytest.raises(ModelError, match="--precision fp32"):
        RayEngine(EngineConfig(device="cpu", precision="int8"), RayConfig())


def test_a_malformed_self_check_entry_is_a_clear_error(make_model: Callable[..., Path]) -> None:
    bad = contract(
        extra={
            SELF_CHECK_KEY: {"images": {"encoding": "zlib+base64", "dtype": "uint8", "shape": [1, 2, 2], "data": "!!"}}
        }
    )
    model = make_model("bad-self-check.onnx", meta=bad)
    with pytest.raises(ModelError, match="self_check' entry is malformed"):
        Classifier(model, device="cpu", threads=1)


# --------------------------------------------------------------------------- writing the self-check


@pytest.mark.slow
def test_export_writes_self_checks_that_pass_and_catch_damage(tmp_path: Path, sample_images: Path) -> None:
    _need_shipped("fp32", "int8")
    pytest.importorskip("onnx")
    from rich.console import Console

    from cxr_batch.training import references

    master, int8 = tmp_path / "m.onnx", tmp_path / "m-int8.onnx"
    shutil.copyfile(SHIPPED["fp32"], master)
    shutil.copyfile(SHIPPED["int8"], int8)
    candidates = sorted(p for p in sample_images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    written = references.write_self_checks(master, [int8], candidates, Console(quiet=True))
    assert set(written) == {"m.onnx", "m-int8.onnx"}
    assert written["m.onnx"]["tolerance"] == references.FP32_SELF_CHECK_TOLERANCE
    assert written["m-int8.onnx"]["tolerance"] >= references.SELF_CHECK_FLOOR["int8"]
    assert written["m.onnx"]["images"] == written["m-int8.onnx"]["images"]
    for path in (master, int8):
        clf = Classifier(path, device="cpu", threads=1)
        assert (
            clf.self_check is not None and clf.self_check.ok and clf.self_check.images == references.SELF_CHECK_IMAGES
        )
    with pytest.raises(ModelError, match="the int8 model gives wrong results"):
        Classifier(_damage(int8, tmp_path / "d.onnx"), device="cpu", threads=1)
