#!/usr/bin/env python3
"""Pruning torchvision's ResNet50 from Python end to end: prunekit.prune (a new nn.Module
with the kept widths) against Torch-Pruning's MagnitudePruner with the same selection (the
L1 norm of the root conv's output filters, group_reduction="first"; each bottleneck's conv1
and conv2 outputs at ratio 0.5, rounded to 8; the stem, conv3, downsample and fc ignored),
measured side by side, alternating. Both pick the same filters: the two pruned models give
the same logits.

Both sides start from the same dense module and end with a pruned nn.Module; Torch-Pruning
prunes in place, so its timing includes a deepcopy of the dense model (prunekit's includes
its own copy). The kept filters and the forward of both results are compared.

  pip install torch-pruning        # not a dependency of prunekit
  python3 scripts/py_prune_vs_torch_pruning.py [--rounds 5] [--threads 2]

Prints one JSON object per measurement and a summary line.
"""
import argparse
import copy
import json
import time

import torch
import torch_pruning as tp
import torchvision

import prunekit


def torch_pruning(dense: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    keep_pruned = set()
    for s in range(1, 5):
        for block in getattr(model, f"layer{s}"):
            keep_pruned.update([block.conv1, block.conv2])
    ignored = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m not in keep_pruned]
    pruner = tp.pruner.MagnitudePruner(
        model,
        torch.zeros(1, 3, 224, 224),
        importance=tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None),
        pruning_ratio=0.5,
        ignored_layers=ignored,
        round_to=8,
    )
    pruner.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    times = {"prunekit": [], "torch-pruning": []}
    results = {}
    for r in range(a.rounds):
        order = [("prunekit", lambda: prunekit.prune(dense, sparsity=0.5).weights), ("torch-pruning", lambda: torch_pruning(dense))]
        if r % 2:
            order.reverse()
        for name, f in order:
            t = time.perf_counter()
            results[name] = f()
            dt = time.perf_counter() - t
            times[name].append(dt)
            print(json.dumps({"round": r, "tool": name, "s": round(dt, 4)}))
    a_, b_ = results["prunekit"].eval(), results["torch-pruning"].eval()
    same_widths = all(
        getattr(a_, f"layer{s}")[i].conv2.weight.shape == getattr(b_, f"layer{s}")[i].conv2.weight.shape
        for s in range(1, 5)
        for i in range(len(getattr(a_, f"layer{s}")))
    )
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (a_(x) - b_(x)).abs().max().item()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(json.dumps({"median_s": med, "speedup": med["torch-pruning"] / med["prunekit"],
                      "same_widths": same_widths, "max_logit_diff": diff}))


if __name__ == "__main__":
    main()
