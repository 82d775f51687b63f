#!/usr/bin/env python3
"""PyTorch's own convolution on the rows of `prunekit conv-bench`: the anchor of its ratios.

Reads the JSON rows that conv-bench wrote and times PyTorch on every (shape, pass) at the
row's batch, dtype and layout (channels_last: NHWC activations, KRSC weights), each pass
separately: fprop through `conv2d`, dgrad and wgrad through `aten.convolution_backward`
with one output of its mask. PyTorch runs with its defaults: on cuda `cudnn.benchmark =
True` (its autotuner, through cuDNN's frontend, picks each shape's engine in the warm-up
calls) and cuDNN's default TF32 for float32; on the CPU oneDNN with --threads threads.
Prints one line per row and the summary: per (mode, sparsity) the geometric mean of
torch_ms / prunekit_ms (above 1: prunekit is faster) and the ratio of the total times,
also without the stem's dgrad (which training never runs). --out writes the joined rows.

    python3 scripts/torch_conv.py rows.json --device cuda [--warmup 3] [--iters 20] [--out joined.json]
    python3 scripts/torch_conv.py rows.json --device cpu --threads 2 [--iters 3]

PyTorch is not a dependency of prunekit: install it into a throwaway environment.
"""
import argparse
import json
import math
import time

import torch


def timer(device, warmup, iters):
    """Times f (ms per call) after `warmup` calls: CUDA events on cuda, the wall clock on the CPU."""

    def run(f):
        for _ in range(warmup):
            f()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                f()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t = time.perf_counter()
        for _ in range(iters):
            f()
        return (time.perf_counter() - t) * 1e3 / iters

    return run


def summary(rows, label):
    if not rows:
        return
    g = math.exp(sum(math.log(r["vs_torch"]) for r in rows) / len(rows))
    tot = sum(r["torch_ms"] for r in rows) / sum(r["ms"] for r in rows)
    worst = min(rows, key=lambda r: r["vs_torch"])
    print(f"{label}: geometric mean of torch_ms/prunekit_ms = {g:.3f}, total-time ratio = {tot:.3f} "
          f"({len(rows)} rows; lowest {worst['vs_torch']:.2f}: {worst['layer']} {worst['pass']})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (cpu only)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = a.device
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cudnn {torch.backends.cudnn.version()}, "
              f"benchmark on, cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}")
    else:
        torch.set_num_threads(a.threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, mkldnn {torch.backends.mkldnn.is_available()}")
    time_ms = timer(dev, a.warmup, a.iters)
    rows = json.load(open(a.rows))
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}
    out = []
    for r in rows:
        n, c, h, w, k, rr, s = r["n"], r["c"], r["h"], r["w"], r["k"], r["r"], r["s"]
        st, pad = r["stride"], r["pad"]
        d = dt[r["dtype"]]
        x = torch.randn(n, c, h, w, device=dev).to(d).contiguous(memory_format=torch.channels_last)
        wt = torch.randn(k, c, rr, s, device=dev).to(d).contiguous(memory_format=torch.channels_last)
        y = torch.nn.functional.conv2d(x, wt, stride=st, padding=pad)
        dy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
        if r["pass"] == "fprop":
            f = lambda: torch.nn.functional.conv2d(x, wt, stride=st, padding=pad)  # noqa: E731
        else:
            mask = [True, False, False] if r["pass"] == "dgrad" else [False, True, False]
            f = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
                dy, x, wt, None, [st, st], [pad, pad], [1, 1], False, [0, 0], 1, mask
            )
        ms = time_ms(f)
        row = dict(r, torch_ms=ms, vs_torch=ms / r["ms"], torch_device=dev)
        out.append(row)
        print(
            f'{r["layer"]:<22} {r.get("mode", "filters")[0]} s={r["sparsity"]:<4} {r["pass"]:<5} n={n} c={c} k={k} '
            f'{rr}x{s}/{st}: prunekit {r["ms"]:.3f} ms, torch {ms:.3f} ms, ratio {ms / r["ms"]:.2f}',
            flush=True,
        )
        del x, wt, y, dy
    for mode, sp in sorted({(r.get("mode", "filters"), r["sparsity"]) for r in out}):
        sel = [r for r in out if r["sparsity"] == sp and r.get("mode", "filters") == mode]
        summary(sel, f"{mode} sparsity {sp}")
    summary(out, "all")
    summary([r for r in out if not (r["c"] == 3 and r["pass"] == "dgrad")], "all but the stem's dgrad")
    if a.out:
        json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
