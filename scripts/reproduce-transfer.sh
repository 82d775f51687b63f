#!/usr/bin/env bash
# The reproductions of the paper's experiment at small scale (README, "Transfer under a
# compute budget"). A ResNet50-depth network (width 32) is pretrained once on Fashion-MNIST
# classes 0-4, then fine-tuned, dense and pruned zero-shot, on classes 5-9 over a ladder of
# training-compute budgets, 3 seeds each, and evaluated on the 5000 test images of classes
# 5-9. Two regimes:
#
#   few-shot  50 training images per class; the learning rate is picked per (model, budget)
#             from 0.01, 0.03 and 0.1 over all three seeds on a held-out split of them.
#             Budgets 3 to 768 GFLOPs: the low-compute regime, where pruned models win.
#   full      1000 training images per class; budgets 16 to 4096 GFLOPs (7 epochs of the
#             dense model), one learning rate (0.02) for every run, with no search, so that
#             the hour goes to the budgets: the regime where the dense model's capacity can
#             pay off.
#
#   scripts/reproduce-transfer.sh few-shot|full [OUT_DIR]
#       (default bench/results/transfer-fmnist-few-shot or bench/results/transfer-fmnist-full)
#
# Needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or
# FMNIST=DIR holding its four .gz IDX files. The pretrained source model is kept in
# SOURCE_DIR (default bench/results/transfer-fmnist-source) and shared by both regimes.
# Finished stages and runs are skipped, so an interrupted reproduction continues where it
# stopped. Each regime ends by validating the advisor and checking the stability criteria
# (scripts/transfer_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
REGIME=${1:-}
case "$REGIME" in
  few-shot) OUT=${2:-bench/results/transfer-fmnist-few-shot} ;;
  full) OUT=${2:-bench/results/transfer-fmnist-full} ;;
  *) echo "usage: $0 few-shot|full [OUT_DIR]" >&2; exit 2 ;;
esac
F=${FMNIST:-/usr/share/datasets/fashion-mnist}
TRAIN="idx:$F/train-images-idx3-ubyte.gz,$F/train-labels-idx1-ubyte.gz"
TEST="idx:$F/t10k-images-idx3-ubyte.gz,$F/t10k-labels-idx1-ubyte.gz"
BIN=${PRUNEKIT:-target/release/prunekit}
[ -x "$BIN" ] || cargo build --release --quiet
SRC=${SOURCE_DIR:-bench/results/transfer-fmnist-source}
mkdir -p "$OUT" "$SRC"
DEVICE=${DEVICE:-cpu}
run() { # LOGDIR CMD...: log the command, run it, keep its output
  local dir=$1 name=$2; shift 2
  echo "[$(date -u +%H:%M:%S)] $*" >>"$dir/commands.txt"
  "$@" 2>&1 | tee "$dir/$name.txt"
}
start=$(date +%s)

# 1. The source model: all 30000 training images of classes 0-4, 3 epochs, from scratch.
PRE="$SRC/pretrained.safetensors"
if [ ! -f "$PRE" ]; then
  run "$SRC" pretrain "$BIN" train --data "$TRAIN" --val "$TEST" --classes 0-4 --layers 3,4,6,3 \
    --width 32 --size 28 --batch 64 --epochs 3 --lr 0.1 --warmup 100 --augment none \
    --device "$DEVICE" --seed 0 --log "$SRC/pretrain.jsonl" --out "$PRE"
fi

# 2. Transfer to classes 5-9 with transfer's stable defaults (warm-up over 10% of each
#    run, gradient-norm clipping at 1, a head-only first 10%).
COMMON=(--weights "$PRE" --data "$TRAIN" --val "$TEST" --classes 5-9 --seeds 3 --size 28
  --eval-batch 500 --augment none --device "$DEVICE" --runs "$OUT/runs"
  --json "$OUT/transfer.json" --plot "$OUT/transfer.svg")
if [ "$REGIME" = few-shot ]; then
  BUDGETS=3,6,12,24,48,96,192,384,768
  run "$OUT" transfer "$BIN" transfer "${COMMON[@]}" --per-class 50 --batch 16 \
    --models dense,filters:0.25,filters:0.5,filters:0.75,channels:0.5 --budgets $BUDGETS \
    --lrs 0.01,0.03,0.1
else
  BUDGETS=16,32,64,128,256,512,1024,2048,4096
  run "$OUT" transfer "$BIN" transfer "${COMMON[@]}" --per-class 1000 --batch 32 \
    --models dense,filters:0.5,filters:0.75,channels:0.5 --budgets $BUDGETS --lr 0.02
fi

# 3. The advisor: fitted on all budgets and predicting the largest, and its validation
#    (fit on the budgets up to B/4, predict B, for every B).
LAST=${BUDGETS##*,}
run "$OUT" advise "$BIN" transfer advise --runs "$OUT/runs" --budget "$LAST" --validate \
  --json "$OUT/advise.json" --plot "$OUT/advise.svg"
# 4. The stability criteria and the measured crossovers, with the seeds' spread.
run "$OUT" check python3 scripts/transfer_check.py "$OUT/transfer.json" --json "$OUT/check.json" || true
echo "[$(date -u +%H:%M:%S)] done in $(( $(date +%s) - start )) s (stages found done were skipped)" \
  | tee -a "$OUT/commands.txt"
