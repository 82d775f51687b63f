#!/usr/bin/env python3
"""How close PyTorch's own float32 (and bf16 autocast) gets to the float64 expectations
of a reference file (kind = model): the floor any f32 implementation faces on it.

  python3 scripts/torch_reference_error.py tests/data/model-resnet50-narrow.safetensors

Needs torch, torchvision and safetensors (CPU is enough). Errors are max |got - expected|
over a tensor, divided by the tensor's largest |expected| (the scale verify uses).
"""
import sys

import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file


def build(model_sd, meta):
    layers = [int(x) for x in meta["layers"].split(",")]
    m = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, layers,
                                         num_classes=model_sd["fc.weight"].shape[0])

    def fix(mod, prefix):  # widths come from the file, not from torchvision's defaults
        for name, ch in mod.named_children():
            p = prefix + name
            if isinstance(ch, torch.nn.Conv2d):
                w = model_sd[p + ".weight"]
                setattr(mod, name, torch.nn.Conv2d(w.shape[1], w.shape[0], ch.kernel_size, ch.stride, ch.padding, bias=False))
            elif isinstance(ch, torch.nn.BatchNorm2d):
                setattr(mod, name, torch.nn.BatchNorm2d(model_sd[p + ".weight"].shape[0], eps=float(meta["bn_eps"]),
                                                        momentum=float(meta["bn_momentum"])))
            elif isinstance(ch, torch.nn.Linear):
                w = model_sd[p + ".weight"]
                setattr(mod, name, torch.nn.Linear(w.shape[1], w.shape[0]))
            else:
                fix(ch, p + ".")

    fix(m, "")
    m.load_state_dict(model_sd, strict=False)
    return m


def rel(got, want):
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def main(path):
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model_sd = {k: v for k, v in t.items() if not k.startswith("expect.") and k not in ("input", "target")}
    x, y = t["input"], t["target"]

    m = build(model_sd, meta)
    m.eval()
    with torch.no_grad():
        print(f"f32 eval logits     {rel(m(x), t['expect.eval_logits']):.3e}")
    m.train()
    logits = m(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    print(f"f32 train logits    {rel(logits, t['expect.logits']):.3e}")
    print(f"f32 loss            {rel(loss.reshape(1), t['expect.loss']):.3e}")
    loss.backward()
    g, n = max((rel(p.grad, t["expect.grad." + n]), n) for n, p in m.named_parameters())
    print(f"f32 gradients worst {g:.3e} ({n})")

    m = build(model_sd, meta)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x).float(), y)
    print(f"bf16 autocast loss  {rel(loss.reshape(1), t['expect.loss']):.3e}")


if __name__ == "__main__":
    main(sys.argv[1])
