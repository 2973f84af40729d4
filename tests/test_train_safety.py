"""Hostile run folders and splits for ``train`` and ``export`` (issue 21): checkpoints are loaded as
plain data only (a pickled payload is refused, never run); split paths stay inside the roots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "covid19-radiography"


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real X-rays per class, copied from the shared pool."""
    if not POOL.is_dir():
        pytest.skip(f"the shared X-ray data is not here ({POOL}); these tests need ../shared/data")
    root = tmp_path_factory.mktemp("pool")
    for label in ("normal", "viral", "covid"):
        (root / label).mkdir()
        for src in sorted((POOL / label).iterdir())[:4]:
            (root / label / src.name).write_bytes(src.read_bytes())
    return root


def _train(pool: Path, out: Path, *extra: str, epochs: int = 1) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "cxr_batch.cli", "train", str(pool), "--out", str(out), "--epochs", str(epochs)]
    args += ["--image-size", "32", "--batch-size", "4", "--threads", "1", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)


def _hostile_ckpt(path: Path, marker: Path) -> None:
    torch.save({"model": {}, "epoch": 0, "history": {}, "payload": _Payload(marker)}, path)


@pytest.mark.slow
def test_resume_refuses_a_pickled_payload_and_a_normal_resume_works(tiny_pool: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _train(tiny_pool, run, epochs=2)
    assert first.returncode == 0, first.stderr
    # What train saved loads as plain data (weights_only=True).
    for name in ("last.ckpt", "best.ckpt"):
        ck = torch.load(run / name, weights_only=True)
        assert ck["labels"] == ["normal", "viral", "covid"]
    # A normal resume loads the checkpoint (the run is complete: straight to the test report).
    resumed = _train(tiny_pool, run, "--resume", epochs=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2" in resumed.stderr
    # A planted payload in last.ckpt is refused with a clear error and never runs.
    good = (run / "last.ckpt").read_bytes()
    marker = tmp_path / "pwned"
    _hostile_ckpt(run / "last.ckpt", marker)
    hostile = _train(tiny_pool, run, "--resume", epochs=2)
    assert hostile.returncode == 1, hostile.stderr
    assert not marker.exists(), "the checkpoint's payload ran"
    assert "refused" in hostile.stderr and "last.ckpt" in hostile.stderr
    assert "Traceback" not in hostile.stderr
    assert (run / "last.ckpt").read_bytes() != good  # the hostile file was left for the user to look at


def test_export_refuses_a_pickled_payload(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    marker = tmp_path / "pwned"
    _hostile_ckpt(ckpt, marker)
    proc = run_cli("export", str(ckpt), "--out", str(tmp_path / "m.onnx"))
    assert proc.returncode != 0
    assert not marker.exists(), "the checkpoint's payload ran"
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr


def test_best_checkpoint_reload_refuses_a_payload(tmp_path: Path) -> None:
    """The end-of-run reload of best.ckpt goes through the same loader."""
    from cxr_batch.errors import CxrBatchError
    from cxr_batch.training.train import load_checkpoint

    marker = tmp_path / "pwned"
    _hostile_ckpt(tmp_path / "best.ckpt", marker)
    with pytest.raises(CxrBatchError, match="refused"):
        load_checkpoint(tmp_path / "best.ckpt")
    assert not marker.exists()
