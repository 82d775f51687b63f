"""Pruning from Python: bitwise equal to the CLI, modules with the kept widths, FLOPs."""

import subprocess

import numpy as np
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import prunekit
from prunekit.torch import module_from_state


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50()


@pytest.fixture(scope="module")
def resnet50_file(resnet50, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in resnet50.state_dict().items()}, str(path))
    return path


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize(
    "mode,sparsity,round_to,criterion",
    [("filters", "0.5", 8, "l1"), ("channels", "0.3", 1, "l2")],
)
def test_bitwise_equal_to_cli(resnet50, resnet50_file, prunekit_bin, tmp_path, mode, sparsity, round_to, criterion):
    out = tmp_path / "cli.safetensors"
    subprocess.run(
        [prunekit_bin, "prune", "--weights", str(resnet50_file), "--mode", mode, "--sparsity", sparsity,
         "--round-to", str(round_to), "--criterion", criterion, "--device", "cpu", "--out", str(out)],
        check=True, capture_output=True,
    )
    cli = load_file(str(out))
    py = prunekit.prune(resnet50, mode=mode, sparsity=float(sparsity), round_to=round_to, criterion=criterion)
    ours = {k: v.numpy() for k, v in py.state_dict.items()}
    ours.update({f"keep.{g}": k for g, k in py.keep.items()})
    assert sorted(ours) == sorted(cli)
    for k in cli:
        assert ours[k].shape == cli[k].shape, k
        assert np.array_equal(bits(ours[k]), bits(cli[k])), f"{k} differs from the CLI's"
    # The file Python writes holds the CLI's tensors and metadata.
    py.save(tmp_path / "py.safetensors")
    saved = load_file(str(tmp_path / "py.safetensors"))
    assert sorted(saved) == sorted(cli)
    assert all(np.array_equal(bits(saved[k]), bits(cli[k])) for k in cli)
    with safe_open(str(tmp_path / "py.safetensors"), "np") as a, safe_open(str(out), "np") as b:
        assert a.metadata() == b.metadata()
        assert a.metadata()["mode"] == mode
    # From a path and from numpy arrays: the same result.
    from_path = prunekit.prune(str(resnet50_file), mode=mode, sparsity=sparsity, round_to=round_to, criterion=criterion)
    np_state = {k: v.numpy() for k, v in resnet50.state_dict().items()}
    from_np = prunekit.prune(np_state, mode=mode, sparsity=sparsity, round_to=round_to, criterion=criterion)
    for k in py.state_dict:
        assert np.array_equal(bits(from_path.state_dict[k]), bits(ours[k]))
        assert np.array_equal(bits(from_np.state_dict[k]), bits(ours[k]))
    assert isinstance(from_np.weights[next(iter(from_np.weights))], np.ndarray)


def test_module_result_forward_matches_prunekit(resnet50):
    pruned = prunekit.prune(resnet50, sparsity=0.5)
    m = pruned.weights
    assert isinstance(m, torchvision.models.ResNet) and m is not resnet50
    assert m.layer1[0].conv1.out_channels == pruned.widths["layer1.0.conv1"][1] == 32
    assert resnet50.layer1[0].conv1.out_channels == 64  # the input is left as it was
    assert m.layer2[0].conv2.stride == (2, 2)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    with torch.no_grad():
        ours = m(x)
    theirs = prunekit.logits(pruned.state_dict, x)
    scale = theirs.abs().max()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale), (ours - theirs).abs().max()


def test_module_from_state_of_any_width():
    sd = prunekit.init_weights([1, 2, 1, 1], width=8, classes=5, seed=3)
    m = module_from_state(sd)
    assert m.conv1.out_channels == 8 and m.fc.out_features == 5 and len(m.layer2) == 2
    x = torch.randn(2, 3, 64, 64)
    m.eval()
    with torch.no_grad():
        y = m(x)
    z = prunekit.logits(sd, x)
    assert torch.allclose(y, z, rtol=1e-4, atol=1e-5)


def torch_flops(model: torch.nn.Module, size: int) -> int:
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return fc.get_total_flops()


@pytest.mark.parametrize("mode", ["filters", "channels"])
def test_flops_match_torch_flop_counter(resnet50, mode):
    # Both count 2 x multiply-adds of the convolutions and the classifier's matmul; neither
    # counts BN, ReLU, pooling or additions.
    assert prunekit.flops(resnet50, size=224)["forward"] == torch_flops(resnet50, 224)
    pruned = prunekit.prune(resnet50, mode=mode, sparsity=0.5)
    assert pruned.flops["after"] == torch_flops(pruned.weights, 224)
    assert prunekit.flops(pruned.state_dict, size=160)["forward"] == torch_flops(pruned.weights, 160)
    assert pruned.flops["before"] == prunekit.flops(resnet50)["forward"]
    assert pruned.params["after"] == sum(p.numel() for p in pruned.weights.parameters())
