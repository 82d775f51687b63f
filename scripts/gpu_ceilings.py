#!/usr/bin/env python3
"""The device's two ceilings, measured through PyTorch, to check the roofline table
(`src/measure/roofline.rs`, datasheet figures) against: the bandwidth of a large
device-to-device copy (bytes read plus bytes written) and the rate of large matrix products
(bf16, and f32 with TF32 off as with it on) on random data. Median of the timed repeats
(CUDA events) after warm-up. Prints one JSON object:

  python3 scripts/gpu_ceilings.py [--copy-gib 4] [--gemm 8192] [--repeats 10]
"""
import argparse
import json
import statistics

import torch


def timed(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copy-gib", type=float, default=4.0)
    ap.add_argument("--gemm", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    n = int(a.copy_gib * 2**30) // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), a.repeats)
    out["copy_bytes"] = 2 * 4 * n
    out["copy_tb_s"] = 2 * 4 * n / t / 1e12
    del src, dst
    m = a.gemm
    for name, dtype, tf32 in [("bf16", torch.bfloat16, False), ("f32", torch.float32, False), ("tf32", torch.float32, True)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(m, m, device=dev, dtype=dtype)
        y = torch.randn(m, m, device=dev, dtype=dtype)
        t = timed(lambda: x @ y, a.repeats if name == "bf16" else max(3, a.repeats // 3))
        out[f"gemm_{name}_tflop_s"] = 2 * m**3 / t / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    out["gemm_n"] = m
    print(json.dumps(out))


if __name__ == "__main__":
    main()
