#!/usr/bin/env bash
# The reproduction of the paper's experiment at small scale (README, "Transfer under a
# compute budget"): pretrain a ResNet50-depth network (width 32) on Fashion-MNIST classes
# 0-4, then fine-tune it, dense and pruned zero-shot, on classes 5-9 with 50 images per
# class over a ladder of training-compute budgets, 3 seeds each, the learning rate picked
# per (model, budget) on a split of those 250 training images; evaluate on the 5000 test
# images of classes 5-9.
#
#   scripts/reproduce-transfer.sh [OUT_DIR]      (default bench/results/transfer-fmnist)
#
# Needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or
# FMNIST=DIR holding its four .gz IDX files. Stages whose output exists are skipped, so an
# interrupted reproduction continues where it stopped. PyTorch's twin of the recipe is
# scripts/torch_transfer_twin.py (run separately: it needs torch).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/transfer-fmnist}
F=${FMNIST:-/usr/share/datasets/fashion-mnist}
TRAIN="idx:$F/train-images-idx3-ubyte.gz,$F/train-labels-idx1-ubyte.gz"
TEST="idx:$F/t10k-images-idx3-ubyte.gz,$F/t10k-labels-idx1-ubyte.gz"
BIN=${PRUNEKIT:-target/release/prunekit}
[ -x "$BIN" ] || cargo build --release --quiet
mkdir -p "$OUT"
DEVICE=${DEVICE:-cpu}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/commands.txt"; }
start=$(date +%s)

# 1. Pretraining: all 30000 training images of classes 0-4, 3 epochs, from scratch.
PRE="$OUT/pretrained.safetensors"
if [ ! -f "$PRE" ]; then
  log "$BIN train --data $TRAIN --val $TEST --classes 0-4 --layers 3,4,6,3 --width 32 --size 28 --batch 64 --epochs 3 --lr 0.1 --warmup 100 --augment none --device $DEVICE --seed 0 --log $OUT/pretrain.jsonl --out $PRE"
  "$BIN" train --data "$TRAIN" --val "$TEST" --classes 0-4 --layers 3,4,6,3 --width 32 --size 28 --batch 64 \
    --epochs 3 --lr 0.1 --warmup 100 --augment none --device "$DEVICE" --seed 0 --log "$OUT/pretrain.jsonl" \
    --out "$PRE" 2>&1 | tee "$OUT/pretrain.txt"
fi

# 2. Transfer: classes 5-9, 50 training images per class, evaluated on their 5000 test images.
log "$BIN transfer --weights $PRE --data $TRAIN --val $TEST --classes 5-9 --per-class 50 --models dense,filters:0.25,filters:0.5,filters:0.75,channels:0.5 --budgets 3,6,12,24,48,96,192,384,768 --seeds 3 --lrs 0.01,0.03,0.1 --batch 16 --eval-batch 100 --size 28 --augment none --device $DEVICE --runs $OUT/runs --json $OUT/transfer.json --plot $OUT/transfer.svg"
"$BIN" transfer --weights "$PRE" --data "$TRAIN" --val "$TEST" --classes 5-9 --per-class 50 \
  --models dense,filters:0.25,filters:0.5,filters:0.75,channels:0.5 --budgets 3,6,12,24,48,96,192,384,768 \
  --seeds 3 --lrs 0.01,0.03,0.1 --batch 16 --eval-batch 100 --size 28 --augment none --device "$DEVICE" \
  --runs "$OUT/runs" --json "$OUT/transfer.json" --plot "$OUT/transfer.svg" 2>&1 | tee "$OUT/transfer.txt"
log "done in $(( $(date +%s) - start )) s (stages found done were skipped)"
