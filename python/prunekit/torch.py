"""PyTorch glue for prunekit: modules with the kept widths, and ``Conv2d``, an
``nn.Module`` whose forward and backward run prunekit's convolution kernels (the CPU
kernels on CPU tensors, the CUDA kernels on CUDA tensors).

Nothing here computes: the shapes come from prunekit's pruned state dicts, and the
convolutions from ``prunekit.conv2d`` and its two gradients on the CPU, or from the kernel
device's passes on the tensors' own memory through DLPack (NCHW tensors are handed to the
NHWC kernels as channels-last views where their memory already is, else one copy).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _prunekit

__all__ = ["Conv2d", "convert", "resize_like", "module_from_state", "check_bottleneck_resnet", "empty_cache", "cache_info"]


def check_bottleneck_resnet(module: nn.Module) -> None:
    """Raises ``ValueError`` unless ``module`` is shaped like torchvision's bottleneck
    ResNet (conv1, bn1, layer1..layer4 of blocks with conv1..conv3, fc)."""
    missing = [n for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc") if not hasattr(module, n)]
    if missing:
        raise ValueError(
            f"{type(module).__name__} is not a torchvision ResNet: it has no {', '.join(missing)} "
            "(prunekit prunes the bottleneck family: resnet50, resnet101, resnet152, wide_resnet50_2, ...)"
        )
    for s in range(1, 5):
        for i, block in enumerate(getattr(module, f"layer{s}")):
            if not hasattr(block, "conv3"):
                raise ValueError(
                    f"layer{s}.{i} is a {type(block).__name__}, not a Bottleneck: prunekit prunes the bottleneck "
                    "ResNets (resnet50, resnet101, resnet152, ...), not resnet18/34"
                )


def _parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    *path, last = name.split(".")
    m = root
    for p in path:
        m = getattr(m, p)
    return m, last


def resize_like(module: nn.Module, state: Mapping[str, torch.Tensor], copy_tensors: bool = True) -> nn.Module:
    """A copy of ``module`` whose convolutions, batch norms and linear layers have the
    shapes of ``state`` (e.g. a pruned state dict), holding copies of ``state``'s tensors
    (every parameter and buffer must be in it), or ``state``'s tensors themselves with
    ``copy_tensors=False`` where they are on the module's device (the module then shares their
    memory, as a ``state_dict()`` shares its module's). Strides, paddings, eps, momentum,
    bias flags, ``requires_grad`` and the training mode are kept; the original module is
    left as it was. The copy is made without copying (or initialising) the original's
    parameters: its structure is copied with empty "meta" tensors, which ``state`` then
    replaces."""
    memo: Dict[int, Any] = {}
    device = torch.device("cpu")
    for t in itertools.chain(module.parameters(), module.buffers()):
        device = t.device
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    new = copy.deepcopy(module, memo)
    for name, m in list(new.named_modules()):
        w = state.get(f"{name}.weight")
        if w is None:
            continue
        if isinstance(m, nn.Conv2d) and tuple(w.shape) != tuple(m.weight.shape):
            o, i, kh, kw = w.shape
            if m.groups != 1:
                raise ValueError(f"{name}: grouped convolutions cannot be resized")
            repl: nn.Module = nn.Conv2d(
                i, o, (kh, kw), stride=m.stride, padding=m.padding, dilation=m.dilation,
                bias=m.bias is not None, padding_mode=m.padding_mode, device="meta", dtype=m.weight.dtype,
            )
        elif isinstance(m, nn.BatchNorm2d) and w.shape[0] != m.num_features:
            repl = nn.BatchNorm2d(
                w.shape[0], eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats, device="meta", dtype=m.weight.dtype,
            )
        elif isinstance(m, nn.Linear) and tuple(w.shape) != tuple(m.weight.shape):
            repl = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device="meta", dtype=m.weight.dtype)
        else:
            continue
        repl.train(m.training)
        for n, p in repl.named_parameters():
            p.requires_grad_(getattr(m, n).requires_grad)
        parent, attr = _parent(new, name)
        setattr(parent, attr, repl)
    new.load_state_dict({k: v.to(device, copy=copy_tensors) for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in itertools.chain(new.named_parameters(), new.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the state has no tensor for {', '.join(left)}")
    return new


def module_from_state(state: Mapping[str, Any], layers: Optional[Sequence[int]] = None) -> nn.Module:
    """A torchvision bottleneck ResNet with the shapes of ``state`` (dense, pruned or of
    another base width, as ``prunekit.init_weights`` makes) and its tensors loaded.
    ``keep.*`` entries are ignored. Needs torchvision."""
    import numpy as np
    from torchvision.models.resnet import Bottleneck, ResNet

    tensors = {
        k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, order="C")))
        for k, v in state.items()
        if not k.startswith("keep.")
    }
    info = _prunekit.flops({k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}, 224)
    layers = list(layers) if layers is not None else list(info["layers"])
    template = ResNet(Bottleneck, layers, num_classes=int(info["classes"]))
    return resize_like(template, tensors)


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1 if stride > 0 else 0


def empty_cache() -> None:
    """Frees the memory that prunekit keeps for reuse. ``Conv2d``'s outputs and gradients
    (and ``prunekit.conv2d``'s new arrays) take memory from an idle list, to which it returns
    when they are freed, as PyTorch's caching allocator does for CUDA memory: a training loop
    asks for the same sizes every step, and memory already mapped saves the page faults of
    fresh allocations. The list holds at most 1 GiB; tensors in use are not affected."""
    _prunekit.empty_buffer_cache()


def cache_info() -> Dict[str, int]:
    """The reuse cache: ``idle_bytes`` and ``idle_blocks`` kept for reuse, ``hits`` (requests
    served from it) and ``misses`` (new allocations of a cached size class)."""
    b, n, h, m = _prunekit.buffer_cache()
    return {"idle_bytes": b, "idle_blocks": n, "hits": h, "misses": m}


def _dlpack(pass_: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, stride: int, padding: int, kernels: str) -> None:
    """One pass of a kernel device's convolution, in place on the tensors' memory (DLPack).
    The capsules are made for the kernels' stream, and PyTorch's current stream then waits
    for the kernels."""
    stream = _prunekit.device_stream(kernels)
    caps = [t.__dlpack__(stream=stream) if stream is not None else t.__dlpack__() for t in (a, b, out)]
    current = torch.cuda.current_stream(out.device).cuda_stream if out.is_cuda else None
    _prunekit.conv2d_dlpack(pass_, *caps, stride, padding, kernels, current)


class _ConvFunction(torch.autograd.Function):
    """prunekit's convolution as an autograd function (NCHW at the boundary): the CPU
    kernels on numpy views of CPU tensors, a kernel device's (``cuda:N``, or ``emu``) on the
    tensors' memory through DLPack."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, kernels: str
    ) -> torch.Tensor:
        """y = conv(x, weight); saves the NHWC input and KRSC weight."""
        xn = x.detach().permute(0, 2, 3, 1).contiguous()  # NHWC: a view for channels-last input
        wn = weight.detach().permute(0, 2, 3, 1).contiguous()  # KRSC: a view for channels-last weights
        if kernels == "cpu":
            # A new array from memory reused from earlier outputs (see empty_cache).
            y = torch.from_numpy(_prunekit.conv2d(xn.numpy(), wn.numpy(), stride, padding))
        else:
            (n, h, w, _), (k, r, s, _) = xn.shape, wn.shape
            p, q = _out_size(h, r, stride, padding), _out_size(w, s, stride, padding)
            # Uninitialised: the kernels overwrite every element; an empty one is refused by them.
            y = torch.empty((n, max(p, 0), max(q, 0), k), dtype=xn.dtype, device=xn.device)
            _dlpack("fprop", xn, wn, y, stride, padding, kernels)
        ctx.save_for_backward(xn, wn)
        ctx.conf = (stride, padding, kernels)
        return y.permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels-last)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        """dx and dweight with prunekit's two gradient kernels (only those asked for)."""
        xn, wn = ctx.saved_tensors
        stride, padding, kernels = ctx.conf
        dyn = dy.permute(0, 2, 3, 1).contiguous()
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if kernels == "cpu":
            # Both kernels in one call, their outputs in memory reused from earlier ones.
            dxa, dwa = _prunekit.conv2d_backward(xn.numpy(), wn.numpy(), dyn.numpy(), stride, padding, want_dx, want_dw)
            dx = None if dxa is None else torch.from_numpy(dxa)
            dw = None if dwa is None else torch.from_numpy(dwa)
        else:
            # Uninitialised: the kernels overwrite every element. wgrad writes float32 (cast
            # to a 16-bit weight's type below).
            dx = torch.empty_like(xn) if want_dx else None
            dw = torch.empty(wn.shape, dtype=torch.float32, device=wn.device) if want_dw else None
            if dx is not None:
                _dlpack("dgrad", dyn, wn, dx, stride, padding, kernels)
            if dw is not None:
                _dlpack("wgrad", xn, dyn, dw, stride, padding, kernels)
                dw = dw.to(wn.dtype)
        # NCHW views of NHWC memory; dw is OIHW in channels-last memory, as the weight.
        dx = None if dx is None else dx.permute(0, 3, 1, 2)
        dw = None if dw is None else dw.permute(0, 3, 1, 2)
        return dx, dw, None, None, None


_HALF = (torch.bfloat16, torch.float16)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The type ``torch.autocast`` casts convolutions to on ``device_type``, or ``None``."""
    if hasattr(torch, "get_autocast_dtype"):  # PyTorch 2.4 and later
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _check_kernels(kernels: Optional[str]) -> Optional[str]:
    if kernels is None or kernels in ("cpu", "emu", "cuda") or (
        kernels.startswith("cuda:") and kernels[5:].isdigit()
    ):
        return kernels
    raise ValueError(f"kernels={kernels!r}: expected None (by the tensors' device), cpu, emu, cuda or cuda:N")


def _kernels_for(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return "cpu"


def _pair(v: Union[int, Tuple[int, int]], what: str) -> int:
    if isinstance(v, tuple):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{what}: prunekit's kernels take the same {what} in both directions, got {v}")
        return int(v[0])
    return int(v)


class Conv2d(nn.Module):
    """A drop-in for ``nn.Conv2d`` (groups 1, dilation 1, square stride and padding) whose
    forward and backward run prunekit's kernels: the CPU kernels for CPU tensors
    (float32), the CUDA kernels for CUDA tensors (float32, bfloat16 or float16, and under
    ``torch.autocast`` its type; in place on the tensors' memory through DLPack, ordered on
    PyTorch's current stream). ``kernels`` overrides the choice: ``"emu"``
    runs the CUDA kernels in prunekit's host emulation on CPU tensors (slow; for tests
    without a GPU). Its weight is OIHW as PyTorch's (held in channels-last memory, which is
    the kernels' KRSC layout), so state dicts load unchanged; the bias, when there is one,
    is added by PyTorch. Inputs in channels-last memory
    (``x.to(memory_format=torch.channels_last)``) reach the kernels without a copy, and
    outputs are channels-last."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[int, Tuple[int, int]] = 0,
        bias: bool = False,
        kernels: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.kernels = _check_kernels(kernels)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        ref = nn.Conv2d(in_channels, out_channels, (kh, kw), bias=bias)  # PyTorch's initialisation
        # OIHW, in channels-last memory: KRSC, the kernels' layout, without a copy per call.
        self.weight = nn.Parameter(ref.weight.detach().contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, kernels: Optional[str] = None) -> "Conv2d":
        """A prunekit ``Conv2d`` with ``conv``'s settings and (shared) parameters."""
        if conv.groups != 1 or conv.dilation not in ((1, 1), 1) or conv.padding_mode != "zeros":
            raise ValueError("prunekit's Conv2d takes groups=1, dilation=1 and zero padding")
        if isinstance(conv.padding, str):
            raise ValueError("prunekit's Conv2d takes a numeric padding, not 'same'/'valid'")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.kernels = _check_kernels(kernels)
        new.in_channels, new.out_channels = conv.in_channels, conv.out_channels
        new.kernel_size = tuple(conv.kernel_size)
        new.stride = _pair(tuple(conv.stride), "stride")
        new.padding = _pair(tuple(conv.padding), "padding")
        # The shared weight moves to channels-last memory (KRSC), the kernels' layout.
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of NCHW ``x``: prunekit's CPU kernels for a CPU tensor (float32),
        its CUDA kernels for a CUDA tensor (float32, bfloat16, float16; on the tensor's device
        and PyTorch's current stream), or the kernels named by ``kernels``."""
        if x.dim() != 4:
            raise ValueError(f"prunekit's Conv2d takes NCHW input, got rank {x.dim()}")
        if x.device != self.weight.device:
            raise ValueError(f"the input is on {x.device}, the weight on {self.weight.device}")
        kernels = self.kernels or _kernels_for(x.device)
        want = "cuda" if kernels.startswith("cuda") else "cpu"
        if x.device.type != want:
            raise ValueError(f"prunekit's {kernels} kernels take {want} tensors, got a {x.device.type} tensor")
        weight = self.weight
        t = _autocast_dtype(x.device.type) if kernels != "cpu" else None
        if t in _HALF:
            # As autocast runs nn.Conv2d: both operands in the autocast type (the cast of
            # the weight is differentiable, so its gradient reaches the float32 weight).
            x, weight = x.to(t), weight.to(t)
        allowed = (torch.float32,) if kernels == "cpu" else (torch.float32,) + _HALF
        if x.dtype not in allowed or weight.dtype != x.dtype:
            raise ValueError(
                f"prunekit's {kernels} kernels take {' or '.join(str(a) for a in allowed)} input and weight of one "
                f"type, got input {x.dtype}, weight {weight.dtype}"
            )
        with torch.autocast(x.device.type, enabled=False):
            y = _ConvFunction.apply(x, weight, self.stride, self.padding, kernels)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}"
        )


def convert(module: nn.Module, kernels: Optional[str] = None) -> nn.Module:
    """Replaces every ``nn.Conv2d`` of ``module`` (in place) by a prunekit ``Conv2d``
    sharing its parameters (``kernels`` as ``Conv2d`` takes it); returns ``module``."""
    for name, m in list(module.named_modules()):
        if isinstance(m, nn.Conv2d):
            parent, attr = _parent(module, name) if name else (None, "")
            if parent is None:
                return Conv2d.from_torch(m, kernels)
            setattr(parent, attr, Conv2d.from_torch(m, kernels))
    return module
