"""--engine ray: same rows as the local engine and as merged shards; resume; the optional extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, REPO, strip_run_ids
from test_shard_merge import build_folder, classify, merge, read_rows, run_shards

from cxr_batch.classify import ClassifyConfig, run_classify
from cxr_batch.cli.main import main
from cxr_batch.engine.classifier import EngineConfig
from cxr_batch.io.inputs import InputSpec
from cxr_batch.report.writer import ReportConfig

PROBS = [f"prob_{label}" for label in LABELS]


def assert_same_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    """Same paths in the same order, same status, label, error and sizes; probabilities within 1e-5
    (the run ids differ: each run has its own)."""
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        for col in x:
            if col == "run_id":
                continue
            if col in PROBS or col in ("confidence", "ood_score"):
                assert (x[col] == y[col] == "") or abs(float(x[col]) - float(y[col])) < 1e-5, (x["path"], col)
            else:
                assert x[col] == y[col], (x["path"], col)


@pytest.fixture
def xray_folder(shared_data: Path, tmp_path: Path) -> Path:
    """24 real X-rays (8 per class) in the layout of build_folder: order traps, a non-UTF-8 name, 3 bad files."""
    root = shared_data / "covid19-radiography"
    images = [p for cls in ("covid", "normal", "viral") for p in sorted((root / cls).glob("*.png"))[:8]]
    return build_folder(tmp_path / "xrays", images)


@pytest.mark.slow
@pytest.mark.ray
def test_local_shards_and_ray_give_the_same_rows(
    runner: CliRunner, tiny_onnx: Path, xray_folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    local = tmp_path / "local.csv"
    code, _, err = classify(runner, tiny_onnx, str(xray_folder), "--out", str(local), "-q")
    assert code == 3, err
    rows = read_rows(local)
    assert len(rows) == 27 and sum(r["status"] == "error" for r in rows) == 3

    parts = run_shards(runner, tiny_onnx, xray_folder, tmp_path, 3)
    merged = tmp_path / "merged.csv"
    code, _, err = merge(runner, *map(str, parts), "--out", str(merged), "--expect", "3")
    assert code == 3, err
    assert strip_run_ids(merged.read_bytes()) == strip_run_ids(local.read_bytes())

    ray_out = tmp_path / "ray.csv"
    code, _, err = classify(runner, tiny_onnx, str(xray_folder), "--engine", "ray", "--out", str(ray_out))
    assert code == 3, err
    assert_same_rows(read_rows(ray_out), rows)
    assert "on Ray (1 actor)" in err and "CPUExecutionProvider" in err  # the summary
    assert "error: empty file (0 bytes)" in err


@pytest.mark.slow
@pytest.mark.ray
def test_ray_resume_and_shard(tiny_onnx: Path, xray_folder: Path, tmp_path: Path) -> None:
    """A killed Ray run (complete rows and a partial one) resumed with --engine ray, on one shard."""
    pytest.importorskip("ray")
    from cxr_batch.engine.ray import RayConfig
    from cxr_batch.io.shard import Shard

    def config(out: Path, ray: RayConfig | None, resume: bool = False) -> ClassifyConfig:
        return ClassifyConfig(
            inputs=InputSpec(paths=(str(xray_folder),)),
            engine=EngineConfig(model=str(tiny_onnx), device="cpu", threads=1, batch_size=2),
            report=ReportConfig(out=str(out), resume=resume),
            quiet=True,
            shard=Shard(0, 2),
            ray=ray,
        )

    local = tmp_path / "local.csv"
    run_classify(config(local, None))
    lines = local.read_bytes().split(b"\r\n")
    part = tmp_path / "part.csv"
    part.write_bytes(b"\r\n".join(lines[:3]) + b"\r\n" + lines[3][:12])
    stats = run_classify(config(part, RayConfig(num_cpus=2, actors=2, task_size=3), resume=True))
    assert stats.kept == 2 and stats.total == len([x for x in lines[1:] if x]) - 2
    assert stats.provider == "CPUExecutionProvider on Ray (2 actors)"
    assert_same_rows(read_rows(part), read_rows(local))


def test_missing_ray_extra(
    runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, find_spec → None
    out = tmp_path / "r.csv"
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--engine", "ray", "--out", str(out))
    assert code == 1 and 'pip install "cxr-batch[ray]"' in err
    assert not out.exists()


def test_local_classify_never_imports_ray(tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    script = f"""
import sys
from cxr_batch.cli.main import main
for args in (["--help"], ["classify", "--help"], ["merge", "--help"],
             ["classify", {str(image_dir)!r}, "--model", {str(tiny_onnx)!r}, "--out", {str(tmp_path / "r.csv")!r},
              "--threads", "1", "--shard", "0/1", "-q"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
assert "ray" not in sys.modules, "ray was imported"
print("RAY-FREE")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("RAY-FREE")


def test_help(runner: CliRunner) -> None:
    result = runner.invoke(main, ["merge", "--help"])
    assert result.exit_code == 0 and "Example: cxr-batch merge" in result.stdout
    result = runner.invoke(main, ["classify", "--help"])
    assert "--engine [local|ray]" in result.stdout and "--shard K/N" in result.stdout
