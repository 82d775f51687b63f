#!/bin/bash
# Before/after comparison of the CPU convolution fast path against PyTorch (oneDNN), in
# alternating rounds so that the machine's load falls on both sides alike:
#
#   scripts/conv_ab_cpu.sh OUTDIR ROUNDS BEFORE_BIN AFTER_BIN "conv-bench args" [TORCH_PYTHON]
#
# Each round runs, per configuration (batch 4 at 112x112, batch 8 at 224x224),
# `BEFORE conv-bench`, `AFTER conv-bench` and scripts/torch_conv.py on the same rows
# (2 threads each; torch with OMP_WAIT_POLICY=passive), writing OUTDIR/{A,B,T}-TAG-ROUND.json.
# scripts/conv_ab_summary.py OUTDIR TAG... turns them into medians, ratios and geometric means.
set -eu
out=$1; rounds=$2; A=$3; B=$4; extra=$5; py=${6:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  for cfg in "4 112 10" "8 224 5"; do
    set -- $cfg
    tag=b$1-$2
    "$A" conv-bench --device cpu --dtype f32 --batch $1 --size $2 --iters $3 $extra --json "$out/A-$tag-$i.json" > /dev/null
    "$B" conv-bench --device cpu --dtype f32 --batch $1 --size $2 --iters $3 $extra --json "$out/B-$tag-$i.json" > /dev/null
    OMP_WAIT_POLICY=passive "$py" "$here/torch_conv.py" "$out/A-$tag-$i.json" --device cpu --threads 2 --iters $3 \
      --out "$out/T-$tag-$i.json" > /dev/null
    echo "round $i $tag done $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log"
  done
done
