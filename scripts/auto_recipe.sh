#!/usr/bin/env bash
# The auto-mode recipe on one generator style and seed, as docs/training.md reports it:
# make-dataset (10,000 training, 1,000 test images) -> first stage (150 steps) -> reranker with
# --auto --max-minutes (validation carved from the training images) -> eval on the test images.
#
#   scripts/auto_recipe.sh glyphs 0     # STYLE SEED; writes benchmarks/results/eval_auto_glyphs_seed0.json
#
# The data set is the same for every seed (make-dataset --seed 0); SEED seeds both trainings.
set -euo pipefail
cd "$(dirname "$0")/.."
STYLE="${1:-glyphs}"
SEED="${2:-0}"
ES="${ES:-.venv/bin/edje-search}"
RUN="${AUTO_DIR:-runs/auto}/${STYLE}_seed${SEED}"
DATA="${AUTO_DIR:-runs/auto}/${STYLE}_data"
MAX_MINUTES="${MAX_MINUTES:-10}"
TRAIN_IMAGES="${TRAIN_IMAGES:-10000}"
TEST_IMAGES="${TEST_IMAGES:-1000}"
FS_STEPS="${FS_STEPS:-150}"
THREADS="${THREADS:-2}"
RESULTS="${RESULTS:-benchmarks/results}"
NAME="auto_${STYLE}_seed${SEED}"
start=$(date +%s)
stamp() { echo "[auto $(( $(date +%s) - start ))s] $*"; }

if [ ! -f "$DATA/test.json" ]; then
  stamp "rendering the $STYLE data set"
  $ES make-dataset "$DATA" --train "$TRAIN_IMAGES" --val 200 --test "$TEST_IMAGES" --image-size 48 --style "$STYLE" --seed 0
fi
if [ ! -f "$RUN/first/first_stage/first_stage.json" ]; then
  stamp "first stage, $FS_STEPS steps"
  $ES train first-stage --data "$DATA/train.json" --out "$RUN/first" --steps "$FS_STEPS" --seed "$SEED" --threads "$THREADS"
fi
stamp "reranker, --auto --max-minutes $MAX_MINUTES"
rr_start=$(date +%s)
$ES train reranker --data "$DATA/train.json" --first-stage "$RUN/first/first_stage" \
  --features "$RUN/first/features.pt" --out "$RUN/reranker" --auto --max-minutes "$MAX_MINUTES" \
  --n-queries 8 --lm-layers 3 --mlp-dim 512 --score-head mean --adapter-warmup 300 --dropout 0 --w-mlm 0 \
  --w-recovery 0 --batch-size 24 --lr 2e-4 --seed "$SEED" --threads "$THREADS"
stamp "reranker trained in $(( $(date +%s) - rr_start ))s"
$ES eval --data "$DATA/test.json" --model "$RUN/reranker/model" --rerank-k 10 --threads "$THREADS" \
  --out "$RESULTS/eval_$NAME.json"
cp "$RUN/reranker/val_curve.json" "$RESULTS/val_curve_$NAME.json"
stamp "done"
