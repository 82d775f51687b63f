//! prunekit's own float64 run of a bottleneck ResNet on the CPU: forward (train and eval),
//! backward and one SGD step, straight from the definitions.
//!
//! It is deliberately a second implementation, independent of [`crate::model::ResNet`]:
//! NHWC activations in plain `Vec<f64>`, convolutions as im2col and an f64 GEMM, batch
//! norm, pooling, the classifier and the loss from the f64 oracles of [`crate::cpu`].
//! A wiring bug in the training stack therefore does not hide in the reference too.
//!
//! Every ReLU and max pool is a [`Gate`]: its decision (which elements pass, which
//! element of a window is the maximum) is either the run's own, or forced from another
//! run's [`Decisions`]. Forcing the device's decisions removes the kinks from the
//! comparison: what is left between the device and this run is rounding, which
//! [`Perturb`] measures by jiggling every op's output by a few units of the device's
//! precision.

use crate::cpu::layers::{bn as cbn, fc as cfc, loss as closs, pool as cpool, sgd as csgd};
use crate::model::{Arch, StateDict};
use crate::{ensure, invalid, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// A decision of one gate.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// ReLU: true where the element passes (its input is > 0).
    Relu(Vec<bool>),
    /// 3x3 stride-2 max pool: for every output element, the index (into the input,
    /// NHWC) of the element that is the window's maximum.
    MaxPool(Vec<u32>),
}

/// The decisions of every gate of one forward pass, in forward order, with their names:
/// `relu` (the stem's, after `bn1`), `maxpool`, `layerS.I.bn1`, `layerS.I.bn2` (the ReLUs
/// after those BNs) and `layerS.I.out` (the ReLU after the residual add).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    /// (gate, decision) in forward order.
    pub gates: Vec<(String, Decision)>,
}

/// One gate's decision and the float64 values it was taken on (for the report).
#[derive(Clone, Debug)]
pub struct Gate {
    /// The gate's name (see [`Decisions`]).
    pub name: String,
    /// The decision taken.
    pub decision: Decision,
    /// ReLU: the float64 input of each element; max pool: empty.
    pub pre: Vec<f64>,
}

/// Perturbs values by a relative `rel`, with signs drawn from `seed`: a stand-in for
/// rounding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perturb {
    /// The relative size of the perturbation.
    pub rel: f64,
    /// Seeds the signs.
    pub seed: u64,
    /// What is perturbed.
    pub what: Jiggle,
}

/// What a [`Perturb`] perturbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jiggle {
    /// The input images only: the rounding of an input stored in float32.
    Input,
    /// The output of every op: the rounding of an implementation in a lower precision.
    Ops,
    /// Every op's output and the conv weights (bf16 convs read rounded copies of them).
    OpsAndWeights,
}

/// Settings of one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// BN momentum (weight of the batch statistic).
    pub bn_momentum: f64,
    /// BN epsilon.
    pub bn_eps: f64,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum (irrelevant for the first step but kept for clarity).
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
}

impl Hyper {
    /// The settings a device runs with (f32, as it got them), in float64.
    pub fn of(sgd: &crate::model::Sgd, bn: &crate::model::BnConfig) -> Hyper {
        Hyper {
            bn_momentum: bn.momentum as f64,
            bn_eps: bn.eps as f64,
            lr: sgd.lr as f64,
            momentum: sgd.momentum as f64,
            weight_decay: sgd.weight_decay as f64,
        }
    }
}

/// A planted wiring bug, for tests that show the differential checks catch one.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The residual input of the last block without a downsample is read one element off
    /// (a wrong channel offset: the next channel, or the next pixel where there is one).
    ChannelOffset,
    /// The gradients of bn2's weight and bias of the first block are swapped (a swapped
    /// buffer).
    SwappedBuffers,
}

/// What one run produced, every tensor in float64, conv tensors OIHW as torchvision's.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Logits of the eval-mode forward (running statistics), `[n, classes]`.
    pub eval_logits: Vec<f64>,
    /// Logits of the train-mode forward.
    pub logits: Vec<f64>,
    /// Mean cross-entropy of the train-mode forward.
    pub loss: f64,
    /// Gradient of every parameter.
    pub grads: BTreeMap<String, Vec<f64>>,
    /// BN running statistics after the train forward.
    pub buffers: BTreeMap<String, Vec<f64>>,
    /// Every parameter after one SGD step.
    pub stepped: BTreeMap<String, Vec<f64>>,
    /// The gates of the eval forward.
    pub eval_gates: Vec<Gate>,
    /// The gates of the train forward.
    pub train_gates: Vec<Gate>,
}

/// How a run takes its decisions.
#[derive(Clone, Copy)]
pub struct Forced<'a> {
    /// Decisions of the eval forward.
    pub eval: &'a Decisions,
    /// Decisions of the train forward.
    pub train: &'a Decisions,
}

/// A bottleneck ResNet in float64.
pub struct Exact {
    arch: Arch,
    /// Every parameter and running statistic, torchvision's names; conv weights KRSC.
    p: BTreeMap<String, Vec<f64>>,
    /// Planted fault (tests only).
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// A conv's geometry (square kernels).
#[derive(Clone, Copy, Debug)]
struct Geo {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    stride: usize,
    pad: usize,
}

impl Geo {
    fn p(&self) -> usize {
        (self.h + 2 * self.pad - self.r) / self.stride + 1
    }
    fn q(&self) -> usize {
        (self.w + 2 * self.pad - self.r) / self.stride + 1
    }
    fn rows(&self) -> usize {
        self.n * self.p() * self.q()
    }
    fn rsc(&self) -> usize {
        self.r * self.r * self.c
    }
}

/// Input coordinate of output position `o`, tap `f`, or None in the padding.
fn tap(o: usize, f: usize, stride: usize, pad: usize, len: usize) -> Option<usize> {
    let v = (o * stride + f).checked_sub(pad)?;
    (v < len).then_some(v)
}

/// For each im2col entry (row, r, s), the input pixel offset (n, h, w), or None.
fn col_index(g: &Geo) -> Vec<Option<usize>> {
    let (p_, q_) = (g.p(), g.q());
    let mut idx = Vec::with_capacity(g.rows() * g.r * g.r);
    for n in 0..g.n {
        for p in 0..p_ {
            for q in 0..q_ {
                for r in 0..g.r {
                    for s in 0..g.r {
                        idx.push(match (tap(p, r, g.stride, g.pad, g.h), tap(q, s, g.stride, g.pad, g.w)) {
                            (Some(h), Some(w)) => Some((n * g.h + h) * g.w + w),
                            _ => None,
                        });
                    }
                }
            }
        }
    }
    idx
}

fn im2col(g: &Geo, x: &[f64]) -> Vec<f64> {
    let c = g.c;
    let idx = col_index(g);
    let mut col = vec![0.0; g.rows() * g.rsc()];
    col.par_chunks_mut(c).zip(idx.par_iter()).for_each(|(d, i)| {
        if let Some(i) = i {
            d.copy_from_slice(&x[i * c..(i + 1) * c]);
        }
    });
    col
}

/// `dst[m x n] = a[m x k] * b[k x n]`, operands given as (slice, row stride, col stride).
#[allow(clippy::too_many_arguments)]
fn dgemm(m: usize, n: usize, k: usize, dst: &mut [f64], a: (&[f64], isize, isize), b: (&[f64], isize, isize)) {
    assert_eq!(dst.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    // SAFETY: dst is m x n row-major; a and b cover every element their strides address
    // (the callers pass whole matrices of the stated shapes).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.0.as_ptr(),
            a.2,
            a.1,
            b.0.as_ptr(),
            b.2,
            b.1,
            0.0f64,
            1.0f64,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// y[rows, k] = im2col(x) * w^T (w KRSC).
fn fprop(g: &Geo, x: &[f64], w: &[f64]) -> Vec<f64> {
    let col = im2col(g, x);
    let (m, rsc) = (g.rows(), g.rsc());
    let mut y = vec![0.0; m * g.k];
    dgemm(m, g.k, rsc, &mut y, (&col, rsc as isize, 1), (w, 1, rsc as isize));
    y
}

/// dx (NHWC) = col2im(dy * w).
fn dgrad(g: &Geo, dy: &[f64], w: &[f64]) -> Vec<f64> {
    let (m, rsc, c) = (g.rows(), g.rsc(), g.c);
    let mut dcol = vec![0.0; m * rsc];
    dgemm(m, rsc, g.k, &mut dcol, (dy, g.k as isize, 1), (w, rsc as isize, 1));
    let mut dx = vec![0.0; g.n * g.h * g.w * c];
    let idx = col_index(g);
    // Scatter per image, in parallel over images (no two images share an input pixel).
    let per_img = idx.len() / g.n;
    dx.par_chunks_mut(g.h * g.w * c).enumerate().for_each(|(n, dxi)| {
        let base = n * g.h * g.w;
        for (j, i) in idx[n * per_img..(n + 1) * per_img].iter().enumerate() {
            if let Some(i) = i {
                let src = &dcol[(n * per_img + j) * c..(n * per_img + j + 1) * c];
                for (d, s) in dxi[(i - base) * c..(i - base + 1) * c].iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
    });
    dx
}

/// dw (KRSC) = dy^T * im2col(x).
fn wgrad(g: &Geo, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let col = im2col(g, x);
    let (m, rsc) = (g.rows(), g.rsc());
    let mut dw = vec![0.0; g.k * rsc];
    dgemm(g.k, rsc, m, &mut dw, (dy, 1, g.k as isize), (&col, rsc as isize, 1));
    dw
}

/// `out[k][j][i] = w[k][i][j]` for `w` of shape `[k][a][b]`: OIHW to KRSC with
/// `(a, b) = (c, r*s)`, and back with `(a, b) = (r*s, c)`.
fn transpose_inner(k: usize, a: usize, b: usize, w: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; w.len()];
    for kk in 0..k {
        for i in 0..a {
            for j in 0..b {
                out[(kk * b + j) * a + i] = w[(kk * a + i) * b + j];
            }
        }
    }
    out
}

fn oihw_to_krsc(k: usize, c: usize, rs: usize, w: &[f64]) -> Vec<f64> {
    transpose_inner(k, c, rs, w)
}

fn krsc_to_oihw(k: usize, c: usize, rs: usize, w: &[f64]) -> Vec<f64> {
    transpose_inner(k, rs, c, w)
}

/// For every output of the 3x3 stride-2 pad-1 max pool, the input index of its window's
/// maximum: PyTorch's rule (the first maximum in row-major tap order wins, NaN wins).
pub fn maxpool_argmax(n: usize, h: usize, w: usize, c: usize, x: &[f64]) -> Vec<u32> {
    let (oh, ow) = (cpool::maxpool_out(h), cpool::maxpool_out(w));
    let mut out = vec![0u32; n * oh * ow * c];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(row, o)| {
        let (img, oy) = (row / oh, row % oh);
        for ox in 0..ow {
            for ch in 0..c {
                let mut best: Option<(usize, f64)> = None;
                for ih in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                    for iw in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                        let i = ((img * h + ih) * w + iw) * c + ch;
                        let v = x[i];
                        match best {
                            Some((_, b)) if !(v > b || v.is_nan()) => {}
                            _ => best = Some((i, v)),
                        }
                    }
                }
                o[ox * c + ch] = best.map_or(0, |(i, _)| i as u32);
            }
        }
    });
    out
}

/// A counter-based sign stream: +1 or -1 for (seed, tensor, element).
fn sign(seed: u64, tensor: u64, i: u64) -> f64 {
    let mut z = seed ^ tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z & 1 == 1 {
        1.0
    } else {
        -1.0
    }
}

/// The state of one run: the gates' source and the perturbation counter.
struct Run<'a> {
    forced: Option<&'a Decisions>,
    gates: Vec<Gate>,
    perturb: Option<Perturb>,
    counter: u64,
}

impl Run<'_> {
    fn jiggle(&mut self, v: &mut [f64]) {
        if let Some(p) = self.perturb.filter(|p| p.what != Jiggle::Input) {
            self.counter += 1;
            let t = self.counter;
            v.par_iter_mut().enumerate().for_each(|(i, x)| *x *= 1.0 + p.rel * sign(p.seed, t, i as u64));
        }
    }

    fn forced(&self, name: &str) -> Result<Option<&Decision>> {
        let Some(d) = self.forced else { return Ok(None) };
        let (n, dec) =
            d.gates.get(self.gates.len()).ok_or_else(|| invalid!("the forced decisions end before gate {name}"))?;
        ensure!(n == name, "forced decisions out of step: gate {name} was given {n}'s");
        Ok(Some(dec))
    }

    /// ReLU gate: returns the output.
    fn relu(&mut self, name: &str, y: &[f64]) -> Result<Vec<f64>> {
        let mask = match self.forced(name)? {
            Some(Decision::Relu(m)) => {
                ensure!(m.len() == y.len(), "gate {name}: {} forced decisions for {} values", m.len(), y.len());
                m.clone()
            }
            Some(_) => return Err(invalid!("gate {name}: the forced decision is not a ReLU's")),
            None => y.iter().map(|&v| v > 0.0).collect(),
        };
        let out = y.iter().zip(&mask).map(|(&v, &m)| if m { v } else { 0.0 }).collect();
        self.gates.push(Gate { name: name.into(), decision: Decision::Relu(mask), pre: y.to_vec() });
        Ok(out)
    }

    /// Max pool gate: returns (output, argmax).
    fn maxpool(&mut self, n: usize, h: usize, w: usize, c: usize, x: &[f64]) -> Result<(Vec<f64>, Vec<u32>)> {
        let len = n * cpool::maxpool_out(h) * cpool::maxpool_out(w) * c;
        let arg = match self.forced("maxpool")? {
            Some(Decision::MaxPool(a)) => {
                ensure!(a.len() == len, "gate maxpool: {} forced decisions for {len} outputs", a.len());
                ensure!(a.iter().all(|&i| (i as usize) < x.len()), "gate maxpool: a forced index is out of range");
                a.clone()
            }
            Some(_) => return Err(invalid!("gate maxpool: the forced decision is not a max pool's")),
            None => maxpool_argmax(n, h, w, c, x),
        };
        let y = arg.iter().map(|&i| x[i as usize]).collect();
        self.gates.push(Gate { name: "maxpool".into(), decision: Decision::MaxPool(arg.clone()), pre: Vec::new() });
        Ok((y, arg))
    }
}

/// What a BN's forward keeps for its backward.
struct BnSaved {
    x: Vec<f64>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

/// What a block's forward keeps for its backward.
struct BlockTape {
    x: Vec<f64>,
    g1: Geo,
    g2: Geo,
    g3: Geo,
    b1: BnSaved,
    mask1: Vec<bool>,
    a1: Vec<f64>,
    b2: BnSaved,
    mask2: Vec<bool>,
    a2: Vec<f64>,
    b3: BnSaved,
    down: Option<(Geo, BnSaved)>,
    mask_out: Vec<bool>,
}

fn mask_of(g: &Gate) -> Vec<bool> {
    match &g.decision {
        Decision::Relu(m) => m.clone(),
        Decision::MaxPool(_) => Vec::new(),
    }
}

impl Exact {
    /// The model of `sd` (torchvision's names; f32 tensors), in float64.
    pub fn from_state(sd: &StateDict) -> Result<Exact> {
        let arch = Arch::from_state(sd)?;
        let mut p = BTreeMap::new();
        for spec in arch.tensor_specs() {
            let t = sd.get(&spec.name)?;
            let v = t.as_f32().ok_or_else(|| invalid!("tensor {} is not F32", spec.name))?;
            ensure!(t.shape == spec.shape, "tensor {} has shape {:?}, expected {:?}", spec.name, t.shape, spec.shape);
            let mut v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            if spec.shape.len() == 4 {
                let (k, c, rs) = (spec.shape[0], spec.shape[1], spec.shape[2] * spec.shape[3]);
                v = oihw_to_krsc(k, c, rs, &v);
            }
            p.insert(spec.name, v);
        }
        Ok(Exact { arch, p, fault: None })
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    fn get(&self, name: &str) -> Result<&[f64]> {
        self.p.get(name).map(Vec::as_slice).ok_or_else(|| invalid!("internal: no parameter {name}"))
    }

    fn conv_weight(&self, name: &str, run: &mut Run, perturb_weights: bool) -> Result<Vec<f64>> {
        let mut w = self.get(&format!("{name}.weight"))?.to_vec();
        if perturb_weights {
            run.jiggle(&mut w);
        }
        Ok(w)
    }

    /// Forward through one BN. Train mode returns the saved statistics and the new
    /// running statistics.
    #[allow(clippy::too_many_arguments)]
    fn bn(
        &self,
        name: &str,
        m: usize,
        c: usize,
        x: Vec<f64>,
        train: bool,
        hp: &Hyper,
        run: &mut Run,
        new_stats: &mut BTreeMap<String, Vec<f64>>,
    ) -> Result<(Vec<f64>, BnSaved)> {
        let gamma = self.get(&format!("{name}.weight"))?;
        let beta = self.get(&format!("{name}.bias"))?;
        let rm = self.get(&format!("{name}.running_mean"))?;
        let rv = self.get(&format!("{name}.running_var"))?;
        let (mut y, saved) = if train {
            let o = cbn::bn_forward_train_oracle(m, c, &x, gamma, beta, rm, rv, hp.bn_momentum, hp.bn_eps, false);
            new_stats.insert(format!("{name}.running_mean"), o.running_mean);
            new_stats.insert(format!("{name}.running_var"), o.running_var);
            (o.y, BnSaved { x, mean: o.mean, invstd: o.invstd })
        } else {
            let y = cbn::bn_forward_eval_oracle(m, c, &x, gamma, beta, rm, rv, hp.bn_eps, false);
            (y, BnSaved { x: Vec::new(), mean: Vec::new(), invstd: Vec::new() })
        };
        run.jiggle(&mut y);
        Ok((y, saved))
    }

    /// One forward pass: returns the logits, and with `train` the tapes for backward.
    #[allow(clippy::type_complexity)]
    fn forward(
        &self,
        images: &[f64],
        dims: (usize, usize, usize),
        train: bool,
        hp: &Hyper,
        run: &mut Run,
        new_stats: &mut BTreeMap<String, Vec<f64>>,
    ) -> Result<(Vec<f64>, Option<Tape>)> {
        let (n, h, w) = dims;
        let pw = run.perturb.is_some_and(|p| p.what == Jiggle::OpsAndWeights);
        // NCHW -> NHWC.
        let mut x0 = vec![0.0; n * h * w * 3];
        for img in 0..n {
            for ch in 0..3 {
                for i in 0..h * w {
                    x0[(img * h * w + i) * 3 + ch] = images[(img * 3 + ch) * h * w + i];
                }
            }
        }
        let a = &self.arch;
        let gs = Geo { n, h, w, c: 3, k: a.stem, r: 7, stride: 2, pad: 3 };
        let mut t0 = fprop(&gs, &x0, &self.conv_weight("conv1", run, pw)?);
        run.jiggle(&mut t0);
        let (h1, w1) = (gs.p(), gs.q());
        let (y0, s0) = self.bn("bn1", n * h1 * w1, a.stem, t0, train, hp, run, new_stats)?;
        let a0 = run.relu("relu", &y0)?;
        let mask0 = mask_of(run.gates.last().expect("pushed"));
        let (mut x, arg) = run.maxpool(n, h1, w1, a.stem, &a0)?;
        let (mut hh, mut ww) = (cpool::maxpool_out(h1), cpool::maxpool_out(w1));
        let mut blocks = Vec::with_capacity(a.blocks.len());
        let fault_block = a.blocks.iter().rposition(|b| !b.downsample);
        for (bi, b) in a.blocks.iter().enumerate() {
            let p = b.prefix();
            let g1 = Geo { n, h: hh, w: ww, c: b.cin, k: b.w1, r: 1, stride: 1, pad: 0 };
            let g2 = Geo { n, h: hh, w: ww, c: b.w1, k: b.w2, r: 3, stride: b.stride, pad: 1 };
            let (ho, wo) = (g2.p(), g2.q());
            let g3 = Geo { n, h: ho, w: wo, c: b.w2, k: b.cout, r: 1, stride: 1, pad: 0 };
            let (m1, m2) = (n * hh * ww, n * ho * wo);
            let mut t1 = fprop(&g1, &x, &self.conv_weight(&format!("{p}.conv1"), run, pw)?);
            run.jiggle(&mut t1);
            let (y1, b1) = self.bn(&format!("{p}.bn1"), m1, b.w1, t1, train, hp, run, new_stats)?;
            let a1 = run.relu(&format!("{p}.bn1"), &y1)?;
            let mask1 = mask_of(run.gates.last().expect("pushed"));
            let mut t2 = fprop(&g2, &a1, &self.conv_weight(&format!("{p}.conv2"), run, pw)?);
            run.jiggle(&mut t2);
            let (y2, b2) = self.bn(&format!("{p}.bn2"), m2, b.w2, t2, train, hp, run, new_stats)?;
            let a2 = run.relu(&format!("{p}.bn2"), &y2)?;
            let mask2 = mask_of(run.gates.last().expect("pushed"));
            let mut t3 = fprop(&g3, &a2, &self.conv_weight(&format!("{p}.conv3"), run, pw)?);
            run.jiggle(&mut t3);
            let (y3, b3) = self.bn(&format!("{p}.bn3"), m2, b.cout, t3, train, hp, run, new_stats)?;
            let (res, down) = if b.downsample {
                let gd = Geo { n, h: hh, w: ww, c: b.cin, k: b.cout, r: 1, stride: b.stride, pad: 0 };
                let mut td = fprop(&gd, &x, &self.conv_weight(&format!("{p}.downsample.0"), run, pw)?);
                run.jiggle(&mut td);
                let (yd, bd) = self.bn(&format!("{p}.downsample.1"), m2, b.cout, td, train, hp, run, new_stats)?;
                (yd, Some((gd, bd)))
            } else if self.fault == Some(Fault::ChannelOffset) && Some(bi) == fault_block {
                let shifted = (0..x.len()).map(|i| x[(i + 1) % x.len()]).collect();
                (shifted, None)
            } else {
                (x.clone(), None)
            };
            let mut s: Vec<f64> = y3.iter().zip(&res).map(|(a, b)| a + b).collect();
            run.jiggle(&mut s);
            let out = run.relu(&format!("{p}.out"), &s)?;
            let mask_out = mask_of(run.gates.last().expect("pushed"));
            blocks.push(BlockTape { x, g1, g2, g3, b1, mask1, a1, b2, mask2, a2, b3, down, mask_out });
            x = out;
            (hh, ww) = (ho, wo);
        }
        let c = a.fc_in();
        let mut feat = cpool::avgpool_forward_oracle(n, hh * ww, c, &x);
        run.jiggle(&mut feat);
        let mut logits = cfc::fc_forward_oracle(n, c, a.classes, &feat, self.get("fc.weight")?, self.get("fc.bias")?);
        run.jiggle(&mut logits);
        let tape = train.then(|| Tape { n, hw: hh * ww, x0, gs, s0, mask0, arg, h1w1: (h1, w1), blocks, feat });
        Ok((logits, tape))
    }

    /// The backward pass from the loss gradient; returns every parameter's gradient
    /// (conv weights KRSC).
    fn backward(&self, tape: Tape, dlogits: &[f64], run: &mut Run) -> Result<BTreeMap<String, Vec<f64>>> {
        let a = &self.arch;
        let mut grads = BTreeMap::new();
        let n = tape.n;
        let c = a.fc_in();
        let (mut dfeat, mut dfw, mut dfb) =
            cfc::fc_backward_oracle(n, c, a.classes, &tape.feat, self.get("fc.weight")?, dlogits);
        run.jiggle(&mut dfeat);
        run.jiggle(&mut dfw);
        run.jiggle(&mut dfb);
        grads.insert("fc.weight".to_string(), dfw);
        grads.insert("fc.bias".to_string(), dfb);
        let mut g = cpool::avgpool_backward_oracle(n, tape.hw, c, &dfeat);
        run.jiggle(&mut g);
        let bn_bwd = |name: &str,
                      m: usize,
                      c: usize,
                      s: &BnSaved,
                      dy: &[f64],
                      run: &mut Run,
                      grads: &mut BTreeMap<String, Vec<f64>>|
         -> Result<Vec<f64>> {
            let gamma = self.get(&format!("{name}.weight"))?;
            let mut o = cbn::bn_backward_oracle(m, c, &s.x, None, dy, gamma, &s.mean, &s.invstd);
            run.jiggle(&mut o.dx);
            run.jiggle(&mut o.dgamma);
            run.jiggle(&mut o.dbeta);
            grads.insert(format!("{name}.weight"), o.dgamma);
            grads.insert(format!("{name}.bias"), o.dbeta);
            Ok(o.dx)
        };
        let masked =
            |d: &[f64], m: &[bool]| -> Vec<f64> { d.iter().zip(m).map(|(&v, &k)| if k { v } else { 0.0 }).collect() };
        let conv_bwd = |name: &str,
                        geo: &Geo,
                        x: &[f64],
                        dy: &[f64],
                        want_dx: bool,
                        run: &mut Run,
                        grads: &mut BTreeMap<String, Vec<f64>>|
         -> Result<Vec<f64>> {
            let mut dw = wgrad(geo, x, dy);
            run.jiggle(&mut dw);
            grads.insert(format!("{name}.weight"), dw);
            if !want_dx {
                return Ok(Vec::new());
            }
            let mut dx = dgrad(geo, dy, self.get(&format!("{name}.weight"))?);
            run.jiggle(&mut dx);
            Ok(dx)
        };
        for (bi, (b, t)) in a.blocks.iter().zip(tape.blocks).enumerate().rev() {
            let p = b.prefix();
            let m1 = t.g1.rows();
            let m2 = t.g3.rows();
            let ds = masked(&g, &t.mask_out);
            let dt3 = bn_bwd(&format!("{p}.bn3"), m2, b.cout, &t.b3, &ds, run, &mut grads)?;
            let da2 = conv_bwd(&format!("{p}.conv3"), &t.g3, &t.a2, &dt3, true, run, &mut grads)?;
            let dt2 = bn_bwd(&format!("{p}.bn2"), m2, b.w2, &t.b2, &masked(&da2, &t.mask2), run, &mut grads)?;
            let da1 = conv_bwd(&format!("{p}.conv2"), &t.g2, &t.a1, &dt2, true, run, &mut grads)?;
            let dt1 = bn_bwd(&format!("{p}.bn1"), m1, b.w1, &t.b1, &masked(&da1, &t.mask1), run, &mut grads)?;
            let mut dx = conv_bwd(&format!("{p}.conv1"), &t.g1, &t.x, &dt1, true, run, &mut grads)?;
            match &t.down {
                Some((gd, bd)) => {
                    let dtd = bn_bwd(&format!("{p}.downsample.1"), m2, b.cout, bd, &ds, run, &mut grads)?;
                    let dxd = conv_bwd(&format!("{p}.downsample.0"), gd, &t.x, &dtd, true, run, &mut grads)?;
                    dx.iter_mut().zip(&dxd).for_each(|(a, b)| *a += b);
                }
                None => dx.iter_mut().zip(&ds).for_each(|(a, b)| *a += b),
            }
            run.jiggle(&mut dx);
            if self.fault == Some(Fault::SwappedBuffers) && bi == 0 {
                let (w, bb) = (format!("{p}.bn2.weight"), format!("{p}.bn2.bias"));
                let gw = grads.remove(&w).expect("inserted");
                let gb = grads.remove(&bb).expect("inserted");
                grads.insert(w, gb);
                grads.insert(bb, gw);
            }
            g = dx;
        }
        // The stem: max pool, BN + ReLU, conv (no input gradient).
        let (h1, w1) = tape.h1w1;
        let mut da0 = vec![0.0; n * h1 * w1 * a.stem];
        for (&i, &d) in tape.arg.iter().zip(&g) {
            da0[i as usize] += d;
        }
        run.jiggle(&mut da0);
        let dt0 = bn_bwd("bn1", n * h1 * w1, a.stem, &tape.s0, &masked(&da0, &tape.mask0), run, &mut grads)?;
        conv_bwd("conv1", &tape.gs, &tape.x0, &dt0, false, run, &mut grads)?;
        Ok(grads)
    }

    /// The whole check sequence of a reference: eval forward, train forward (loss and
    /// running statistics), backward, one SGD step (the first: momentum buffer = gradient).
    /// `forced` takes the decisions from another run; `perturb` jiggles every op.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        images: &[f32],
        dims: (usize, usize, usize),
        targets: &[i64],
        hp: &Hyper,
        forced: Option<Forced>,
        perturb: Option<Perturb>,
    ) -> Result<Outcome> {
        let (n, h, w) = dims;
        ensure!(images.len() == n * 3 * h * w, "{} input values for [{n}, 3, {h}, {w}]", images.len());
        ensure!(targets.len() == n, "{} targets for a batch of {n}", targets.len());
        let classes = self.arch.classes;
        let t32: Vec<i32> = targets
            .iter()
            .map(|&t| i32::try_from(t).ok().filter(|&v| v >= 0 && (v as usize) < classes))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid!("a target is not a class index below {classes}"))?;
        let mut images: Vec<f64> = images.iter().map(|&v| v as f64).collect();
        if let Some(p) = perturb.filter(|p| p.what == Jiggle::Input) {
            images.iter_mut().enumerate().for_each(|(i, x)| *x *= 1.0 + p.rel * sign(p.seed, 0, i as u64));
        }
        let mut scratch = BTreeMap::new();
        let mut run = Run { forced: forced.map(|f| f.eval), gates: Vec::new(), perturb, counter: 0 };
        let (eval_logits, _) = self.forward(&images, dims, false, hp, &mut run, &mut scratch)?;
        let eval_gates = std::mem::take(&mut run.gates);
        run.forced = forced.map(|f| f.train);
        let mut buffers = BTreeMap::new();
        let (logits, tape) = self.forward(&images, dims, true, hp, &mut run, &mut buffers)?;
        let train_gates = std::mem::take(&mut run.gates);
        let (loss, mut dlogits) = closs::softmax_cross_entropy_oracle(n, classes, &logits, &t32);
        run.jiggle(&mut dlogits);
        let grads_krsc = self.backward(tape.expect("train forward keeps its tape"), &dlogits, &mut run)?;
        let mut grads = BTreeMap::new();
        let mut stepped = BTreeMap::new();
        for (name, param) in &self.p {
            if name.ends_with(".running_mean") || name.ends_with(".running_var") {
                continue;
            }
            let g = grads_krsc.get(name).ok_or_else(|| invalid!("internal: no gradient for {name}"))?;
            let (p, _) =
                csgd::sgd_step_oracle(param, g, &vec![0.0; g.len()], hp.lr, hp.momentum, hp.weight_decay, true);
            let (g, p) = match self.shape4(name) {
                Some((k, c, rs)) => (krsc_to_oihw(k, c, rs, g), krsc_to_oihw(k, c, rs, &p)),
                None => (g.clone(), p),
            };
            grads.insert(name.clone(), g);
            stepped.insert(name.clone(), p);
        }
        for (k, v) in &buffers {
            stepped.insert(k.clone(), v.clone());
        }
        Ok(Outcome { eval_logits, logits, loss, grads, buffers, stepped, eval_gates, train_gates })
    }

    /// (k, c, r*s) of a conv weight.
    fn shape4(&self, name: &str) -> Option<(usize, usize, usize)> {
        self.arch
            .tensor_specs()
            .into_iter()
            .find(|s| s.name == name && s.shape.len() == 4)
            .map(|s| (s.shape[0], s.shape[1], s.shape[2] * s.shape[3]))
    }
}

/// What a train forward keeps for its backward.
struct Tape {
    n: usize,
    hw: usize,
    x0: Vec<f64>,
    gs: Geo,
    s0: BnSaved,
    mask0: Vec<bool>,
    arg: Vec<u32>,
    h1w1: (usize, usize),
    blocks: Vec<BlockTape>,
    feat: Vec<f64>,
}

/// The decisions a device took, from its post-ReLU activations (as f32, NHWC, named as
/// in [`Decisions`], in forward order, without the max pool): a ReLU passed an element
/// where its output is > 0; the max pool's decisions are those of the stem ReLU's output.
pub fn decisions_from_relu_outputs(
    arch: &Arch,
    dims: (usize, usize, usize),
    outs: &[(String, Vec<f32>)],
) -> Result<Decisions> {
    let (n, h, w) = dims;
    let mut gates = Vec::with_capacity(outs.len() + 1);
    for (i, (name, v)) in outs.iter().enumerate() {
        gates.push((name.clone(), Decision::Relu(v.iter().map(|&x| x > 0.0).collect())));
        if i == 0 {
            ensure!(name == "relu", "internal: the first ReLU output must be the stem's, got {name}");
            let (h1, w1) = ((h + 6 - 7) / 2 + 1, (w + 6 - 7) / 2 + 1);
            ensure!(v.len() == n * h1 * w1 * arch.stem, "internal: the stem's ReLU output has {} values", v.len());
            let x: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            gates.push(("maxpool".into(), Decision::MaxPool(maxpool_argmax(n, h1, w1, arch.stem, &x))));
        }
    }
    Ok(Decisions { gates })
}

impl Decisions {
    /// The same decisions with ReLU elements flipped: (gate index, element).
    pub fn flipped(&self, flips: &[(usize, usize)]) -> Decisions {
        let mut d = self.clone();
        for &(g, i) in flips {
            if let Some((_, Decision::Relu(m))) = d.gates.get_mut(g) {
                if let Some(b) = m.get_mut(i) {
                    *b = !*b;
                }
            }
        }
        d
    }
}

impl From<&[Gate]> for Decisions {
    fn from(g: &[Gate]) -> Decisions {
        Decisions { gates: g.iter().map(|g| (g.name.clone(), g.decision.clone())).collect() }
    }
}
