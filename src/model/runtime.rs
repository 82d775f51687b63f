//! [`Model`]: a ResNet whose precision is chosen at run time (the CLI's `--precision`).

use super::arch::Arch;
use super::resnet::{BnConfig, BnFusion, ResNet, Sgd, Workspace};
use super::state::StateDict;
use crate::device::Device;
use crate::{invalid, Result};
use half::bf16;

/// The precision of the convolutions' activations and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionKind {
    /// Everything in f32.
    F32,
    /// bf16 activations and conv weights (tensor cores), f32 master weights, BN
    /// statistics, classifier and loss.
    Bf16,
}

impl std::str::FromStr for PrecisionKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(PrecisionKind::F32),
            "bf16" => Ok(PrecisionKind::Bf16),
            _ => Err(invalid!("unknown precision {s:?}: expected f32 or bf16")),
        }
    }
}

impl std::fmt::Display for PrecisionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrecisionKind::F32 => "f32",
            PrecisionKind::Bf16 => "bf16",
        })
    }
}

/// A ResNet in the precision chosen at run time.
pub enum Model {
    /// Everything in f32.
    F32(ResNet<f32>),
    /// bf16 convolutions (see [`PrecisionKind::Bf16`]).
    Bf16(ResNet<bf16>),
}

/// The workspace of a [`Model`] (of the same precision).
pub enum AnyWorkspace {
    /// For a [`Model::F32`].
    F32(Workspace<f32>),
    /// For a [`Model::Bf16`].
    Bf16(Workspace<bf16>),
}

macro_rules! both {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Model::F32($m) => $e,
            Model::Bf16($m) => $e,
        }
    };
}

macro_rules! pair {
    ($self:expr, $ws:expr, $m:ident, $w:ident => $e:expr) => {
        match ($self, $ws) {
            (Model::F32($m), AnyWorkspace::F32($w)) => $e,
            (Model::Bf16($m), AnyWorkspace::Bf16($w)) => $e,
            _ => Err(invalid!("the workspace was made for a model of another precision")),
        }
    };
}

impl Model {
    /// A model with the weights of `sd` (torchvision's names) on `dev`.
    pub fn from_state(dev: &Device, sd: &StateDict, precision: PrecisionKind) -> Result<Model> {
        Ok(match precision {
            PrecisionKind::F32 => Model::F32(ResNet::from_state(dev, sd)?),
            PrecisionKind::Bf16 => Model::Bf16(ResNet::from_state(dev, sd)?),
        })
    }

    /// A fresh model with torchvision's initialisation.
    pub fn new(dev: &Device, arch: &Arch, seed: u64, precision: PrecisionKind) -> Result<Model> {
        Model::from_state(dev, &super::init::torchvision_init(arch, seed), precision)
    }

    /// The precision the model runs in.
    pub fn precision(&self) -> PrecisionKind {
        match self {
            Model::F32(_) => PrecisionKind::F32,
            Model::Bf16(_) => PrecisionKind::Bf16,
        }
    }

    /// See [`ResNet::arch`].
    pub fn arch(&self) -> &Arch {
        both!(self, m => m.arch())
    }

    /// Sets the batch norm momentum and epsilon ([`ResNet::bn`]).
    pub fn set_bn(&mut self, bn: BnConfig) {
        both!(self, m => m.bn = bn)
    }

    /// Sets the label smoothing of the training loss ([`ResNet::label_smoothing`]), in [0, 1).
    pub fn set_label_smoothing(&mut self, e: f32) -> Result<()> {
        crate::ensure!((0.0..1.0).contains(&e), "label smoothing must be in [0, 1), not {e}");
        both!(self, m => m.label_smoothing = e);
        Ok(())
    }

    /// Sets the BN work a train step on a kernel device folds into the convolutions
    /// ([`ResNet::bn_fusion`]).
    pub fn set_bn_fusion(&mut self, f: BnFusion) {
        both!(self, m => m.bn_fusion = f)
    }

    /// See [`ResNet::workspace`].
    pub fn workspace(&self, n: usize, h: usize, w: usize) -> Result<AnyWorkspace> {
        Ok(match self {
            Model::F32(m) => AnyWorkspace::F32(m.workspace(n, h, w)?),
            Model::Bf16(m) => AnyWorkspace::Bf16(m.workspace(n, h, w)?),
        })
    }

    /// See [`ResNet::set_batch`].
    pub fn set_batch(&self, ws: &mut AnyWorkspace, images: &[f32], targets: Option<&[i64]>) -> Result<()> {
        pair!(self, ws, m, w => m.set_batch(w, images, targets))
    }

    /// See [`ResNet::forward`].
    pub fn forward(&mut self, ws: &mut AnyWorkspace, train: bool) -> Result<()> {
        pair!(self, ws, m, w => m.forward(w, train))
    }

    /// See [`ResNet::backward`].
    pub fn backward(&mut self, ws: &mut AnyWorkspace) -> Result<()> {
        pair!(self, ws, m, w => m.backward(w))
    }

    /// See [`ResNet::sgd_step`].
    pub fn sgd_step(&mut self, sgd: &Sgd) -> Result<()> {
        both!(self, m => m.sgd_step(sgd))
    }

    /// See [`ResNet::sgd_step_scaled`].
    pub fn sgd_step_scaled(&mut self, sgd: &Sgd, grad_scale: f32) -> Result<()> {
        both!(self, m => m.sgd_step_scaled(sgd, grad_scale))
    }

    /// See [`ResNet::grad_norm`].
    pub fn grad_norm(&self, head_only: bool) -> Result<f64> {
        both!(self, m => m.grad_norm(head_only))
    }

    /// See [`ResNet::head_forward_backward`].
    pub fn head_forward_backward(&mut self, ws: &mut AnyWorkspace) -> Result<()> {
        pair!(self, ws, m, w => m.head_forward_backward(w))
    }

    /// See [`ResNet::sgd_step_head`].
    pub fn sgd_step_head(&mut self, sgd: &Sgd, grad_scale: f32) -> Result<()> {
        both!(self, m => m.sgd_step_head(sgd, grad_scale))
    }

    /// See [`ResNet::train_step`].
    pub fn train_step(&mut self, ws: &mut AnyWorkspace, sgd: &Sgd) -> Result<()> {
        pair!(self, ws, m, w => m.train_step(w, sgd))
    }

    /// See [`ResNet::train_step_graphed`].
    pub fn train_step_graphed(&mut self, ws: &mut AnyWorkspace, sgd: &Sgd) -> Result<()> {
        pair!(self, ws, m, w => m.train_step_graphed(w, sgd))
    }

    /// See [`ResNet::forward_backward_graphed`].
    pub fn forward_backward_graphed(&mut self, ws: &mut AnyWorkspace) -> Result<()> {
        pair!(self, ws, m, w => m.forward_backward_graphed(w))
    }

    /// See [`ResNet::loss`].
    pub fn loss(&self, ws: &AnyWorkspace) -> Result<f32> {
        pair!(self, ws, m, w => m.loss(w))
    }

    /// See [`ResNet::logits`].
    pub fn logits(&self, ws: &AnyWorkspace) -> Result<Vec<f32>> {
        pair!(self, ws, m, w => m.logits(w))
    }

    /// See [`ResNet::relu_outputs`].
    pub fn relu_outputs(&self, ws: &AnyWorkspace) -> Result<Vec<(String, Vec<f32>)>> {
        pair!(self, ws, m, w => m.relu_outputs(w))
    }

    /// See [`ResNet::to_state`].
    pub fn to_state(&self) -> Result<StateDict> {
        both!(self, m => m.to_state())
    }

    /// See [`ResNet::gradients`].
    pub fn gradients(&self) -> Result<StateDict> {
        both!(self, m => m.gradients())
    }

    /// See [`ResNet::momentum_state`].
    pub fn momentum_state(&self) -> Result<StateDict> {
        both!(self, m => m.momentum_state())
    }

    /// See [`ResNet::set_momentum_state`].
    pub fn set_momentum_state(&mut self, sd: &StateDict, steps: u64) -> Result<()> {
        both!(self, m => m.set_momentum_state(sd, steps))
    }

    /// See [`ResNet::device`].
    pub fn device(&self) -> &Device {
        both!(self, m => m.device())
    }
}
