//! The fused ops of the training step (`prunekit::ops::fused`) against the unfused
//! sequences they replace, at a ResNet50 stage-1 shape (conv3 of a bottleneck: 1x1,
//! 64 -> 256 channels on 56x56, and its filters-0.5 pruned twin 32 -> 256), on the CPU and,
//! where there is one, on the GPU (`cuda:0`):
//! - `conv_bn_relu`: conv fprop + BN train forward + ReLU (the bn1/bn2 pattern);
//! - `block_end`: conv fprop + BN train forward + residual add + ReLU (the bn3 pattern);
//!   `block_end_bn_input`: the same with the previous BN + ReLU applied to x, written out
//!   first (unfused) or as the conv loads it (what a train step runs on a kernel device).
//! - `residual_grad` (group `fused_layer1_conv1_dgrad_*`): conv1's dgrad plus the
//!   shortcut's gradient, into a temporary and added, against `conv2d_dgrad_accumulate`.
//! - `bn_grad` (group `fused_layer1_conv3_dgrad_bn2_*`): conv3's dgrad then bn2's backward
//!   through its ReLU (reduction and dx pass), against the dgrad taking the reduction's
//!   sums in its epilogue (`conv2d_dgrad_bn_sums`) then the dx pass alone.
//! - `bn_input` (group `fused_layer1_conv3_input_*`): BN apply + ReLU of the previous conv's
//!   output, then conv3's fprop and wgrad on it (unfused: `bn_apply_saved` writes the
//!   activation, both passes read it), against both passes applying the BN as they load x
//!   (`conv2d_fprop_bn_input`, `conv2d_wgrad_bn_input`).
//!
//! GPU timings are CUDA events around a batch of launches. Batch sizes: 256 on the GPU;
//! on the CPU `PK_BENCH_CPU_BATCH` (default 2).
//!
//! ```sh
//! cargo bench --bench fused
//! cargo bench --bench fused -- cuda
//! ```

use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use prunekit::gpu::Elem;
use prunekit::ops::conv::{self, ConvElem};
use prunekit::ops::fused;
use prunekit::ops::layers::{self as layers, BnInput, BnLayer, LayerElem};
use prunekit::shape::ConvShape;
use prunekit::{Buf, Device};

mod common;

use common::bench;

fn devices() -> Vec<(Device, usize)> {
    common::devices("fused", 2)
}

fn filled<T: ConvElem>(dev: &Device, n: usize, seed: u32, lo: f32, hi: f32) -> Buf<T> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    let v: Vec<T> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            T::from_f32(lo + (hi - lo) * ((s >> 8) as f32 / (1u32 << 24) as f32))
        })
        .collect();
    dev.upload(v).unwrap()
}

fn fused_benches<T: ConvElem + LayerElem>(c: &mut Criterion) {
    for (what, cin) in [("dense", 64), ("filters0.5", 32)] {
        let mut g = c.benchmark_group(format!("fused_layer1_conv3_{what}_{}", <T as Elem>::NAME));
        g.sample_size(10);
        for (dev, batch) in devices() {
            let sh = ConvShape { n: batch, h: 56, w: 56, c: cin, k: 256, r: 1, s: 1, stride: 1, pad: 0 };
            let (m, k) = (batch * 56 * 56, sh.k);
            let x = filled::<T>(&dev, sh.x_len(), 1, 0.0, 1.0);
            let w = filled::<T>(&dev, sh.w_len(), 2, -0.1, 0.1);
            let res = filled::<T>(&dev, sh.y_len(), 3, -1.0, 1.0);
            let gamma = dev.upload(vec![1.0f32; k]).unwrap();
            let beta = dev.zeros::<f32>(k).unwrap();
            let mut rm = dev.zeros::<f32>(k).unwrap();
            let mut rv = dev.upload(vec![1.0f32; k]).unwrap();
            let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
            let mut out = dev.uninit::<T>(sh.y_len()).unwrap();
            let mut tmp = dev.uninit::<T>(sh.y_len()).unwrap();
            let (mut sm, mut si) = (dev.uninit::<f32>(k).unwrap(), dev.uninit::<f32>(k).unwrap());
            let (mut dg, mut db) = (dev.uninit::<f32>(k).unwrap(), dev.uninit::<f32>(k).unwrap());
            let mut bn = BnLayer {
                c: k,
                gamma: &gamma,
                beta: &beta,
                running_mean: &mut rm,
                running_var: &mut rv,
                save_mean: &mut sm,
                save_invstd: &mut si,
                dgamma: &mut dg,
                dbeta: &mut db,
                momentum: 0.1,
                eps: 1e-5,
            };
            bench(&mut g, &format!("conv_bn_relu_unfused/m{m}"), &dev, || {
                conv::conv2d_fprop(&dev, &sh, &x, &w, &mut y).unwrap();
                layers::bn_forward_train(&dev, m, &y, &mut bn, true, &mut out).unwrap();
            });
            bench(&mut g, &format!("conv_bn_relu_fused/m{m}"), &dev, || {
                fused::conv_bn_forward_train(&dev, &sh, &x, None, &w, &mut y, &mut bn, None, true, &mut out).unwrap();
            });
            bench(&mut g, &format!("block_end_unfused/m{m}"), &dev, || {
                conv::conv2d_fprop(&dev, &sh, &x, &w, &mut y).unwrap();
                layers::bn_forward_train(&dev, m, &y, &mut bn, false, &mut tmp).unwrap();
                layers::add_relu(&dev, &tmp, &res, &mut out).unwrap();
            });
            bench(&mut g, &format!("block_end_fused/m{m}"), &dev, || {
                fused::conv_bn_forward_train(&dev, &sh, &x, None, &w, &mut y, &mut bn, Some(&res), true, &mut out)
                    .unwrap();
            });
            // As a train step runs conv3 on a kernel device: x is conv2's raw output, bn2 +
            // ReLU applied as the conv loads it (the unfused twin: bn2's apply, then the
            // fused block end above).
            let ones = dev.upload(vec![1.0f32; cin]).unwrap();
            let (beta_in, mean_in) = (dev.upload(vec![0.1f32; cin]).unwrap(), dev.upload(vec![0.5f32; cin]).unwrap());
            let bn_in = BnInput { c: cin, gamma: &ones, beta: &beta_in, mean: &mean_in, invstd: &ones, relu: true };
            let mut a = dev.uninit::<T>(sh.x_len()).unwrap();
            bench(&mut g, &format!("block_end_bn_input_unfused/m{m}"), &dev, || {
                layers::bn_apply_saved(&dev, m, &x, &bn_in, None, &mut a).unwrap();
                fused::conv_bn_forward_train(&dev, &sh, &a, None, &w, &mut y, &mut bn, Some(&res), true, &mut out)
                    .unwrap();
            });
            bench(&mut g, &format!("block_end_bn_input_fused/m{m}"), &dev, || {
                let b = Some(&bn_in);
                fused::conv_bn_forward_train(&dev, &sh, &x, b, &w, &mut y, &mut bn, Some(&res), true, &mut out)
                    .unwrap();
            });
        }
        g.finish();
    }
}

/// conv3 of layer1 reading bn2 + ReLU of conv2's raw output: apply, fprop, wgrad, unfused
/// and with the BN in both passes' loads.
fn bn_input_benches<T: ConvElem + LayerElem>(c: &mut Criterion) {
    for (what, cin) in [("dense", 64), ("filters0.5", 32)] {
        let mut g = c.benchmark_group(format!("fused_layer1_conv3_input_{what}_{}", <T as Elem>::NAME));
        g.sample_size(10);
        for (dev, batch) in devices() {
            let sh = ConvShape { n: batch, h: 56, w: 56, c: cin, k: 256, r: 1, s: 1, stride: 1, pad: 0 };
            let m = batch * 56 * 56;
            let x = filled::<T>(&dev, sh.x_len(), 1, -1.0, 2.0);
            let w = filled::<T>(&dev, sh.w_len(), 2, -0.1, 0.1);
            let dy = filled::<T>(&dev, sh.y_len(), 3, -1.0, 1.0);
            let gamma = dev.upload(vec![1.0f32; cin]).unwrap();
            let beta = dev.upload(vec![0.1f32; cin]).unwrap();
            let mean = dev.upload(vec![0.5f32; cin]).unwrap();
            let invstd = dev.upload(vec![1.5f32; cin]).unwrap();
            let mut a = dev.uninit::<T>(sh.x_len()).unwrap();
            let mut y = dev.uninit::<T>(sh.y_len()).unwrap();
            let mut dw = dev.uninit::<f32>(sh.w_len()).unwrap();
            let bn = BnInput { c: cin, gamma: &gamma, beta: &beta, mean: &mean, invstd: &invstd, relu: true };
            bench(&mut g, &format!("bn_input_unfused/m{m}"), &dev, || {
                layers::bn_apply_saved(&dev, m, &x, &bn, None, &mut a).unwrap();
                conv::conv2d_fprop(&dev, &sh, &a, &w, &mut y).unwrap();
                conv::conv2d_wgrad(&dev, &sh, &a, &dy, &mut dw).unwrap();
            });
            bench(&mut g, &format!("bn_input_fused/m{m}"), &dev, || {
                fused::conv2d_fprop_bn_input(&dev, &sh, &x, &bn, &w, &mut y).unwrap();
                fused::conv2d_wgrad_bn_input(&dev, &sh, &x, &bn, &dy, &mut dw).unwrap();
            });
        }
        g.finish();
    }
}

/// The gradient of an identity block's input: conv1's dgrad (1x1, 64 -> 256 channels at
/// 56x56, and the filters-0.5 twin 32 -> 256) plus the shortcut's gradient, as a dgrad into
/// a temporary and an add pass, against the dgrad adding as it stores.
fn residual_grad_benches<T: ConvElem + LayerElem>(c: &mut Criterion) {
    for (what, k) in [("dense", 64), ("filters0.5", 32)] {
        let mut g = c.benchmark_group(format!("fused_layer1_conv1_dgrad_{what}_{}", <T as Elem>::NAME));
        g.sample_size(10);
        for (dev, batch) in devices() {
            let sh = ConvShape { n: batch, h: 56, w: 56, c: 256, k, r: 1, s: 1, stride: 1, pad: 0 };
            let dy = filled::<T>(&dev, sh.y_len(), 1, -1.0, 1.0);
            let w = filled::<T>(&dev, sh.w_len(), 2, -0.1, 0.1);
            let mut dx = filled::<T>(&dev, sh.x_len(), 3, -1.0, 1.0);
            let mut tmp = dev.uninit::<T>(sh.x_len()).unwrap();
            let m = batch * 56 * 56;
            bench(&mut g, &format!("dgrad_then_add/m{m}"), &dev, || {
                conv::conv2d_dgrad(&dev, &sh, &dy, &w, &mut tmp).unwrap();
                layers::add_assign(&dev, &mut dx, &tmp).unwrap();
            });
            bench(&mut g, &format!("dgrad_accumulate/m{m}"), &dev, || {
                conv::conv2d_dgrad_accumulate(&dev, &sh, &dy, &w, None, &mut dx).unwrap();
            });
        }
        g.finish();
    }
}

/// The backward of bn2 (+ ReLU) from conv3's dgrad (1x1, 256 -> 64 channels at 56x56, and
/// the filters-0.5 twin 256 -> 32): the dgrad, then the BN backward's reduction and dx pass,
/// against the dgrad taking the reduction's sums in its epilogue, then the dx pass alone.
fn bn_grad_benches<T: ConvElem + LayerElem>(c: &mut Criterion) {
    for (what, cin) in [("dense", 64), ("filters0.5", 32)] {
        let mut g = c.benchmark_group(format!("fused_layer1_conv3_dgrad_bn2_{what}_{}", <T as Elem>::NAME));
        g.sample_size(10);
        for (dev, batch) in devices() {
            let sh = ConvShape { n: batch, h: 56, w: 56, c: cin, k: 256, r: 1, s: 1, stride: 1, pad: 0 };
            let m = batch * 56 * 56;
            let t2 = filled::<T>(&dev, sh.x_len(), 1, -1.0, 2.0);
            let w = filled::<T>(&dev, sh.w_len(), 2, -0.1, 0.1);
            let dy = filled::<T>(&dev, sh.y_len(), 3, -1.0, 1.0);
            let gamma = dev.upload(vec![1.0f32; cin]).unwrap();
            let beta = dev.upload(vec![0.1f32; cin]).unwrap();
            let (mut rm, mut rv) = (dev.zeros::<f32>(cin).unwrap(), dev.upload(vec![1.0f32; cin]).unwrap());
            let mut sm = dev.upload(vec![0.5f32; cin]).unwrap();
            let mut si = dev.upload(vec![1.5f32; cin]).unwrap();
            let (mut dg, mut db) = (dev.uninit::<f32>(cin).unwrap(), dev.uninit::<f32>(cin).unwrap());
            let mut bn = BnLayer {
                c: cin,
                gamma: &gamma,
                beta: &beta,
                running_mean: &mut rm,
                running_var: &mut rv,
                save_mean: &mut sm,
                save_invstd: &mut si,
                dgamma: &mut dg,
                dbeta: &mut db,
                momentum: 0.1,
                eps: 1e-5,
            };
            let mut a2 = dev.uninit::<T>(sh.x_len()).unwrap();
            layers::bn_apply_saved(&dev, m, &t2, &bn.input(true), None, &mut a2).unwrap();
            let mut da = dev.uninit::<T>(sh.x_len()).unwrap();
            let mut dt = dev.uninit::<T>(sh.x_len()).unwrap();
            let mut part = dev.uninit::<f32>(fused::grad_sums_workspace_len::<T>(&sh, None).max(1)).unwrap();
            bench(&mut g, &format!("dgrad_then_bn_backward/m{m}"), &dev, || {
                conv::conv2d_dgrad(&dev, &sh, &dy, &w, &mut da).unwrap();
                layers::bn_backward_through_relu(&dev, m, &t2, &a2, &da, &mut bn, &mut dt).unwrap();
            });
            bench(&mut g, &format!("dgrad_bn_sums_then_dx/m{m}"), &dev, || {
                let grad = fused::GradBn { x: &t2, bn: &mut bn, relu: true, second: None, workspace: &mut part };
                fused::conv2d_dgrad_bn_sums(&dev, &sh, &dy, &w, &mut da, grad).unwrap();
                layers::bn_backward_dx(&dev, m, &t2, &da, &bn, true, &mut dt).unwrap();
            });
        }
        g.finish();
    }
}

fn all(c: &mut Criterion) {
    fused_benches::<bf16>(c);
    fused_benches::<f32>(c);
    bn_input_benches::<bf16>(c);
    bn_input_benches::<f32>(c);
    residual_grad_benches::<bf16>(c);
    residual_grad_benches::<f32>(c);
    bn_grad_benches::<bf16>(c);
    bn_grad_benches::<f32>(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
