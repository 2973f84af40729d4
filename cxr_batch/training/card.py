"""The model card (``NAME.md`` beside the ONNX file), written from the model's contract.

Every fact on the card comes from the contract the file carries (training data, recipe, the
weights it started from, the recipe selection, test metrics overall and per source, the int8
section, the out-of-distribution guard and its evaluation): nothing here describes one model in
prose. What is known about a data *source* (its citation, its biases) is looked up by the
source's name in :data:`KNOWN_SOURCES`; a source not listed there is named and counted only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr_batch.contract import ModelMeta

#: What is known about the data folders this project trains on, by source (folder) name.
KNOWN_SOURCES: dict[str, dict[str, Any]] = {
    "covid19-radiography": {
        "what": "COVID-19 Radiography Database (Kaggle; M.E.H. Chowdhury et al., IEEE Access 8, 2020; T. Rahman et al., "
        "Computers in Biology and Medicine 132, 2021), a subset stored as 256×256 greyscale PNGs",
        "biases": [
            "**Every viral pneumonia image is pediatric**, from one hospital in Guangzhou (Kermany et al. 2018); the "
            "normal and COVID-19 images of this source are mostly adults from other hospitals. A model can separate "
            "the classes by the patient's age or the hospital rather than the disease; expect it to do worse on adult "
            "viral pneumonia, of which it has seen none.",
            "**Burned-in text**: many COVID-19 images carry captions, arrows, 'D'/'R' markers or scanner labels; the "
            "other classes rarely do. The model may use the text.",
            "**The classes come from different hospitals and scanners**, so acquisition differences are confounded "
            "with the label.",
        ],
    },
    "kermany-normal": {
        "what": "pediatric normal films of the Kermany, Zhang and Goldbaum (2018) training split (Mendeley Data v2, "
        "CC BY 4.0; Guangzhou Women and Children's Medical Center, children aged 1 to 5), converted as the database "
        "converted its images (grey, 256×256 PNG)",
        "biases": [
            "The pediatric normal films come from **the same hospital as every viral pneumonia film**: within "
            "children, the model has to tell normal from viral by the lungs, but all its pediatric films are one "
            "hospital's, so another children's hospital is still out of its experience.",
        ],
    },
}

_NLM = (
    "NLM public research release (credit NLM/NIH; cite Jaeger et al. 2014, Quant Imaging Med Surg 4(6), and "
    "Candemir et al. 2014, IEEE TMI 33(2)), via `../shared/data/lung-masks` (256×256 grey PNG, squashed square); "
    "read from its `SOURCES.csv` (`source_label`): only the **normal** films are used, the tuberculosis films "
    "(not a class) are left out"
)
KNOWN_SOURCES["montgomery"] = {
    "what": "adult PA films of the NLM Montgomery County (Maryland, USA) TB screening set; " + _NLM,
    "biases": ["Few films (80 normals), one US county's screening programme; adults only, no disease class used."],
}
KNOWN_SOURCES["shenzhen"] = {
    "what": "adult PA films of the NLM Shenzhen No.3 People's Hospital (China) TB set; " + _NLM,
    "biases": [
        "Adult normals only: they teach the model that an adult film from another hospital can be normal, but "
        "no adult viral pneumonia exists in any source.",
    ],
}

#: What each augmentation preset of ``cxr-batch train --augment`` does.
AUGMENTATIONS = {
    "light": "random affine (rotation ±7°, scale 0.9–1.1, shift ±6%) and brightness/contrast ±10%",
    "scanner": "random affine (rotation ±10°, scale 0.85–1.15, shift ±8%); on half the images resolution loss "
    "(shrunk to 35–90% and re-sampled); on a third JPEG re-compression (quality 30–90); on half gamma 0.7–1.45; "
    "on a third Gaussian noise (σ ≤ 0.03); contrast ±20% and brightness ±10%",
}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _metrics_lines(m: dict[str, Any], labels: tuple[str, ...], what: str = "test") -> list[str]:
    lines = [
        f"- n = {m.get('n')}, accuracy **{_fmt(m.get('accuracy'))}** (95% CI "
        f"{[round(v, 4) for v in m.get('accuracy_ci95') or []]}), macro-F1 **{_fmt(m.get('macro_f1'))}**"
        + (
            f", expected calibration error {_fmt(m.get('ece'))}; best epoch {m.get('best_epoch')} (chosen on validation)."
            if what == "test"
            else "."
        ),
        "",
        "| class | support | precision | recall (sensitivity) | specificity | F1 | ROC AUC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    per_class = m.get("per_class", {})
    for name in labels:
        pc = per_class.get(name)
        if pc:
            lines.append(
                f"| {name} | {pc['support']} | {_fmt(pc['precision'])} | {_fmt(pc['recall'])} | "
                f"{_fmt(pc['specificity'])} | {_fmt(pc['f1'])} | {_fmt(pc['roc_auc'])} |"
            )
    lines += [
        "",
        "Confusion matrix (rows true, columns predicted, order " + ", ".join(labels) + "):",
        "",
        "```",
        *[" ".join(f"{v:5d}" for v in row) for row in m.get("confusion_matrix", [])],
        "```",
    ]
    by_source = m.get("by_source") or {}
    if len(by_source) > 1:
        lines += [
            "",
            f"Per source (the same {what} images, split by the folder they came from):",
            "",
            "| source | images | accuracy (95% CI) | macro-F1 | " + " | ".join(f"{x} recall" for x in labels) + " |",
            "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |",
        ]
        for name, sm in by_source.items():
            ci = sm.get("accuracy_ci95") or []
            ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 and None not in ci else ""
            recalls = [
                _fmt(sm["per_class"][x]["recall"]) if sm["per_class"].get(x, {}).get("support") else "-" for x in labels
            ]
            held = " (held out of training)" if name == m.get("holdout_source") else ""
            lines.append(
                f"| {name}{held} | {sm.get('n')} | {_fmt(sm.get('accuracy'))}{ci_text} | {_fmt(sm.get('macro_f1'))} | "
                + " | ".join(recalls)
                + " |"
            )
        lines += ["", "Macro-F1 of a source that holds one class only is not meaningful; read its accuracy and recall."]
    return lines


def card_text(onnx_path: Path, meta: ModelMeta, int8: dict[str, Any] | None) -> str:
    """The card's Markdown for the fp32 master ``onnx_path`` with contract ``meta``."""
    m = meta.metrics
    recipe = meta.extra.get("recipe", {}) or {}
    init = meta.extra.get("init") or {}
    td = meta.training_data or {}
    sources = td.get("sources") or [td.get("source")]
    weights = str(recipe.get("weights", "none"))
    if init:
        start = (
            f"- Weights: initialised from `{init.get('file')}` ({init.get('model')}, sha256 `{init.get('sha256')}`), "
            "a released model of this project, then fine-tuned on the training split below. "
            + (f"That model was itself {init['origin']}." if init.get("origin") else "")
        )
    elif weights == "none":
        start = (
            "- Weights: **random initialisation** (ImageNet weights could not be downloaded on the training machine)."
        )
    else:
        start = f"- Weights: `{weights}` initialisation."
    siblings = [
        (f"{onnx_path.stem}-int8.onnx", "int8, the default on CPUs with VNNI, AMX or ARM dot product"),
        (f"{onnx_path.stem}-fp16.onnx", "fp16, preferred on CUDA"),
    ]
    files = f"- Files: `{onnx_path.name}` (fp32, the master copy; the default elsewhere)" + "".join(
        f", `{name}` ({what})" for name, what in siblings if onnx_path.with_name(name).exists()
    )
    lines = [
        f"# Model card: {meta.name} {meta.version}",
        "",
        "**A research tool, not a medical device.** Not for clinical use: never use this model's output to",
        "diagnose, triage or treat anyone.",
        "",
        *_adaptation_lines(meta),
        "## Model",
        f"- Architecture: torchvision ResNet-18, `fc` replaced for {len(meta.labels)} classes "
        f"({', '.join(meta.labels)}, in that order). Input {meta.input_size[0]}×{meta.input_size[1]}, 3 identical "
        f"grey channels, normalised with mean {list(meta.mean)} and std {list(meta.std)} (ImageNet's).",
        start,
        files + ".",
        f"- ONNX opset {meta.extra.get('opset')}; outputs {meta.outputs}. Parity with PyTorch on real images: "
        f"max |Δprob| = {meta.extra.get('parity_max_abs_prob_diff', float('nan')):.1e}.",
        f"- Created {meta.created}.",
        "",
        "## Training data",
    ]
    by_source_counts = td.get("split_counts_by_source") or {}
    for name in sources:
        known = KNOWN_SOURCES.get(str(name), {})
        counts = by_source_counts.get(name)
        lines.append(
            f"- `{name}`: {known.get('what', 'a folder of labelled images')}"
            + (f"; split counts `{json.dumps(counts, sort_keys=True)}`" if counts else "")
            + "."
        )
    lines += [
        f"- Files: {td.get('files')}; split counts: `{json.dumps(td.get('split_counts'), sort_keys=True)}`.",
        (
            "- Split: see *Adapted model* above ('train' is the adapt part)."
            if meta.extra.get("adaptation")
            else "- Split: seeded 70/15/15 train/validation/test, stratified by source and class; files with "
            "identical content (within or across sources) are kept on one side. Checkpoints were chosen and early "
            "stopping decided on validation only; the test split was used once, for the numbers below."
        ),
        f"- Fingerprint: split sha256 `{td.get('split_sha256')}`, file list sha256 `{td.get('file_list_sha256')}`.",
        "",
        "## Recipe",
        f"`{json.dumps(recipe, sort_keys=True)}`",
        "",
        f"Augmentation (`{recipe.get('augment', 'light')}`): {AUGMENTATIONS.get(str(recipe.get('augment', 'light')), '?')}."
        " No horizontal flip: a flipped chest X-ray puts the heart on the wrong side, which no real PA/AP film shows "
        "(a judgement, not measured). Sampling: " + str(recipe.get("sampling", "class-balanced")) + ".",
        (
            "Input: **the lung crop** of every film (the square around both lung fields found by the embedded lung "
            "segmenter, plus a margin; the whole film when no two lung fields are found), in training, evaluation "
            "and classify alike (`preprocessing.crop` in the contract)."
            if meta.crop == "lungs"
            else "Input: the whole film (no lung crop)."
        ),
    ]
    for note in meta.extra.get("notes") or []:
        lines += ["", f"- {note}"]
    selection = meta.extra.get("selection")
    if selection:
        lines += ["", "### How the recipe was chosen (validation only)", "", str(selection.get("summary", "")), ""]
        rows = selection.get("recipes") or {}
        stressed = bool(rows) and all("val_stressed" in r for r in rows.values())
        if rows and stressed:
            lines += [
                "| recipe | val accuracy | val macro-F1 | stressed val accuracy | stressed val macro-F1 | "
                "val accuracy per source | stressed per source |",
                "| --- | ---: | ---: | ---: | ---: | --- | --- |",
            ]
            for name, r in rows.items():
                per = ", ".join(f"{k} {v:.3f}" for k, v in r["val"]["by_source_accuracy"].items())
                per_s = ", ".join(f"{k} {v:.3f}" for k, v in r["val_stressed"]["by_source_accuracy"].items())
                lines.append(
                    f"| {name}{' (chosen)' if name == selection.get('chosen') else ''} | {_fmt(r['val']['accuracy'])} | "
                    f"{_fmt(r['val']['macro_f1'])} | {_fmt(r['val_stressed']['accuracy'])} | "
                    f"{_fmt(r['val_stressed']['macro_f1'])} | {per} | {per_s} |"
                )
        elif rows:
            lines += [
                "| recipe | what differs | best epoch | val accuracy | val macro-F1 | val accuracy per source | score |",
                "| --- | --- | ---: | ---: | ---: | --- | ---: |",
            ]
            for name, r in rows.items():
                per = ", ".join(f"{k} {v:.3f}" for k, v in r["val"]["by_source_accuracy"].items())
                what = ", ".join(f"{k} {v}" for k, v in (r.get("recipe") or {}).items() if k in ("crop", "augment"))
                lines.append(
                    f"| {name}{' (chosen)' if name == selection.get('chosen') else ''} | {what} | {r.get('best_epoch')} | "
                    f"{_fmt(r['val']['accuracy'])} | {_fmt(r['val']['macro_f1'])} | {per} | {_fmt(r.get('score'))} |"
                )
        if selection.get("command"):
            lines += ["", f"Measured with `{selection['command']}` on {selection.get('cpu', '?')}."]
    val = m.get("validation") if m else None
    if val:
        lines += ["", "## Validation metrics (fp32; what the checkpoint and the operating point were chosen on)", ""]
        lines.append(f"Images: {val.get('images')}.")
        if val.get("holdout_source"):
            lines.append(
                f"`{val['holdout_source']}` was **held out of training** (`train --holdout-source`): a hospital the model "
                "never saw. Its train and val rows are validation; its test rows are in the test table."
            )
        lines.append("")
        lines += _metrics_lines(val, meta.labels, what="validation")
    if meta.screening is not None:
        lines += _screening_lines(meta)
    lines += ["", "## Test-split metrics (fp32)"]
    test_m = {k: v for k, v in m.items() if k not in ("validation", "screening_test")} if m else {}
    if td.get("holdout_source") or (val or {}).get("holdout_source"):
        test_m["holdout_source"] = td.get("holdout_source") or (val or {}).get("holdout_source")
    lines += _metrics_lines(test_m, meta.labels) if test_m else ["No test metrics were recorded for this checkpoint."]
    if int8:
        measured = int8.get("measured_on")
        lines += [
            "",
            "## int8 model",
            "",
            f"{int8['scheme']}; calibrated on {int8['calibration_images']} training images.",
            "",
            "| | fp32 | int8 |",
            "| --- | ---: | ---: |",
            f"| test accuracy | {_fmt(int8['fp32_accuracy'])} | {_fmt(int8['int8_accuracy'])} |",
            f"| test macro-F1 | {_fmt(int8['fp32_macro_f1'])} | {_fmt(int8['int8_macro_f1'])} |",
            "",
            f"Top-1 agreement with fp32 on the test split: {_fmt(int8['top1_agreement_with_fp32'])}; "
            f"largest probability difference {_fmt(int8['max_abs_prob_diff'])}."
            + (
                f" Measured on {measured.get('model')} (flags: {', '.join(measured.get('flags', [])) or 'none relevant'})."
                if isinstance(measured, dict)
                else ""
            ),
        ]
        gate = int8.get("gate")
        if isinstance(gate, dict):
            lines += [
                "",
                f"Faithfulness gate (top-1 agreement >= {gate.get('min_top1_agreement')} and largest |Δprob| <= "
                f"{gate.get('max_abs_prob_diff')} on the test split): **{'passed' if gate.get('passed') else 'not passed'}**. "
                + (
                    "`--precision auto` takes the int8 file on CPUs with VNNI, AMX or ARM dot product."
                    if gate.get("passed")
                    else "`--precision auto` takes the fp32 file on every CPU; the int8 file is there for "
                    "`--precision int8`."
                )
                + " Measured on this CPU only: VNNI/AMX kernels (no saturation) were not measured.",
            ]
    if meta.ood:
        lines += _ood_lines(meta)
    lines += [
        "",
        "## Intended use",
        "Research on batches of chest radiographs: screening experiments, dataset triage, method comparisons.",
        "Not for clinical use, not a medical device, not validated on any clinical population.",
        "The `covid_screen` column is a research screening call at a threshold chosen on validation images, not a "
        "diagnosis.",
        "",
        "## Known biases and limits of the data",
    ]
    for name in sources:
        lines += [f"- ({name}) {b}" for b in KNOWN_SOURCES.get(str(name), {}).get("biases", [])]
    if "viral" in meta.labels:
        lines.append(
            "- **Bacterial pneumonia is not a class.** A film with a pneumonia the model was never taught still gets "
            "one of its labels (see the out-of-distribution section for what it does with pediatric bacterial pneumonia)."
        )
    if "viral" in meta.labels:
        lines.append(
            "- **No adult viral (non-COVID) pneumonia** in any source: every viral film is pediatric. Expect adult "
            "viral pneumonia to be called `covid` or `normal`, not `viral`."
        )
    lines += [
        "- No patient identifiers: images of one patient can fall on both sides of the split, which flatters the test "
        "numbers.",
        "- The test split comes from the same sources as the training data; the numbers above are not an estimate of "
        "performance on another hospital's images. Measure on your own films (`cxr-batch evaluate`).",
    ]
    return "\n".join(lines) + "\n"


def _adaptation_lines(meta: ModelMeta) -> list[str]:
    """What an adapted model (``cxr-batch adapt``) is: its base, its site, before and after."""
    a = meta.extra.get("adaptation")
    if not a:
        return []
    b = a.get("base") or {}
    local = a.get("local_data") or {}
    anchors = (a.get("recipe") or {}).get("anchor_distillation")
    how = (
        "distillation on the local films, and on synthetic classifier inputs drawn from the base model's "
        f"Gaussian model of each class's embeddings, {anchors.get('per_class')} per class, weight "
        f"{anchors.get('weight')}, applied to {anchors.get('applies_to')}"
        if anchors
        else "distillation"
    )
    lines = [
        "## Adapted model",
        "",
        f"**Adapted to the films of {a.get('site')}** with `cxr-batch adapt`, from `{b.get('name')}` {b.get('version')} "
        f"(sha256 `{b.get('sha256')}`). It has seen the local films of {', '.join(local.get('classes') or [])} only; "
        f"for the other classes it was trained to keep the base model's outputs ({how}), which this card "
        "cannot measure on local films. Its numbers hold for this site's films, not for other hospitals'.",
        "",
        f"- Local data: {local.get('films')} films from {', '.join(local.get('sources') or [])}; "
        f"{local.get('split')}; counts `{json.dumps(local.get('split_counts'), sort_keys=True)}`; "
        f"split sha256 `{local.get('split_sha256')}`.",
        f"- Recipe: `{json.dumps(a.get('recipe'), sort_keys=True)}`.",
        "",
        "Local test part (used once), base model against the adapted model, 95% Wilson intervals:",
        "",
        "| | films | base | adapted | change |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in a.get("comparison") or []:
        bc, ac = r.get("before_ci95") or [None, None], r.get("after_ci95") or [None, None]
        lines.append(
            f"| {r['metric']} | {r['n']} | {_fmt(r['before'])} [{_fmt(bc[0])}, {_fmt(bc[1])}] | "
            f"{_fmt(r['after'])} [{_fmt(ac[0])}, {_fmt(ac[1])}] | {r['after'] - r['before']:+.4f} |"
        )
    if a.get("warnings"):
        lines.append("")
    for w in a.get("warnings") or []:
        lines.append(f"- **Warning:** {w}")
    return [*lines, ""]


def _screening_lines(meta: ModelMeta) -> list[str]:
    sp = meta.screening
    assert sp is not None
    v = sp.validation or {}

    def rate(key: str) -> str:
        ci = v.get(f"{key}_ci95") or []
        tail = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 and None not in ci else ""
        return f"{_fmt(v.get(key))}{tail}"

    lines = [
        "",
        "## Screening operating point",
        "",
        f"The report's `covid_screen` column is `positive` when P({sp.label}) >= **{sp.threshold:.4f}**, `negative` "
        "otherwise (empty on error rows). The `label` column stays the argmax. "
        f"Rule: {v.get('rule', f'the highest threshold with validation sensitivity >= {sp.target_sensitivity}')}; "
        f"chosen on {v.get('n')} validation images ({v.get('images')}). "
        "`--covid-threshold P` overrides it (recorded in the provenance).",
        "",
        f"- Validation: sensitivity {rate('sensitivity')} ({v.get('tp')}/{(v.get('tp') or 0) + (v.get('fn') or 0)}), "
        f"specificity {rate('specificity')} ({v.get('tn')}/{(v.get('tn') or 0) + (v.get('fp') or 0)}); 95% CI Wilson.",
    ]
    raised = v.get("raised") or {}
    if raised.get("tried"):
        lines += [
            "",
            f"How the target was chosen (validation; `{raised.get('holdout_source')}` held out of training, its "
            f"non-COVID films standing in for a new hospital's normals, floor {_fmt(raised.get('specificity_floor'))}):",
            "",
            f"| validation sensitivity target | threshold | {raised.get('holdout_source')} specificity |",
            "| ---: | ---: | ---: |",
        ]
        for t in raised["tried"]:
            mark = " (chosen)" if t.get("target") == raised.get("chosen") else ""
            lines.append(
                f"| {_fmt(t.get('target'))}{mark} | {_fmt(t.get('threshold'))} | "
                f"{_fmt(t.get('holdout_specificity'))} ({t.get('tn')}/{t.get('n')}) |"
            )
        lines.append(
            "The held-out specificity took part in the choice, so at the chosen target it is not an unbiased "
            "estimate for another hospital."
        )
    by = v.get("by_source") or {}
    if by:
        lines += [
            "",
            "| validation source | COVID-19 sensitivity | specificity (non-COVID films) |",
            "| --- | ---: | ---: |",
        ]
        for name, o in by.items():
            sens = "-" if o.get("sensitivity") is None else f"{o['sensitivity']:.4f} ({o['tp']}/{o['tp'] + o['fn']})"
            spec = "-" if o.get("specificity") is None else f"{o['specificity']:.4f} ({o['tn']}/{o['tn'] + o['fp']})"
            lines.append(f"| {name} | {sens} | {spec} |")
    test = meta.metrics.get("screening_test") if meta.metrics else None
    if isinstance(test, dict):
        lines += [
            "",
            "- Test split (measured once at export, with the int8 gate's fp32 pass): sensitivity "
            f"{_fmt(test.get('sensitivity'))} ({test.get('tp')}/{(test.get('tp') or 0) + (test.get('fn') or 0)}), "
            f"specificity {_fmt(test.get('specificity'))} ({test.get('tn')}/{(test.get('tn') or 0) + (test.get('fp') or 0)}).",
        ]
    return lines


def _ood_lines(meta: ModelMeta) -> list[str]:
    ood = meta.ood or {}
    threshold = float("nan") if meta.ood_threshold is None else meta.ood_threshold
    lines = [
        "",
        "## Out-of-distribution guard",
        "",
        f"{ood.get('description')}. Output `{ood.get('output')}`; an image is flagged (`in_distribution=false`) "
        f"when its score is above {threshold:.3f}, set so that {ood.get('calibration')} "
        f"(measured pass rate {_fmt(ood.get('val_pass_rate'))} on {ood.get('n_calibration')} images). DICOM files "
        "whose modality is not a projection radiograph (CT, MR, ...) are flagged whatever the score.",
    ]
    ev = ood.get("evaluation")
    if not ev:
        return lines
    labels = list(meta.labels)
    lines += [
        "",
        f"Measured with `{ev.get('command')}` (the fp32 model):",
        "",
        "| group | images | flagged | AUROC vs test split | called " + " / ".join(labels) + " |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for g in ev.get("groups", []):
        auroc = "-" if g.get("auroc") is None else _fmt(g["auroc"])
        called = " / ".join(str(g.get("called", {}).get(x, "-")) for x in labels) if g.get("called") else "-"
        lines.append(f"| {g['name']} | {g['n']} | {g['flagged']:.1%} | {auroc} | {called} |")
    first = (ev.get("groups") or [{}])[0]
    if first.get("flagged", 0.0) > 0.05:
        lines += [
            "",
            f"The test split is flagged at {first['flagged']:.1%}, above the 5% target: the threshold was set on the "
            "validation split and deliberately not re-tuned on test. Lateral chest views were not available to measure.",
        ]
    samples = next((g for g in ev.get("groups", []) if g.get("predictions")), None)
    if samples:
        lines += [
            "",
            "The sample images (`sample_images/`, other collections than the training data; the folder is the true class):",
            "",
            "| file | predicted | confidence | in distribution |",
            "| --- | --- | ---: | --- |",
        ]
        for p in samples["predictions"]:
            lines.append(f"| {p['file']} | {p['label']} | {p['confidence']:.3f} | {p['in_distribution']} |")
        right = sum(p["file"].split("/")[0] == p["label"] for p in samples["predictions"])
        lines += ["", f"{right} of {len(samples['predictions'])} right."]
    return lines


def write_card(onnx_path: Path, meta: ModelMeta, int8: dict[str, Any] | None) -> Path:
    """Write :func:`card_text` next to the ONNX file (``NAME.md``). ``int8``: the int8 file's
    quantisation facts; None keeps the int8 sibling's (when only the fp32 master changed)."""
    from cxr_batch.io.safe_write import write_file_atomic
    from cxr_batch.training.onnx_file import read_contract_file

    sibling = onnx_path.with_name(onnx_path.stem + "-int8.onnx")
    if int8 is None and sibling.exists():
        int8 = read_contract_file(sibling)[1].extra.get("quantization")
    card = onnx_path.with_suffix(".md")
    write_file_atomic(card, card_text(onnx_path, meta, int8))
    return card
