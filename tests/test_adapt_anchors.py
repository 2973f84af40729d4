"""``adapt``'s distillation on synthetic embeddings: a site with normal films only must not take COVID-19 away.

Real films through the shipped model: the classifier is trained (adapt's own :func:`train_head`) on adult
normal films of two hospitals the model never saw, which it partly calls COVID-19, so training pushes
the COVID-19 boundary back. Measured on real pool COVID-19 films of the 1.1.0 split's validation part,
with and without the synthetic anchors drawn from the base model's OOD guard.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")
pytest.importorskip("onnx", reason="the train extra (onnx) is not installed")

BASE = REPO / "export" / "cxr-resnet18.onnx"
N_NORMAL = 48
N_COVID = 60


def need_base() -> None:
    if not BASE.is_file():
        pytest.skip(f"the shipped model {BASE} is not here")


@pytest.mark.slow
def test_anchors_are_draws_of_the_guards_gaussians() -> None:
    """One block of draws per class of the base model, centred on the guard's class means, seeded."""
    need_base()
    from onnx import numpy_helper

    from cxr_batch.training.adapt import gaussian_anchors
    from cxr_batch.training.onnx_file import read_contract_file

    proto, meta = read_contract_file(BASE)
    means = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["ood/means"]
    got = gaussian_anchors(BASE, list(meta.labels), 2000, seed=3)
    assert got is not None
    x, y = got
    assert x.shape == (3 * 2000, 512) and np.bincount(y.numpy()).tolist() == [2000, 2000, 2000]
    precision = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["ood/precision"]
    sd = np.sqrt(np.diag(np.linalg.inv(precision.astype(np.float64))))  # each dimension's spread
    for c in range(3):
        z = (x[y == c].numpy().mean(0) - means[c]) / (sd / np.sqrt(2000))
        assert np.abs(z).max() < 5  # the sample mean is the class mean, within noise (512 dimensions)
    again = gaussian_anchors(BASE, list(meta.labels), 2000, seed=3)
    assert again is not None and torch.equal(again[0], x)
    assert gaussian_anchors(BASE, list(meta.labels), 0, seed=3) is None


@pytest.fixture
def normals_and_covid(shared_data: Path) -> dict[str, object]:
    """Frozen-trunk outputs of real adult normals (Montgomery, Shenzhen) and real pool COVID-19 films."""
    need_base()
    from cxr_batch.training.adapt import _Split, _test_tensors
    from cxr_batch.training.onnx_file import read_contract_file
    from cxr_batch.training.train import build_model

    torch.set_num_threads(2)
    _, meta = read_contract_file(BASE)
    normals = [
        (p, "normal", "site")
        for site in ("montgomery", "shenzhen")
        for p in sorted((shared_data / "lung-masks" / site / "images").glob("*_0.png"))[: N_NORMAL // 2]
    ]
    with open(REPO / "export" / "run-1.1.0" / "split.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val" and r["label"] == "covid"]
    covid = [(shared_data / r["source"] / r["path"], "covid", "pool") for r in rows[:N_COVID]]
    model = build_model(len(meta.labels), str(BASE))
    model.eval()
    parts = _Split(model, "layer4")
    for p in parts.trunk.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        x_n, _, _ = _test_tensors(normals, meta)
        x_c, _, _ = _test_tensors(covid, meta)
        f_n = parts.trunk(torch.from_numpy(x_n))
        e_c = torch.flatten(parts.pool(parts.trunk(torch.from_numpy(x_c))), 1)
    return {"model": model, "parts": parts, "f_n": f_n, "e_c": e_c, "labels": list(meta.labels)}


@pytest.mark.slow
def test_anchors_keep_covid_when_adapting_on_normals_only(normals_and_covid: dict[str, object]) -> None:
    from cxr_batch.training.adapt import AdaptConfig, gaussian_anchors, train_head

    d = normals_and_covid
    model, parts, f_n, e_c = d["model"], d["parts"], d["f_n"], d["e_c"]
    labels: list[str] = d["labels"]  # type: ignore[assignment]
    assert isinstance(model, torch.nn.Module) and isinstance(f_n, torch.Tensor) and isinstance(e_c, torch.Tensor)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.zeros(len(f_n), dtype=torch.int64)  # every local film a normal
    with torch.no_grad():
        teacher = parts.head(f_n)  # type: ignore[attr-defined]
        base_covid = parts.fc(e_c).argmax(1)  # type: ignore[attr-defined]
        base_normal = (teacher.argmax(1) == 0).float().mean().item()
        fresh = gaussian_anchors(BASE, labels, 500, seed=99)  # other draws than the ones trained on
        assert fresh is not None
        near = fresh[0][fresh[1] == 2]  # around the COVID-19 mean
        base_near = parts.fc(near).argmax(1)  # type: ignore[attr-defined]
    # a strong push: 10x adapt's learning rate, no early stop; validation = the same normals
    cfg = AdaptConfig(data_dirs=(), out="unused.onnx", lr=1e-3, epochs=10, patience=10, batch_size=16)

    def covid_recall_after(anchor_weight: float) -> tuple[float, float, float]:
        model.load_state_dict(base_state)  # type: ignore[union-attr]
        c = replace(cfg, anchor_weight=anchor_weight)
        anchors = gaussian_anchors(BASE, labels, 1024, seed=0) if anchor_weight else None
        fit = train_head(model, parts, f_n, y, f_n, y.numpy(), teacher, teacher, c, anchors)  # type: ignore[arg-type]
        model.load_state_dict(fit.state)  # type: ignore[union-attr]
        with torch.no_grad():
            covid = (parts.fc(e_c).argmax(1) == 2).float().mean().item()  # type: ignore[attr-defined]
            normal = (parts.head(f_n).argmax(1) == 0).float().mean().item()  # type: ignore[attr-defined]
            keep = (parts.fc(near).argmax(1) == base_near).float().mean().item()  # type: ignore[attr-defined]
        return covid, normal, keep

    base_recall = (base_covid == 2).float().mean().item()
    plain = covid_recall_after(0.0)
    anchored = covid_recall_after(1.0)
    print(f"base covid {base_recall:.3f} normal {base_normal:.3f}; plain {plain}; anchored {anchored}")
    # measured (2-core EPYC, torch CPU; anchor weight 1, a third of the default): base COVID-19 recall 0.967,
    # normals 0.896; without anchors 0.867 and 0.958; with them 0.933 and 0.938; the base's call kept on
    # 0.958 and 0.988 of new draws near the COVID-19 mean
    assert plain[1] > base_normal and anchored[1] > base_normal  # the push does fit the site's normals
    assert plain[0] <= base_recall - 0.08  # ... and, unprotected, takes COVID-19 films away
    assert anchored[0] >= base_recall - 0.05 and anchored[0] >= plain[0] + 0.05  # the anchors keep most
    assert anchored[2] > plain[2] and anchored[2] > 0.97  # and the base's calls near the COVID-19 mean
