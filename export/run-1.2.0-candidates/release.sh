#!/bin/bash
# The 1.2.0 release steps, to run only after a candidate passed a rule written before it trained
# (RELEASE-RULE.md). Reads the test split once. The train command must be the chosen run's own
# (here candidate 3's); the selection names and --note must be edited to the run chosen.
set -euo pipefail
RUN=${1:?usage: release.sh RUN_DIR [INT8_SCHEME] (the run the rule chose, e.g. runs/r19-cand3)}
S=${2:-8bit-ends}
cd "$(dirname "$0")/../.."
D=../shared/data
ROOTS="$D/covid19-radiography $D/kermany-normal $D/lung-masks/shenzhen/SOURCES.csv $D/lung-masks/montgomery/SOURCES.csv"
log() { echo "== $(date -u +%H:%M:%S) $*"; }
log "test report of candidate 3 (the test split, read once)"
cxr-batch train $ROOTS --holdout-source montgomery --split export/run-1.2.0-candidates/split.csv --weights export/cxr-resnet18.onnx --lr 1e-4 --warmup 0.05 --epochs 6 --epoch-images 2800 --augment scanner --balance class+source --out "$RUN" --resume
log "selection file"
python benchmarks/recipe_compare.py runs/r18-1.2.0-full runs/r18-1.2.0-crop runs/r18-1.2.0-crop2 runs/r19-cand3 runs/r20-cand4 --names whole-film-lr3e-4,lung-crop,lung-crop-continued,whole-film-lr1e-4,whole-film-lr1e-4-shenzhen-held-out --chosen whole-film-lr1e-4 --rule "export/run-1.2.0-candidates/RELEASE-RULE.md: the whole-film recipe at lr 1e-4 is accepted when its Shenzhen-held-out run (candidate 4) reaches pool validation accuracy >= 0.955 and matches 1.1.0 on the held-out Shenzhen normals (accuracy and AUC against pool COVID-19), all on validation; the model shipped is then its Montgomery-held-out run (candidate 3)" --out benchmarks/recipes-1.2.0-release.json
log "export"
cxr-batch export "$RUN/best.ckpt" --out export/cxr-resnet18.onnx --name cxr-resnet18 --version 1.2.0 --quantize int8 --int8-scheme "$S" --fp16 --overwrite --screen-holdout-specificity 0.85 --selection benchmarks/recipes-1.2.0-release.json --note "Released under the rule in export/run-1.2.0-candidates/RELEASE-RULE.md (rotation: the same recipe with Shenzhen held out passed on validation); no GPU was lent, trained on a 2-core CPU."
log "ood_eval"
python benchmarks/ood_eval.py --model export/cxr-resnet18.onnx --run "$RUN" --data $D --write-contract --out benchmarks/OOD.md
mkdir -p export/run-1.2.0
cp "$RUN"/config.json "$RUN"/history.json "$RUN"/split.csv "$RUN"/metrics.json export/run-1.2.0/
log "evaluate test fp32"
cxr-batch evaluate $ROOTS --labels export/run-1.2.0/split.csv --part test --model export/cxr-resnet18.onnx --out export/run-1.2.0/evaluate-test-fp32.json --overwrite
log "evaluate test int8"
cxr-batch evaluate $ROOTS --labels export/run-1.2.0/split.csv --part test --model export/cxr-resnet18-int8.onnx --out export/run-1.2.0/evaluate-test-int8.json --overwrite
log "holdout validation"
python benchmarks/holdout_validation.py --model export/cxr-resnet18.onnx --holdout montgomery --split export/run-1.2.0/split.csv --targets 0.90 0.95 0.97 0.98 0.99 --json export/run-1.2.0/holdout-validation.json $ROOTS
log done
