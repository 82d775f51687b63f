"""Bad inputs are refused with an exception of the fitting class, and nothing is written."""

import numpy as np
import pytest
import torch
import torchvision

import prunekit
from prunekit.torch import Conv2d


@pytest.fixture(scope="module")
def small():
    return {k: torch.from_numpy(v) for k, v in prunekit.init_weights([1, 1, 1, 1], 8, 4, seed=0).items()}


def test_conv_wrong_dtype_rank_layout():
    x = np.zeros((1, 5, 5, 3), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="float32, got float64"):
        prunekit.conv2d(x.astype(np.float64), w)
    with pytest.raises(ValueError, match="rank-4"):
        prunekit.conv2d(x[0], w)
    with pytest.raises(ValueError, match="not C-contiguous"):
        prunekit.conv2d(np.zeros((1, 5, 3, 5), np.float32).transpose(0, 1, 3, 2), w)
    with pytest.raises(ValueError, match="input channels"):
        prunekit.conv2d(x, np.zeros((4, 3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        prunekit.conv2d(x, np.zeros((4, 9, 9, 3), np.float32))
    with pytest.raises(ValueError, match="stride"):
        prunekit.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="numpy array"):
        prunekit.conv2d([[1.0]], w)
    with pytest.raises(ValueError, match="float32"):
        Conv2d(3, 4, 3)(torch.zeros(1, 3, 5, 5, dtype=torch.float64))


def test_prune_bad_settings(small):
    with pytest.raises(ValueError, match="unknown pruning mode"):
        prunekit.prune(small, mode="rows")
    for s in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            prunekit.prune(small, sparsity=s)
    with pytest.raises(ValueError, match="sparsity"):
        prunekit.prune(small, sparsity="half")
    with pytest.raises(ValueError, match="round_to"):
        prunekit.prune(small, round_to=0)
    with pytest.raises(ValueError, match="criterion"):
        prunekit.prune(small, criterion="l3")


def test_prune_bad_weights(small, tmp_path):
    bad = dict(small)
    w = bad["layer1.0.conv1.weight"].clone()
    w[0, 0, 0, 0] = float("nan")
    bad["layer1.0.conv1.weight"] = w
    with pytest.raises(ValueError, match="layer1.0.conv1.weight holds a non-finite value"):
        prunekit.prune(bad)
    with pytest.raises(ValueError, match="dtype"):
        prunekit.prune({k: v.double() if v.is_floating_point() else v for k, v in small.items()})
    with pytest.raises(ValueError, match="not a Bottleneck"):
        prunekit.prune(torchvision.models.resnet18())
    with pytest.raises(ValueError):
        prunekit.prune(torchvision.models.resnet18().state_dict())
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        prunekit.prune(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="missing tensor|unexpected"):
        prunekit.prune({k: v for k, v in small.items() if k != "fc.bias"})
    with pytest.raises(FileNotFoundError):
        prunekit.prune(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        prunekit.prune(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="expected a state dict"):
        prunekit.prune(42)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors"]


def test_train_refuses_before_writing(small, tiny_arrays, tmp_path):
    train, val = tiny_arrays
    out, log = tmp_path / "out.safetensors", tmp_path / "log.jsonl"
    common = dict(val=val, steps=2, batch=8, out=out, log=log)
    with pytest.raises(ValueError, match="lr"):
        prunekit.train(train, weights=small, lr=-1.0, **common)
    with pytest.raises(ValueError, match="exactly one"):
        prunekit.train(train, weights=small, val=val, steps=2, epochs=1, out=out)
    with pytest.raises(ValueError, match="unknown pruning mode"):
        prunekit.train(train, weights=small, mode="rows", sparsity=0.5, **common)
    with pytest.raises(ValueError, match="sparsity"):
        prunekit.train(train, weights=small, mode="filters", sparsity=1.0, **common)
    with pytest.raises(ValueError, match="momentum"):
        prunekit.train(train, weights=small, momentum=1.5, **common)
    with pytest.raises(ValueError, match="uint8"):
        prunekit.train((train[0].astype(np.float32), train[1]), weights=small, **common)
    with pytest.raises(ValueError, match="augment|crop"):
        prunekit.train(train, weights=small, augment="rotate", **common)
    with pytest.raises(FileNotFoundError):
        prunekit.train(train, weights=small, resume=tmp_path / "nope.safetensors", **common)
    with pytest.raises(ValueError, match="--out"):
        prunekit.train(train, weights=small, val=val, steps=2, batch=8, out=tmp_path / "no" / "dir" / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_and_verify_errors(small, tiny_arrays, tmp_path):
    train, val = tiny_arrays
    with pytest.raises(ValueError, match="classes"):
        prunekit.evaluate(prunekit.init_weights([1, 1, 1, 1], 8, 7), train, val=val)
    with pytest.raises(FileNotFoundError):
        prunekit.verify(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="device"):
        prunekit.verify(tmp_path / "missing.safetensors", device="tpu")


@pytest.mark.parametrize("released", [True, False])
def test_a_rust_panic_is_a_runtime_error(released):
    # A panic in the GIL-released compute and one with the GIL held both reach Python as
    # RuntimeError (not pyo3's PanicException, a BaseException), carrying the panic's text.
    from prunekit import _prunekit

    with pytest.raises(RuntimeError, match="prunekit failed internally: a deliberate panic"):
        _prunekit._panic_for_tests(released)
