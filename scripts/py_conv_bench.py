#!/usr/bin/env python3
"""prunekit's CPU convolutions called from Python against the same convolutions timed in
Rust: `prunekit conv-bench --device cpu --dtype f32` gives every distinct ResNet50
convolution's fprop, dgrad and wgrad time (1 warm-up call, then the mean of --iters calls);
this script times the same shapes, the same way, through prunekit.conv2d and its two
gradients on numpy arrays (NHWC, zero-copy, written into preallocated out= arrays as the
Rust bench reuses its buffers), and through prunekit.torch.Conv2d (forward, and backward for
dgrad + wgrad, new outputs each call) on channels-last tensors. Rounds alternate CLI and Python; each
row is the median of the rounds on each side.

  python3 scripts/py_conv_bench.py --cli target/release/prunekit [--batch 8 --size 112 --iters 5 --rounds 5]

Prints a markdown table.
"""
import argparse
import json
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch

import prunekit
from prunekit.torch import Conv2d


def mean_ms(f, iters):
    f()
    t = time.perf_counter()
    for _ in range(iters):
        f()
    return (time.perf_counter() - t) * 1e3 / iters


def python_rows(rows, iters):
    out = {}
    rng = np.random.default_rng(0)
    for r in rows:
        n, h, w, c, k, kr, st, pad = r["n"], r["h"], r["w"], r["c"], r["k"], r["r"], r["stride"], r["pad"]
        x = rng.standard_normal((n, h, w, c), dtype=np.float32)
        wt = rng.standard_normal((k, kr, kr, c), dtype=np.float32)
        y = prunekit.conv2d(x, wt, st, pad)
        dy = rng.standard_normal(y.shape, dtype=np.float32)
        key = (r["layer"], r["pass"])
        # The functions write into preallocated outputs (out=), as the Rust bench does.
        ybuf, dxbuf, dwbuf = np.empty_like(y), np.empty_like(x), np.empty_like(wt)
        if r["pass"] == "fprop":
            out[key] = mean_ms(lambda: prunekit.conv2d(x, wt, st, pad, out=ybuf), iters)
            conv = Conv2d(c, k, kr, stride=st, padding=pad)
            xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels-last NCHW view
            with torch.no_grad():
                out[key + ("module",)] = mean_ms(lambda: conv(xt), iters)
        elif r["pass"] == "dgrad":
            out[key] = mean_ms(lambda: prunekit.conv2d_backward_input(dy, wt, (h, w), st, pad, out=dxbuf), iters)
        else:
            out[key] = mean_ms(lambda: prunekit.conv2d_backward_weight(x, dy, (kr, kr), st, pad, out=dwbuf), iters)
            conv = Conv2d(c, k, kr, stride=st, padding=pad)
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
            dyt = torch.from_numpy(dy).permute(0, 3, 1, 2)
            yt = conv(xt)

            def backward():
                torch.autograd.grad(yt, (xt, conv.weight), dyt, retain_graph=True)

            out[key + ("module",)] = mean_ms(backward, iters)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", default="target/release/prunekit")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rounds_cli, rounds_py = {}, {}
    rows = None
    for _ in range(a.rounds):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([a.cli, "conv-bench", "--device", "cpu", "--dtype", "f32", "--batch", str(a.batch),
                            "--size", str(a.size), "--sparsity", "0", "--iters", str(a.iters), "--json", f.name],
                           check=True, capture_output=True)
            rows = json.load(open(f.name))
        for r in rows:
            k = (r["layer"], r["pass"])
            rounds_cli.setdefault(k, []).append(r["ms"])
        for k, v in python_rows(rows, a.iters).items():
            rounds_py.setdefault(k, []).append(v)
    med_cli = {k: statistics.median(v) for k, v in rounds_cli.items()}
    med_py = {k: statistics.median(v) for k, v in rounds_py.items()}
    print(f"| layer | shape (n,h,w,c -> k, rxr/stride) | pass | Rust ms | Python ms | Python/Rust | Conv2d ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    tot_r = tot_p = 0.0
    for r in rows:
        k = (r["layer"], r["pass"])
        rust, py = med_cli[k], med_py[k]
        tot_r += rust
        tot_p += py
        mod = med_py.get(k + ("module",))
        mod_s = "" if mod is None else (f"{mod:.2f}" + (" (fwd)" if r["pass"] == "fprop" else " (dgrad+wgrad)"))
        shape = f"{r['n']},{r['h']},{r['w']},{r['c']} -> {r['k']}, {r['r']}x{r['s']}/{r['stride']}"
        print(f"| {r['layer']} | {shape} | {r['pass']} | {rust:.2f} | {py:.2f} | {py / rust:.3f} | {mod_s} |")
    print(f"\nsum of every row: Rust {tot_r:.1f} ms, Python functions {tot_p:.1f} ms, ratio {tot_p / tot_r:.3f}")
    layers = {r["layer"] for r in rows}
    fwd_r = sum(med_cli[(l, "fprop")] for l in layers)
    fwd_m = sum(med_py[(l, "fprop", "module")] for l in layers)
    bwd_r = sum(med_cli[(l, "dgrad")] + med_cli[(l, "wgrad")] for l in layers)
    bwd_m = sum(med_py[(l, "wgrad", "module")] for l in layers)
    print(f"prunekit.torch.Conv2d: forward {fwd_m:.1f} ms vs Rust fprop {fwd_r:.1f} ms (ratio {fwd_m / fwd_r:.3f}); "
          f"backward {bwd_m:.1f} ms vs Rust dgrad + wgrad {bwd_r:.1f} ms (ratio {bwd_m / bwd_r:.3f})")


if __name__ == "__main__":
    main()
