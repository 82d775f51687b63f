"""A/B of prunekit.torch.Conv2d's backward on the CPU: "new" (the module as shipped: both
gradient kernels in one call, _prunekit.conv2d_backward) against "old" (the former
backward, re-implemented here: two calls, outputs from _prunekit.empty) and "out=" (the two
kernels on preallocated arrays, no autograd). Calls alternate; medians of 22 per variant.

  python3 backward_one_call_ab.py BATCH SIZE      # e.g. 8 112
"""
import torch, time, numpy as np, prunekit, sys
import prunekit.torch as pt
from prunekit import _prunekit
pc = time.perf_counter
def _empty(shape): return torch.from_numpy(_prunekit.empty(list(shape)))
class Old(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        xn = x.detach().permute(0, 2, 3, 1).contiguous(); wn = weight.detach().permute(0, 2, 3, 1).contiguous()
        y = torch.from_numpy(_prunekit.conv2d(xn.numpy(), wn.numpy(), stride, padding))
        ctx.save_for_backward(xn, wn); ctx.conf = (stride, padding)
        return y.permute(0, 3, 1, 2)
    @staticmethod
    def backward(ctx, dy):
        xn, wn = ctx.saved_tensors
        stride, padding = ctx.conf
        (h, w), (r, s) = xn.shape[1:3], wn.shape[1:3]
        dyn = dy.permute(0, 2, 3, 1).contiguous()
        dx = _empty(xn.shape)
        _prunekit.conv2d_backward_input(dyn.numpy(), wn.numpy(), (h, w), stride, padding, out=dx.numpy())
        dx = dx.permute(0, 3, 1, 2)
        dw = _empty(wn.shape)
        _prunekit.conv2d_backward_weight(xn.numpy(), dyn.numpy(), (r, s), stride, padding, out=dw.numpy())
        dw = dw.to(wn.dtype).permute(0, 3, 1, 2)
        return dx, dw, None, None
LAYERS = [(3, 64, 7, 2, 3, 1), (64, 64, 3, 1, 1, 4), (256, 64, 1, 1, 0, 4), (128, 128, 3, 2, 1, 4), (512, 256, 1, 1, 0, 8), (1024,2048,1,2,0,16)]
B, S = int(sys.argv[1]), int(sys.argv[2])
tot = {}
for c,k,r,st,pad,div in LAYERS:
    conv = pt.Conv2d(c,k,r,stride=st,padding=pad); h = S//div
    xt = torch.randn(B,h,h,c).permute(0,3,1,2).requires_grad_(True)
    y = conv(xt); yo = Old.apply(xt, conv.weight, st, pad)
    dyt = torch.randn(*y.permute(0,2,3,1).shape).permute(0,3,1,2)
    xn, wn, dyn = xt.detach().permute(0,2,3,1).numpy(), conv.weight.detach().permute(0,2,3,1).numpy(), dyt.permute(0,2,3,1).numpy()
    dxb, dwb = np.empty_like(xn), np.empty_like(wn)
    def direct():
        _prunekit.conv2d_backward_input(dyn, wn, (h,h), st, pad, dxb); _prunekit.conv2d_backward_weight(xn, dyn, (r,r), st, pad, dwb)
    fs = {"out=": direct, "old": lambda: torch.autograd.grad(yo, (xt, conv.weight), dyt, retain_graph=True),
          "new": lambda: torch.autograd.grad(y, (xt, conv.weight), dyt, retain_graph=True)}
    res = {kk: [] for kk in fs}
    for i in range(25):
        for kk, f in fs.items():
            t=pc(); f(); res[kk].append(pc()-t)
    med = {kk: np.median(v[3:])*1e3 for kk,v in res.items()}
    for kk in med: tot[kk] = tot.get(kk,0)+med[kk]
    print((c,k,r,st,h), {kk: round(v,3) for kk,v in med.items()})
print({kk: round(v/tot["out="],3) for kk,v in tot.items()})
