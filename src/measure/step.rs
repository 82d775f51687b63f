//! `prunekit bench`, the main job: builds ResNet50 (random weights, or given ones),
//! prunes it for each mode and sparsity, trains a few steps on synthetic data on the
//! device after a warm-up, and compares the measured speedup over the dense model with
//! the FLOP-ideal speedup (dense train FLOPs over pruned train FLOPs).

use crate::device::Device;
use crate::model::{init::torchvision_init, AnyWorkspace, Arch, BnFusion, Model, PrecisionKind, Sgd, StateDict};
use crate::ops::profile::{profile, Profile};
use crate::prune::{prune_state, Mode, Norm, Plan, PruneConfig, Sparsity};
use crate::{ensure, invalid, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// What a row of the bench prunes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// The dense model, the baseline of every speedup.
    Dense,
    /// Pruned in [`Mode::Filters`]: the blocks' inner widths shrink.
    Filters,
    /// Pruned in [`Mode::Channels`]: also the residual streams and the stem shrink.
    Channels,
    /// The control: the dense model with the filters that filters-mode pruning would
    /// remove set to zero. It executes every FLOP of the dense model.
    Masked,
}

impl BenchMode {
    /// The mode's name in the table and the JSON: `dense`, `filters`, `channels` or `masked`.
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Dense => "dense",
            BenchMode::Filters => "filters",
            BenchMode::Channels => "channels",
            BenchMode::Masked => "masked",
        }
    }
}

impl std::str::FromStr for BenchMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "filters" => Ok(BenchMode::Filters),
            "channels" => Ok(BenchMode::Channels),
            "masked" => Ok(BenchMode::Masked),
            _ => Err(invalid!("unknown bench mode {s:?}: expected filters, channels or masked")),
        }
    }
}

/// Settings of a bench run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Dense weights (torchvision names); None: ResNet50 with torchvision's initialisation.
    pub weights: Option<StateDict>,
    /// The pruned modes to measure (the dense row always comes first).
    pub modes: Vec<BenchMode>,
    /// The sparsities to measure per mode (0 is skipped: the dense row covers it).
    pub sparsities: Vec<Sparsity>,
    /// Kept widths are rounded up to a multiple of this (at least 1).
    pub round_to: usize,
    /// The filter score pruning ranks by.
    pub criterion: Norm,
    /// Images per training step (at least 1).
    pub batch: usize,
    /// Image height and width in pixels (at least 32).
    pub size: usize,
    /// Untimed training steps before the timed ones.
    pub warmup: usize,
    /// Timed training steps (at least 1).
    pub steps: usize,
    /// The precision the models train in.
    pub precision: PrecisionKind,
    /// Seed of the random weights (when none are given) and of the synthetic data.
    pub seed: u64,
    /// After the timed steps, profile one more step per row ([`crate::ops::profile`]):
    /// [`BenchRow::profile`].
    pub profile: bool,
    /// Time the step captured as one CUDA graph and replayed
    /// ([`Model::train_step_graphed`]; the plain step where there is no capture).
    pub graph: bool,
    /// The BN work the step folds into the convolutions on a kernel device
    /// ([`Model::set_bn_fusion`]; default: none).
    pub bn_fusion: BnFusion,
}

impl BenchOptions {
    /// Defaults for a device: a full-size run on cuda (batch 256, 224x224, bf16), a run
    /// that finishes in about a minute on a small CPU, a tiny one in the emulation.
    pub fn defaults(dev: &Device) -> BenchOptions {
        let (batch, size, warmup, steps, precision) = match dev.kind() {
            _ if dev.counts_only() => (256, 224, 0, 1, PrecisionKind::Bf16),
            "cuda" => (256, 224, 3, 20, PrecisionKind::Bf16),
            "emu" => (2, 32, 0, 1, PrecisionKind::F32),
            _ => (8, 224, 1, 2, PrecisionKind::F32),
        };
        BenchOptions {
            weights: None,
            modes: vec![BenchMode::Filters, BenchMode::Channels, BenchMode::Masked],
            sparsities: ["0", "0.25", "0.5", "0.75"].iter().map(|s| s.parse().expect("valid")).collect(),
            round_to: 8,
            criterion: Norm::L1,
            batch,
            size,
            warmup,
            steps,
            precision,
            seed: 0,
            profile: false,
            graph: false,
            bn_fusion: BnFusion::default(),
        }
    }

    /// The untimed steps per row: `warmup`, and at least two with `graph` (one plain step,
    /// then the capture), so that the timed steps are replays.
    pub fn warmup_steps(&self) -> usize {
        if self.graph {
            self.warmup.max(2)
        } else {
            self.warmup
        }
    }
}

/// One row of the bench table (and of its JSON).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchRow {
    /// The [`BenchMode`]'s name.
    pub mode: String,
    /// The sparsity (0 for the dense row).
    pub sparsity: f64,
    /// Trainable parameters of the model that ran (the masked row counts the dense model's).
    pub params: usize,
    /// Forward GFLOPs per image at the bench's image size.
    pub gflops_forward_per_image: f64,
    /// Training GFLOPs per image (forward and backward) at the bench's image size.
    pub gflops_train_per_image: f64,
    /// Measured milliseconds per training step (forward, backward and SGD).
    pub step_ms: f64,
    /// Training throughput: batch size over the step time.
    pub images_per_s: f64,
    /// The dense step time over this row's.
    pub speedup: f64,
    /// The FLOP-ideal speedup: dense training FLOPs over this row's.
    pub ideal_speedup: f64,
    /// `speedup / ideal_speedup`: 1 when the step time shrinks as much as the FLOPs do.
    pub efficiency: f64,
    /// The loss after the timed steps (random data: a check that training ran, not a result).
    #[serde(skip)]
    pub loss: f32,
    /// With [`BenchOptions::profile`]: the per-op profile of one training step after the
    /// timed ones (absent from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

/// Zeroes, in a copy of `sd`, every output filter (and its BN entries) that the plan
/// does not keep.
fn masked_state(sd: &StateDict, plan: &Plan, keep: &std::collections::BTreeMap<String, Vec<i64>>) -> StateDict {
    let mut out = sd.clone();
    for (name, t) in out.tensors.iter_mut() {
        let (og, _) = plan.tensor_groups(name);
        let (Some(g), crate::model::Data::F32(v)) = (og, &mut t.data) else { continue };
        let kept: std::collections::HashSet<i64> = keep[&plan.groups[g].name].iter().copied().collect();
        let row = v.len() / t.shape[0];
        for (r, chunk) in v.chunks_mut(row).enumerate() {
            let is_stat = name.ends_with("running_mean") || name.ends_with("running_var");
            if !kept.contains(&(r as i64)) && !is_stat {
                chunk.iter_mut().for_each(|x| *x = 0.0);
            }
        }
    }
    out
}

/// Times `steps` training steps of `sd` (after [`BenchOptions::warmup_steps`] untimed ones); returns ms per step,
/// the last loss and, with `o.profile`, the profile of one more step.
fn time_steps(
    dev: &Device,
    sd: &StateDict,
    o: &BenchOptions,
    tick: &mut dyn FnMut(),
) -> Result<(f64, f32, Option<Profile>)> {
    let mut model = Model::from_state(dev, sd, o.precision)?;
    model.set_bn_fusion(o.bn_fusion);
    let mut ws = model.workspace(o.batch, o.size, o.size)?;
    let mut rng = StdRng::seed_from_u64(o.seed);
    let images: Vec<f32> = (0..o.batch * 3 * o.size * o.size).map(|_| StandardNormal.sample(&mut rng)).collect();
    let classes = model.arch().classes as i64;
    let targets: Vec<i64> = (0..o.batch).map(|_| rng.random_range(0..classes)).collect();
    model.set_batch(&mut ws, &images, Some(&targets))?;
    let sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 1e-4 };
    let step = |model: &mut Model, ws: &mut AnyWorkspace| {
        if o.graph {
            model.train_step_graphed(ws, &sgd)
        } else {
            model.train_step(ws, &sgd)
        }
    };
    for _ in 0..o.warmup_steps() {
        step(&mut model, &mut ws)?;
        tick();
    }
    dev.synchronize()?;
    let start = dev.mark()?;
    for _ in 0..o.steps {
        step(&mut model, &mut ws)?;
        tick();
    }
    let end = dev.mark()?;
    let ms = dev.elapsed_ms(&start, &end)? / o.steps as f64;
    let loss = model.loss(&ws)?;
    let prof = if o.profile {
        let p = profile(dev, || model.train_step(&mut ws, &sgd))?.1;
        tick();
        Some(p)
    } else {
        None
    };
    Ok((ms, loss, prof))
}

/// The (mode, sparsity) pairs a run measures, dense first.
pub fn bench_plan(o: &BenchOptions) -> Vec<(BenchMode, Sparsity)> {
    let mut v = vec![(BenchMode::Dense, Sparsity::ZERO)];
    for &m in &o.modes {
        for &s in &o.sparsities {
            if s != Sparsity::ZERO {
                v.push((m, s));
            }
        }
    }
    v
}

/// Runs the bench; `tick` is called after every training step (for a progress bar).
pub fn run(dev: &Device, o: &BenchOptions, tick: &mut dyn FnMut()) -> Result<Vec<BenchRow>> {
    ensure!(o.steps >= 1, "--steps must be at least 1");
    ensure!(o.batch >= 1, "--batch must be at least 1");
    ensure!(o.round_to >= 1, "--round-to must be at least 1");
    ensure!(o.size >= 32, "--size must be at least 32 (ResNet50 reduces it 32-fold)");
    let dense = match &o.weights {
        Some(sd) => sd.clone(),
        None => torchvision_init(&Arch::resnet50(1000), o.seed),
    };
    let arch = Arch::from_state(&dense)?;
    // The dense model is the largest of the run: check that it fits before anything big
    // is allocated (the synthetic batch lives on the host beside it).
    let images = (o.batch as f64) * 3.0 * (o.size * o.size) as f64 * 4.0;
    crate::limits::check_training_memory(dev, &arch, o.precision, o.batch, o.size, images)?;
    let (h, w) = (o.size, o.size);
    let dense_train = arch.flops_train(h, w);
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut dense_ms = f64::NAN;
    for (mode, s) in bench_plan(o) {
        let (state, arch_row) = match mode {
            BenchMode::Dense => (dense.clone(), arch.clone()),
            BenchMode::Filters | BenchMode::Channels => {
                let m = if mode == BenchMode::Filters { Mode::Filters } else { Mode::Channels };
                let p = prune_state(dev, &dense, &PruneConfig::new(m, s, o.round_to, o.criterion)?)?;
                let a = p.plan.after.clone();
                (p.state, a)
            }
            BenchMode::Masked => {
                let p = prune_state(dev, &dense, &PruneConfig::new(Mode::Filters, s, o.round_to, o.criterion)?)?;
                (masked_state(&dense, &p.plan, &p.keep), arch.clone())
            }
        };
        let (ms, loss, profile) = time_steps(dev, &state, o, tick)?;
        if mode == BenchMode::Dense {
            dense_ms = ms;
        }
        let train = arch_row.flops_train(h, w);
        let speedup = dense_ms / ms;
        let ideal = dense_train / train;
        rows.push(BenchRow {
            mode: mode.name().to_string(),
            sparsity: s.as_f64(),
            params: arch_row.params(),
            gflops_forward_per_image: arch_row.flops_forward(h, w) / 1e9,
            gflops_train_per_image: train / 1e9,
            step_ms: ms,
            images_per_s: o.batch as f64 / (ms / 1e3),
            speedup,
            ideal_speedup: ideal,
            efficiency: speedup / ideal,
            loss,
            profile,
        });
    }
    Ok(rows)
}

/// The rows as a text table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<9} {:>8} {:>11} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10}\n",
        "mode", "sparsity", "params", "GF fwd", "GF train", "step ms", "img/s", "speedup", "ideal", "efficiency"
    );
    for r in rows {
        s += &format!(
            "{:<9} {:>8} {:>11} {:>9.3} {:>9.3} {:>10.2} {:>10.1} {:>8.2} {:>8.2} {:>10.2}\n",
            r.mode,
            r.sparsity,
            r.params,
            r.gflops_forward_per_image,
            r.gflops_train_per_image,
            r.step_ms,
            r.images_per_s,
            r.speedup,
            r.ideal_speedup,
            r.efficiency
        );
    }
    s
}
