#!/usr/bin/env python3
"""Extracts what tests/layers.rs checks against PyTorch from the reference files
(../shared/reference, written by PyTorch; see its README) into
tests/data/layers-reference.txt, so that the tests do not read that folder.

Per model file: the metadata (lr, momentum, weight_decay), the targets, PyTorch's train
logits, loss and fc.bias gradient (checks softmax_cross_entropy and the bias gradient),
and for a few parameters the tensor, its gradient and the tensor after one SGD step
(checks sgd_step). f32 values are written as their bit patterns in hex (exact).

Usage: tests/data/extract_layers_reference.py ../shared/reference > tests/data/layers-reference.txt
"""
import json
import struct
import sys

FILES = ["model-tiny-irregular", "model-resnet50-narrow"]
SGD_PARAMS = ["fc.bias", "fc.weight", "bn1.weight", "bn1.bias", "layer1.0.conv2.weight"]


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def tensor(header, data, name):
    t = header[name]
    a, b = t["data_offsets"]
    raw = data[a:b]
    if t["dtype"] == "F32":
        return "f32", [struct.unpack_from("<I", raw, 4 * i)[0] for i in range(len(raw) // 4)]
    if t["dtype"] == "I64":
        return "i64", [struct.unpack_from("<q", raw, 8 * i)[0] for i in range(len(raw) // 8)]
    raise ValueError(t["dtype"])


def main():
    root = sys.argv[1]
    print("# Extracted by tests/data/extract_layers_reference.py from PyTorch's reference files.")
    for fn in FILES:
        header, data = read(f"{root}/{fn}.safetensors")
        meta = header["__metadata__"]
        print(f"file {fn}")
        print(f"meta lr {meta['lr']} momentum {meta['momentum']} weight_decay {meta['weight_decay']}")
        names = ["target", "expect.logits", "expect.loss", "expect.grad.fc.bias"]
        for p in SGD_PARAMS:
            names += [n for n in (p, f"expect.grad.{p}", f"expect.step.{p}") if n not in names]
        for name in names:
            kind, vals = tensor(header, data, name)
            body = " ".join(f"{v:08x}" if kind == "f32" else str(v) for v in vals)
            print(f"tensor {name} {kind} {len(vals)} {body}")


if __name__ == "__main__":
    main()
