//! The ResNet training stack on a device: forward (train and eval), backward, and SGD,
//! with the same code on the CPU and on a kernel device (cuda or emu).
//!
//! Parameters live on the device in the kernels' layouts (conv weights KRSC, f32 master
//! copies; in bf16 precision also a bf16 copy for the convs). Activations and gradients
//! live in a [`Workspace`] planned once per batch size and image size; a training step
//! allocates nothing. Layouts: activations NHWC; torchvision's NCHW and OIHW appear only
//! at the boundary (images in, state dicts in and out).

mod backward;
mod forward;
mod graph;
mod io;
mod tune;
mod workspace;

use super::arch::{Arch, Block};
use super::init::torchvision_init;
use super::state::{StateDict, Tensor};
use crate::device::{Buf, Device};
use crate::gpu::Elem;
use crate::ops::conv::{self, ConvElem};
use crate::ops::fused;
use crate::ops::layers::{self as layers, CastElem, LayerElem};
use crate::shape::ConvShape;
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

/// The BN work a train step on a kernel device folds into its convolutions (the CPU
/// fuses neither: it writes every BN output and runs each BN backward as its own passes).
/// Every combination gives the same results up to rounding. Each fusion cuts bytes (the
/// dense bf16 step at batch 256, 224x224: 84.8 GB unfused, 76.5 GB with both, counted by
/// `bench --device emu:count`) but, with the present conv kernels, costs the convs more
/// time than it saves: on an H200 the dense step took 65.3 ms unfused, 77.3 ms with the BN
/// on load, 69.4 ms with the dgrad sums and 81.3 ms with both
/// (`bench/results/gpu-h200-2026-12-04`). So the default is neither.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BnFusion {
    /// bn1 and bn2 (with their ReLUs) applied as conv2's and conv3's fprop and wgrad load
    /// their inputs; their outputs are never written.
    pub on_load: bool,
    /// The BN backward sums (dbeta, dgamma) of bn1, bn2, and the previous block's bn3 and
    /// downsample BN taken in the epilogue of the dgrad that stores their output gradient;
    /// each of those BN backwards is then its dx pass alone.
    pub dgrad_sums: bool,
}

impl BnFusion {
    /// Both fusions.
    pub const ALL: BnFusion = BnFusion { on_load: true, dgrad_sums: true };
    /// Neither (the default).
    pub const NONE: BnFusion = BnFusion { on_load: false, dgrad_sums: false };
}

/// The names of `--bn-fusion`: `all`, `load` (the BN on load), `dgrad` (the sums in the
/// dgrad epilogues), `none`.
impl std::str::FromStr for BnFusion {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        let (on_load, dgrad_sums) = match s {
            "all" => (true, true),
            "load" => (true, false),
            "dgrad" => (false, true),
            "none" => (false, false),
            _ => return Err(crate::invalid!("unknown BN fusion {s:?}: expected all, load, dgrad or none")),
        };
        Ok(BnFusion { on_load, dgrad_sums })
    }
}

impl std::fmt::Display for BnFusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.on_load, self.dgrad_sums) {
            (true, true) => "all",
            (true, false) => "load",
            (false, true) => "dgrad",
            (false, false) => "none",
        })
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
    /// The input channels the kernels run with: `c`, or for the stem of a bf16 model on a
    /// kernel device `c` padded with zero channels to [`STEM_PADDED`] (the low copy of
    /// the weight, the stem's input and its shape are padded; master weight, gradient and
    /// momentum are not).
    cp: usize,
    r: usize,
    stride: usize,
    pad: usize,
    w: Buf<f32>,
    low: Option<Buf<T>>,
    dw: Buf<f32>,
    /// The wgrad's output where `cp != c`, cut to `dw`.
    dw_padded: Option<Buf<f32>>,
    mom: Buf<f32>,
}

/// The channels the stem of a tensor-core model runs with on a kernel device: its three
/// input channels padded with zeros to 8, so that its loads are the 16-byte ones of every
/// other conv (`conv::vector_ok`) instead of the scalar tile.
pub(crate) const STEM_PADDED: usize = 8;

impl<T: Precision> Conv<T> {
    fn shape(&self, n: usize, h: usize, w: usize) -> ConvShape {
        ConvShape { n, h, w, c: self.cp, k: self.k, r: self.r, s: self.r, stride: self.stride, pad: self.pad }
    }
    fn weight(&self) -> Result<&Buf<T>> {
        T::pick(&self.w, &self.low)
    }
    /// The low-precision copy from the master weight (padded where `cp != c`).
    fn refresh_low(&mut self, dev: &Device) -> Result<()> {
        if let Some(low) = self.low.as_mut() {
            if self.cp == self.c {
                layers::cast(dev, &self.w, low)?;
            } else {
                conv::pad_rows(dev, self.k * self.r * self.r, self.c, self.cp, &self.w, low)?;
            }
        }
        Ok(())
    }
    /// The wgrad of `sh` (this conv's shape) from `x` and `dy` into `dw` (through the padded
    /// gradient where `cp != c`).
    fn wgrad(&mut self, dev: &Device, sh: &ConvShape, x: &Buf<T>, dy: &Buf<T>) -> Result<()> {
        match self.dw_padded.as_mut() {
            Some(dwp) => {
                conv::conv2d_wgrad(dev, sh, x, dy, dwp)?;
                conv::pad_rows(dev, self.k * self.r * self.r, self.cp, self.c, dwp, &mut self.dw)
            }
            None => conv::conv2d_wgrad(dev, sh, x, dy, &mut self.dw),
        }
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

    /// The layer's batch norm with its saved statistics `s`, then the ReLU if `relu`: what
    /// a train-mode forward applies, for a convolution to apply as it loads its input.
    fn input<'a>(&'a self, s: &'a Saved, relu: bool) -> layers::BnInput<'a> {
        layers::BnInput { c: self.c, gamma: &self.gamma, beta: &self.beta, mean: &s.mean, invstd: &s.invstd, relu }
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
    /// The device's table of the SGD step's tensors, made with the model.
    sgd_table: layers::SgdTable,
    /// Batch norm momentum and epsilon.
    pub bn: BnConfig,
    /// Label smoothing of the training loss, in [0, 1) (0: plain cross-entropy).
    pub label_smoothing: f32,
    /// The BN work a train step on a kernel device folds into the convolutions (default:
    /// none).
    pub bn_fusion: BnFusion,
}

fn f32_of<'a>(sd: &'a StateDict, name: &str) -> Result<&'a [f32]> {
    sd.get(name)?.as_f32().ok_or_else(|| invalid!("tensor {name} is not F32"))
}

/// Scratch buffers for one step, checked out by length: gradients during backward and
/// temporaries during forward. Sized when the workspace is made.
struct Scratch<T: Elem> {
    bufs: Vec<Buf<T>>,
    busy: Vec<bool>,
}

/// Saved batch statistics of one BN for its backward.
struct Saved {
    mean: Buf<f32>,
    invstd: Buf<f32>,
}

/// Activations of one block kept for backward. The numbers name the block's layers
/// (conv1/bn1, conv2/bn2, conv3/bn3), `d` its downsample branch.
struct BlockActs<T: Elem> {
    /// The shapes of conv1, conv2, conv3 and the downsample conv.
    sh1: ConvShape,
    sh2: ConvShape,
    sh3: ConvShape,
    shd: Option<ConvShape>,
    /// conv1's output (`t1`, BN input) and bn1 + ReLU's output (`a1`, conv2's input).
    /// With the BN on load (a train step on a kernel device), conv2 reads `t1` through
    /// bn1 and `a1` only holds conv1's statistics pairs between two launches.
    t1: Buf<T>,
    a1: Buf<T>,
    /// conv2's output and bn2 + ReLU's output (conv3's input; as `a1`).
    t2: Buf<T>,
    a2: Buf<T>,
    /// conv3's output and the downsample conv's output (BN inputs).
    t3: Buf<T>,
    td: Option<Buf<T>>,
    /// The block's output: ReLU(bn3(t3) + shortcut).
    out: Buf<T>,
    /// That ReLU's decisions as bits, beside `out` (kernel devices, every block but the
    /// last): written by the train forward, read instead of `out` by the next block's dgrad
    /// into its input, which masks its sum by them.
    out_bits: Option<Buf<u8>>,
    /// The batch statistics bn1, bn2, bn3 and the downsample BN saved for backward.
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
    /// Images, NHWC f32 (none where the stem's input is padded: `input_low` is then written
    /// from `input` directly).
    input_nhwc: Option<Buf<f32>>,
    /// Images, NHWC, in the convs' precision (bf16 only), with the stem's padded channels.
    input_low: Option<Buf<T>>,
    stem_sh: ConvShape,
    /// Stem conv output, BN+ReLU output, max pool output.
    t0: Buf<T>,
    a0: Buf<T>,
    p0: Buf<T>,
    /// On kernel devices, the max pool's argmax taps (`layers::maxpool_forward_bn`), which
    /// the train forward writes and the backward reads.
    taps0: Option<Buf<u8>>,
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
    scratch: Scratch<T>,
    /// The per-row-tile sums of the BN backwards whose reductions run in dgrad epilogues
    /// (kernel devices; see `backward`): as large as the largest of them needs.
    grad_sums: Buf<f32>,
    /// Set once targets were given (a train forward needs them).
    has_targets: bool,
    /// The last forward applied bn1 and bn2 as conv2 and conv3 load their inputs (a train
    /// forward on a kernel device): `a1` and `a2` were not written, and the backward's
    /// wgrads apply the BNs again as they load `t1` and `t2`. `Some(steps)`: the model's
    /// SGD steps at that forward (after another step, gamma and beta have moved).
    bn_on_load: Option<u64>,
    /// The last forward applied the stem's BN + ReLU as the max pool loaded the conv output
    /// and wrote `taps0` (a train forward on a kernel device): `a0` was not written, and the
    /// backward reads the taps. `Some(steps)` as `bn_on_load`.
    stem_pool_bn: Option<u64>,
    /// [`ResNet::forward_backward_graphed`]: the model (by [`ResNet::graph_key`]) whose step ran
    /// once on this workspace, and the captured forward + backward.
    graph_warm: Option<graph::GraphKey>,
    graph: Option<(graph::GraphKey, crate::gpu::Graph)>,
}

/// The stem's input as its conv reads it (a workspace's `input_nhwc`, `input`, `input_low`):
/// NHWC in the convs' precision. Without an f32 NHWC copy the model is bf16 with a padded
/// stem, and `pick` takes the low copy.
fn stem_input<'a, T: Precision>(
    nhwc: &'a Option<Buf<f32>>,
    input: &'a Buf<f32>,
    low: &'a Option<Buf<T>>,
) -> Result<&'a Buf<T>> {
    T::pick(nhwc.as_ref().unwrap_or(input), low)
}

impl<T: Precision> ResNet<T> {
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
}
