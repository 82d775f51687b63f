#!/usr/bin/env python3
"""PyTorch's twin of the reproduction (scripts/reproduce-transfer.sh): the same
architecture, the same recipe, the same data, trained by PyTorch, so that prunekit's error
on real data can be read next to PyTorch's.

pretrain: a bottleneck ResNet of depth 3,4,6,3 and base width 32 (prunekit's
  `--layers 3,4,6,3 --width 32`: stem 32, stage s inner width 32 << s, outputs x4), from
  torchvision's initialisation, on all training images of Fashion-MNIST classes 0-4 at
  28x28 (gray replicated to RGB, ImageNet normalisation, no augmentation), batch 64,
  3 epochs of full batches reshuffled each epoch, SGD momentum 0.9, weight decay 5e-4 on
  every parameter, lr 0.1 with 100 steps of linear warm-up (lr * (s+1)/100) then a cosine
  to 0 over the remaining steps (prunekit's Schedule); top-1 error on the 5000 test images
  of classes 0-4, eval-mode batch norm.

finetune: from a prunekit weights file (dense, or pruned by `prunekit prune`; the
  architecture is read from its shapes), the classifier replaced by a fresh one, on
  --per-class images of each of classes 5-9 (its own seeded sample: prunekit's sample is
  another one of the same size), for --steps steps of --batch at --lr (cosine, no warm-up),
  evaluated on the 5000 test images of classes 5-9; one run per seed.

  python3 scripts/torch_transfer_twin.py pretrain --seeds 0 --json OUT.json
  python3 scripts/torch_transfer_twin.py finetune --weights W.safetensors --steps 12 --lr 0.03 --seeds 0,1,2

Prints one JSON object per run; --json appends them to a file. Threads: torch.set_num_threads
(--threads, default 2, this project's CPU machine).
"""
import argparse
import gzip
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def read_idx(path):
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(root, split, classes):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    remap = {c: i for i, c in enumerate(sorted(classes))}
    y = np.array([remap[v] for v in y], dtype=np.int64)
    t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return ((t - MEAN) / STD).contiguous(memory_format=torch.channels_last), torch.from_numpy(y)


class Block(nn.Module):
    def __init__(self, cin, w1, w2, cout, stride, down):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if down else None

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        o = F.relu(self.bn2(self.conv2(o)))
        o = self.bn3(self.conv3(o))
        return F.relu(o + (self.downsample(x) if self.downsample is not None else x))


class Net(nn.Module):
    """A torchvision-named bottleneck ResNet of any widths: widths[(stage, block)] = (w1, w2, out)."""

    def __init__(self, stem, layers, widths, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for s, n in enumerate(layers):
            blocks = []
            for b in range(n):
                w1, w2, out = widths[(s, b)]
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(Block(cin, w1, w2, out, stride, b == 0))
                cin = out
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for s in range(4):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def scratch(layers, width, classes):
    widths = {(s, b): (width << s, width << s, 4 * (width << s)) for s in range(4) for b in range(layers[s])}
    net = Net(width, layers, widths, classes)
    for m in net.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


def from_file(path, classes, seed):
    sd = {k: v for k, v in load_file(path).items() if not k.startswith("keep.")}
    layers = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{s + 1}.")}) for s in range(4)]
    widths = {}
    for s in range(4):
        for b in range(layers[s]):
            p = f"layer{s + 1}.{b}."
            widths[(s, b)] = (sd[p + "conv1.weight"].shape[0], sd[p + "conv2.weight"].shape[0], sd[p + "conv3.weight"].shape[0])
    net = Net(sd["conv1.weight"].shape[0], layers, widths, sd["fc.weight"].shape[0])
    net.load_state_dict(sd, strict=False)
    torch.manual_seed(seed)
    net.fc = nn.Linear(net.fc.in_features, classes)  # a fresh classifier, PyTorch's init
    return net


def lr_at(base, warmup, total, s):
    if s < warmup:
        return base * (s + 1) / warmup
    t = (s - warmup) / (total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def train(net, x, y, batch, steps, lr, warmup, seed, wd=5e-4, momentum=0.9):
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(y) // batch
    order, s, t0, loss = None, 0, time.time(), float("nan")
    net.train()
    while s < steps:
        if s % per_epoch == 0:
            order = torch.randperm(len(y), generator=g)
        idx = order[(s % per_epoch) * batch:(s % per_epoch + 1) * batch]
        for group in opt.param_groups:
            group["lr"] = lr_at(lr, warmup, steps, s)
        out = net(x[idx])
        l = F.cross_entropy(out, y[idx])
        opt.zero_grad(set_to_none=True)
        l.backward()
        opt.step()
        loss = l.item()
        if not math.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {s + 1}")
        s += 1
    return time.time() - t0, loss


@torch.no_grad()
def evaluate(net, x, y, batch=500):
    net.eval()
    wrong, total_loss = 0, 0.0
    for i in range(0, len(y), batch):
        out = net(x[i:i + batch])
        wrong += (out.argmax(1) != y[i:i + batch]).sum().item()
        total_loss += F.cross_entropy(out.double(), y[i:i + batch], reduction="sum").item()
    return wrong / len(y), total_loss / len(y)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pretrain", "finetune"])
    p.add_argument("--data", default=os.environ.get("FMNIST", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--weights")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int)
    p.add_argument("--per-class", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for seed in (int(s) for s in a.seeds.split(",")):
        torch.manual_seed(seed)
        if a.what == "pretrain":
            x, y = load(a.data, "train", [0, 1, 2, 3, 4])
            xt, yt = load(a.data, "test", [0, 1, 2, 3, 4])
            batch = a.batch or 64
            steps = a.epochs * (len(y) // batch)
            net = scratch([3, 4, 6, 3], 32, 5)
            wall, last = train(net, x, y, batch, steps, a.lr, 100, seed)
            what = {"run": "pretrain", "classes": "0-4", "train_images": len(y)}
        else:
            x, y = load(a.data, "train", [5, 6, 7, 8, 9])
            g = torch.Generator().manual_seed(1000 + seed)
            keep = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:a.per_class]] for c in range(5)])
            x, y = x[keep.sort().values], y[keep.sort().values]
            xt, yt = load(a.data, "test", [5, 6, 7, 8, 9])
            batch = a.batch or 16
            steps = a.steps
            net = from_file(a.weights, 5, seed)
            wall, last = train(net, x, y, batch, steps, a.lr, 0, seed)
            what = {"run": "finetune", "weights": os.path.basename(a.weights), "classes": "5-9", "train_images": len(y)}
        err, loss = evaluate(net, xt, yt)
        row = dict(what, seed=seed, steps=steps, batch=batch, lr=a.lr, val_error=err, val_loss=loss,
                   last_train_loss=last, wall_s=wall, val_images=len(yt), torch=torch.__version__, threads=a.threads)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
