#!/usr/bin/env python3
"""Where prunekit.torch.Conv2d's time goes beyond the kernels, per layer shape: the same
convolution (forward; backward = dgrad + wgrad) timed

  out=     the numpy functions writing into preallocated arrays (the kernels alone),
  reused   the module, its outputs from prunekit's reuse cache (what Conv2d does),
  fresh    the module after prunekit.torch.empty_cache(): its outputs in fresh memory,
  engine   (backward only) the two functions with out= called inside a custom
           autograd.Function: PyTorch's autograd engine around the same kernels.

Calls alternate between the variants; each variant's median of --iters calls.

  python3 scripts/py_conv_overheads.py [--batch 32 --size 224 --iters 9]
"""
import argparse
import time

import numpy as np
import torch

import prunekit
import prunekit.torch as pt

# name, channels in, filters, kernel, stride, padding, input size divisor (stem: 1)
LAYERS = [
    ("conv1 (stem)", 3, 64, 7, 2, 3, 1),
    ("layer1.0.conv2", 64, 64, 3, 1, 1, 4),
    ("layer1.1.conv1", 256, 64, 1, 1, 0, 4),
    ("layer2.0.conv2", 128, 128, 3, 2, 1, 4),
    ("layer3.0.conv1", 512, 256, 1, 1, 0, 8),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=9)
    a = ap.parse_args()
    reused, fresh = (lambda: None), pt.empty_cache
    totals = {}
    print(f"batch {a.batch}, {a.size}x{a.size}, median of {a.iters} calls, ms")
    for name, c, k, r, st, pad, div in LAYERS:
        n, h = a.batch, a.size // div
        conv = pt.Conv2d(c, k, r, stride=st, padding=pad)
        xt = torch.randn(n, h, h, c).permute(0, 3, 1, 2).requires_grad_(True)
        y = conv(xt)
        dyt = torch.randn(*y.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2)
        xn, wn = xt.detach().permute(0, 2, 3, 1).numpy(), conv.weight.detach().permute(0, 2, 3, 1).numpy()
        dyn = dyt.permute(0, 2, 3, 1).numpy()
        yb, dxb, dwb = np.empty(dyn.shape, np.float32), np.empty_like(xn), np.empty_like(wn)

        def kern_f():
            prunekit.conv2d(xn, wn, st, pad, out=yb)

        def kern_b():
            prunekit.conv2d_backward_input(dyn, wn, (h, h), st, pad, out=dxb)
            prunekit.conv2d_backward_weight(xn, dyn, (r, r), st, pad, out=dwb)

        class Engine(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.clone()

            @staticmethod
            def backward(ctx, g):
                kern_b()
                return g

        leaf = torch.zeros(1, requires_grad=True)
        out = Engine.apply(leaf)

        def mod_f():
            with torch.no_grad():
                conv(xt)

        def mod_b():
            torch.autograd.grad(y, (xt, conv.weight), dyt, retain_graph=True)

        variants = {
            ("forward", "out="): (kern_f, reused),
            ("forward", "reused"): (mod_f, reused),
            ("forward", "fresh"): (mod_f, fresh),
            ("backward", "out="): (kern_b, reused),
            ("backward", "engine"): (lambda: torch.autograd.grad(out, (leaf,), torch.ones(1), retain_graph=True), reused),
            ("backward", "reused"): (mod_b, reused),
            ("backward", "fresh"): (mod_b, fresh),
        }
        times = {v: [] for v in variants}
        for i in range(a.iters + 1):
            for v, (f, alloc) in variants.items():
                alloc()
                t = time.perf_counter()
                f()
                if i:  # the first round warms up
                    times[v].append(time.perf_counter() - t)
        med = {v: sorted(ts)[len(ts) // 2] * 1e3 for v, ts in times.items()}
        for v, m in med.items():
            totals[v] = totals.get(v, 0.0) + m
        print(f"{name:16s} " + "  ".join(f"{p[:3]} {kind} {m:7.2f}" for (p, kind), m in med.items()))
    for p in ("forward", "backward"):
        base = totals[(p, "out=")]
        print(f"{p}: " + ", ".join(f"{kind} {totals[(q, kind)] / base:.3f}x" for (q, kind) in totals if q == p)
              + " of out= (sum over the layers)")


if __name__ == "__main__":
    main()
