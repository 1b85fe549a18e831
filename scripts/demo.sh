#!/usr/bin/env bash
# The offline demo: generated data -> first stage -> compressed reranker -> fusion weight on val ->
# index the test images -> side-by-side queries -> evaluation table on the 1,000 test images.
# Every stage is skipped when its output exists, so a second run reuses the first one's work.
set -euo pipefail
cd "$(dirname "$0")/.."
ES="${ES:-.venv/bin/edje-search}"
PY="${PY:-.venv/bin/python}"
RUN="${DEMO_DIR:-runs/demo}"
DATA="$RUN/data"
: "${EDJE_HOME:=$PWD/runs/home}"; export EDJE_HOME
# Sizes of the demo recipe (override from the environment for a longer or shorter run).
TRAIN_IMAGES="${TRAIN_IMAGES:-10000}"
FS_STEPS="${FS_STEPS:-150}"            # first-stage steps of 256 captions
AUTO="${AUTO:-1}"                      # 1: the reranker sizes itself (--auto) within MAX_MINUTES; 0: RR_STEPS
MAX_MINUTES="${MAX_MINUTES:-10}"       # the reranker's time budget in auto mode
RR_STEPS="${RR_STEPS:-700}"            # AUTO=0: reranker steps of 24 pairs (+ a hard negative image and caption each)
WARMUP="${WARMUP:-300}"                # caption-word warm-up steps of the adapter (no joint-encoder pass)
DROPOUT="${DROPOUT:-0}"                # joint-encoder dropout while training (MiniLM's own: 0.1)
LM_LAYERS="${LM_LAYERS:-3}"            # first layers of MiniLM-L6 kept in the joint encoder
N_QUERIES="${N_QUERIES:-8}"            # stored tokens per image (the adapter's queries)
POOL="${POOL:-256}"                    # hard negatives mined among this many pairs (0: the batch of 24)
POOL_FROM="${POOL_FROM:-$(( RR_STEPS / 2 ))}"  # AUTO=0: ... from this step on (in-batch negatives before)
SEED="${SEED:-0}"
THREADS="${THREADS:-2}"                # torch threads; 1 on a machine others are using
EVAL_SPLIT="${EVAL_SPLIT:-test}"
STYLE="${STYLE:-shapes}"               # make-dataset --style (heldout: the other generator)
INDEX="${DEMO_INDEX:-indexes/demo}"
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

if [ ! -f "$DATA/test.json" ]; then
  stamp "rendering the $STYLE data set"
  $ES make-dataset "$DATA" --train "$TRAIN_IMAGES" --val 200 --test 1000 --image-size 48 --style "$STYLE"
fi
if [ ! -f "$RUN/first/first_stage/first_stage.json" ]; then
  stamp "training the first stage (ViT vs locked MiniLM-L6), $FS_STEPS steps"
  $ES train first-stage --data "$DATA/train.json" --out "$RUN/first" --steps "$FS_STEPS" --seed "$SEED" \
    --threads "$THREADS"
fi
if [ ! -f "$RUN/reranker/model/edje.json" ]; then
  FEATURES=()  # the first stage's features of the training set (absent from runs of older versions)
  [ -f "$RUN/first/features.pt" ] && FEATURES=(--features "$RUN/first/features.pt")
  if [ "$AUTO" = 1 ]; then
    # length, pool switch and stop chosen on validation images carved from the training set
    LENGTH=(--auto --max-minutes "$MAX_MINUTES"); what="auto, at most $MAX_MINUTES min"
  else
    LENGTH=(--mining-pool-from "$POOL_FROM" --steps "$RR_STEPS"); what="$RR_STEPS steps"
  fi
  stamp "training the compressed reranker ($N_QUERIES stored tokens, MiniLM-L6's first $LM_LAYERS layers), $what"
  $ES train reranker --data "$DATA/train.json" --first-stage "$RUN/first/first_stage" --out "$RUN/reranker" \
    --variant compressed --n-queries "$N_QUERIES" --mlp-dim 512 --lm-layers "$LM_LAYERS" --score-head mean \
    --adapter-warmup "$WARMUP" --dropout "$DROPOUT" --w-mlm 0 --w-recovery 0 --batch-size 24 --lr 2e-4 \
    --mining-pool "$POOL" "${LENGTH[@]}" ${FEATURES[@]+"${FEATURES[@]}"} --name edje-demo --seed "$SEED" \
    --threads "$THREADS"
fi
mkdir -p "$EDJE_HOME/models"
rm -rf "$EDJE_HOME/models/edje-demo" && cp -r "$RUN/reranker/model" "$EDJE_HOME/models/edje-demo"

stamp "choosing the fusion weight on the validation split"
$ES calibrate --data "$DATA/val.json" --model edje-demo --threads "$THREADS"
stamp "indexing the test images"
rm -rf "$INDEX"
$ES build-index "$DATA/test" --index "$INDEX" --model edje-demo
$ES info --index "$INDEX"
stamp "queries: first stage vs reranked (captions of three test images; where does that image land?)"
# Captions written for known test images, so each column can be read against the right answer.
mapfile -t PICKS < <($PY - "$DATA/test.json" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))
for i in (7, 123, 512):
    item = items[i % len(items)]
    print(f"{item['caption'][0]}\t{item['image'].rsplit('/', 1)[-1]}")
PY
)
QUERIES=()
for pick in "${PICKS[@]}"; do
  QUERIES+=("${pick%%$'\t'*}")
  echo "  \"${pick%%$'\t'*}\" describes ${pick#*$'\t'}"
done
$ES query --index "$INDEX" -k 5 --rerank-k 10 --compare "${QUERIES[@]}"
stamp "evaluating on the $EVAL_SPLIT split"
$ES eval --data "$DATA/$EVAL_SPLIT.json" --model edje-demo --rerank-k 10 --threads "$THREADS" \
  --out "$RUN/eval_$EVAL_SPLIT.json"
stamp "done"
