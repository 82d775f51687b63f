"""Training in-process: the embedding proof against a plain PyTorch loop, Ctrl-C and
resume, evaluation, and a small transfer sweep."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.torch import module_from_state

# verify's float32 tolerances (src/verify/mod.rs: tolerance(F32)): atol 1e-5 of the
# scale and rtol 1e-4; for a scalar loss the scale is its own magnitude.
ATOL, RTOL = 1e-5, 1e-4

RECIPE = dict(batch=8, size=32, lr=0.01, momentum=0.9, wd=5e-4, schedule="constant", augment="none", seed=0)


@pytest.fixture(scope="module")
def pruned_small():
    dense = {k: torch.from_numpy(v) for k, v in prunekit.init_weights([1, 1, 1, 1], 8, 4, seed=0).items()}
    return prunekit.prune(dense, sparsity=0.5, round_to=2)


def test_pytorch_loop_and_prunekit_train_agree(pruned_small, tiny_arrays, tmp_path):
    train, val = tiny_arrays
    data = prunekit.Data(train, val=val)
    steps = 5
    model = module_from_state(pruned_small.state_dict)
    model.train()  # batch statistics, as prunekit trains
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"], weight_decay=RECIPE["wd"])
    torch_losses = []
    for x, y in prunekit.batches(data, batch=8, size=32, seed=0, augment="none", steps=steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())
    assert len(torch_losses) == steps
    rows = []
    run = prunekit.train(data, weights=pruned_small.state_dict, steps=steps, progress=rows.append,
                         out=tmp_path / "trained.safetensors", log=tmp_path / "log.jsonl", **RECIPE)
    ours = [r["loss"] for r in run.rows]
    assert [r["step"] for r in run.rows] == list(range(1, steps + 1))
    assert [r for r in rows if "loss" in r] == run.rows
    assert any("line" in r for r in rows)
    for step, (a, b) in enumerate(zip(torch_losses, ours), 1):
        assert abs(a - b) <= ATOL * abs(a) + RTOL * abs(a), f"step {step}: PyTorch {a}, prunekit {b}"
    assert run.summary["finished"] and run.summary["steps"] == steps
    # The files the CLI writes.
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == run.rows
    trained = prunekit.flops(str(tmp_path / "trained.safetensors"))
    assert trained["params"] == pruned_small.params["after"]
    # Evaluation of the trained file against PyTorch's eval-mode forward of the same weights.
    ev = prunekit.evaluate(tmp_path / "trained.safetensors", data, batch=8, size=32)
    m2 = module_from_state({k: v for k, v in __import__("safetensors.torch", fromlist=["x"]).load_file(
        str(tmp_path / "trained.safetensors")).items()})
    m2.eval()
    xs, ys = zip(*prunekit.batches(data, batch=8, size=32, split="val"))
    with torch.no_grad():
        z = m2(torch.cat(xs))
    y = torch.cat(ys)
    assert ev["images"] == len(y) == 8
    assert ev["error"] == (z.argmax(1) != y).float().mean().item()
    assert abs(ev["loss"] - F.cross_entropy(z, y).item()) <= 1e-4 * abs(ev["loss"])


SIGINT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, numpy as np, prunekit
    # Ctrl-C raises KeyboardInterrupt, as in any interactive Python, even where the parent
    # (a CI runner in the background) left SIGINT ignored, which a child inherits.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ck, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (72, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 72).astype(np.int64)
    w = prunekit.init_weights([1, 1, 1, 1], 8, 4, seed=0)
    def progress(row):
        if row.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C during the run
    try:
        prunekit.train((images[:64], labels[:64]), val=(images[64:], labels[64:]), weights=w, steps=1000,
                       batch=8, size=32, augment="none", checkpoint=ck, out=out, progress=progress)
    except KeyboardInterrupt:
        print("interrupted")
        sys.exit(130)
    print("finished")
    """
)


def test_sigint_leaves_a_checkpoint_that_resumes(tiny_arrays, tmp_path):
    ck, out = tmp_path / "ck.safetensors", tmp_path / "out.safetensors"
    p = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, str(ck), str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 130, p.stdout + p.stderr
    assert "interrupted" in p.stdout
    assert ck.exists() and not out.exists()
    from safetensors import safe_open
    with safe_open(str(ck), "np") as f:
        stopped = int(f.metadata()["step"])
    assert 2 <= stopped < 1000
    train, val = tiny_arrays
    w = prunekit.init_weights([1, 1, 1, 1], 8, 4, seed=0)
    common = dict(val=val, steps=1000, batch=8, size=32, augment="none")
    resumed = prunekit.train(train, weights=w, resume=ck, checkpoint=ck, out=out, **common)
    assert resumed.summary["finished"] and resumed.summary["steps"] == 1000
    assert resumed.rows[0]["step"] == stopped + 1
    whole = prunekit.train(train, weights=w, out=tmp_path / "whole.safetensors", **common)
    from safetensors.numpy import load_file
    a, b = load_file(str(out)), load_file(str(tmp_path / "whole.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:  # bit-identical to the uninterrupted run on the CPU
        assert np.array_equal(a[k], b[k]), k
    assert resumed.rows[-1]["loss"] == whole.rows[-1]["loss"]


def test_small_transfer_sweep(tiny_arrays, tmp_path):
    train, val = tiny_arrays
    w = prunekit.init_weights([1, 1, 1, 1], 8, 10, seed=1)
    lines = []
    report = prunekit.transfer(train, val=val, weights=w, models="dense,filters:0.5", budgets=[0.05, 0.1],
                               batch=8, size=32, augment="none", json_path=tmp_path / "report.json",
                               runs=tmp_path / "runs", progress=lines.append)
    rows = report["rows"]
    assert [(r["model"], r["budget_gflops"]) for r in rows] == [
        ("dense", 0.05), ("filters:0.5", 0.05), ("dense", 0.1), ("filters:0.5", 0.1)
    ] or sorted((r["model"], r["budget_gflops"]) for r in rows) == sorted(
        [("dense", 0.05), ("filters:0.5", 0.05), ("dense", 0.1), ("filters:0.5", 0.1)])
    assert all(0.0 <= r["val_error"] <= 1.0 for r in rows)
    assert "filters:0.5" in report["table"]
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == rows
    assert len(os.listdir(tmp_path / "runs")) == 4
    assert lines


def write_idx(path, a: np.ndarray) -> None:
    """An IDX file (MNIST's format) of unsigned bytes."""
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    path.write_bytes(header + a.astype(np.uint8).tobytes())


def test_train_is_the_cli_in_process(tiny_arrays, prunekit_bin, tmp_path):
    (ti, tl), (vi, vl) = tiny_arrays
    for name, a in [("ti", ti[..., 0]), ("tl", tl), ("vi", vi[..., 0]), ("vl", vl)]:
        write_idx(tmp_path / name, a)
    data = f"idx:{tmp_path / 'ti'},{tmp_path / 'tl'}"
    val = f"idx:{tmp_path / 'vi'},{tmp_path / 'vl'}"
    subprocess.run(
        [prunekit_bin, "train", "--data", data, "--val", val, "--layers", "1,1,1,1", "--width", "8",
         "--mode", "filters", "--sparsity", "0.5", "--round-to", "2", "--steps", "4", "--batch", "8",
         "--size", "32", "--device", "cpu", "--out", str(tmp_path / "cli.safetensors"), "--log",
         str(tmp_path / "cli.jsonl")],
        check=True, capture_output=True,
    )
    run = prunekit.train(data, val=val, layers=[1, 1, 1, 1], width=8, mode="filters", sparsity=0.5, round_to=2,
                         steps=4, batch=8, size=32, out=tmp_path / "py.safetensors", log=tmp_path / "py.jsonl")
    from safetensors.numpy import load_file
    a, b = load_file(str(tmp_path / "cli.safetensors")), load_file(str(tmp_path / "py.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    cli_rows = [json.loads(l) for l in (tmp_path / "cli.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(cli_rows) == strip(run.rows)
    assert any("pruned zero-shot" in n for n in run.notes)
