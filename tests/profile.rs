//! The per-op profile of a training step (`prunekit::ops::profile`) on the CPU and through
//! the kernels in the emulation: every op family is recorded, the conv and fc FLOPs add up
//! to `Arch::flops_train` times the batch, the counts are the same on every device but for
//! the passes a kernel device fuses differently, the shares add up, and a profiled step
//! computes exactly what an unprofiled one does.

mod common;

use common::Rng;
use prunekit::gpu::{Gpu, Schedule};
use prunekit::model::{init::torchvision_init, Arch, Block, BnFusion, Model, PrecisionKind, Sgd, StateDict};
use prunekit::ops::profile::{profile, Cost, Family, Profile};
use prunekit::shape::{ConvShape, Pass};
use prunekit::Device;

/// A bottleneck ResNet with odd widths: two blocks in the first stage (the second without
/// a downsample, so the identity residual paths run too), one in each other stage.
fn tiny_arch() -> Arch {
    let b = |stage, index, cin, w1, w2, cout, stride, downsample| Block {
        stage,
        index,
        cin,
        w1,
        w2,
        cout,
        stride,
        downsample,
    };
    Arch {
        stem: 8,
        classes: 5,
        blocks: vec![
            b(1, 0, 8, 3, 5, 6, 1, true),
            b(1, 1, 6, 4, 4, 6, 1, false),
            b(2, 0, 6, 4, 3, 10, 2, true),
            b(3, 0, 10, 3, 3, 7, 2, true),
            b(4, 0, 7, 5, 4, 16, 2, true),
        ],
    }
}

// Small enough that no wgrad splits its reduction (checked in `no_wgrad_is_split`): split-K
// adds partial sums with atomics in an order that varies from run to run on a GPU and in
// the multi-threaded emulation, profiled or not, and bit-identity would not be a check.
const N: usize = 2;
const SIZE: usize = 28;
const SGD: Sgd = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 };

fn model(
    dev: &Device,
    sd: &StateDict,
    precision: PrecisionKind,
    fusion: BnFusion,
) -> (Model, prunekit::model::AnyWorkspace) {
    let mut m = Model::from_state(dev, sd, precision).unwrap();
    m.set_bn_fusion(fusion);
    let mut ws = m.workspace(N, SIZE, SIZE).unwrap();
    let mut rng = Rng::new(7);
    let images = rng.vec(N * 3 * SIZE * SIZE);
    let targets: Vec<i64> = (0..N).map(|_| rng.below(5) as i64).collect();
    m.set_batch(&mut ws, &images, Some(&targets)).unwrap();
    // One step first, so that the profiled step is not the first SGD step.
    m.train_step(&mut ws, &SGD).unwrap();
    (m, ws)
}

/// Steps a model once unprofiled and a twin once profiled; checks that both end with the
/// same bits in every tensor and the same loss, and returns the profile.
fn profiled_step(dev: &Device, precision: PrecisionKind, fusion: BnFusion) -> Profile {
    let sd = torchvision_init(&tiny_arch(), 11);
    let (mut plain, mut ws_plain) = model(dev, &sd, precision, fusion);
    plain.train_step(&mut ws_plain, &SGD).unwrap();
    let (mut prof, mut ws_prof) = model(dev, &sd, precision, fusion);
    let ((), p) = profile(dev, || prof.train_step(&mut ws_prof, &SGD)).unwrap();
    assert!(!prunekit::ops::profile::active());
    assert_eq!(plain.loss(&ws_plain).unwrap().to_bits(), prof.loss(&ws_prof).unwrap().to_bits());
    let (a, b) = (plain.to_state().unwrap(), prof.to_state().unwrap());
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let (x, y) = (t.as_f32().unwrap(), b.tensors[name].as_f32().unwrap());
        assert!(x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits()), "{name} differs after a profiled step");
    }
    for (name, t) in &plain.momentum_state().unwrap().tensors {
        let other = prof.momentum_state().unwrap();
        let (x, y) = (t.as_f32().unwrap(), other.tensors[name].as_f32().unwrap());
        assert!(x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits()), "momentum of {name} differs");
    }
    p
}

/// The stem's shape as the architecture gives it (C = 3) and as a bf16 train step on a
/// kernel device runs it (C padded with zeros to 8, for the 16-byte loads).
fn stem_shapes() -> (ConvShape, ConvShape) {
    let sh = tiny_arch().convs(SIZE, SIZE).into_iter().find(|l| l.name == "conv1").unwrap().shape(N);
    (sh, ConvShape { c: 8, ..sh })
}

/// What the padded stem adds to the count of `pass` (FLOPs, bytes).
fn stem_padding(pass: Pass) -> (u64, u64) {
    let (s3, s8) = stem_shapes();
    let (a, b) = (Cost::conv(pass, &s3, 2), Cost::conv(pass, &s8, 2));
    (b.flops - a.flops, b.bytes - a.bytes)
}

/// `padded`: a bf16 step on a kernel device (the stem runs with C padded to 8).
fn check(p: &Profile, precision: PrecisionKind, padded: bool) {
    let arch = tiny_arch();
    let convs = arch.convs(SIZE, SIZE).len();
    // Every family ran; a cast only in bf16 with the unpadded stem (the images: the padded
    // stem's are cast as they are padded, and the SGD step writes the weights' copies);
    // no ReLU/add pass: the residual add and the ReLU are in bn3's apply, the shortcut's
    // gradient is added by the dgrads (conv2d_dgrad_accumulate).
    for f in Family::ALL {
        let want = (f != Family::Cast || (precision == PrecisionKind::Bf16 && !padded)) && f != Family::ReluAdd;
        assert_eq!(p.family(f).is_some(), want, "{f:?} in {p:#?}");
    }
    let calls = |f| p.family(f).unwrap().calls;
    assert_eq!(calls(Family::ConvFprop), convs);
    assert_eq!(calls(Family::ConvDgrad), convs - 1, "the stem has no input gradient");
    assert_eq!(calls(Family::ConvWgrad), convs);
    assert_eq!(calls(Family::Fc), 2);
    assert_eq!(calls(Family::Loss), 1);
    // The images NCHW -> NHWC; with the padded stem also its weight's padded copy after SGD
    // and its gradient cut from the padded one.
    assert_eq!(calls(Family::Layout), if padded { 3 } else { 1 }, "the layout conversions");
    // SGD: one launch for every conv, every BN's gamma and beta, the fc's weight and bias.
    assert_eq!(calls(Family::Sgd), 1);
    // Its bytes: those of the step on every parameter, and in bf16 the conv weights' copies
    // (but the padded stem's, a layout op).
    let conv_weights: usize = arch.convs(SIZE, SIZE).iter().map(|l| l.shape(N).w_len()).sum();
    let copies = match (precision, padded) {
        (PrecisionKind::Bf16, false) => 2 * conv_weights,
        (PrecisionKind::Bf16, true) => 2 * (conv_weights - stem_shapes().0.w_len()),
        _ => 0,
    };
    assert_eq!(p.family(Family::Sgd).unwrap().bytes, Cost::sgd(arch.params(), false).bytes + copies as u64);
    // The GEMM FLOPs of a step are flops_train times the batch, exactly: conv fprop, dgrad
    // (all but the stem) and wgrad, and the fc's forward and two backward GEMMs; and what
    // the padded stem's fprop and wgrad compute on its zero channels.
    let gemm: u64 = p.families.iter().filter(|f| f.family.is_gemm()).map(|f| f.flops).sum();
    let pad = if padded { stem_padding(Pass::Fprop).0 + stem_padding(Pass::Wgrad).0 } else { 0 };
    assert_eq!(gemm as f64, arch.flops_train(SIZE, SIZE) * N as f64 + pad as f64);
    let fc = (6 * arch.fc_in() * arch.classes * N) as u64;
    assert_eq!(p.family(Family::Fc).unwrap().flops, fc);
    assert_eq!(p.flops, p.families.iter().map(|f| f.flops).sum::<u64>());
    assert_eq!(p.bytes, p.families.iter().map(|f| f.bytes).sum::<u64>());
    // Shares: the ops plus the time between them make the step; the ops are most of it.
    let shares: f64 = p.families.iter().map(|f| f.share).sum();
    assert!(p.step_ms > 0.0 && p.ops_ms > 0.0, "{p:#?}");
    assert!((shares + p.other_ms / p.step_ms - 1.0).abs() < 1e-9, "{shares} {p:#?}");
    assert!(shares <= 1.0 + 1e-9 && shares > 0.5, "the ops cover {shares} of the step: {p:#?}");
    for f in &p.families {
        assert!(f.ms >= 0.0 && f.gb_per_s >= 0.0, "{f:?}");
        assert!(f.bytes > 0, "{f:?}");
    }
}

/// The counts of a profile, family by family (times differ between two runs, counts must
/// not).
fn counts(p: &Profile) -> Vec<(Family, usize, u64, u64)> {
    p.families.iter().map(|f| (f.family, f.calls, f.flops, f.bytes)).collect()
}

/// [`counts`] as the CPU and the kernel devices share them: all but the bytes and FLOPs
/// of the BN backward, where the kernel devices recompute the ReLU's output that the CPU
/// reads (`bn_backward_through_relu`; see [`check_bn_backward`]).
fn shared_counts(p: &Profile) -> Vec<(Family, usize, u64, u64)> {
    let mut c = counts(p);
    for f in c.iter_mut().filter(|f| f.0 == Family::BnBackward) {
        (f.2, f.3) = (0, 0);
    }
    c
}

/// The convolutions whose input a kernel device's train step passes through the previous
/// BN (+ ReLU) as it loads it (conv2 and conv3 of each block, in fprop and wgrad), with
/// what that adds to each pass's count.
fn bn_on_load() -> impl Iterator<Item = (prunekit::shape::ConvShape, Cost)> {
    let convs = tiny_arch().convs(SIZE, SIZE);
    convs.into_iter().filter(|l| l.name.ends_with(".conv2") || l.name.ends_with(".conv3")).map(|l| {
        let sh = l.shape(N);
        (sh, Cost { flops: 0, bytes: 0 }.with_bn_on_load(&sh))
    })
}

/// The dgrads whose epilogue takes a BN backward's sums in a kernel device's train step:
/// conv2's (bn1) and conv3's (bn2) of each block, and from the second block on the last
/// dgrad into the block's input (the downsample's, else conv1's: the previous block's bn3,
/// and its downsample BN as a second one when it has a downsample).
fn grad_sums() -> Vec<(prunekit::shape::ConvShape, bool)> {
    let arch = tiny_arch();
    let convs = arch.convs(SIZE, SIZE);
    let by_name = |name: String| convs.iter().find(|l| l.name == name).unwrap().shape(N);
    let mut v = Vec::new();
    for (i, b) in arch.blocks.iter().enumerate() {
        let p = b.prefix();
        v.extend([(by_name(format!("{p}.conv2")), false), (by_name(format!("{p}.conv3")), false)]);
        if i > 0 {
            let sh = by_name(format!("{p}.{}", if b.downsample { "downsample.0" } else { "conv1" }));
            v.push((sh, arch.blocks[i - 1].downsample));
        }
    }
    v
}

/// What the kernel devices count where the CPU counts `cpu` (as [`shared_counts`]). The
/// stem's BN + ReLU runs in the max pool, and the pool's backward in the stem BN's. With
/// `fusion.on_load` a train step there applies bn1 and bn2 as conv2 and conv3 load their
/// inputs, in fprop and wgrad, so each block has two BN apply passes fewer and those four
/// conv passes count the reads of the BN's parameters; with `fusion.dgrad_sums` the dgrads
/// of [`grad_sums`] read the BNs' inputs and write the sums, which a finalize op of its own
/// merges (one BN backward call more each; a second BN's backward is its dx pass alone, in
/// place of the full backward).
fn kernel_counts(cpu: &Profile, precision: PrecisionKind, fusion: BnFusion) -> Vec<(Family, usize, u64, u64)> {
    use prunekit::ops::fused::grad_sums_tiles;
    let elem = if precision == PrecisionKind::Bf16 { 2 } else { 4 };
    let mut c = shared_counts(cpu);
    for (sh, second) in grad_sums().into_iter().filter(|_| fusion.dgrad_sums) {
        let tiles = match precision {
            PrecisionKind::Bf16 => grad_sums_tiles::<half::bf16>(&sh, None),
            _ => grad_sums_tiles::<f32>(&sh, None),
        };
        let extra = Cost { flops: 0, bytes: 0 }.with_grad_sums(&sh, elem, tiles, second);
        for f in c.iter_mut() {
            match f.0 {
                Family::ConvDgrad => f.3 += extra.bytes,
                Family::BnBackward => f.1 += 1,
                _ => {}
            }
        }
    }
    // The stem: its BN + ReLU is applied by the max pool as it loads (one BN apply pass
    // fewer; the pool reads the conv output and also writes its taps), and the pool's
    // backward runs inside the stem BN's backward (one pool call fewer).
    {
        let (s3, _) = stem_shapes();
        let (m0, c0) = (s3.n * s3.p() * s3.q(), s3.k);
        let (ph, pw) = (prunekit::ops::layers::maxpool_out(s3.p()), prunekit::ops::layers::maxpool_out(s3.q()));
        let pooled = s3.n * ph * pw * c0;
        let apply = Cost::bn_apply(m0, c0, elem, false, true);
        let (plain, fused) =
            (Cost::maxpool_forward(m0 * c0, pooled, elem), Cost::maxpool_forward_bn(m0 * c0, pooled, elem, true, true));
        let back = Cost::maxpool_backward(m0 * c0, pooled, elem);
        for f in c.iter_mut() {
            match f.0 {
                Family::BnForward => (f.1, f.2, f.3) = (f.1 - 1, f.2 - apply.flops, f.3 - apply.bytes),
                Family::Pool => {
                    (f.1, f.2, f.3) = (
                        f.1 - 1,
                        f.2 + fused.flops - plain.flops - back.flops,
                        f.3 + fused.bytes - plain.bytes - back.bytes,
                    )
                }
                _ => {}
            }
        }
    }
    for (sh, on_load) in bn_on_load().filter(|_| fusion.on_load) {
        let apply = Cost::bn_apply(sh.n * sh.h * sh.w, sh.c, elem, false, true);
        for f in c.iter_mut() {
            match f.0 {
                Family::ConvFprop | Family::ConvWgrad => (f.2, f.3) = (f.2 + on_load.flops, f.3 + on_load.bytes),
                Family::BnForward => (f.1, f.2, f.3) = (f.1 - 1, f.2 - apply.flops, f.3 - apply.bytes),
                _ => {}
            }
        }
    }
    // Each block's output ReLU but the last one's writes its decisions as bits (zeroed
    // first, unless its vectors are 8 wide: bf16 and channels in multiples of 8), and the
    // dgrad into the next block's input masks its sum by them instead of that output.
    {
        let arch = tiny_arch();
        let convs = arch.convs(SIZE, SIZE);
        let by_name = |name: String| convs.iter().find(|l| l.name == name).unwrap().shape(N);
        for (i, b) in arch.blocks.iter().enumerate() {
            let p = b.prefix();
            let sh3 = by_name(format!("{p}.conv3"));
            let passes = if elem == 2 && sh3.k % 8 == 0 { 1 } else { 2 };
            let last = i + 1 == arch.blocks.len();
            let bits = if last { 0 } else { passes * prunekit::ops::layers::relu_bits_len(sh3.y_len()) as u64 };
            let into_input =
                (i > 0).then(|| by_name(format!("{p}.{}", if b.downsample { "downsample.0" } else { "conv1" })));
            for f in c.iter_mut() {
                match f.0 {
                    Family::BnForward => f.3 += bits,
                    Family::ConvDgrad => {
                        if let Some(sh) = into_input {
                            f.3 = f.3 + sh.x_len().div_ceil(8) as u64 - (sh.x_len() * elem) as u64;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if precision == PrecisionKind::Bf16 {
        // The padded stem: its passes over 8 channels; the images go to NHWC bf16 padded in
        // one pass (the CPU: a transpose, then a cast), its weight copy is padded after SGD
        // (the CPU: a cast) and its gradient cut from the padded one.
        let (s3, _) = stem_shapes();
        let (img, wlen, rows) = (s3.x_len(), s3.w_len(), s3.k * s3.r * s3.s);
        let cast_cpu = Cost::cast(img, 4, 2).bytes;
        let (fprop, wgrad) = (stem_padding(Pass::Fprop), stem_padding(Pass::Wgrad));
        let layout_cpu = Cost::transpose(img, 4).bytes;
        let layout_kernels = Cost::transpose_pad(s3.n * s3.h * s3.w, 3, 8, 2).bytes
            + Cost::transpose_pad(rows, 3, 8, 2).bytes
            + Cost::transpose_pad(rows, 3, 3, 4).bytes;
        for f in c.iter_mut() {
            match f.0 {
                Family::ConvFprop => (f.2, f.3) = (f.2 + fprop.0, f.3 + fprop.1),
                Family::ConvWgrad => (f.2, f.3) = (f.2 + wgrad.0, f.3 + wgrad.1),
                Family::Layout => (f.1, f.3) = (f.1 + 2, f.3 - layout_cpu + layout_kernels),
                Family::Cast => (f.1, f.3) = (f.1 - 1, f.3 - cast_cpu),
                Family::Sgd => f.3 -= 2 * wlen as u64,
                _ => {}
            }
        }
        c.retain(|f| f.1 > 0);
    }
    c
}

/// The kernel device's BN backward reads less than the CPU's (two passes over each ReLU'd
/// BN's output fewer, and the reductions in the dgrads) and computes more (the recomputed
/// output).
fn check_bn_backward(kernels: &Profile, cpu: &Profile) {
    let (k, c) = (kernels.family(Family::BnBackward).unwrap(), cpu.family(Family::BnBackward).unwrap());
    assert!(k.bytes < c.bytes && k.flops > c.flops, "{k:?} vs {c:?}");
}

#[test]
fn profiled_step_on_cpu_records_every_family_and_changes_nothing() {
    let f32p = profiled_step(&Device::Cpu, PrecisionKind::F32, BnFusion::NONE);
    check(&f32p, PrecisionKind::F32, false);
    let bf16p = profiled_step(&Device::Cpu, PrecisionKind::Bf16, BnFusion::NONE);
    check(&bf16p, PrecisionKind::Bf16, false);
    // bf16 halves the bytes of the activations and weights that the convs read.
    let b = |p: &Profile| p.family(Family::ConvFprop).unwrap().bytes;
    assert!(b(&bf16p) < b(&f32p) && 2 * b(&bf16p) >= b(&f32p));
    assert_eq!(f32p.device, "cpu");
}

#[test]
fn profiled_step_in_the_emulation_counts_what_the_cpu_counts() {
    let emu = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    let cpu = profiled_step(&Device::Cpu, PrecisionKind::F32, BnFusion::NONE);
    let cpub = profiled_step(&Device::Cpu, PrecisionKind::Bf16, BnFusion::NONE);
    for fusion in [BnFusion::NONE, BnFusion::ALL, BnFusion { on_load: false, dgrad_sums: true }] {
        let p = profiled_step(&emu, PrecisionKind::F32, fusion);
        check(&p, PrecisionKind::F32, false);
        assert_eq!(p.device, "emu");
        assert_eq!(shared_counts(&p), kernel_counts(&cpu, PrecisionKind::F32, fusion), "{fusion:?}");
        check_bn_backward(&p, &cpu);
        let pb = profiled_step(&emu, PrecisionKind::Bf16, fusion);
        check(&pb, PrecisionKind::Bf16, true);
        assert_eq!(shared_counts(&pb), kernel_counts(&cpub, PrecisionKind::Bf16, fusion), "{fusion:?}");
        check_bn_backward(&pb, &cpub);
    }
}

#[test]
fn the_counting_mode_counts_what_the_emulation_runs_and_computes_nothing() {
    let count = Device::parse_counting("emu:count").unwrap();
    assert!(count.counts_only() && !Device::parse("emu").unwrap().counts_only());
    let emu = Device::Gpu(Gpu::emu_with(Schedule::Forward));
    for precision in [PrecisionKind::F32, PrecisionKind::Bf16] {
        let sd = torchvision_init(&tiny_arch(), 11);
        for fusion in [BnFusion::NONE, BnFusion::ALL] {
            let (mut m, mut ws) = model(&count, &sd, precision, fusion);
            let ((), p) = profile(&count, || m.train_step(&mut ws, &SGD)).unwrap();
            assert_eq!(counts(&p), counts(&profiled_step(&emu, precision, fusion)), "{precision} {fusion:?}");
            // Nothing ran: no loss was computed (a real step's is about ln 5).
            assert_eq!(m.loss(&ws).unwrap(), 0.0);
        }
    }
    // Only bench takes it: a command that would compute refuses it.
    let e = Device::parse("emu:count").unwrap_err().to_string();
    assert!(e.contains("only `prunekit bench`"), "{e}");
}

#[test]
fn no_wgrad_is_split() {
    use prunekit::ops::conv::plan;
    for l in tiny_arch().convs(SIZE, SIZE) {
        let sh = l.shape(N);
        assert_eq!(plan::<f32>(Pass::Wgrad, &sh).splits, 1, "{}", l.name);
        assert_eq!(plan::<half::bf16>(Pass::Wgrad, &sh).splits, 1, "{}", l.name);
    }
}

#[test]
fn profile_scopes_report_errors_and_end() {
    let dev = Device::Cpu;
    let sd = torchvision_init(&tiny_arch(), 11);
    let (mut m, _) = model(&dev, &sd, PrecisionKind::F32, BnFusion::NONE);
    let mut other = m.workspace(N, SIZE, SIZE).unwrap();
    // A train step without targets fails inside the scope: the error comes out, the scope ends.
    let r = profile(&dev, || m.train_step(&mut other, &SGD));
    assert!(r.is_err());
    assert!(!prunekit::ops::profile::active());
    let r = profile(&dev, || profile(&dev, || Ok(())).map(|_| ()));
    assert!(r.unwrap_err().to_string().contains("do not nest"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn profiled_step_on_cuda_counts_what_the_cpu_counts() {
    let dev = common::cuda_device();
    for precision in [PrecisionKind::F32, PrecisionKind::Bf16] {
        let cpu = profiled_step(&Device::Cpu, precision, BnFusion::NONE);
        for fusion in [BnFusion::NONE, BnFusion::ALL] {
            let p = profiled_step(&dev, precision, fusion);
            check(&p, precision, precision == PrecisionKind::Bf16);
            assert_eq!(p.device, "cuda");
            assert_eq!(shared_counts(&p), kernel_counts(&cpu, precision, fusion));
            check_bn_backward(&p, &cpu);
            assert_eq!(counts(&p), counts(&profiled_step(&common::emu_devices()[0], precision, fusion)));
        }
    }
}
