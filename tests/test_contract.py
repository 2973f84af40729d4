"""The model contract, model resolution, devices and ``cxr-batch info``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, contract

from cxr_batch.cli.main import main
from cxr_batch.contract import file_sha256
from cxr_batch.engine import classifier as inference
from cxr_batch.engine import model as model_loading
from cxr_batch.engine.classifier import Classifier, EngineConfig, load_model, model_info
from cxr_batch.errors import DeviceError, ModelError, NoDefaultModelError


@pytest.fixture(autouse=True)
def _no_env_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)


def test_valid_model_loads_with_its_contract(tiny_onnx: Path) -> None:
    clf = Classifier(tiny_onnx, device="cpu", threads=1)
    assert clf.labels == LABELS
    assert clf.meta.ident == "tiny@1"
    assert clf.meta.input_size == (32, 32)
    assert clf.provider == "CPUExecutionProvider"
    assert clf.model_origin == "--model"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("nometa.onnx", {"meta": None}, "has no 'cxr_batch' entry"),
        ("badjson.onnx", {"meta": "{not json"}, "is not valid JSON"),
        (
            "labels2.onnx",
            {"meta": contract(labels=["normal", "covid"])},
            "2 labels ['normal', 'covid'] but its logits output has 3 classes",
        ),
        ("rank3.onnx", {"meta": contract(), "input_rank": 3}, "the input must have rank 4"),
        ("nolabels.onnx", {"meta": contract(labels=None)}, "the model contract lacks labels"),
        (
            "size.onnx",
            {"meta": contract(input_size=[64, 64])},
            "input_size [64, 64] doesn't match the graph's [32, 32]",
        ),
        ("fixed.onnx", {"meta": contract(), "fixed_batch": 1}, "batch axis must be dynamic"),
        ("noout.onnx", {"meta": contract(outputs={"logits": "scores"})}, "names output 'scores' (logits)"),
    ],
)
def test_broken_models_are_refused_saying_why(
    make_model: Callable[..., Path],
    runner: CliRunner,
    tmp_path: Path,
    name: str,
    kwargs: dict[str, object],
    message: str,
) -> None:
    model = make_model(name, **kwargs)
    with pytest.raises(ModelError) as info:
        Classifier(model, device="cpu", threads=1)
    assert message in str(info.value)
    assert str(model) in str(info.value)
    # The CLI: exit 1, the same message, and no report file left behind.
    (tmp_path / "x.png").write_bytes(b"")
    out = tmp_path / "out.csv"
    result = runner.invoke(main, ["classify", str(tmp_path / "x.png"), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 1
    assert message in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "ood", "message"),
    [
        ("ood-nan.onnx", {"threshold": float("nan")}, "'ood.threshold' must be a finite number"),
        ("ood-inf.onnx", {"threshold": float("inf")}, "'ood.threshold' must be a finite number"),
        ("ood-text.onnx", {"threshold": "23.0"}, "'ood.threshold' must be a finite number"),
        ("ood-bool.onnx", {"threshold": True}, "'ood.threshold' must be a finite number"),
        ("ood-list.onnx", [23.0], "'ood' must be an object"),
    ],
)
def test_an_ood_threshold_that_is_not_a_finite_number_is_refused(
    make_model: Callable[..., Path], name: str, ood: object, message: str
) -> None:
    outputs = {"logits": "logits", "embedding": "embedding", "ood_score": "ood_score"}
    model = make_model(name, ood=True, meta=contract(outputs=outputs, ood=ood))
    with pytest.raises(ModelError) as info:
        Classifier(model, device="cpu", threads=1)
    assert message in str(info.value) and str(model) in str(info.value)


def test_the_ood_threshold_is_read_as_a_number(make_model: Callable[..., Path]) -> None:
    outputs = {"logits": "logits", "embedding": "embedding", "ood_score": "ood_score"}
    model = make_model("ood-int.onnx", ood=True, meta=contract(outputs=outputs, ood={"threshold": 23}))
    meta = Classifier(model, device="cpu", threads=1).meta
    assert meta.ood_threshold == 23.0 and isinstance(meta.ood_threshold, float)
    assert meta.with_updates(ood={"calibration": "none yet"}).ood_threshold is None
    with pytest.raises(ModelError, match="finite number"):  # a contract built in memory is checked too
        _ = meta.with_updates(ood={"threshold": float("nan")}).ood_threshold


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_text("hello")
    with pytest.raises(ModelError, match="cannot load the model"):
        Classifier(bogus, device="cpu")
    with pytest.raises(ModelError, match="model file not found"):
        Classifier(tmp_path / "missing.onnx", device="cpu")


def test_info_prints_contract_sha_and_graph(runner: CliRunner, tiny_onnx: Path) -> None:
    result = runner.invoke(main, ["info", str(tiny_onnx), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["sha256"] == file_sha256(tiny_onnx)
    assert info["contract"]["labels"] == list(LABELS)
    assert info["inputs"] == [{"name": "input", "type": "tensor(float)", "shape": ["batch", 3, 32, 32]}]
    assert [o["name"] for o in info["outputs"]] == ["logits", "embedding"]
    assert "CPUExecutionProvider" in info["providers_available"]

    human = runner.invoke(main, ["info", str(tiny_onnx)])
    assert human.exit_code == 0, human.output
    assert file_sha256(tiny_onnx) in human.stdout
    assert "labels: normal, viral, covid" in human.stdout and "logits" in human.stdout and "tiny@1" in human.stdout
    assert '"labels"' not in human.stdout and len(human.stdout.splitlines()) <= 15  # short; --json has the contract


def test_info_refuses_a_broken_model(runner: CliRunner, make_model: Callable[..., Path]) -> None:
    model = make_model("info-nometa.onnx", meta=None)
    result = runner.invoke(main, ["info", str(model)])
    assert result.exit_code == 1
    assert "not a cxr-batch model" in result.stderr


# --------------------------------------------------------------------------- model resolution


@pytest.fixture
def default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty embedded-models folder in place of the package's."""
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setattr(model_loading, "default_model_dirs", lambda: [folder])
    return folder


def test_no_default_model_is_a_clear_fatal_error(default_dir: Path, runner: CliRunner, image_dir: Path) -> None:
    with pytest.raises(NoDefaultModelError, match="pass --model PATH"):
        Classifier(device="cpu")
    result = runner.invoke(main, ["classify", str(image_dir), "--out", str(image_dir.parent / "r.csv")])
    assert result.exit_code == 1
    assert "no default model is installed" in result.stderr and "CXR_BATCH_MODEL" in result.stderr
    info = runner.invoke(main, ["info"])
    assert info.exit_code == 1 and "no default model is installed" in info.stderr


#: The int8 file's record of the export gate (issue 19): auto takes it only when it passed.
GATE_PASSED = {"quantization": {"top1_agreement_with_fp32": 1.0, "max_abs_prob_diff": 0.01, "gate": {"passed": True}}}
GATE_MISSED = {
    "quantization": {"top1_agreement_with_fp32": 0.9961, "max_abs_prob_diff": 0.087, "gate": {"passed": False}}
}


def _install_defaults(folder: Path, make_model: Callable[..., Path], fp32: bool, int8: bool, gate: bool = True) -> None:
    if fp32:
        src = make_model("default-fp32.onnx", meta=contract(name="default", precision="fp32"))
        (folder / "cxr-resnet18.onnx").write_bytes(src.read_bytes())
    if int8:
        extra = GATE_PASSED if gate else GATE_MISSED
        src = make_model(f"default-int8-{gate}.onnx", meta=contract(name="default", precision="int8", extra=extra))
        (folder / "cxr-resnet18-int8.onnx").write_bytes(src.read_bytes())


@pytest.mark.parametrize(
    ("fp32", "int8", "precision", "expected", "gate"),
    [
        (True, True, "auto", "int8", True),  # a CPU with VNNI: int8 when installed and it passed the gate
        (True, True, "auto", "fp32", False),  # ... else fp32
        (True, False, "auto", "fp32", True),
        (False, True, "auto", "int8", True),
        (False, True, "auto", "int8", False),  # nothing else installed
        (True, True, "fp32", "fp32", True),
        (True, True, "int8", "int8", False),  # asked for: no gate
    ],
)
def test_embedded_default_and_precision(
    default_dir: Path,
    make_model: Callable[..., Path],
    fp32: bool,
    int8: bool,
    precision: str,
    expected: str,
    gate: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install_defaults(default_dir, make_model, fp32, int8, gate)
    monkeypatch.setenv("CXR_BATCH_CPU_FLAGS", "avx512_vnni")
    clf = Classifier(device="cpu", precision=precision, threads=1)  # type: ignore[arg-type]
    assert clf.meta.precision == expected
    assert clf.model_origin == "embedded default"
    assert clf.model_path.parent == default_dir
    if precision == "auto" and fp32 and int8 and not gate:
        assert "did not pass the export gate" in clf.precision_reason and "99.61%" in clf.precision_reason


def test_missing_precision_is_an_error(default_dir: Path, make_model: Callable[..., Path]) -> None:
    _install_defaults(default_dir, make_model, fp32=True, int8=False)
    with pytest.raises(NoDefaultModelError, match="int8 model"):
        Classifier(device="cpu", precision="int8")


def test_auto_on_cuda_prefers_fp32(
    default_dir: Path, make_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_defaults(default_dir, make_model, fp32=True, int8=True)
    monkeypatch.setenv("CXR_BATCH_CPU_FLAGS", "avx512_vnni")  # a CPU where auto takes int8
    assert inference.find_default_model("auto", cuda=True).name == "cxr-resnet18.onnx"
    assert inference.find_default_model("auto", cuda=False).name == "cxr-resnet18-int8.onnx"


def test_env_variable_then_explicit_model(
    default_dir: Path, monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path, other_onnx: Path
) -> None:
    monkeypatch.setenv("CXR_BATCH_MODEL", str(other_onnx))
    assert Classifier(device="cpu", threads=1).meta.ident == "tiny@2"
    assert Classifier(tiny_onnx, device="cpu", threads=1).meta.ident == "tiny@1"
    monkeypatch.setenv("CXR_BATCH_MODEL", str(default_dir / "nope.onnx"))
    with pytest.raises(ModelError, match=r"from \$CXR_BATCH_MODEL"):
        Classifier(device="cpu")


def test_precision_must_match_an_explicit_model(tiny_onnx: Path) -> None:
    with pytest.raises(ModelError, match="is a fp32 model but --precision int8"):
        Classifier(tiny_onnx, device="cpu", precision="int8")
    assert Classifier(tiny_onnx, device="cpu", precision="fp32", threads=1).meta.precision == "fp32"


# --------------------------------------------------------------------------- devices


def test_cuda_without_a_cuda_build_names_the_fix(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError) as info:
        Classifier(tiny_onnx, device="cuda")
    message = str(info.value)
    assert "onnxruntime-gpu" in message and "CUDA 12" in message and "cuDNN 9" in message


def test_silent_cpu_fallback_is_detected(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime claims CUDA but the session ends up on CPU (the CUDA libraries did not load)."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class FallbackSession(ort.InferenceSession):
        def __init__(self, path: str, sess_options: object = None, providers: list[str] | None = None) -> None:
            self.asked = providers
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    with pytest.raises(DeviceError, match="fell back to CPUExecutionProvider") as info:
        Classifier(tiny_onnx, device="cuda")
    assert "onnxruntime-gpu" in str(info.value)
    # auto: runs, on CPU, and says so.
    clf = Classifier(tiny_onnx, device="auto", threads=1)
    assert clf.provider == "CPUExecutionProvider"
    assert clf._loaded.session.asked == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # type: ignore[attr-defined]


def test_cli_device_cuda_on_this_machine(runner: CliRunner, tiny_onnx: Path, image_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = image_dir.parent / "r.csv"
    result = runner.invoke(
        main, ["classify", str(image_dir), "--model", str(tiny_onnx), "--device", "cuda", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "onnxruntime-gpu" in result.stderr
    assert not out.exists()


def test_engine_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EngineConfig(batch_size=0)
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")  # type: ignore[arg-type]


def test_model_info_and_load_model_agree(tiny_onnx: Path) -> None:
    info = model_info(tiny_onnx)
    loaded = load_model(EngineConfig(model=str(tiny_onnx), device="cpu", threads=1))
    assert info["model"] == loaded.meta.ident
    assert info["contract"]["outputs"] == loaded.meta.outputs
