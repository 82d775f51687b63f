//! The ResNet training stack on a device: forward (train and eval), backward, and SGD,
//! with the same code on the CPU and on a kernel device (cuda or emu).
//!
//! Parameters live on the device in the kernels' layouts (conv weights KRSC, f32 master
//! copies; in bf16 precision also a bf16 copy for the convs). Activations and gradients
//! live in a [`Workspace`] planned once per batch size and image size; a training step
//! allocates nothing. Layouts: activations NHWC; torchvision's NCHW and OIHW appear only
//! at the boundary (images in, state dicts in and out).

use super::arch::{Arch, Block};
use super::init::torchvision_init;
use super::state::{StateDict, Tensor};
use crate::device::{Buf, Device};
use crate::gpu::Elem;
use crate::ops::conv::{self, ConvElem, ConvShape};
use crate::ops::fused;
use crate::ops::layers::{self as layers, CastElem, LayerElem};
use crate::{ensure, invalid, Result};
use half::bf16;

/// The element type of the convolutions' activations and weights: f32, or bf16 (with f32
/// master weights, f32 BN statistics, classifier and loss).
pub trait Precision: ConvElem + LayerElem + CastElem {
    /// "f32" or "bf16".
    const NAME: &'static str;
    /// Whether convs need a low-precision copy of the f32 master weights.
    const LOW: bool;
    /// The buffer in this precision: the f32 buffer itself (f32), or its low-precision
    /// copy (bf16). Conv weights (master and copy) and input images come in such pairs.
    fn pick<'a>(full: &'a Buf<f32>, low: &'a Option<Buf<Self>>) -> Result<&'a Buf<Self>>;
}

impl Precision for f32 {
    const NAME: &'static str = "f32";
    const LOW: bool = false;
    fn pick<'a>(full: &'a Buf<f32>, _: &'a Option<Buf<f32>>) -> Result<&'a Buf<f32>> {
        Ok(full)
    }
}

impl Precision for bf16 {
    const NAME: &'static str = "bf16";
    const LOW: bool = true;
    fn pick<'a>(_: &'a Buf<f32>, low: &'a Option<Buf<bf16>>) -> Result<&'a Buf<bf16>> {
        low.as_ref().ok_or_else(|| invalid!("internal: the bf16 copy is missing"))
    }
}

/// Batch norm settings (PyTorch's defaults: momentum 0.1, eps 1e-5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnConfig {
    /// Weight of the batch statistic in the running-statistics update:
    /// `running = (1 - momentum) * running + momentum * batch`.
    pub momentum: f32,
    /// Added to the variance before the square root: `x_hat = (x - mean) / sqrt(var + eps)`.
    pub eps: f32,
}

impl Default for BnConfig {
    fn default() -> Self {
        BnConfig { momentum: 0.1, eps: 1e-5 }
    }
}

/// SGD with momentum and weight decay, as PyTorch's (dampening 0, no Nesterov).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate: `param -= lr * buf`.
    pub lr: f32,
    /// Momentum factor: `buf = momentum * buf + d`.
    pub momentum: f32,
    /// L2 penalty added to the gradient: `d = grad + weight_decay * param`.
    pub weight_decay: f32,
}

/// A conv layer's parameters: master weights (KRSC, f32), gradient, momentum.
struct Conv<T: Precision> {
    name: String,
    k: usize,
    c: usize,
    r: usize,
    stride: usize,
    pad: usize,
    w: Buf<f32>,
    low: Option<Buf<T>>,
    dw: Buf<f32>,
    mom: Buf<f32>,
}

impl<T: Precision> Conv<T> {
    fn shape(&self, n: usize, h: usize, w: usize) -> ConvShape {
        ConvShape { n, h, w, c: self.c, k: self.k, r: self.r, s: self.r, stride: self.stride, pad: self.pad }
    }
    fn weight(&self) -> Result<&Buf<T>> {
        T::pick(&self.w, &self.low)
    }
}

/// A batch norm's parameters, running statistics, gradients and momenta.
struct Bn {
    name: String,
    c: usize,
    gamma: Buf<f32>,
    beta: Buf<f32>,
    mean: Buf<f32>,
    var: Buf<f32>,
    dgamma: Buf<f32>,
    dbeta: Buf<f32>,
    mom_gamma: Buf<f32>,
    mom_beta: Buf<f32>,
}

impl Bn {
    /// The layer's buffers and settings for the BN ops, with `s` as its saved statistics.
    fn layer<'a>(&'a mut self, s: &'a mut Saved, cfg: BnConfig) -> layers::BnLayer<'a> {
        layers::BnLayer {
            c: self.c,
            gamma: &self.gamma,
            beta: &self.beta,
            running_mean: &mut self.mean,
            running_var: &mut self.var,
            save_mean: &mut s.mean,
            save_invstd: &mut s.invstd,
            dgamma: &mut self.dgamma,
            dbeta: &mut self.dbeta,
            momentum: cfg.momentum,
            eps: cfg.eps,
        }
    }
}

struct BlockParams<T: Precision> {
    spec: Block,
    conv1: Conv<T>,
    bn1: Bn,
    conv2: Conv<T>,
    bn2: Bn,
    conv3: Conv<T>,
    bn3: Bn,
    down: Option<(Conv<T>, Bn)>,
}

/// A bottleneck ResNet on a device, ready to train.
pub struct ResNet<T: Precision> {
    dev: Device,
    arch: Arch,
    stem: Conv<T>,
    stem_bn: Bn,
    blocks: Vec<BlockParams<T>>,
    fc_w: Buf<f32>,
    fc_b: Buf<f32>,
    dfc_w: Buf<f32>,
    dfc_b: Buf<f32>,
    mom_fc_w: Buf<f32>,
    mom_fc_b: Buf<f32>,
    steps: u64,
    /// Batch norm momentum and epsilon.
    pub bn: BnConfig,
    /// Label smoothing of the training loss, in [0, 1) (0: plain cross-entropy).
    pub label_smoothing: f32,
}

fn f32_of<'a>(sd: &'a StateDict, name: &str) -> Result<&'a [f32]> {
    sd.get(name)?.as_f32().ok_or_else(|| invalid!("tensor {name} is not F32"))
}

/// Scratch buffers for one step, checked out by length: gradients during backward and
/// temporaries during forward. Sized when the workspace is made.
struct Pool<T: Elem> {
    bufs: Vec<Buf<T>>,
    busy: Vec<bool>,
}

impl<T: Elem> Pool<T> {
    fn take(&mut self, len: usize) -> Result<usize> {
        let i = (0..self.bufs.len())
            .find(|&i| !self.busy[i] && self.bufs[i].len() == len)
            .ok_or_else(|| invalid!("internal: the workspace has no free scratch buffer of {len} elements"))?;
        self.busy[i] = true;
        Ok(i)
    }
    fn give(&mut self, i: usize) {
        self.busy[i] = false;
    }
}

/// Saved batch statistics of one BN for its backward.
struct Saved {
    mean: Buf<f32>,
    invstd: Buf<f32>,
}

/// Activations of one block kept for backward.
struct BlockActs<T: Elem> {
    sh1: ConvShape,
    sh2: ConvShape,
    sh3: ConvShape,
    shd: Option<ConvShape>,
    t1: Buf<T>,
    a1: Buf<T>,
    t2: Buf<T>,
    a2: Buf<T>,
    t3: Buf<T>,
    td: Option<Buf<T>>,
    out: Buf<T>,
    s1: Saved,
    s2: Saved,
    s3: Saved,
    sd: Option<Saved>,
}

/// Activations and gradient buffers for one batch size and image size.
pub struct Workspace<T: Precision> {
    n: usize,
    h: usize,
    w: usize,
    classes: usize,
    /// Images, NCHW f32, as the caller gives them.
    input: Buf<f32>,
    /// Images, NHWC f32.
    input_nhwc: Buf<f32>,
    /// Images, NHWC, in the convs' precision (bf16 only).
    input_low: Option<Buf<T>>,
    stem_sh: ConvShape,
    /// Stem conv output, BN+ReLU output, max pool output.
    t0: Buf<T>,
    a0: Buf<T>,
    p0: Buf<T>,
    s0: Saved,
    stem_h: usize,
    stem_w: usize,
    blocks: Vec<BlockActs<T>>,
    feat: Buf<f32>,
    logits: Buf<f32>,
    dlogits: Buf<f32>,
    dfeat: Buf<f32>,
    loss: Buf<f32>,
    targets: Buf<i32>,
    pool: Pool<T>,
    /// Set once targets were given (a train forward needs them).
    has_targets: bool,
    /// [`ResNet::train_step_graphed`]: the model (by [`ResNet::graph_key`]) whose step ran
    /// once on this workspace, and the captured forward + backward.
    graph_warm: Option<(u64, u64)>,
    graph: Option<((u64, u64), crate::gpu::Graph)>,
}

impl<T: Precision> Workspace<T> {
    /// The number of images per batch it was planned for.
    pub fn batch(&self) -> usize {
        self.n
    }
    /// The image height and width it was planned for.
    pub fn image_size(&self) -> (usize, usize) {
        (self.h, self.w)
    }
}

impl<T: Precision> ResNet<T> {
    /// A model with the weights of `sd` (torchvision's names and layouts), on `dev`.
    pub fn from_state(dev: &Device, sd: &StateDict) -> Result<Self> {
        let arch = Arch::from_state(sd)?;
        let zeros = |n: usize| dev.zeros::<f32>(n);
        let conv = |name: &str, k: usize, c: usize, r: usize, stride: usize, pad: usize| -> Result<Conv<T>> {
            let oihw = dev.upload(f32_of(sd, &format!("{name}.weight"))?.to_vec())?;
            let mut w = dev.uninit::<f32>(k * c * r * r)?;
            conv::oihw_to_krsc(dev, k, c, r, r, &oihw, &mut w)?;
            let low = if T::LOW {
                let mut l = dev.uninit::<T>(w.len())?;
                layers::cast(dev, &w, &mut l)?;
                Some(l)
            } else {
                None
            };
            Ok(Conv { name: name.to_string(), k, c, r, stride, pad, dw: zeros(w.len())?, mom: zeros(w.len())?, w, low })
        };
        let bn = |name: &str, c: usize| -> Result<Bn> {
            let up = |s: &str| -> Result<Buf<f32>> { dev.upload(f32_of(sd, &format!("{name}.{s}"))?.to_vec()) };
            Ok(Bn {
                name: name.to_string(),
                c,
                gamma: up("weight")?,
                beta: up("bias")?,
                mean: up("running_mean")?,
                var: up("running_var")?,
                dgamma: zeros(c)?,
                dbeta: zeros(c)?,
                mom_gamma: zeros(c)?,
                mom_beta: zeros(c)?,
            })
        };
        let stem = conv("conv1", arch.stem, 3, 7, 2, 3)?;
        let stem_bn = bn("bn1", arch.stem)?;
        let mut blocks = Vec::with_capacity(arch.blocks.len());
        for b in &arch.blocks {
            let p = b.prefix();
            let down = if b.downsample {
                Some((
                    conv(&format!("{p}.downsample.0"), b.cout, b.cin, 1, b.stride, 0)?,
                    bn(&format!("{p}.downsample.1"), b.cout)?,
                ))
            } else {
                None
            };
            blocks.push(BlockParams {
                spec: b.clone(),
                conv1: conv(&format!("{p}.conv1"), b.w1, b.cin, 1, 1, 0)?,
                bn1: bn(&format!("{p}.bn1"), b.w1)?,
                conv2: conv(&format!("{p}.conv2"), b.w2, b.w1, 3, b.stride, 1)?,
                bn2: bn(&format!("{p}.bn2"), b.w2)?,
                conv3: conv(&format!("{p}.conv3"), b.cout, b.w2, 1, 1, 0)?,
                bn3: bn(&format!("{p}.bn3"), b.cout)?,
                down,
            });
        }
        let fc_n = arch.classes * arch.fc_in();
        Ok(ResNet {
            dev: dev.clone(),
            stem,
            stem_bn,
            blocks,
            fc_w: dev.upload(f32_of(sd, "fc.weight")?.to_vec())?,
            fc_b: dev.upload(f32_of(sd, "fc.bias")?.to_vec())?,
            dfc_w: zeros(fc_n)?,
            dfc_b: zeros(arch.classes)?,
            mom_fc_w: zeros(fc_n)?,
            mom_fc_b: zeros(arch.classes)?,
            arch,
            steps: 0,
            bn: BnConfig::default(),
            label_smoothing: 0.0,
        })
    }

    /// A fresh model with torchvision's initialisation.
    pub fn new(dev: &Device, arch: &Arch, seed: u64) -> Result<Self> {
        ResNet::from_state(dev, &torchvision_init(arch, seed))
    }

    /// The architecture (widths as read from the weights).
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// SGD steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Plans every activation and gradient buffer for batches of `n` images of `h` x `w`.
    pub fn workspace(&self, n: usize, h: usize, w: usize) -> Result<Workspace<T>> {
        ensure!(n >= 1, "the batch must hold at least one image");
        ensure!(h >= 1 && w >= 1, "images must be at least 1x1");
        let dev = &self.dev;
        let stem_sh = self.stem.shape(n, h, w);
        stem_sh.validate()?;
        let (h1, w1) = (stem_sh.p(), stem_sh.q());
        let (hp, wp) = (layers::maxpool_out(h1), layers::maxpool_out(w1));
        ensure!(
            n * h1 * w1 >= 2,
            "images of {h}x{w} at batch {n} leave a single value per channel for the stem's batch norm"
        );
        let act = |len: usize| dev.uninit::<T>(len);
        let saved = |c: usize| -> Result<Saved> { Ok(Saved { mean: dev.zeros(c)?, invstd: dev.zeros(c)? }) };
        let mut needs: std::collections::BTreeMap<usize, usize> = Default::default();
        let mut need = |counts: &[(usize, usize)]| {
            let mut here: std::collections::BTreeMap<usize, usize> = Default::default();
            for &(len, k) in counts {
                *here.entry(len).or_default() += k;
            }
            for (len, k) in here {
                let e = needs.entry(len).or_default();
                *e = (*e).max(k);
            }
        };
        let (mut hh, mut ww) = (hp, wp);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for bp in &self.blocks {
            let sh1 = bp.conv1.shape(n, hh, ww);
            let sh2 = bp.conv2.shape(n, hh, ww);
            sh2.validate()?;
            let (ho, wo) = (sh2.p(), sh2.q());
            let sh3 = bp.conv3.shape(n, ho, wo);
            let shd = bp.down.as_ref().map(|(c, _)| c.shape(n, hh, ww));
            let (l_in, l1, l2, l_out) = (sh1.x_len(), sh1.y_len(), sh2.y_len(), sh3.y_len());
            ensure!(n * ho * wo >= 2, "the feature map of {} is too small for batch norm", bp.spec.prefix());
            // Forward: b3 and the downsample's BN output; backward: see `backward`.
            need(&[(l_out, 2)]);
            need(&[(l_out, 2), (l_in, 2), (l1, 2), (l2, 2)]);
            blocks.push(BlockActs {
                sh1,
                sh2,
                sh3,
                shd,
                t1: act(l1)?,
                a1: act(l1)?,
                t2: act(l2)?,
                a2: act(l2)?,
                t3: act(l_out)?,
                td: if shd.is_some() { Some(act(l_out)?) } else { None },
                out: act(l_out)?,
                s1: saved(bp.spec.w1)?,
                s2: saved(bp.spec.w2)?,
                s3: saved(bp.spec.cout)?,
                sd: if shd.is_some() { Some(saved(bp.spec.cout)?) } else { None },
            });
            (hh, ww) = (ho, wo);
        }
        let (l_stem, l_pool) = (stem_sh.y_len(), n * hp * wp * self.arch.stem);
        need(&[(l_stem, 2), (l_pool, 1)]);
        let last = blocks.last().map_or(l_pool, |b| b.out.len());
        need(&[(last, 1)]);
        let mut bufs = Vec::new();
        for (&len, &k) in &needs {
            for _ in 0..k {
                bufs.push(act(len)?);
            }
        }
        let (c, k) = (self.arch.fc_in(), self.arch.classes);
        Ok(Workspace {
            n,
            h,
            w,
            classes: k,
            input: dev.zeros(n * 3 * h * w)?,
            input_nhwc: dev.zeros(n * 3 * h * w)?,
            input_low: if T::LOW { Some(act(n * 3 * h * w)?) } else { None },
            stem_sh,
            t0: act(l_stem)?,
            a0: act(l_stem)?,
            p0: act(l_pool)?,
            s0: saved(self.arch.stem)?,
            stem_h: h1,
            stem_w: w1,
            blocks,
            feat: dev.zeros(n * c)?,
            logits: dev.zeros(n * k)?,
            dlogits: dev.zeros(n * k)?,
            dfeat: dev.zeros(n * c)?,
            loss: dev.zeros(1)?,
            targets: dev.zeros(n)?,
            pool: Pool { busy: vec![false; bufs.len()], bufs },
            has_targets: false,
            graph_warm: None,
            graph: None,
        })
    }

    /// Copies a batch into the workspace: `images` NCHW f32 `[n, 3, h, w]`, and for
    /// training the class of each image (checked against the classifier's size).
    pub fn set_batch(&self, ws: &mut Workspace<T>, images: &[f32], targets: Option<&[i64]>) -> Result<()> {
        ensure!(
            images.len() == ws.input.len(),
            "the batch holds {} values, the workspace expects {}x3x{}x{} = {}",
            images.len(),
            ws.n,
            ws.h,
            ws.w,
            ws.input.len()
        );
        ws.input.write(images)?;
        if let Some(t) = targets {
            ensure!(t.len() == ws.n, "{} targets for a batch of {}", t.len(), ws.n);
            let t32: Vec<i32> = t
                .iter()
                .map(|&x| i32::try_from(x).map_err(|_| invalid!("target {x} is not a class index")))
                .collect::<Result<_>>()?;
            layers::check_targets(&t32, ws.classes)?;
            ws.targets.write(&t32)?;
            ws.has_targets = true;
        }
        Ok(())
    }

    /// The forward pass: train mode (batch statistics, running statistics updated, loss
    /// and its gradient computed) or eval mode (running statistics).
    pub fn forward(&mut self, ws: &mut Workspace<T>, train: bool) -> Result<()> {
        ensure!(!train || ws.has_targets, "a train-mode forward needs targets (set_batch with targets)");
        let dev = self.dev.clone();
        let bnc = self.bn;
        let n = ws.n;
        conv::nchw_to_nhwc(&dev, n, 3, ws.h, ws.w, &ws.input, &mut ws.input_nhwc)?;
        if let Some(low) = ws.input_low.as_mut() {
            layers::cast(&dev, &ws.input_nhwc, low)?;
        }
        let x0: &Buf<T> = T::pick(&ws.input_nhwc, &ws.input_low)?;
        if train {
            let sh = ws.stem_sh;
            let bn = &mut self.stem_bn.layer(&mut ws.s0, bnc);
            conv_bn_train(&dev, &sh, x0, &self.stem, bn, &mut ws.t0, None, true, &mut ws.a0)?;
        } else {
            conv::conv2d_fprop(&dev, &ws.stem_sh, x0, self.stem.weight()?, &mut ws.t0)?;
            let m0 = n * ws.stem_h * ws.stem_w;
            bn_fwd(&dev, &mut self.stem_bn.layer(&mut ws.s0, bnc), m0, &ws.t0, &mut ws.a0, train, true)?;
        }
        layers::maxpool_forward(&dev, n, ws.stem_h, ws.stem_w, self.arch.stem, &ws.a0, &mut ws.p0)?;
        for bi in 0..self.blocks.len() {
            let (before, rest) = ws.blocks.split_at_mut(bi);
            let acts = &mut rest[0];
            let x: &Buf<T> = if bi == 0 { &ws.p0 } else { &before[bi - 1].out };
            let bp = &mut self.blocks[bi];
            if train {
                // Fused (ops::fused): BN statistics in the conv epilogues, the last BN, the
                // residual add and the ReLU in one pass.
                let (a, t, bn) = (&mut acts.a1, &mut acts.t1, &mut bp.bn1.layer(&mut acts.s1, bnc));
                conv_bn_train(&dev, &acts.sh1, x, &bp.conv1, bn, t, None, true, a)?;
                let (a, t, bn) = (&mut acts.a2, &mut acts.t2, &mut bp.bn2.layer(&mut acts.s2, bnc));
                conv_bn_train(&dev, &acts.sh2, &acts.a1, &bp.conv2, bn, t, None, true, a)?;
                match (&mut bp.down, acts.shd, acts.td.as_mut(), acts.sd.as_mut()) {
                    (Some((dconv, dbn)), Some(shd), Some(td), Some(sd)) => {
                        let bd = ws.pool.take(acts.out.len())?;
                        let bdb = &mut ws.pool.bufs[bd];
                        conv_bn_train(&dev, &shd, x, dconv, &mut dbn.layer(sd, bnc), td, None, false, bdb)?;
                        let (o, t, bn) = (&mut acts.out, &mut acts.t3, &mut bp.bn3.layer(&mut acts.s3, bnc));
                        let r = Some(&ws.pool.bufs[bd]);
                        conv_bn_train(&dev, &acts.sh3, &acts.a2, &bp.conv3, bn, t, r, true, o)?;
                        ws.pool.give(bd);
                    }
                    (None, None, None, None) => {
                        let (o, t, bn) = (&mut acts.out, &mut acts.t3, &mut bp.bn3.layer(&mut acts.s3, bnc));
                        conv_bn_train(&dev, &acts.sh3, &acts.a2, &bp.conv3, bn, t, Some(x), true, o)?;
                    }
                    _ => return Err(invalid!("internal: downsample buffers out of step")),
                }
                continue;
            }
            let m1 = acts.sh1.n * acts.sh1.p() * acts.sh1.q();
            let m2 = acts.sh2.n * acts.sh2.p() * acts.sh2.q();
            conv::conv2d_fprop(&dev, &acts.sh1, x, bp.conv1.weight()?, &mut acts.t1)?;
            bn_fwd(&dev, &mut bp.bn1.layer(&mut acts.s1, bnc), m1, &acts.t1, &mut acts.a1, train, true)?;
            conv::conv2d_fprop(&dev, &acts.sh2, &acts.a1, bp.conv2.weight()?, &mut acts.t2)?;
            bn_fwd(&dev, &mut bp.bn2.layer(&mut acts.s2, bnc), m2, &acts.t2, &mut acts.a2, train, true)?;
            conv::conv2d_fprop(&dev, &acts.sh3, &acts.a2, bp.conv3.weight()?, &mut acts.t3)?;
            let b3 = ws.pool.take(acts.out.len())?;
            let bn = &mut bp.bn3.layer(&mut acts.s3, bnc);
            bn_fwd(&dev, bn, m2, &acts.t3, &mut ws.pool.bufs[b3], train, false)?;
            match (&mut bp.down, acts.shd, acts.td.as_mut(), acts.sd.as_mut()) {
                (Some((dconv, dbn)), Some(shd), Some(td), Some(sd)) => {
                    conv::conv2d_fprop(&dev, &shd, x, dconv.weight()?, td)?;
                    let bd = ws.pool.take(acts.out.len())?;
                    bn_fwd(&dev, &mut dbn.layer(sd, bnc), m2, td, &mut ws.pool.bufs[bd], train, false)?;
                    let [b3b, bdb] = ws.pool.bufs.get_disjoint_mut([b3, bd]).expect("distinct");
                    layers::add_relu(&dev, b3b, bdb, &mut acts.out)?;
                    ws.pool.give(bd);
                }
                (None, None, None, None) => layers::add_relu(&dev, &ws.pool.bufs[b3], x, &mut acts.out)?,
                _ => return Err(invalid!("internal: downsample buffers out of step")),
            }
            ws.pool.give(b3);
        }
        let last = ws.blocks.last().map_or(&ws.p0, |b| &b.out);
        let hw = last.len() / (n * self.arch.fc_in());
        layers::avgpool_forward(&dev, n, hw, self.arch.fc_in(), last, &mut ws.feat)?;
        layers::fc_forward(&dev, n, self.arch.fc_in(), ws.classes, &ws.feat, &self.fc_w, &self.fc_b, &mut ws.logits)?;
        if train {
            let (z, t, e) = (&ws.logits, &ws.targets, self.label_smoothing);
            layers::softmax_cross_entropy_smoothed(&dev, n, ws.classes, z, t, e, &mut ws.loss, &mut ws.dlogits)?;
        }
        Ok(())
    }

    /// The backward pass after a train-mode [`forward`](Self::forward): every parameter's
    /// gradient (conv weights in KRSC, f32).
    pub fn backward(&mut self, ws: &mut Workspace<T>) -> Result<()> {
        let dev = self.dev.clone();
        let bnc = self.bn;
        let n = ws.n;
        let (c, k) = (self.arch.fc_in(), ws.classes);
        layers::fc_backward(
            &dev,
            n,
            c,
            k,
            &ws.feat,
            &self.fc_w,
            &ws.dlogits,
            &mut ws.dfeat,
            &mut self.dfc_w,
            &mut self.dfc_b,
        )?;
        let last_len = ws.blocks.last().map_or(ws.p0.len(), |b| b.out.len());
        let mut g = ws.pool.take(last_len)?;
        layers::avgpool_backward(&dev, n, last_len / (n * c), c, &ws.dfeat, &mut ws.pool.bufs[g])?;
        let pool = &mut ws.pool;
        for bi in (0..self.blocks.len()).rev() {
            let (before, rest) = ws.blocks.split_at_mut(bi);
            let acts = &mut rest[0];
            let x: &Buf<T> = if bi == 0 { &ws.p0 } else { &before[bi - 1].out };
            let bp = &mut self.blocks[bi];
            let (l_in, l1, l2, l_out) = (acts.sh1.x_len(), acts.sh1.y_len(), acts.sh2.y_len(), acts.sh3.y_len());
            let m1 = acts.sh1.n * acts.sh1.p() * acts.sh1.q();
            let m2 = acts.sh2.n * acts.sh2.p() * acts.sh2.q();
            // Through the final ReLU to bn3 and conv3: bn3's backward masks g in place, which
            // leaves dsum, the gradient of both branches of the sum.
            let dsum = g;
            let dt3 = pool.take(l_out)?;
            {
                let [ds, d3] = pool.bufs.get_disjoint_mut([dsum, dt3]).expect("distinct");
                let bn = &mut bp.bn3.layer(&mut acts.s3, bnc);
                layers::bn_backward_masking_dy(&dev, m2, &acts.t3, &acts.out, ds, bn, d3)?;
            }
            let da2 = pool.take(l2)?;
            {
                let [d3, da] = pool.bufs.get_disjoint_mut([dt3, da2]).expect("distinct");
                conv::conv2d_wgrad(&dev, &acts.sh3, &acts.a2, d3, &mut bp.conv3.dw)?;
                conv::conv2d_dgrad(&dev, &acts.sh3, d3, bp.conv3.weight()?, da)?;
            }
            pool.give(dt3);
            // conv2 and bn2 (with its ReLU).
            let dt2 = pool.take(l2)?;
            {
                let [da, d2] = pool.bufs.get_disjoint_mut([da2, dt2]).expect("distinct");
                let bn = &mut bp.bn2.layer(&mut acts.s2, bnc);
                layers::bn_backward(&dev, m2, &acts.t2, Some(&acts.a2), da, bn, d2)?;
            }
            pool.give(da2);
            let da1 = pool.take(l1)?;
            {
                let [d2, da] = pool.bufs.get_disjoint_mut([dt2, da1]).expect("distinct");
                conv::conv2d_wgrad(&dev, &acts.sh2, &acts.a1, d2, &mut bp.conv2.dw)?;
                conv::conv2d_dgrad(&dev, &acts.sh2, d2, bp.conv2.weight()?, da)?;
            }
            pool.give(dt2);
            // conv1 and bn1 (with its ReLU).
            let dt1 = pool.take(l1)?;
            {
                let [da, d1] = pool.bufs.get_disjoint_mut([da1, dt1]).expect("distinct");
                let bn = &mut bp.bn1.layer(&mut acts.s1, bnc);
                layers::bn_backward(&dev, m1, &acts.t1, Some(&acts.a1), da, bn, d1)?;
            }
            pool.give(da1);
            let dx = pool.take(l_in)?;
            {
                let [d1, dxb] = pool.bufs.get_disjoint_mut([dt1, dx]).expect("distinct");
                conv::conv2d_wgrad(&dev, &acts.sh1, x, d1, &mut bp.conv1.dw)?;
                conv::conv2d_dgrad(&dev, &acts.sh1, d1, bp.conv1.weight()?, dxb)?;
            }
            pool.give(dt1);
            // The residual branch.
            match (&mut bp.down, acts.shd, acts.td.as_ref(), acts.sd.as_mut()) {
                (Some((dconv, dbn)), Some(shd), Some(td), Some(sd)) => {
                    let dtd = pool.take(l_out)?;
                    {
                        let [ds, dd] = pool.bufs.get_disjoint_mut([dsum, dtd]).expect("distinct");
                        layers::bn_backward(&dev, m2, td, None, ds, &mut dbn.layer(sd, bnc), dd)?;
                    }
                    let tmp = pool.take(l_in)?;
                    {
                        let [dd, t, dxb] = pool.bufs.get_disjoint_mut([dtd, tmp, dx]).expect("distinct");
                        conv::conv2d_wgrad(&dev, &shd, x, dd, &mut dconv.dw)?;
                        conv::conv2d_dgrad(&dev, &shd, dd, dconv.weight()?, t)?;
                        layers::add_assign(&dev, dxb, t)?;
                    }
                    pool.give(tmp);
                    pool.give(dtd);
                }
                (None, None, None, None) => {
                    let [dxb, ds] = pool.bufs.get_disjoint_mut([dx, dsum]).expect("distinct");
                    layers::add_assign(&dev, dxb, ds)?;
                }
                _ => return Err(invalid!("internal: downsample buffers out of step")),
            }
            pool.give(dsum);
            g = dx;
        }
        // The stem: max pool, BN + ReLU, conv (no input gradient).
        let da0 = pool.take(ws.a0.len())?;
        {
            let [gb, da] = pool.bufs.get_disjoint_mut([g, da0]).expect("distinct");
            layers::maxpool_backward(&dev, n, ws.stem_h, ws.stem_w, self.arch.stem, &ws.a0, gb, da)?;
        }
        pool.give(g);
        let dt0 = pool.take(ws.t0.len())?;
        let m0 = n * ws.stem_h * ws.stem_w;
        {
            let [da, d0] = pool.bufs.get_disjoint_mut([da0, dt0]).expect("distinct");
            let bn = &mut self.stem_bn.layer(&mut ws.s0, bnc);
            layers::bn_backward(&dev, m0, &ws.t0, Some(&ws.a0), da, bn, d0)?;
        }
        pool.give(da0);
        let x0: &Buf<T> = T::pick(&ws.input_nhwc, &ws.input_low)?;
        conv::conv2d_wgrad(&dev, &ws.stem_sh, x0, &pool.bufs[dt0], &mut self.stem.dw)?;
        pool.give(dt0);
        Ok(())
    }

    /// One SGD step on every parameter with the gradients of the last backward (the
    /// first step sets the momentum buffers to the gradients, as PyTorch).
    pub fn sgd_step(&mut self, sgd: &Sgd) -> Result<()> {
        let dev = self.dev.clone();
        let first = self.steps == 0;
        let step = |p: &mut Buf<f32>, g: &Buf<f32>, m: &mut Buf<f32>| -> Result<()> {
            layers::sgd_step(&dev, p, g, m, sgd.lr, sgd.momentum, sgd.weight_decay, first)
        };
        let conv_step = |c: &mut Conv<T>| -> Result<()> {
            step(&mut c.w, &c.dw, &mut c.mom)?;
            if let Some(low) = c.low.as_mut() {
                layers::cast(&dev, &c.w, low)?;
            }
            Ok(())
        };
        let bn_step = |b: &mut Bn| -> Result<()> {
            step(&mut b.gamma, &b.dgamma, &mut b.mom_gamma)?;
            step(&mut b.beta, &b.dbeta, &mut b.mom_beta)
        };
        conv_step(&mut self.stem)?;
        bn_step(&mut self.stem_bn)?;
        for b in &mut self.blocks {
            conv_step(&mut b.conv1)?;
            bn_step(&mut b.bn1)?;
            conv_step(&mut b.conv2)?;
            bn_step(&mut b.bn2)?;
            conv_step(&mut b.conv3)?;
            bn_step(&mut b.bn3)?;
            if let Some((c, bn)) = b.down.as_mut() {
                conv_step(c)?;
                bn_step(bn)?;
            }
        }
        step(&mut self.fc_w, &self.dfc_w, &mut self.mom_fc_w)?;
        step(&mut self.fc_b, &self.dfc_b, &mut self.mom_fc_b)?;
        self.steps += 1;
        Ok(())
    }

    /// Forward (train mode), backward and one SGD step on the batch in `ws`.
    pub fn train_step(&mut self, ws: &mut Workspace<T>, sgd: &Sgd) -> Result<()> {
        self.forward(ws, true)?;
        self.backward(ws)?;
        self.sgd_step(sgd)
    }

    /// [`train_step`](Self::train_step) with the forward and backward as one CUDA graph on
    /// the cuda device: the first call on a workspace runs them as usual (loading every
    /// kernel), the second captures them into a graph kept in the workspace (for this
    /// model), and every call from then on replays it: one launch instead of several
    /// hundred. The SGD step (whose learning rate may change) is launched as usual. Every
    /// buffer a step touches is fixed when the workspace is planned, so the replay does
    /// the same work; the launch sequence is the same as [`train_step`](Self::train_step)'s. On the CPU, the
    /// emulation, inside a profile scope (which times each op), or with synchronous
    /// launches, this is [`train_step`](Self::train_step).
    pub fn train_step_graphed(&mut self, ws: &mut Workspace<T>, sgd: &Sgd) -> Result<()> {
        ensure!(ws.has_targets, "a train-mode forward needs targets (set_batch with targets)");
        let gpu = match &self.dev {
            Device::Gpu(g) if g.can_capture() && !crate::ops::profile::active() => g.clone(),
            _ => return self.train_step(ws, sgd),
        };
        let key = self.graph_key();
        match &ws.graph {
            Some((k, g)) if *k == key => gpu.replay(g)?,
            _ if ws.graph_warm != Some(key) => {
                ws.graph = None;
                self.forward(ws, true)?;
                self.backward(ws)?;
                ws.graph_warm = Some(key);
            }
            _ => {
                let ((), g) = gpu.capture(|| -> Result<()> {
                    self.forward(ws, true)?;
                    self.backward(ws)
                })?;
                gpu.replay(&g)?;
                ws.graph = Some((key, g));
            }
        }
        self.sgd_step(sgd)
    }

    /// What a captured step depends on besides the workspace: the device addresses of the
    /// model's parameters (the stem's and the classifier's weights stand for all of them,
    /// which are allocated with the model).
    fn graph_key(&self) -> (u64, u64) {
        let ptr = |b: &Buf<f32>| match b {
            Buf::Gpu(g) => g.ptr(),
            Buf::Host(_) => 0,
        };
        (ptr(&self.stem.w), ptr(&self.fc_w))
    }

    /// The loss of the last train-mode forward (waits for the device).
    pub fn loss(&self, ws: &Workspace<T>) -> Result<f32> {
        Ok(ws.loss.to_vec()?[0])
    }

    /// The logits of the last forward, `[n, classes]` (waits for the device).
    pub fn logits(&self, ws: &Workspace<T>) -> Result<Vec<f32>> {
        ws.logits.to_vec()
    }

    /// The output of every ReLU of the last forward pass, as f32 NHWC, in forward order and
    /// named as `verify`'s gates: `relu` (the stem's), then per block `layerS.I.bn1`,
    /// `layerS.I.bn2` and `layerS.I.out` (after the residual add). `verify` reads the
    /// device's ReLU and max-pool decisions off them.
    pub fn relu_outputs(&self, ws: &Workspace<T>) -> Result<Vec<(String, Vec<f32>)>> {
        let f = |b: &Buf<T>| -> Result<Vec<f32>> { Ok(b.to_vec()?.into_iter().map(ConvElem::to_f32).collect()) };
        let mut out = vec![("relu".to_string(), f(&ws.a0)?)];
        for (bp, acts) in self.blocks.iter().zip(&ws.blocks) {
            let p = bp.spec.prefix();
            out.push((format!("{p}.bn1"), f(&acts.a1)?));
            out.push((format!("{p}.bn2"), f(&acts.a2)?));
            out.push((format!("{p}.out"), f(&acts.out)?));
        }
        Ok(out)
    }

    fn conv_oihw(&self, c: &Conv<T>, krsc: &Buf<f32>) -> Result<Vec<f32>> {
        let mut out = self.dev.uninit::<f32>(krsc.len())?;
        conv::krsc_to_oihw(&self.dev, c.k, c.c, c.r, c.r, krsc, &mut out)?;
        out.to_vec()
    }

    /// Visits every conv and BN in torchvision's order.
    fn layers(&self) -> (Vec<&Conv<T>>, Vec<&Bn>) {
        let mut convs = vec![&self.stem];
        let mut bns = vec![&self.stem_bn];
        for b in &self.blocks {
            convs.extend([&b.conv1, &b.conv2, &b.conv3]);
            bns.extend([&b.bn1, &b.bn2, &b.bn3]);
            if let Some((c, bn)) = &b.down {
                convs.push(c);
                bns.push(bn);
            }
        }
        (convs, bns)
    }

    fn collect(&self, what: Collect) -> Result<StateDict> {
        let mut sd = StateDict::default();
        let (convs, bns) = self.layers();
        for c in convs {
            let src = match what {
                Collect::Params => &c.w,
                Collect::Grads => &c.dw,
                Collect::Momentum => &c.mom,
            };
            sd.tensors
                .insert(format!("{}.weight", c.name), Tensor::f32(vec![c.k, c.c, c.r, c.r], self.conv_oihw(c, src)?));
        }
        for b in bns {
            let v = |x: &Buf<f32>| -> Result<Tensor> { Ok(Tensor::f32(vec![b.c], x.to_vec()?)) };
            let (g, bb) = match what {
                Collect::Params => (&b.gamma, &b.beta),
                Collect::Grads => (&b.dgamma, &b.dbeta),
                Collect::Momentum => (&b.mom_gamma, &b.mom_beta),
            };
            sd.tensors.insert(format!("{}.weight", b.name), v(g)?);
            sd.tensors.insert(format!("{}.bias", b.name), v(bb)?);
            if what == Collect::Params {
                sd.tensors.insert(format!("{}.running_mean", b.name), v(&b.mean)?);
                sd.tensors.insert(format!("{}.running_var", b.name), v(&b.var)?);
            }
        }
        let (wsrc, bsrc) = match what {
            Collect::Params => (&self.fc_w, &self.fc_b),
            Collect::Grads => (&self.dfc_w, &self.dfc_b),
            Collect::Momentum => (&self.mom_fc_w, &self.mom_fc_b),
        };
        sd.tensors.insert("fc.weight".into(), Tensor::f32(vec![self.arch.classes, self.arch.fc_in()], wsrc.to_vec()?));
        sd.tensors.insert("fc.bias".into(), Tensor::f32(vec![self.arch.classes], bsrc.to_vec()?));
        Ok(sd)
    }

    /// The model as a state dict with torchvision's names and layouts.
    pub fn to_state(&self) -> Result<StateDict> {
        self.collect(Collect::Params)
    }

    /// The gradients of the last backward, named after their parameters (OIHW for convs).
    pub fn gradients(&self) -> Result<StateDict> {
        self.collect(Collect::Grads)
    }

    /// SGD's momentum buffers, named after their parameters (OIHW for convs): the
    /// optimizer state to prune with the model (`prune::prune_state_with`).
    pub fn momentum_state(&self) -> Result<StateDict> {
        self.collect(Collect::Momentum)
    }

    /// Continues an SGD run: sets every momentum buffer (named and shaped like the
    /// parameters, as [`momentum_state`](Self::momentum_state) gives them) and the number of
    /// steps already taken (0 makes the next step a first step again).
    pub fn set_momentum_state(&mut self, sd: &StateDict, steps: u64) -> Result<()> {
        let want: std::collections::BTreeMap<String, Vec<usize>> =
            self.arch.tensor_specs().into_iter().filter(|s| s.role.is_param()).map(|s| (s.name, s.shape)).collect();
        for (n, t) in &sd.tensors {
            let shape = want.get(n).ok_or_else(|| invalid!("momentum state {n} names no parameter"))?;
            ensure!(&t.shape == shape, "momentum state {n} has shape {:?}, its parameter {shape:?}", t.shape);
            ensure!(t.as_f32().is_some(), "momentum state {n} is not F32");
        }
        for n in want.keys() {
            ensure!(sd.tensors.contains_key(n), "momentum state for {n} is missing");
        }
        let dev = self.dev.clone();
        let get = |n: &str| -> Result<&[f32]> { f32_of(sd, n) };
        let (convs, bns) = self.layers_mut();
        for c in convs {
            let oihw = dev.upload(get(&format!("{}.weight", c.name))?.to_vec())?;
            conv::oihw_to_krsc(&dev, c.k, c.c, c.r, c.r, &oihw, &mut c.mom)?;
        }
        for b in bns {
            b.mom_gamma.write(get(&format!("{}.weight", b.name))?)?;
            b.mom_beta.write(get(&format!("{}.bias", b.name))?)?;
        }
        self.mom_fc_w.write(get("fc.weight")?)?;
        self.mom_fc_b.write(get("fc.bias")?)?;
        self.steps = steps;
        Ok(())
    }

    /// Every conv and BN, mutably, in torchvision's order.
    fn layers_mut(&mut self) -> (Vec<&mut Conv<T>>, Vec<&mut Bn>) {
        let mut convs = vec![&mut self.stem];
        let mut bns = vec![&mut self.stem_bn];
        for b in &mut self.blocks {
            convs.extend([&mut b.conv1, &mut b.conv2, &mut b.conv3]);
            bns.extend([&mut b.bn1, &mut b.bn2, &mut b.bn3]);
            if let Some((c, bn)) = &mut b.down {
                convs.push(c);
                bns.push(bn);
            }
        }
        (convs, bns)
    }
}

/// Which tensors [`ResNet::collect`] gathers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Collect {
    Params,
    Grads,
    Momentum,
}

/// A BN (+ ReLU) forward in train or eval mode.
fn bn_fwd<T: Precision>(
    dev: &Device,
    bn: &mut layers::BnLayer<'_>,
    m: usize,
    x: &Buf<T>,
    y: &mut Buf<T>,
    train: bool,
    relu: bool,
) -> Result<()> {
    if train {
        layers::bn_forward_train(dev, m, x, bn, relu, y)
    } else {
        layers::bn_forward_eval(dev, m, x, bn, relu, y)
    }
}

/// Train-mode conv + BN (+ residual) (+ ReLU) through [`fused::conv_bn_forward_train`]:
/// `t` = the conv output (kept for backward), `out` = the BN output.
#[allow(clippy::too_many_arguments)]
fn conv_bn_train<T: Precision>(
    dev: &Device,
    sh: &ConvShape,
    x: &Buf<T>,
    cv: &Conv<T>,
    bn: &mut layers::BnLayer<'_>,
    t: &mut Buf<T>,
    residual: Option<&Buf<T>>,
    relu: bool,
    out: &mut Buf<T>,
) -> Result<()> {
    fused::conv_bn_forward_train(dev, sh, x, cv.weight()?, t, bn, residual, relu, out)
}
