#!/usr/bin/env python3
"""PyTorch's ResNet50 training step, the anchor of `prunekit bench --sparsity 0` on cuda.

torchvision's resnet50, channels_last, `cudnn.benchmark`, SGD with momentum (PyTorch's
default foreach implementation); bf16 through autocast (f32 master weights, as prunekit);
every other setting PyTorch's default (cuDNN may use TF32 for float32 convolutions). Prints
one JSON object per configuration:

  python3 scripts/torch_train_step.py --batch 64,256 --precision f32,bf16 --steps 20
  python3 scripts/torch_train_step.py --batch 256 --precision bf16 --compile      # also torch.compile's step

--profile adds the device time of one step per op family, from torch.profiler's kernels,
in the families of `prunekit bench --profile`; with --against BENCH.json (the rows of
`prunekit bench --profile --json` at the same batch and precision) the two profiles are
printed side by side. --selftest checks the kernel-name classifier (no GPU needed).
"""
import argparse
import json
import re

FAMILIES = ["conv_fprop", "conv_dgrad", "conv_wgrad", "bn_forward", "bn_backward", "relu_add", "pool", "fc",
            "loss", "sgd", "cast", "layout", "other"]

# (family, pattern) in order: the first match wins. Kernel names of cuDNN 9, cuBLAS(Lt),
# CUTLASS and PyTorch's own CUDA kernels.
RULES = [
    ("layout", r"nchwToNhwc|nhwcToNchw|nchw_to_nhwc|nhwc_to_nchw"),
    ("conv_dgrad", r"dgrad"),
    ("conv_wgrad", r"wgrad"),
    ("conv_fprop", r"fprop|convolve|winograd|implicit_gemm|conv2d|convolution"),
    ("bn_backward", r"batch_norm_backward|bn_bw|batchnorm_bwd|bn_backward"),
    ("bn_forward", r"batch_norm|bn_fw|batchnorm_fwd|welford"),
    ("sgd", r"multi_tensor_apply|foreach|[Ss]gd"),
    ("loss", r"log_softmax|nll_loss|cross_entropy|[Ss]oft[Mm]ax"),
    ("pool", r"max_pool|MaxPool|avg_pool|AvgPool|adaptive|MeanOps"),
    ("fc", r"gemm|gemv|Kernel2|cublas|cutlass|splitKreduce"),
    ("relu_add", r"threshold|clamp|relu|CUDAFunctor_add|AddFunctor|add_kernel"),
    ("cast", r"copy_kernel|bfloat16_copy|to_copy|direct_copy"),
]


def family(kernel_name):
    for fam, pat in RULES:
        if re.search(pat, kernel_name):
            return fam
    return "other"


def selftest():
    cases = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "conv_fprop",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "conv_dgrad",
        "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv_wgrad",
        "cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5_nhwc>": "conv_fprop",
        "void cudnn::cnn::wgrad_alg0_engine<float, 128, 5, 5, 3, 3, 3, false, 512>": "conv_wgrad",
        "void at::native::batch_norm_collect_statistics_channels_last_kernel<...>": "bn_forward",
        "void at::native::batch_norm_transform_input_channels_last_kernel<...>": "bn_forward",
        "void at::native::batch_norm_backward_reduce_channels_last_kernel<...>": "bn_backward",
        "void at::native::batch_norm_backward_elemt_channels_last_kernel<...>": "bn_backward",
        "void cudnn::bn_fw_tr_1C11_singleread_fp16<...>": "bn_forward",
        "void cudnn::bn_bw_1C11_singleread_fp16<...>": "bn_backward",
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::launch_clamp_scalar": "relu_add",
        "void at::native::vectorized_elementwise_kernel<4, at::native::threshold_kernel_impl<c10::BFloat16>": "relu_add",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>": "relu_add",
        "void at::native::(anonymous namespace)::max_pool_forward_nhwc<c10::BFloat16, float>": "pool",
        "void at::native::(anonymous namespace)::max_pool_backward_nhwc<c10::BFloat16>": "pool",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::MeanOps<float, float>": "pool",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "fc",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "fc",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, c10::BFloat16, float>": "loss",
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<3>": "sgd",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)": "cast",
        "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda": "cast",
        "void nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, true, false, (cudnnKernelDataType_t)2>": "layout",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>": "other",
    }
    bad = [(n, family(n), want) for n, want in cases.items() if family(n) != want]
    for n, got, want in bad:
        print(f"FAIL {n}: {got}, want {want}")
    print(f"classifier: {len(cases) - len(bad)}/{len(cases)} kernel names in the right family")
    return not bad


def build(batch, size, precision, compile_, classes=1000):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=classes).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")
    model.train()
    fwd = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()

    return step


def step_ms(step, steps, warmup):
    from torch_conv import timer  # CUDA events after the warm-up, as the convolutions' anchor

    return timer("cuda", warmup, steps)(step)


def profile_families(step, steps=3):
    """Device ms per family per step over `steps` profiled steps, and the largest kernels
    the classifier put in `other`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    fam = {f: 0.0 for f in FAMILIES}
    other = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        f = family(e.name)
        fam[f] += us / 1e3 / steps
        if f == "other":
            other[e.name] = other.get(e.name, 0.0) + us / 1e3 / steps
    top = sorted(other.items(), key=lambda kv: -kv[1])[:8]
    return fam, [[n[:120], ms] for n, ms in top]


def side_by_side(torch_fams, bench_json):
    rows = json.load(open(bench_json))
    dense = next(r for r in rows if r.get("sparsity", 0) == 0 and r.get("profile"))
    ours = {f["family"]: f["ms"] for f in dense["profile"]["families"]}
    print(f"{'family':<12} {'prunekit ms':>12} {'torch ms':>10} {'ratio':>7}   (per step; ratio = torch / prunekit)")
    for f in FAMILIES:
        a, b = ours.get(f, 0.0), torch_fams.get(f, 0.0)
        if a == 0 and b == 0:
            continue
        r = f"{b / a:.2f}" if a > 0 and b > 0 else "-"
        print(f"{f:<12} {a:>12.2f} {b:>10.2f} {r:>7}")
    a, b = sum(ours.values()), sum(torch_fams.values())
    print(f"{'all kernels':<12} {a:>12.2f} {b:>10.2f} {b / a if a else float('nan'):>7.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="32,64,128,256")
    p.add_argument("--precision", default="f32,bf16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile's step")
    p.add_argument("--profile", action="store_true", help="device time per op family (torch.profiler)")
    p.add_argument("--against", help="prunekit bench --profile --json rows, printed side by side")
    p.add_argument("--selftest", action="store_true")
    a = p.parse_args()
    if a.selftest:
        raise SystemExit(0 if selftest() else 1)
    import torch

    torch.backends.cudnn.benchmark = True
    for precision in a.precision.split(","):
        for batch in (int(b) for b in a.batch.split(",")):
            for compiled in [False, True] if a.compile else [False]:
                row = {"batch": batch, "precision": precision, "size": a.size, "compiled": compiled,
                       "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                       "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
                try:
                    step = build(batch, a.size, precision, compiled)
                    ms = step_ms(step, a.steps, a.warmup)
                    row.update(step_ms=ms, images_per_s=batch / (ms / 1e3))
                    if a.profile and not compiled:
                        row["families_ms"], row["other_top"] = profile_families(step)
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                print(json.dumps(row), flush=True)
                if a.against and "families_ms" in row:
                    side_by_side(row["families_ms"], a.against)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
