"""prunekit's CPU convolution kernels from Python against torch.nn.functional.conv2d."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.torch import Conv2d, convert

# (batch, channels in, height, width, filters, kernel, stride, padding)
SHAPES = [
    (1, 3, 17, 13, 8, 7, 2, 3),  # the stem's kind: 7x7 stride 2, odd sizes, batch 1
    (2, 16, 9, 9, 24, 3, 1, 1),
    (3, 5, 11, 7, 6, 3, 2, 1),  # 3x3 stride 2 on odd sizes
    (2, 32, 8, 8, 16, 1, 1, 0),  # 1x1: a plain GEMM
    (1, 12, 15, 15, 20, 1, 2, 0),  # 1x1 stride 2 (a downsample)
    (2, 4, 6, 5, 3, 5, 1, 0),
]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = b.abs().max().item()
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30) + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_module_forward_and_both_gradients(shape):
    n, c, h, w, k, r, stride, pad = shape
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    conv = Conv2d(c, k, r, stride=stride, padding=pad)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(k, c, r, r, generator=g))
    y = conv(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = conv.weight.detach().clone().requires_grad_(True)
    ref = F.conv2d(ref_x, ref_w, stride=stride, padding=pad)
    assert y.shape == ref.shape
    assert close(y.detach(), ref.detach())
    dy = torch.randn(ref.shape, generator=g)
    y.backward(dy)
    ref.backward(dy)
    assert close(x.grad, ref_x.grad)
    assert close(conv.weight.grad, ref_w.grad)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_numpy_functions_nhwc(shape):
    n, c, h, w, k, r, stride, pad = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    wt = rng.standard_normal((k, r, r, c), dtype=np.float32)
    y = prunekit.conv2d(x, wt, stride=stride, padding=pad)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    wtt = torch.from_numpy(wt).permute(0, 3, 1, 2)
    ref = F.conv2d(xt, wtt, stride=stride, padding=pad).permute(0, 2, 3, 1)
    assert isinstance(y, np.ndarray) and close(torch.from_numpy(y), ref)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    dx = prunekit.conv2d_backward_input(dy, wt, (h, w), stride=stride, padding=pad)
    dw = prunekit.conv2d_backward_weight(x, dy, (r, r), stride=stride, padding=pad)
    xr = xt.clone().requires_grad_(True)
    wr = wtt.clone().requires_grad_(True)
    F.conv2d(xr, wr, stride=stride, padding=pad).backward(torch.from_numpy(dy).permute(0, 3, 1, 2))
    assert close(torch.from_numpy(dx), xr.grad.permute(0, 2, 3, 1))
    assert close(torch.from_numpy(dw), wr.grad.permute(0, 2, 3, 1))
    # CPU tensors in, tensors out.
    yt = prunekit.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=stride, padding=pad)
    assert isinstance(yt, torch.Tensor) and torch.equal(yt, torch.from_numpy(y))


def test_channels_last_input_and_convert():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 10, 10).to(memory_format=torch.channels_last)
    ref = net(x)
    ours = convert(net)
    assert isinstance(ours[0], Conv2d) and ours[0].bias is not None
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert close(y.detach(), ref.detach())


def test_out_arrays():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 9, 4), dtype=np.float32)
    w = rng.standard_normal((6, 3, 3, 4), dtype=np.float32)
    out = np.full((2, 9, 9, 6), np.nan, np.float32)
    y = prunekit.conv2d(x, w, 1, 1, out=out)
    assert np.shares_memory(y, out) and np.array_equal(out, prunekit.conv2d(x, w, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        prunekit.conv2d(x, w, 1, 0, out=out)
    ro = np.zeros((2, 9, 9, 6), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="cannot be written"):
        prunekit.conv2d(x, w, 1, 1, out=ro)
    sq = rng.standard_normal((1, 5, 5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="cannot be written"):  # out is the input itself
        prunekit.conv2d(sq, np.ones((3, 1, 1, 3), np.float32), out=sq)


def test_reused_memory_never_shows_old_values():
    """Outputs come from memory freed by earlier outputs (prunekit.torch.empty_cache): a
    block left full of NaN must be overwritten everywhere, including the input positions a
    strided 1x1 convolution's windows never touch (their gradient is zero)."""
    from prunekit import _prunekit
    from prunekit.torch import cache_info, empty_cache

    n, c, h, w, k = 2, 64, 33, 33, 128  # x, dx and y over the cache's 256 KiB minimum
    torch.manual_seed(3)
    x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last).requires_grad_(True)
    conv = Conv2d(c, k, 1, stride=2)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = conv.weight.detach().clone().requires_grad_(True)
    ref = F.conv2d(ref_x, ref_w, stride=2)
    dy = torch.randn(ref.shape)
    ref.backward(dy)
    empty_cache()
    for size in (x.numel(), ref.numel()):  # dx's and y's sizes, poisoned and freed
        block = _prunekit.empty([size])
        block[:] = np.nan
        del block
    before = cache_info()
    assert before["idle_blocks"] == 2 and before["idle_bytes"] == 4 * (x.numel() + ref.numel())
    for _ in range(2):
        x.grad = None
        conv.weight.grad = None
        y = conv(x)
        y.backward(dy)
        assert torch.isfinite(y).all() and close(y.detach(), ref.detach())
        assert torch.isfinite(x.grad).all() and close(x.grad, ref_x.grad)
        assert close(conv.weight.grad, ref_w.grad)
        del y
    assert cache_info()["hits"] >= before["hits"] + 2
    # Arrays in use keep their memory; emptying the cache frees only idle blocks.
    kept = x.grad.clone()
    empty_cache()
    assert cache_info()["idle_bytes"] == 0 and torch.equal(x.grad, kept)
    with pytest.raises(ValueError, match="too large"):
        _prunekit.empty([1 << 40, 1 << 40])


def test_backward_in_one_call():
    """The module's backward runs both gradient kernels in one call: the same values as the
    two gradient functions, only the gradients asked for, and shapes checked."""
    from prunekit import _prunekit

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 9, 7, 5), dtype=np.float32)
    w = rng.standard_normal((6, 3, 3, 5), dtype=np.float32)
    dy = rng.standard_normal((2, 5, 4, 6), dtype=np.float32)  # 3x3, stride 2, padding 1
    dx, dw = _prunekit.conv2d_backward(x, w, dy, 2, 1)
    assert np.array_equal(dx, prunekit.conv2d_backward_input(dy, w, (9, 7), 2, 1))
    assert np.array_equal(dw, prunekit.conv2d_backward_weight(x, dy, (3, 3), 2, 1))
    dx_only = _prunekit.conv2d_backward(x, w, dy, 2, 1, True, False)
    assert dx_only[1] is None and np.array_equal(dx_only[0], dx)
    assert _prunekit.conv2d_backward(x, w, dy, 2, 1, False, True)[0] is None
    with pytest.raises(ValueError, match="dy has shape"):
        _prunekit.conv2d_backward(x, w, dy[:, :4].copy(), 2, 1)
    with pytest.raises(ValueError, match="input channels"):
        _prunekit.conv2d_backward(x, w[..., :4].copy(), dy, 2, 1)
    with pytest.raises(ValueError, match="float32"):
        _prunekit.conv2d_backward(x.astype(np.float64), w, dy, 2, 1)
