#!/usr/bin/env python3
"""PyTorch's ResNet50 training step, for comparison with `prunekit bench --sparsity 0`.

torchvision's resnet50, channels_last, cudnn.benchmark, SGD with momentum; bf16 through
autocast (f32 master weights, as prunekit). Prints one JSON object per configuration:
  python3 scripts/torch_train_step.py --batch 64,256 --precision f32,bf16 --steps 20
"""
import argparse
import json
import time

import torch
import torchvision


def step_ms(batch, size, precision, steps, warmup, classes=1000):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=classes).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="32,64,128,256")
    p.add_argument("--precision", default="f32,bf16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for precision in a.precision.split(","):
        for batch in (int(b) for b in a.batch.split(",")):
            try:
                ms = step_ms(batch, a.size, precision, a.steps, a.warmup)
                row = {"batch": batch, "precision": precision, "size": a.size, "step_ms": ms,
                       "images_per_s": batch / (ms / 1e3), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name()}
            except torch.OutOfMemoryError:
                row = {"batch": batch, "precision": precision, "error": "out of memory"}
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
