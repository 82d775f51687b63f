//! The memory-bound layer ops at ResNet50 sizes other than batch norm (benches/bn.rs), on
//! the CPU and, where there is one, on the GPU (`cuda:0`). Throughput is the bytes each op must move at least (every input
//! read once, every output written once), so criterion's GB/s compare with the GPU's
//! memory bandwidth directly.
//!
//! GPU timings are CUDA events around a batch of launches (no host sync in between).
//! Batch sizes: 256 on the GPU; on the CPU `PK_BENCH_CPU_BATCH` (default 8), since a
//! full batch takes seconds per op there.
//!
//! ```sh
//! cargo bench --bench layers            # everything
//! cargo bench --bench layers -- cuda    # GPU only
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use prunekit::ops::layers::{self as layers, LayerElem};
use prunekit::{Buf, Device};

mod common;

use common::{bench, filled};

fn devices() -> Vec<(Device, usize)> {
    common::devices("layers", 8)
}

fn elementwise_benches<T: LayerElem>(c: &mut Criterion) {
    let es = std::mem::size_of::<T>() as u64;
    let mut g = c.benchmark_group(format!("elementwise_{}", T::DTYPE));
    g.sample_size(10);
    for (dev, batch) in devices() {
        // The output of a stage-1 block: 56x56x256.
        let n = batch * 56 * 56 * 256;
        let a = filled::<T>(&dev, n, 5);
        let b = filled::<T>(&dev, n, 6);
        let mut out = dev.uninit::<T>(n).unwrap();
        g.throughput(Throughput::Bytes(3 * n as u64 * es));
        bench(&mut g, &format!("add_relu/n{n}"), &dev, || layers::add_relu(&dev, &a, &b, &mut out).unwrap());
        bench(&mut g, &format!("relu_backward/n{n}"), &dev, || layers::relu_backward(&dev, &a, &b, &mut out).unwrap());
        bench(&mut g, &format!("add_assign/n{n}"), &dev, || layers::add_assign(&dev, &mut out, &b).unwrap());
        let mut f = dev.uninit::<f32>(n).unwrap();
        g.throughput(Throughput::Bytes(n as u64 * (es + 4)));
        bench(&mut g, &format!("cast_to_f32/n{n}"), &dev, || layers::cast(&dev, &a, &mut f).unwrap());
    }
    g.finish();
}

fn pool_benches<T: LayerElem>(c: &mut Criterion) {
    let es = std::mem::size_of::<T>() as u64;
    let mut g = c.benchmark_group(format!("pool_{}", T::DTYPE));
    g.sample_size(10);
    for (dev, batch) in devices() {
        let (h, ch) = (112, 64);
        let oh = layers::maxpool_out(h);
        let x = filled::<T>(&dev, batch * h * h * ch, 7);
        let dy = filled::<T>(&dev, batch * oh * oh * ch, 8);
        let mut y = dev.uninit::<T>(batch * oh * oh * ch).unwrap();
        let mut dx = dev.uninit::<T>(batch * h * h * ch).unwrap();
        let (xb, yb) = ((batch * h * h * ch) as u64 * es, (batch * oh * oh * ch) as u64 * es);
        g.throughput(Throughput::Bytes(xb + yb));
        bench(&mut g, &format!("maxpool_forward/n{batch}"), &dev, || {
            layers::maxpool_forward(&dev, batch, h, h, ch, &x, &mut y).unwrap()
        });
        g.throughput(Throughput::Bytes(2 * xb + yb));
        bench(&mut g, &format!("maxpool_backward/n{batch}"), &dev, || {
            layers::maxpool_backward(&dev, batch, h, h, ch, &x, &dy, &mut dx).unwrap()
        });
        // The stem of a train step: its BN + ReLU then the max pool, against the max pool
        // that applies them as it loads and writes its taps, and the backwards from the BN
        // output and from the taps. Throughput: the fused ops' bytes, for both sides.
        let tb = (batch * oh * oh * ch) as u64;
        let (gamma, beta, mean) =
            (filled::<f32>(&dev, ch, 10), filled::<f32>(&dev, ch, 11), filled::<f32>(&dev, ch, 12));
        let invstd = dev.upload(vec![1.5f32; ch]).unwrap();
        let bn = layers::BnInput { c: ch, gamma: &gamma, beta: &beta, mean: &mean, invstd: &invstd, relu: true };
        let mut a = dev.uninit::<T>(batch * h * h * ch).unwrap();
        let mut taps = dev.uninit::<u8>(batch * oh * oh * ch).unwrap();
        g.throughput(Throughput::Bytes(xb + yb + tb));
        bench(&mut g, &format!("stem_bn_then_maxpool/n{batch}"), &dev, || {
            layers::bn_apply_saved(&dev, batch * h * h, &x, &bn, None, &mut a).unwrap();
            layers::maxpool_forward(&dev, batch, h, h, ch, &a, &mut y).unwrap()
        });
        bench(&mut g, &format!("maxpool_forward_bn_taps/n{batch}"), &dev, || {
            layers::maxpool_forward_bn(&dev, batch, h, h, ch, &x, Some(&bn), &mut y, Some(&mut taps)).unwrap()
        });
        g.throughput(Throughput::Bytes(xb + yb + tb));
        bench(&mut g, &format!("maxpool_backward_taps/n{batch}"), &dev, || {
            layers::maxpool_backward_taps(&dev, batch, h, h, ch, &taps, &dy, &mut dx).unwrap()
        });
        let (hw, ch) = (49, 2048);
        let x = filled::<T>(&dev, batch * hw * ch, 9);
        let mut y = dev.uninit::<f32>(batch * ch).unwrap();
        let mut dx = dev.uninit::<T>(batch * hw * ch).unwrap();
        g.throughput(Throughput::Bytes((batch * hw * ch) as u64 * es + (batch * ch * 4) as u64));
        bench(&mut g, &format!("avgpool_forward/n{batch}"), &dev, || {
            layers::avgpool_forward(&dev, batch, hw, ch, &x, &mut y).unwrap()
        });
        bench(&mut g, &format!("avgpool_backward/n{batch}"), &dev, || {
            layers::avgpool_backward(&dev, batch, hw, ch, &y, &mut dx).unwrap()
        });
    }
    g.finish();
}

fn head_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("head_f32");
    g.sample_size(10);
    for (dev, batch) in devices() {
        let (cin, cout) = (2048, 1000);
        let x = filled::<f32>(&dev, batch * cin, 10);
        let w = filled::<f32>(&dev, cout * cin, 11);
        let b = filled::<f32>(&dev, cout, 12);
        let mut y = dev.uninit::<f32>(batch * cout).unwrap();
        let (mut dx, mut dw, mut db) =
            (dev.uninit(batch * cin).unwrap(), dev.uninit(cout * cin).unwrap(), dev.uninit(cout).unwrap());
        g.throughput(Throughput::Elements((2 * batch * cin * cout) as u64)); // flops
        bench(&mut g, &format!("fc_forward/n{batch}"), &dev, || {
            layers::fc_forward(&dev, batch, cin, cout, &x, &w, &b, &mut y).unwrap()
        });
        g.throughput(Throughput::Elements((4 * batch * cin * cout) as u64));
        bench(&mut g, &format!("fc_backward/n{batch}"), &dev, || {
            layers::fc_backward(&dev, batch, cin, cout, &x, &w, &y, &mut dx, &mut dw, &mut db).unwrap()
        });
        let targets = dev.upload((0..batch as i32).map(|i| (i * 37) % cout as i32).collect()).unwrap();
        let (mut loss, mut d) = (dev.uninit::<f32>(1).unwrap(), dev.uninit::<f32>(batch * cout).unwrap());
        g.throughput(Throughput::Bytes((2 * batch * cout * 4) as u64));
        bench(&mut g, &format!("cross_entropy/n{batch}"), &dev, || {
            layers::softmax_cross_entropy(&dev, batch, cout, &y, &targets, &mut loss, &mut d).unwrap()
        });
        // SGD over the largest ResNet50 weight (layer4 conv2: 512x3x3x512).
        let n = 512 * 9 * 512;
        let (mut p, gr, mut buf) = (filled::<f32>(&dev, n, 13), filled::<f32>(&dev, n, 14), filled::<f32>(&dev, n, 15));
        g.throughput(Throughput::Bytes(5 * n as u64 * 4));
        bench(&mut g, &format!("sgd_step/n{n}"), &dev, || {
            layers::sgd_step(&dev, &mut p, &gr, &mut buf, &layers::SgdStep::new(1e-6, 0.9, 1e-4, false)).unwrap()
        });
        sgd_model_benches(&mut g, &dev);
    }
    g.finish();
}

/// A parameter, its gradient and momentum, and its bf16 copy for the convolutions.
type SgdRow = (Buf<f32>, Buf<f32>, Buf<f32>, Option<Buf<bf16>>);

fn tensors(ps: &mut [SgdRow]) -> Vec<layers::SgdTensor<'_, bf16>> {
    ps.iter_mut()
        .map(|(param, grad, momentum_buf, low)| layers::SgdTensor { param, grad, momentum_buf, low: low.as_mut() })
        .collect()
}

/// SGD over every parameter of ResNet50 with the conv weights' bf16 copies, as a bf16
/// train step runs it: one launch per tensor and a cast per conv weight, against the
/// multi-tensor step (one launch).
fn sgd_model_benches(g: &mut common::Group<'_>, dev: &Device) {
    use prunekit::model::{Arch, Role};
    let specs: Vec<_> = Arch::resnet50(1000).tensor_specs().into_iter().filter(|s| s.role.is_param()).collect();
    let mut ps = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let n: usize = s.shape.iter().product();
        let low = (s.role == Role::ConvWeight).then(|| dev.uninit::<bf16>(n).unwrap());
        let seed = 3 * i as u32;
        ps.push((filled::<f32>(dev, n, seed), filled::<f32>(dev, n, seed + 1), filled::<f32>(dev, n, seed + 2), low));
    }
    let st = layers::SgdStep::new(1e-6, 0.9, 1e-4, false);
    let bytes: usize = ps.iter().map(|p| p.0.len() * 16 + p.3.as_ref().map_or(0, |l| 2 * l.len())).sum();
    g.throughput(Throughput::Bytes(bytes as u64));
    bench(g, "sgd_resnet50/per_tensor", dev, || {
        for (p, gr, b, low) in ps.iter_mut() {
            layers::sgd_step(dev, p, gr, b, &st).unwrap();
            if let Some(l) = low.as_mut() {
                layers::cast(dev, p, l).unwrap();
            }
        }
    });
    let table = layers::SgdTable::new(dev, &tensors(&mut ps)).unwrap();
    bench(g, "sgd_resnet50/multi_tensor", dev, || {
        layers::sgd_step_multi(dev, &table, &mut tensors(&mut ps), &st).unwrap()
    });
}

fn all(c: &mut Criterion) {
    elementwise_benches::<bf16>(c);
    elementwise_benches::<f32>(c);
    pool_benches::<bf16>(c);
    pool_benches::<f32>(c);
    head_benches(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
