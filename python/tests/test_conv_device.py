"""prunekit.torch.Conv2d on a kernel device's tensors through DLPack: the CUDA kernels in
the host emulation on CPU tensors (every CI run), and on CUDA tensors against cuDNN when
a GPU is present (the GPU bundle)."""

import pytest
import torch
import torch.nn.functional as F

from prunekit import _prunekit
from prunekit.torch import Conv2d, convert

# (batch, channels in, height, width, filters, kernel, stride, padding): odd sizes, the
# stem's 7x7 stride 2, 3x3 stride 2, 1x1 stride 1 and 2, batch 1.
SHAPES = [
    (1, 3, 13, 11, 8, 7, 2, 3),
    (2, 5, 7, 7, 13, 3, 1, 1),
    (1, 27, 9, 7, 5, 3, 2, 1),
    (2, 13, 7, 9, 27, 1, 2, 0),
    (2, 24, 5, 5, 40, 1, 1, 0),
]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = b.abs().max().item()
    return torch.allclose(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-5 * max(scale, 1e-30) + 1e-6)


def check(shape, device, kernels, channels_last):
    n, c, h, w, k, r, stride, pad = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device).requires_grad_(True)
    conv = Conv2d(c, k, r, stride=stride, padding=pad, kernels=kernels)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(k, c, r, r, generator=g))
    conv = conv.to(device)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = conv.weight.detach().clone().requires_grad_(True)
    y = conv(x)
    ref = F.conv2d(ref_x, ref_w, stride=stride, padding=pad)
    assert y.shape == ref.shape and y.device == ref.device
    assert close(y.detach(), ref.detach()), f"{shape}: forward"
    dy = torch.randn(ref.shape, generator=g).to(device)
    y.backward(dy)
    ref.backward(dy)
    assert close(x.grad, ref_x.grad), f"{shape}: input gradient"
    assert close(conv.weight.grad, ref_w.grad), f"{shape}: weight gradient"


@pytest.mark.parametrize("shape", SHAPES)
def test_emulated_kernels_through_dlpack(shape):
    check(shape, "cpu", "emu", channels_last=shape[0] == 2)


def test_dlpack_refusals():
    x = torch.randn(1, 4, 6, 6)
    conv = Conv2d(4, 8, 3, kernels="emu")
    with pytest.raises(ValueError, match="kernels='tpu'"):
        Conv2d(4, 8, 3, kernels="tpu")
    with pytest.raises(ValueError, match="float32"):
        conv(x.double())
    # The kernels' own checks: a kernel larger than the padded input.
    with pytest.raises(ValueError, match="does not fit the padded 6x6 input"):
        Conv2d(4, 8, 7, kernels="emu")(x)
    with pytest.raises(ValueError, match="take cuda tensors"):
        Conv2d(4, 8, 3, kernels="cuda:0")(x)
    # The binding's checks on capsules.
    xn = x.permute(0, 2, 3, 1).contiguous()
    wn = torch.randn(8, 3, 3, 4)
    y = torch.empty(1, 4, 4, 8)
    with pytest.raises(ValueError, match="DLPack capsule"):
        _prunekit.conv2d_dlpack("fprop", xn, wn.__dlpack__(), y.__dlpack__(), 1, 0, "emu")
    with pytest.raises(ValueError, match="not dense in NHWC"):
        _prunekit.conv2d_dlpack("fprop", x.permute(0, 2, 3, 1).__dlpack__(), wn.__dlpack__(), y.__dlpack__(), 1, 0, "emu")
    with pytest.raises(ValueError, match="shares memory"):
        _prunekit.conv2d_dlpack("fprop", xn.__dlpack__(), torch.randn(4, 1, 1, 4).__dlpack__(), xn.__dlpack__(), 1, 0, "emu")
    with pytest.raises(ValueError, match="output"):
        _prunekit.conv2d_dlpack("fprop", xn.__dlpack__(), wn.__dlpack__(), torch.empty(1, 5, 4, 8).__dlpack__(), 1, 0, "emu")
    with pytest.raises(ValueError, match="unknown pass"):
        _prunekit.conv2d_dlpack("sideways", xn.__dlpack__(), wn.__dlpack__(), y.__dlpack__(), 1, 0, "emu")
    with pytest.raises(ValueError, match="DLPack tensors run on"):
        _prunekit.conv2d_dlpack("fprop", xn.__dlpack__(), wn.__dlpack__(), y.__dlpack__(), 1, 0, "cpu")
    # The module converted with the emulated kernels still matches PyTorch.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    z = torch.randn(2, 3, 9, 9)
    ref = net(z)
    assert close(convert(net, kernels="emu")(z).detach(), ref.detach())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by the GPU bundle)")


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_tensors_run_the_cuda_kernels(shape):
    torch.backends.cudnn.allow_tf32 = False  # the reference in full float32
    check(shape, "cuda", None, channels_last=True)
    check(shape, "cuda", None, channels_last=False)


@needs_cuda
def test_cuda_kernels_follow_a_side_stream():
    """Work queued on a non-default PyTorch stream before and after the convolution is
    ordered with the kernels: the input written just before is read, the output read just
    after is complete."""
    torch.backends.cudnn.allow_tf32 = False
    s = torch.cuda.Stream()
    conv = Conv2d(64, 64, 3, padding=1).cuda()
    with torch.cuda.stream(s):
        x = torch.zeros(8, 64, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
        for _ in range(20):  # a long queue of work ahead of the kernels
            x.add_(0.05)
        y = conv(x)
        total = y.sum()
    torch.cuda.synchronize()
    ref = F.conv2d(torch.full((8, 64, 56, 56), 1.0, device="cuda"), conv.weight.detach(), padding=1)
    assert torch.allclose(total, ref.sum(), rtol=1e-4)
