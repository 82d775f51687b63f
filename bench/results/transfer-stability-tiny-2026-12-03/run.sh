#!/bin/bash
F=/usr/share/datasets/fashion-mnist
TRAIN="idx:$F/train-images-idx3-ubyte.gz,$F/train-labels-idx1-ubyte.gz"
TEST="idx:$F/t10k-images-idx3-ubyte.gz,$F/t10k-labels-idx1-ubyte.gz"
COMMON=(transfer --weights pre.safetensors --data "$TRAIN" --val "$TEST" --classes 5-9 --per-class 50 --models dense,filters:0.5,channels:0.5 --budgets 0.5,1,2,4,8,16,32 --seeds 3 --lrs 0.01,0.03,0.1 --batch 16 --eval-batch 100 --size 28 --augment none --device cpu --threads 2)
( time ./prunekit "${COMMON[@]}" --runs runs-stable --json stable.json ) > stable.txt 2>&1
( time ./prunekit "${COMMON[@]}" --warmup 0 --clip-grad-norm 0 --head-only-fraction 0 --runs runs-plain --json plain.json ) > plain.txt 2>&1
echo finished > done
