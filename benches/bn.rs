//! Batch norm (`prunekit::ops::layers::bn_*`) at ResNet50 sizes, on the CPU and, where
//! there is one, on the GPU (`cuda:0`): train forward, eval forward and backward, each
//! with the fused ReLU, and a downsample block's two BNs (bn3 and the shortcut's) apart and
//! fused. Throughput is the bytes each op must move at least (every input
//! read once, every output written once, the train forward's x twice), so criterion's GB/s
//! compare with the GPU's memory bandwidth directly.
//!
//! GPU timings are CUDA events around a batch of launches (no host sync in between).
//! Batch sizes: 256 on the GPU; on the CPU `PK_BENCH_CPU_BATCH` (default 8), since a
//! full batch takes seconds per op there.
//!
//! ```sh
//! cargo bench --bench bn            # everything
//! cargo bench --bench bn -- cuda    # GPU only
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use prunekit::ops::layers::{self as layers, BnLayer, LayerElem};

mod common;

use common::{bench, filled};

fn bn_benches<T: LayerElem>(c: &mut Criterion) {
    let es = std::mem::size_of::<T>() as u64;
    // (name, h*w, channels): the stem (after conv1), a stage-1 block, the last stage.
    for (what, hw, ch) in [("stem", 112 * 112, 64), ("layer1", 56 * 56, 256), ("layer4", 7 * 7, 2048)] {
        let mut g = c.benchmark_group(format!("bn_{what}_{}", T::DTYPE));
        g.sample_size(10);
        for (dev, batch) in common::devices("bn", 8) {
            let m = batch * hw;
            let x = filled::<T>(&dev, m * ch, 1);
            let dy = filled::<T>(&dev, m * ch, 2);
            let gamma = filled::<f32>(&dev, ch, 3);
            let beta = filled::<f32>(&dev, ch, 4);
            let mut rm = dev.zeros::<f32>(ch).unwrap();
            let mut rv = dev.upload(vec![1.0f32; ch]).unwrap();
            let mut y = dev.uninit::<T>(m * ch).unwrap();
            let mut dx = dev.uninit::<T>(m * ch).unwrap();
            let (mut sm, mut si) = (dev.uninit::<f32>(ch).unwrap(), dev.uninit::<f32>(ch).unwrap());
            let (mut dg, mut db) = (dev.uninit::<f32>(ch).unwrap(), dev.uninit::<f32>(ch).unwrap());
            let mut bn = BnLayer {
                c: ch,
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
            let bytes = (m * ch) as u64 * es;
            // Train forward: reads x twice (statistics, normalization), writes y.
            g.throughput(Throughput::Bytes(3 * bytes));
            bench(&mut g, &format!("forward_train_relu/m{m}"), &dev, || {
                layers::bn_forward_train(&dev, m, &x, &mut bn, true, &mut y).unwrap()
            });
            g.throughput(Throughput::Bytes(2 * bytes));
            bench(&mut g, &format!("forward_eval_relu/m{m}"), &dev, || {
                layers::bn_forward_eval(&dev, m, &x, &mut bn, true, &mut y).unwrap()
            });
            // Backward with the ReLU mask: reads x, dy, y twice, writes dx.
            g.throughput(Throughput::Bytes(7 * bytes));
            bench(&mut g, &format!("backward_relu/m{m}"), &dev, || {
                layers::bn_backward(&dev, m, &x, Some(&y), &dy, &mut bn, &mut dx).unwrap()
            });
            // The same through the BN's own ReLU, its output recomputed from x on a kernel
            // device (y is not read there): reads x, dy twice, writes dx.
            g.throughput(Throughput::Bytes(5 * bytes));
            bench(&mut g, &format!("backward_through_relu/m{m}"), &dev, || {
                layers::bn_backward_through_relu(&dev, m, &x, &y, &dy, &mut bn, &mut dx).unwrap()
            });
            // A downsample block's bn3 and shortcut BN (x2): the two applies (the shortcut's
            // output written, then read as bn3's residual) against the one with the residual
            // through its BN, and the two backwards from one dy against the pair.
            let x2 = filled::<T>(&dev, m * ch, 5);
            let (mut rm2, mut rv2) = (dev.zeros::<f32>(ch).unwrap(), dev.upload(vec![1.0f32; ch]).unwrap());
            let (mut sm2, mut si2) = (dev.uninit::<f32>(ch).unwrap(), dev.uninit::<f32>(ch).unwrap());
            let (mut dg2, mut db2) = (dev.uninit::<f32>(ch).unwrap(), dev.uninit::<f32>(ch).unwrap());
            let mut bn2 = BnLayer {
                c: ch,
                gamma: &gamma,
                beta: &beta,
                running_mean: &mut rm2,
                running_var: &mut rv2,
                save_mean: &mut sm2,
                save_invstd: &mut si2,
                dgamma: &mut dg2,
                dbeta: &mut db2,
                momentum: 0.1,
                eps: 1e-5,
            };
            let (mut short, mut dx2) = (dev.uninit::<T>(m * ch).unwrap(), dev.uninit::<T>(m * ch).unwrap());
            layers::bn_forward_train(&dev, m, &x, &mut bn, false, &mut y).unwrap();
            layers::bn_forward_train(&dev, m, &x2, &mut bn2, false, &mut short).unwrap();
            g.throughput(Throughput::Bytes(5 * bytes));
            bench(&mut g, &format!("downsample_two_applies/m{m}"), &dev, || {
                layers::bn_apply_saved(&dev, m, &x2, &bn2.input(false), None, &mut short).unwrap();
                layers::bn_apply_saved(&dev, m, &x, &bn.input(true), Some(&short), &mut y).unwrap();
            });
            g.throughput(Throughput::Bytes(3 * bytes));
            bench(&mut g, &format!("downsample_apply_bn_residual/m{m}"), &dev, || {
                let (b, b2) = (bn.input(true), bn2.input(false));
                let residual = layers::Residual::Bn(&x2, &b2);
                layers::bn_apply_residual(&dev, m, &x, &b, residual, &mut y, None).unwrap();
            });
            g.throughput(Throughput::Bytes(10 * bytes));
            bench(&mut g, &format!("downsample_two_backwards/m{m}"), &dev, || {
                layers::bn_backward(&dev, m, &x, None, &dy, &mut bn, &mut dx).unwrap();
                layers::bn_backward(&dev, m, &x2, None, &dy, &mut bn2, &mut dx2).unwrap();
            });
            g.throughput(Throughput::Bytes(8 * bytes));
            bench(&mut g, &format!("downsample_backward_pair/m{m}"), &dev, || {
                let a = layers::BnSide { x: &x, bn: &mut bn, dx: &mut dx };
                let b = layers::BnSide { x: &x2, bn: &mut bn2, dx: &mut dx2 };
                layers::bn_backward_pair(&dev, m, &dy, a, b).unwrap();
            });
        }
        g.finish();
    }
}

fn all(c: &mut Criterion) {
    bn_benches::<bf16>(c);
    bn_benches::<f32>(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
