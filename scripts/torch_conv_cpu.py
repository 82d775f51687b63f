#!/usr/bin/env python3
"""PyTorch's CPU convolution (oneDNN) on the rows of `prunekit conv-bench --device cpu`.

Reads the JSON rows that conv-bench wrote (its --mode filters or channels widths), times PyTorch on every (shape, pass) with the
same number of threads, in the same layout (channels_last = NHWC activations and KRSC
weights) and dtype, and prints one line per row plus the summary: the geometric mean of
torch_ms / prunekit_ms (our throughput relative to PyTorch's) and the ratio of the total
times. Writes the combined rows as JSON with --out.

    python3 scripts/torch_conv_cpu.py rows.json --threads 2 [--iters 3] [--out combined.json]

PyTorch is not a dependency of prunekit: install it into a throwaway environment.
"""
import argparse
import json
import math
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = json.load(open(a.rows))
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}
    out = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, mkldnn {torch.backends.mkldnn.is_available()}")
    for r in rows:
        n, c, h, w, k, rr, s = r["n"], r["c"], r["h"], r["w"], r["k"], r["r"], r["s"]
        st, pad = r["stride"], r["pad"]
        d = dt[r["dtype"]]
        x = torch.randn(n, c, h, w).to(d).contiguous(memory_format=torch.channels_last)
        wt = torch.randn(k, c, rr, s).to(d).contiguous(memory_format=torch.channels_last)
        y = torch.nn.functional.conv2d(x, wt, stride=st, padding=pad)
        dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
        if r["pass"] == "fprop":
            f = lambda: torch.nn.functional.conv2d(x, wt, stride=st, padding=pad)
        else:
            mask = [True, False, False] if r["pass"] == "dgrad" else [False, True, False]
            f = lambda: torch.ops.aten.convolution_backward(
                dy, x, wt, None, [st, st], [pad, pad], [1, 1], False, [0, 0], 1, mask
            )
        f()
        t = time.perf_counter()
        for _ in range(a.iters):
            f()
        ms = (time.perf_counter() - t) * 1e3 / a.iters
        row = dict(r, torch_ms=ms, vs_torch=ms / r["ms"])
        out.append(row)
        print(
            f'{r["layer"]:<22} {r.get("mode", "filters")[0]} s={r["sparsity"]:<4} {r["pass"]} c={c} k={k} {rr}x{s}/{st}: '
            f'prunekit {r["ms"]:.3f} ms, torch {ms:.3f} ms, ratio {ms / r["ms"]:.2f}'
        )
    for mode, sp in sorted({(r.get("mode", "filters"), r["sparsity"]) for r in out}):
        sel = [r for r in out if r["sparsity"] == sp and r.get("mode", "filters") == mode]
        g = math.exp(sum(math.log(r["vs_torch"]) for r in sel) / len(sel))
        tot = sum(r["torch_ms"] for r in sel) / sum(r["ms"] for r in sel)
        print(f"{mode} sparsity {sp}: geometric mean of torch_ms/prunekit_ms = {g:.3f}, total-time ratio = {tot:.3f} ({len(sel)} rows)")
    g = math.exp(sum(math.log(r["vs_torch"]) for r in out) / len(out))
    tot = sum(r["torch_ms"] for r in out) / sum(r["ms"] for r in out)
    print(f"all: geometric mean = {g:.3f}, total-time ratio = {tot:.3f} ({len(out)} rows)")
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
