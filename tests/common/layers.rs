//! Helpers of the layer families' tests (bn, elementwise, pool, fc, loss, sgd): the ops of
//! `prunekit::ops::layers` on every device against the f64 oracles of
//! `prunekit::cpu::layers`.

use super::emu_devices;
use prunekit::cpu::layers::Real;
use prunekit::gpu::Elem;
use prunekit::model::state::StateDict;
use prunekit::ops::layers::{BnLayer, LayerElem};
use prunekit::{Buf, Device};

/// Rounded to a layer element type.
pub fn to_t<T: Real>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}
/// Widened to f64.
pub fn f64s<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}
pub fn up<T: Elem>(dev: &Device, v: Vec<T>) -> Buf<T> {
    dev.upload(v).unwrap()
}
/// A buffer whose contents must be overwritten (poison on emu).
pub fn fresh<T: Elem>(dev: &Device, n: usize) -> Buf<T> {
    dev.uninit(n).unwrap()
}
pub fn down<T: Real + Elem>(b: &Buf<T>) -> Vec<f64> {
    f64s(&b.to_vec().unwrap())
}

/// The CPU and the emulation in every fiber order.
pub fn all_devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(emu_devices());
    d
}

/// Relative tolerance of an output of type T: f32 results within a few 1e-6, bf16 ones
/// within one bf16 ulp (2^-7 relative) of the exact value.
pub fn rtol<T: LayerElem>() -> f64 {
    if std::mem::size_of::<T>() == 2 {
        1.0 / 128.0
    } else {
        2e-5
    }
}

/// The largest finite magnitude.
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().filter(|x| x.is_finite()).fold(0.0, |a, b| a.max(b.abs()))
}

/// Every element within atol + rtol |want|; NaN exactly where want is NaN, infinities equal.
#[track_caller]
pub fn check(what: &str, dev: &Device, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what} on {}: length", dev.name());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what} on {}: element {i} is {g}, expected {w} (atol {atol:e}, rtol {rtol:e})", dev.name());
    }
}

/// Central differences of f at x (step h relative to max(|x_i|, 1)).
pub fn numeric_grad(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-6 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// A batch norm's buffers on a device, owned: the parameters and running statistics as
/// given, the saved statistics and the gradients fresh (poison on emu). [`BnBufs::layer`]
/// lends them to the ops.
pub struct BnBufs {
    pub c: usize,
    pub gamma: Buf<f32>,
    pub beta: Buf<f32>,
    pub running_mean: Buf<f32>,
    pub running_var: Buf<f32>,
    pub save_mean: Buf<f32>,
    pub save_invstd: Buf<f32>,
    pub dgamma: Buf<f32>,
    pub dbeta: Buf<f32>,
}

impl BnBufs {
    /// Every buffer of `c` values.
    pub fn new(dev: &Device, gamma: Vec<f32>, beta: Vec<f32>, running_mean: Vec<f32>, running_var: Vec<f32>) -> Self {
        let c = gamma.len();
        BnBufs {
            c,
            gamma: up(dev, gamma),
            beta: up(dev, beta),
            running_mean: up(dev, running_mean),
            running_var: up(dev, running_var),
            save_mean: fresh(dev, c),
            save_invstd: fresh(dev, c),
            dgamma: fresh(dev, c),
            dbeta: fresh(dev, c),
        }
    }

    /// The layer with momentum 0.1 and eps 1e-5 (PyTorch's defaults).
    pub fn layer(&mut self) -> BnLayer<'_> {
        BnLayer {
            c: self.c,
            gamma: &self.gamma,
            beta: &self.beta,
            running_mean: &mut self.running_mean,
            running_var: &mut self.running_var,
            save_mean: &mut self.save_mean,
            save_invstd: &mut self.save_invstd,
            dgamma: &mut self.dgamma,
            dbeta: &mut self.dbeta,
            momentum: 0.1,
            eps: 1e-5,
        }
    }
}

/// A model reference file PyTorch wrote (tests/data/README.md): its train logits, loss
/// and gradients and the parameters after one SGD step.
pub struct Reference {
    pub name: &'static str,
    pub sd: StateDict,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Reference {
    pub fn f32s(&self, name: &str) -> Vec<f32> {
        self.sd.get(name).unwrap().as_f32().unwrap().to_vec()
    }
}

pub fn references() -> Vec<Reference> {
    ["model-tiny-irregular", "model-resnet50-narrow", "model-tiny-b1-odd"]
        .into_iter()
        .map(|name| {
            let sd = StateDict::read(&super::data(&format!("{name}.safetensors"))).unwrap();
            let meta = |k: &str| -> f32 { sd.metadata[k].parse().unwrap() };
            let (lr, momentum, weight_decay) = (meta("lr"), meta("momentum"), meta("weight_decay"));
            Reference { name, sd, lr, momentum, weight_decay }
        })
        .collect()
}
