"""prunekit.torch.Conv2d on a kernel device's tensors through DLPack: the CUDA kernels in
the host emulation on CPU tensors (every CI run; float32, bfloat16, float16, autocast),
and on CUDA tensors against cuDNN when a GPU is present (the GPU bundle)."""

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


def close16(got: torch.Tensor, want: torch.Tensor, reduction: int) -> bool:
    """A 16-bit result against float32 math on the same (rounded) operands: the bound of
    the Rust kernel tests, scaled by the reduction length."""
    got, want = got.float().cpu(), want.float().cpu()
    tol = 2e-3 * reduction**0.5 + 8e-3 * want.abs()
    return bool(((got - want).abs() <= tol * max(1.0, want.abs().max().item() ** 0.5)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_emulated_16_bit_tensors(shape, dtype):
    """bfloat16 and float16 tensors run the tensor-core kernels; the weight gradient is
    computed in float32 and comes back in the weight's type."""
    n, c, h, w, k, r, stride, pad = shape
    g = torch.Generator().manual_seed(7 + sum(shape))
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    conv = Conv2d(c, k, r, stride=stride, padding=pad, kernels="emu")
    with torch.no_grad():
        conv.weight.copy_(torch.randn(k, c, r, r, generator=g))
    conv = conv.to(dtype)
    y = conv(x)
    assert y.dtype == dtype
    xf = x.detach().float().requires_grad_(True)
    wf = conv.weight.detach().float().requires_grad_(True)
    ref = F.conv2d(xf, wf, stride=stride, padding=pad)
    assert close16(y.detach(), ref.detach(), c * r * r), f"{shape} {dtype}: forward"
    dy = torch.randn(ref.shape, generator=g).to(dtype)
    y.backward(dy)
    ref.backward(dy.float())
    assert x.grad.dtype == dtype and conv.weight.grad.dtype == dtype
    assert close16(x.grad, xf.grad, k * r * r), f"{shape} {dtype}: input gradient"
    assert close16(conv.weight.grad, wf.grad, n * h * w), f"{shape} {dtype}: weight gradient"


def test_autocast_runs_16_bit_and_keeps_float32_weights():
    torch.manual_seed(5)
    conv = Conv2d(8, 16, 3, padding=1, bias=True, kernels="emu")
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    ref = F.conv2d(x.bfloat16().float(), conv.weight.detach().bfloat16().float(), conv.bias.detach(), padding=1)
    assert close16(y.detach(), ref, 8 * 9)
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


def test_dlpack_refusals():
    x = torch.randn(1, 4, 6, 6)
    conv = Conv2d(4, 8, 3, kernels="emu")
    with pytest.raises(ValueError, match="kernels='tpu'"):
        Conv2d(4, 8, 3, kernels="tpu")
    with pytest.raises(ValueError, match="float32 or torch.bfloat16 or torch.float16"):
        conv(x.double())
    with pytest.raises(ValueError, match="of one type"):
        conv(x.bfloat16())  # the weight is float32
    with pytest.raises(ValueError, match="take torch.float32"):
        Conv2d(4, 8, 3)(x.bfloat16())  # the CPU kernels: float32 only
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
    with pytest.raises(ValueError, match="dw is float32"):
        _prunekit.conv2d_dlpack("wgrad", xn.__dlpack__(), y.__dlpack__(), wn.bfloat16().__dlpack__(), 1, 0, "emu")
    with pytest.raises(ValueError, match="the inputs take one type"):
        _prunekit.conv2d_dlpack("fprop", xn.bfloat16().__dlpack__(), wn.__dlpack__(), y.__dlpack__(), 1, 0, "emu")
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
def test_cuda_autocast_bfloat16():
    torch.manual_seed(11)
    conv = Conv2d(64, 128, 3, stride=2, padding=1).cuda()
    x = torch.randn(4, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    ref = F.conv2d(x.bfloat16().float(), conv.weight.detach().bfloat16().float(), stride=2, padding=1)
    assert close16(y.detach(), ref, 64 * 9)
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


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
