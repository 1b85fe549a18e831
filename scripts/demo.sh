#!/usr/bin/env bash
# The offline demo: generated data -> first stage -> local teacher -> compressed student ->
# index the test images -> side-by-side queries -> evaluation table.
# Every stage is skipped when its output exists, so a second run reuses the first one's work.
set -euo pipefail
cd "$(dirname "$0")/.."
ES=".venv/bin/edje-search"
RUN="${DEMO_DIR:-runs/demo}"
DATA="$RUN/data"
: "${EDJE_HOME:=$PWD/runs/home}"; export EDJE_HOME
# Sizes of the demo recipe (override from the environment for a longer or shorter run).
TRAIN_IMAGES="${TRAIN_IMAGES:-10000}"
FS_EPOCHS="${FS_EPOCHS:-2}"
TEACHER_STEPS="${TEACHER_STEPS:-80}"
STUDENT_STEPS="${STUDENT_STEPS:-80}"
EVAL_SPLIT="${EVAL_SPLIT:-val}"
LM_LAYERS="${LM_LAYERS:-6}"
COMMON=(--batch-size 24 --lr 1e-4 --mlp-dim 512 --lm-layers "$LM_LAYERS")
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

if [ ! -f "$DATA/test.json" ]; then
  stamp "rendering the shapes data set"
  $ES make-dataset "$DATA" --train "$TRAIN_IMAGES" --val 200 --test 1000 --image-size 48
fi
if [ ! -f "$RUN/first/first_stage/first_stage.json" ]; then
  stamp "training the first stage (ViT vs locked MiniLM-L6)"
  $ES train first-stage --data "$DATA/train.json" --out "$RUN/first" --epochs "$FS_EPOCHS"
fi
if [ ! -f "$RUN/teacher/model/edje.json" ]; then
  stamp "training the local reranker (teacher, every vision token)"
  $ES train reranker --data "$DATA/train.json" --first-stage "$RUN/first/first_stage" --out "$RUN/teacher" \
    --variant local --steps "$TEACHER_STEPS" --name edje-demo-local "${COMMON[@]}"
fi
if [ ! -f "$RUN/student/model/edje.json" ]; then
  stamp "training the compressed reranker (student, 12 tokens, distilled from the teacher)"
  $ES train reranker --data "$DATA/train.json" --first-stage "$RUN/first/first_stage" --out "$RUN/student" \
    --variant compressed --n-queries 12 --teacher "$RUN/teacher/model" --steps "$STUDENT_STEPS" \
    --name edje-demo "${COMMON[@]}"
fi
mkdir -p "$EDJE_HOME/models"
rm -rf "$EDJE_HOME/models/edje-demo" && cp -r "$RUN/student/model" "$EDJE_HOME/models/edje-demo"

stamp "indexing the test images"
rm -rf indexes/demo
$ES build-index "$DATA/test" --index indexes/demo --model edje-demo
$ES info --index indexes/demo
stamp "queries: first stage vs reranked"
$ES query --index indexes/demo -k 5 --rerank-k 20 --compare \
  "a small red circle left of a large blue square" \
  "a large yellow triangle above a small green diamond" \
  "three small white circles and a small purple square"
stamp "evaluating on the $EVAL_SPLIT split"
$ES eval --data "$DATA/$EVAL_SPLIT.json" --model "$EDJE_HOME/models/edje-demo" --model "$RUN/teacher/model" \
  --rerank-k 10 --out "$RUN/eval_$EVAL_SPLIT.json"
stamp "done"
