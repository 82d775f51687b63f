#!/usr/bin/env python3
"""prunekit's CPU training step against PyTorch's, row by row, in one invocation.

For each configuration (batch, image size) it runs `prunekit bench --device cpu` over the
configuration's modes and sparsities, then PyTorch's twin of every row, and repeats that
--rounds times, alternating, so that both sides see the same machine load; each row's step
time is the median over the rounds of each side's mean step time.

The twin is torchvision's resnet50 rebuilt with the widths prunekit keeps (the rule of
DESIGN.md: ceil((1 - s) C) in exact decimal arithmetic, rounded up to --round-to, never above
C; filters: each block's conv1/conv2 outputs; channels: also the residual stream of every
stage and the stem), checked against prunekit's parameter count, in channels_last, f32,
torch.set_num_threads(--threads), SGD (lr 0.01, momentum 0.9, weight decay 1e-4, as the
bench), cross-entropy on random labels of 1000 classes.

Writes OUT.md (a table with the command, the date and the machine load) and OUT.json:
  python3 scripts/cpu_vs_torch.py --prunekit target/release/prunekit \\
      --out bench/results/cpu-vs-torch-2026-11-30
ratio = torch_ms / prunekit_ms: above 1 prunekit is faster.

PyTorch runs with its defaults and both sides get the same warm-up (--warmup, 3 steps by
default). OMP_WAIT_POLICY changes PyTorch's speed (on a quiet 2-core machine `passive` made
its rows 10-30% slower; on a loaded one, spinning OpenMP threads can make them swing): run
the script once without it and once with OMP_WAIT_POLICY=passive and quote, per row,
PyTorch's faster time (each file records the policy and the load average before and after).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

import torch
import torch.nn as nn
import torchvision

# (batch, size, modes, sparsities): the compared rows (batch 8 224x224: dense, filters
# 0.5, channels 0.5, 0.75; batch 64 32x32: dense, filters 0.5), plus what the same bench
# invocation measures anyway.
CONFIGS = {
    "b8-224": (8, 224, "filters,channels", "0.5,0.75"),
    "b64-32": (64, 32, "filters,channels", "0.5"),
}


def keep(c, s, round_to):
    """Kept width: ceil((1 - s) c) in exact decimal arithmetic, rounded up, at most c."""
    n = math.ceil((1 - Fraction(str(s))) * c)
    n = -(-n // round_to) * round_to
    return max(1, min(c, n))


def twin(mode, sparsity, round_to, classes=1000):
    """torchvision's resnet50 with the widths that prunekit's `mode` at `sparsity` keeps."""
    m = torchvision.models.resnet50(num_classes=classes)
    if mode == "dense":
        return m
    kp = lambda c: keep(c, sparsity, round_to)
    chan = mode == "channels"
    stem = kp(64) if chan else 64
    m.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(stem)
    cin = stem
    for li, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4]):
        planes = 64 * 2**li
        out = kp(planes * 4) if chan else planes * 4
        for blk in layer:
            mid, stride = kp(planes), blk.conv2.stride
            blk.conv1, blk.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
            blk.conv2, blk.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
            blk.conv3, blk.bn3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
            if blk.downsample is not None:
                blk.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            cin = out
    m.fc = nn.Linear(cin, classes)
    return m


def torch_rows(rows, batch, size, steps, warmup, round_to):
    """Mean step ms of PyTorch's twin of each (mode, sparsity) row, and its parameters."""
    out = {}
    for mode, sp in rows:
        torch.manual_seed(0)
        model = twin(mode, sp, round_to).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,))

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms = (time.perf_counter() - t0) / steps * 1e3
        out[(mode, sp)] = (ms, sum(p.numel() for p in model.parameters()))
    return out


def prunekit_rows(exe, batch, size, modes, sparsities, steps, warmup, round_to):
    with tempfile.TemporaryDirectory() as d:
        js = os.path.join(d, "rows.json")
        cmd = [exe, "bench", "--device", "cpu", "--batch", str(batch), "--size", str(size),
               "--mode", modes, "--sparsity", sparsities, "--round-to", str(round_to),
               "--steps", str(steps), "--warmup", str(warmup), "--json", js]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = json.load(open(js))
    return {(r["mode"], float(r["sparsity"])): (r["step_ms"], r["params"], r["ideal_speedup"]) for r in rows}, cmd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prunekit", default="target/release/prunekit")
    p.add_argument("--configs", default="b8-224,b64-32", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration")
    p.add_argument("--steps", default="b8-224:2,b64-32:3", help="timed steps per row, per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row, each side (at least 3 for a fair comparison)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--out", required=True, help="OUT.md and OUT.json are written")
    p.add_argument("--note", default="", help="a line for the results file (e.g. the machine's state)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    steps = dict(kv.split(":") for kv in a.steps.split(","))
    env_threads = os.environ.get("RAYON_NUM_THREADS")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    results, commands = [], []
    for name in a.configs.split(","):
        batch, size, modes, sps = CONFIGS[name]
        n_steps = int(steps.get(name, 2))
        pk, tc = {}, {}
        for rnd in range(a.rounds):
            rows, cmd = prunekit_rows(a.prunekit, batch, size, modes, sps, n_steps, a.warmup, a.round_to)
            for k, v in rows.items():
                pk.setdefault(k, []).append(v)
            t = torch_rows(list(rows), batch, size, n_steps, a.warmup, a.round_to)
            for k, v in t.items():
                tc.setdefault(k, []).append(v)
            print(f"{name} round {rnd + 1}/{a.rounds}: " + ", ".join(
                f"{m} {s}: {rows[(m, s)][0]:.0f}/{t[(m, s)][0]:.0f} ms" for m, s in rows), file=sys.stderr, flush=True)
        commands.append(" ".join(shlex.quote(c) for c in cmd if not c.endswith("rows.json")).replace(" --json", ""))
        for k in pk:
            pk_ms = statistics.median(v[0] for v in pk[k])
            t_ms = statistics.median(v[0] for v in tc[k])
            params, t_params = pk[k][0][1], tc[k][0][1]
            # Efficiency: measured speedup over the dense row of the same round and side,
            # divided by the FLOP-ideal speedup; the median over the rounds.
            dense = ("dense", 0.0)
            ideal = pk[k][0][2]
            eff = lambda side: statistics.median(d[0] / v[0] / ideal for d, v in zip(side[dense], side[k]))
            results.append({
                "config": name, "batch": batch, "size": size, "mode": k[0], "sparsity": k[1],
                "params": params, "torch_params": t_params, "params_match": params == t_params,
                "prunekit_ms": pk_ms, "torch_ms": t_ms, "ratio": t_ms / pk_ms,
                "ideal_speedup": ideal, "prunekit_efficiency": eff(pk), "torch_efficiency": eff(tc),
                "prunekit_ms_all": [v[0] for v in pk[k]], "torch_ms_all": [v[0] for v in tc[k]],
            })
    finished = datetime.datetime.now(datetime.timezone.utc)
    load_after = os.getloadavg()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "finished": finished.strftime("%H:%M UTC"),
        "command": " ".join(shlex.quote(x) for x in sys.argv), "prunekit_commands": commands,
        "prunekit_commit": commit, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "torch_threads": a.threads, "rayon_threads": env_threads or f"default ({os.cpu_count()} cpus)",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "cpu": platform.processor() or platform.machine(), "rounds": a.rounds,
        "loadavg_before": load_before, "loadavg_after": load_after, "note": a.note,
    }
    json.dump({"meta": meta, "rows": results}, open(a.out + ".json", "w"), indent=1)
    md = [f"# prunekit CPU training step vs PyTorch, {meta['date']}", "",
          f"Command: `{meta['command']}` (prunekit {commit}; torch {meta['torch']}, "
          f"torchvision {meta['torchvision']}, {a.threads} torch threads, OMP_WAIT_POLICY "
          f"{meta['omp_wait_policy']}, channels_last, f32).", "",
          "prunekit side: " + "; ".join(f"`{c}`" for c in commands) + ".", "",
          f"Each side alternates {a.rounds} times per configuration; a row is the median of the rounds' mean "
          "step times. ratio = torch_ms / prunekit_ms (above 1: prunekit is faster). The twin is torchvision's "
          "resnet50 with prunekit's kept widths (params must match). Efficiency = measured speedup over the "
          "dense row of the same round and side / FLOP-ideal speedup (prunekit's count), the median over the "
          "rounds.", "",
          f"Machine load average (1, 5, 15 min): {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f} "
          f"before, {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f} after"
          f" (finished {meta['finished']}).", ""]
    if a.note:
        md += [a.note, ""]
    md += ["| batch | size | mode | sparsity | params | prunekit ms | torch ms | ratio | ideal | "
           "efficiency prunekit / torch |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        pm = "" if r["params_match"] else f" (torch {r['torch_params']})"
        md.append(f"| {r['batch']} | {r['size']} | {r['mode']} | {r['sparsity']} | {r['params']}{pm} | "
                  f"{r['prunekit_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f} | {r['ideal_speedup']:.2f} | "
                  + ("-" if r["mode"] == "dense" else f"{r['prunekit_efficiency']:.2f} / {r['torch_efficiency']:.2f}")
                  + " |")
    g = math.exp(statistics.mean(math.log(r["ratio"]) for r in results))
    md += ["", f"Geometric mean of the ratios: {g:.2f} over {len(results)} rows.", ""]
    open(a.out + ".md", "w").write("\n".join(md))
    print("\n".join(md))
    if not all(r["params_match"] for r in results):
        sys.exit("the twin's parameter count differs from prunekit's on some row")


if __name__ == "__main__":
    main()
