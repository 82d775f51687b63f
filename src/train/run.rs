//! The training loop.

use super::budget::{head_step_flops, phase_steps, Length};
use super::checkpoint::{check_settings, Checkpoint, Progress};
use super::eval::{evaluate, EvalResult};
use super::log::{Bar, JsonLog, Record};
use super::schedule::Schedule;
use super::TrainConfig;
use crate::data::{Dataset, Loader, LoaderConfig, Position};
use crate::device::Device;
use crate::model::{AnyWorkspace, Arch, Model, Sgd, StateDict};
use crate::{ensure, invalid, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Where a run starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// From a model (see [`prepare_model`](super::prepare_model)), at step 0.
    Fresh(StateDict),
    /// From a checkpoint (read from the path) of a run with the same settings.
    Resume(Box<Checkpoint>, PathBuf),
}

/// What a finished run did.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Steps done in all.
    pub steps: u64,
    /// Training images seen.
    pub images: u64,
    /// Training compute in GFLOPs.
    pub train_gflops: f64,
    /// Training FLOPs per image of the model that trained, in GFLOPs.
    pub gflops_per_image: f64,
    /// Seconds, over every part of an interrupted run, evaluations included.
    pub wall_s: f64,
    /// Seconds of the evaluations in this part of the run (after a resume: since the resume).
    pub eval_s: f64,
    /// The loss of the last step (of the last step applied, when the run stopped at a
    /// divergence).
    pub last_loss: f64,
    /// The loss of the first step.
    pub first_loss: f64,
    /// The steps planned (the schedule's length); `steps` is less when the run stopped at
    /// a divergence or at the end of a time budget.
    pub planned_steps: u64,
    /// Training FLOPs per image of a head-only step, in GFLOPs ([`head_step_flops`]).
    pub head_gflops_per_image: f64,
    /// The head-only steps planned (see [`TrainConfig::head_only_fraction`](super::TrainConfig::head_only_fraction)).
    pub head_steps: u64,
    /// Seconds of training: the steps' wall time, loading included, evaluations excluded
    /// (this part of the run, after a resume).
    pub train_s: f64,
    /// Seconds of the probe that timed the step for a time budget (0 without one).
    pub probe_s: f64,
    /// Set when the loss diverged (see [`TrainConfig::diverge_factor`](super::TrainConfig::diverge_factor)).
    pub diverged: Option<Divergence>,
    /// The evaluation at the end (None when the validation split is empty).
    pub eval: Option<EvalResult>,
}

/// A training loss that diverged: not finite, or above the divergence factor times the
/// first step's loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    /// The step (from 1) whose loss it was.
    pub step: u64,
    /// Its loss.
    pub loss: f64,
    /// The first step's loss.
    pub first_loss: f64,
    /// The factor.
    pub factor: f64,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.loss.is_finite() {
            write!(
                f,
                "the training loss {:.4} at step {} is above {}x the first step's {:.4}",
                self.loss, self.step, self.factor, self.first_loss
            )
        } else {
            write!(f, "the training loss is not finite ({}) at step {}", self.loss, self.step)
        }
    }
}

/// How a run ended (errors aside).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every step ran.
    Finished(Summary),
    /// Stopped early by the interrupt flag (or the test hook) after `step` steps; the
    /// checkpoint, when one was asked for, holds that state.
    Interrupted {
        /// Steps done.
        step: u64,
        /// The checkpoint written.
        checkpoint: Option<PathBuf>,
    },
}

fn settings(cfg: &TrainConfig, total: u64, data: &Dataset, arch: &Arch) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("batch", cfg.batch.to_string());
    put("size", cfg.size.to_string());
    put("steps", total.to_string());
    put("lr", format!("{:?}", cfg.lr));
    put("momentum", format!("{:?}", cfg.momentum));
    put("wd", format!("{:?}", cfg.weight_decay));
    put("schedule", cfg.schedule.to_string());
    put("warmup", cfg.warmup.to_string());
    // The recipes' options only when set, so that checkpoints made without them resume.
    if let Some(f) = cfg.warmup_fraction {
        put("warmup_fraction", format!("{f:?}"));
    }
    if let Some(c) = cfg.clip_grad_norm {
        put("clip_grad_norm", format!("{c:?}"));
    }
    if cfg.head_only_fraction > 0.0 {
        put("head_only_fraction", format!("{:?}", cfg.head_only_fraction));
    }
    put("label_smoothing", format!("{:?}", cfg.label_smoothing));
    put("precision", cfg.precision.to_string());
    put("seed", cfg.seed.to_string());
    put("augment", cfg.augment.to_string());
    put("normalize", format!("{:?}", cfg.norm));
    put("train_images", data.train.len().to_string());
    put("classes", data.classes().len().to_string());
    put("params", arch.params().to_string());
    m
}

/// Trains as `cfg` says; `say` gets the lines a user should read (the plan, evaluations,
/// where files went). Returns how the run ended; errors leave the last checkpoint as it was.
///
/// Before any big allocation it checks the settings and output paths
/// ([`TrainConfig::check`]), that the model and workspace fit in the device's memory, and
/// that the length is at least one step. A diverged training loss (not finite, or above
/// [`TrainConfig::diverge_factor`](super::TrainConfig::diverge_factor) times the first)
/// stops the run with [`Summary::diverged`] set when
/// [`TrainConfig::stop_on_divergence`](super::TrainConfig::stop_on_divergence); without it
/// a non-finite loss is an error that names the step, and a finite one is reported and the
/// run goes on.
pub fn train(
    dev: &Device,
    start: Start,
    data: &Dataset,
    cfg: &TrainConfig,
    say: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    cfg.check()?;
    let (state, momentum, progress) = match start {
        Start::Fresh(sd) => (sd, None, Progress::default()),
        Start::Resume(ck, path) => {
            let ck = *ck;
            (ck.state, Some((ck.momentum, ck.settings, path)), ck.progress)
        }
    };
    let arch = Arch::from_state(&state)?;
    let classes = data.classes().len();
    ensure!(arch.classes == classes, "the model has {} outputs and the data {classes} classes", arch.classes);
    let (size, batch) = (cfg.size, cfg.batch);
    ensure!(
        data.train.len() >= batch,
        "the training split has {} images, fewer than one batch of {batch}",
        data.train.len()
    );
    let image_flops = arch.flops_train(size, size);
    let step_gflops = image_flops * batch as f64 / 1e9;
    let head_image_flops = head_step_flops(&arch, size, size);
    let head_step_gflops = head_image_flops * batch as f64 / 1e9;
    let steps_per_epoch = data.train.len() / batch;
    let lc = LoaderConfig {
        batch,
        size,
        augment: cfg.augment,
        norm: cfg.norm,
        seed: cfg.seed,
        threads: cfg.threads,
        ..LoaderConfig::default()
    };
    let eval_batch = cfg.eval_batch.unwrap_or(batch);
    let elc = LoaderConfig { batch: eval_batch, ..lc.clone() };
    let loader_bytes = (lc.prefetch + 3) as f64 * ((batch + eval_batch) * 3 * size * size * 4) as f64;
    crate::limits::check_run_memory(dev, &arch, cfg.precision, batch, size, Some(eval_batch), loader_bytes)?;
    let head_fraction = cfg.head_only_fraction;
    let (step_seconds, probe_s) = match cfg.length {
        Length::Seconds(_) => {
            ensure!(
                momentum.is_none(),
                "a run with a time budget cannot be resumed (its steps were fitted to a probe)"
            );
            let (secs, probe_s) = probe_step_seconds(dev, &state, cfg, data, &lc, head_fraction > 0.0)?;
            (Some(secs), probe_s)
        }
        _ => (None, 0.0),
    };
    let (total, head_steps) =
        phase_steps(cfg.length, image_flops, head_image_flops, batch, steps_per_epoch, head_fraction, step_seconds)?;
    let schedule = PhasedSchedule::new(cfg, total, head_steps)?;
    // Compute spent after s steps: head-only steps are charged their own FLOPs.
    let spent = |s: u64| {
        let h = s.min(head_steps);
        h as f64 * head_step_gflops + (s - h) as f64 * step_gflops
    };
    let now = settings(cfg, total, data, &arch);
    let resumed = momentum.is_some();
    if let Some((_, saved, path)) = &momentum {
        check_settings(saved, &now, path)?;
        ensure!(
            progress.step <= total,
            "{}: the checkpoint is at step {}, past the run's {total} steps",
            path.display(),
            progress.step
        );
    }

    let mut model = Model::from_state(dev, &state, cfg.precision)?;
    model.set_label_smoothing(cfg.label_smoothing as f32)?;
    if let Some((m, _, _)) = &momentum {
        model.set_momentum_state(m, progress.step)?;
    }
    let mut ws = model.workspace(batch, size, size)?;
    let mut train_loader = Loader::train(&data.train, &lc, progress.position)?;
    let mut val_loader = if data.val.is_empty() { None } else { Some(Loader::eval(&data.val, &elc)?) };
    let mut b = train_loader.new_batch();
    let mut vb = match &val_loader {
        Some(v) => v.new_batch(),
        None => train_loader.new_batch(),
    };
    // The evaluation's own workspace, when its batch differs (made at the first evaluation).
    let mut eval_ws = None;
    let mut log = match &cfg.log {
        Some(p) => Some(JsonLog::open(p, resumed)?),
        None => None,
    };
    say(&format!(
        "{} {} steps of {batch} images of {size}x{size} on {}, {}: {:.4} GFLOPs per step, {:.1} GFLOPs in all; \
         {} train and {} val images, {classes} classes; lr {} ({}{}), momentum {}, wd {}",
        if resumed { format!("resuming at step {} of", progress.step) } else { "training".to_string() },
        total,
        dev.name(),
        cfg.precision,
        step_gflops,
        spent(total),
        data.train.len(),
        data.val.len(),
        cfg.lr,
        cfg.schedule,
        schedule.describe(cfg),
        cfg.momentum,
        cfg.weight_decay
    ));
    if val_loader.is_none() {
        say("note: the validation split is empty: no evaluation");
    }
    let keep: Vec<(String, crate::model::Tensor)> =
        state.tensors.iter().filter(|(n, _)| n.starts_with("keep.")).map(|(n, t)| (n.clone(), t.clone())).collect();
    let meta = state.metadata.clone();
    drop(state);
    let snapshot = |model: &Model, step: u64, position: Position, wall_s: f64| -> Result<Checkpoint> {
        let mut st = model.to_state()?;
        st.tensors.extend(keep.iter().cloned());
        st.metadata = meta.clone();
        Ok(Checkpoint {
            state: st,
            momentum: model.momentum_state()?,
            progress: Progress { step, position, wall_s },
            settings: now.clone(),
        })
    };
    let write_checkpoint = |ck: &Checkpoint| -> Result<()> {
        let path = cfg.checkpoint.as_ref().expect("checked by the caller");
        if let Some(t) = ck.first_non_finite() {
            return Err(invalid!(
                "the weights became non-finite ({t}) at step {}; the last checkpoint {} was left as it was",
                ck.progress.step,
                path.display()
            ));
        }
        ck.write(path)
    };

    let bar = Bar::new(total, progress.step, step_gflops, cfg.progress);
    let t0 = Instant::now();
    let wall = |t0: &Instant| progress.wall_s + t0.elapsed().as_secs_f64();
    let mut step = progress.step;
    let mut last_loss = f64::NAN;
    let mut first_loss: Option<f64> = None;
    let mut diverged: Option<Divergence> = None;
    let mut final_eval = None;
    let mut eval_s = 0.0f64;
    let mut train_s = 0.0f64;
    let result = (|| -> Result<Outcome> {
        while step < total {
            let interrupted = cfg.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
                || (cfg.stop_after == Some(step) && step > progress.step);
            if interrupted {
                let written = match &cfg.checkpoint {
                    Some(p) => {
                        write_checkpoint(&snapshot(&model, step, train_loader.position(), wall(&t0))?)?;
                        Some(p.clone())
                    }
                    None => None,
                };
                return Ok(Outcome::Interrupted { step, checkpoint: written });
            }
            let ts = Instant::now();
            train_loader.next(&mut b)?;
            model.set_batch(&mut ws, &b.images, Some(&b.targets))?;
            let lr = schedule.lr(step);
            let head = step < head_steps;
            let loss = forward_backward(&mut model, &mut ws, head)?;
            if step == 0 || first_loss.is_none() {
                first_loss = Some(loss);
            }
            let first = first_loss.expect("set above");
            if !loss.is_finite() || loss > cfg.diverge_factor * first {
                let d = Divergence { step: step + 1, loss, first_loss: first, factor: cfg.diverge_factor };
                if cfg.stop_on_divergence {
                    train_s += ts.elapsed().as_secs_f64();
                    say(&format!("diverged: {d}; the run stops here"));
                    diverged = Some(d);
                    if let Some(vl) = val_loader.as_mut() {
                        let te = Instant::now();
                        final_eval =
                            Some(run_eval(&mut model, &mut ws, &mut eval_ws, vl, &mut vb, batch, eval_batch, size)?);
                        eval_s += te.elapsed().as_secs_f64();
                    }
                    break;
                }
                if !loss.is_finite() {
                    let kept = match &cfg.checkpoint {
                        Some(p) if p.exists() => format!("; the last checkpoint {} was left as it was", p.display()),
                        _ => String::new(),
                    };
                    return Err(invalid!("the training loss is not finite ({loss}) at step {}{kept}", step + 1));
                }
                if diverged.is_none() {
                    say(&format!("warning: {d}: the run has diverged"));
                    diverged = Some(d);
                }
            }
            let (scale, grad_norm) = clip_scale(&model, head, cfg.clip_grad_norm)?;
            let sgd = Sgd { lr: lr as f32, momentum: cfg.momentum as f32, weight_decay: cfg.weight_decay as f32 };
            if head {
                model.sgd_step_head(&sgd, scale)?;
            } else {
                model.sgd_step_scaled(&sgd, scale)?;
            }
            let gf_before = spent(step);
            step += 1;
            train_s += ts.elapsed().as_secs_f64();
            last_loss = loss;
            let gf = spent(step);
            let time_up = matches!(cfg.length, Length::Seconds(b) if train_s >= b);
            let mut rec = Record {
                step,
                images: step * batch as u64,
                train_gflops: gf,
                wall_s: 0.0,
                lr,
                loss,
                grad_norm,
                val_error: None,
                val_loss: None,
            };
            let last = step == total || time_up;
            let at_eval = last || cfg.eval_every.is_some_and(|e| (gf / e).floor() > (gf_before / e).floor());
            if at_eval {
                if let Some(vl) = val_loader.as_mut() {
                    let te = Instant::now();
                    let r = run_eval(&mut model, &mut ws, &mut eval_ws, vl, &mut vb, batch, eval_batch, size)?;
                    eval_s += te.elapsed().as_secs_f64();
                    rec.val_error = Some(r.error);
                    rec.val_loss = Some(r.loss);
                    let line = format!(
                        "step {step}: {gf:.2} GFLOPs, train loss {loss:.4}, val error {:.4}, val loss {:.4}",
                        r.error, r.loss
                    );
                    if cfg.progress {
                        bar.println(&line);
                    } else {
                        say(&line);
                    }
                    if last {
                        final_eval = Some(r);
                    }
                }
            }
            rec.wall_s = wall(&t0);
            if let Some(l) = log.as_mut() {
                l.write(&rec)?;
            }
            bar.step(&rec, batch as f64 / ts.elapsed().as_secs_f64().max(1e-9));
            let every = cfg.checkpoint_every.is_some_and(|n| step % n == 0);
            if cfg.checkpoint.is_some() && (every || last) {
                write_checkpoint(&snapshot(&model, step, train_loader.position(), wall(&t0))?)?;
            }
            if time_up {
                break;
            }
        }
        Ok(Outcome::Finished(Summary {
            steps: step,
            images: step * batch as u64,
            train_gflops: spent(step),
            gflops_per_image: image_flops / 1e9,
            wall_s: wall(&t0),
            eval_s,
            last_loss,
            first_loss: first_loss.unwrap_or(f64::NAN),
            planned_steps: total,
            head_steps,
            head_gflops_per_image: head_image_flops / 1e9,
            train_s,
            probe_s,
            diverged: diverged.clone(),
            eval: final_eval,
        }))
    })();
    bar.finish();
    let outcome = result?;
    if let (Outcome::Finished(s), Some(out)) = (&outcome, &cfg.out) {
        let mut st = snapshot(&model, step, train_loader.position(), s.wall_s)?.state;
        st.metadata.insert("trained_steps".into(), s.steps.to_string());
        st.metadata.insert("trained_gflops".into(), format!("{:.6}", s.train_gflops));
        st.write(out)?;
        say(&format!("wrote the trained model to {}", out.display()));
    }
    Ok(outcome)
}

/// The learning rate of each step: with a head-only phase, its steps and the full
/// fine-tune's each have their own schedule (warm-up and decay) fitted to their steps.
struct PhasedSchedule {
    head: Option<Schedule>,
    full: Schedule,
    head_steps: u64,
}

impl PhasedSchedule {
    fn new(cfg: &TrainConfig, total: u64, head_steps: u64) -> Result<PhasedSchedule> {
        // The warm-up of a phase of n steps: the fraction's (rounded up, shorter than the
        // phase) when given, else `warmup` steps (kept shorter than a head-only phase).
        let warm = |n: u64| match cfg.warmup_fraction {
            Some(f) => ((f * n as f64).ceil() as u64).min(n.saturating_sub(1)),
            None => cfg.warmup,
        };
        let head = if head_steps > 0 {
            let w = warm(head_steps).min(head_steps - 1);
            Some(Schedule::new(cfg.lr, cfg.schedule, w, head_steps)?)
        } else {
            None
        };
        let full = Schedule::new(cfg.lr, cfg.schedule, warm(total - head_steps), total - head_steps)?;
        Ok(PhasedSchedule { head, full, head_steps })
    }

    fn lr(&self, step: u64) -> f64 {
        match &self.head {
            Some(h) if step < self.head_steps => h.lr(step),
            _ => self.full.lr(step - self.head_steps),
        }
    }

    /// ", 10 warm-up steps, ..." for the run's first line.
    fn describe(&self, cfg: &TrainConfig) -> String {
        let mut s = String::new();
        if self.full.warmup > 0 {
            s += &format!(", {} warm-up steps", self.full.warmup);
        }
        if let Some(h) = &self.head {
            s += &format!("; first {} steps head-only ({} warm-up steps)", self.head_steps, h.warmup);
        }
        if let Some(c) = cfg.clip_grad_norm {
            s += &format!("; gradients clipped to norm {c}");
        }
        if let Length::Seconds(b) = cfg.length {
            s += &format!("; time budget {b} s");
        }
        s
    }
}

/// The forward and backward of the batch in `ws` (the classifier's only, `head`): the
/// training loss. On the cuda device the whole network's are one CUDA graph from the third
/// step of a workspace on ([`Model::forward_backward_graphed`]).
fn forward_backward(model: &mut Model, ws: &mut AnyWorkspace, head: bool) -> Result<f64> {
    if head {
        model.head_forward_backward(ws)?;
    } else {
        model.forward_backward_graphed(ws)?;
    }
    Ok(model.loss(ws)? as f64)
}

/// The gradient scale of clipping to the norm `clip` (`torch.nn.utils.clip_grad_norm_`:
/// `clip / (norm + 1e-6)` when below 1, else 1), and the norm; 1 and None without clipping.
fn clip_scale(model: &Model, head: bool, clip: Option<f64>) -> Result<(f32, Option<f64>)> {
    let Some(max) = clip else { return Ok((1.0, None)) };
    let norm = model.grad_norm(head)?;
    let c = max / (norm + 1e-6);
    Ok((if c < 1.0 { c as f32 } else { 1.0 }, Some(norm)))
}

/// One evaluation pass, in the training workspace or (another batch size) its own.
#[allow(clippy::too_many_arguments)]
fn run_eval(
    model: &mut Model,
    ws: &mut AnyWorkspace,
    eval_ws: &mut Option<AnyWorkspace>,
    vl: &mut Loader,
    vb: &mut crate::data::Batch,
    batch: usize,
    eval_batch: usize,
    size: usize,
) -> Result<EvalResult> {
    if eval_batch == batch {
        return evaluate(model, ws, vl, vb);
    }
    if eval_ws.is_none() {
        *eval_ws = Some(model.workspace(eval_batch, size, size)?);
    }
    evaluate(model, eval_ws.as_mut().expect("made above"), vl, vb)
}

/// The probe of a time budget ([`Length::Seconds`]): seconds per full step and per
/// head-only step (`head`; else the full step's) of a throwaway copy of the model, with
/// the run's batches (from the start of the data order) and a learning rate of 0; and the
/// seconds the probe took.
fn probe_step_seconds(
    dev: &Device,
    state: &StateDict,
    cfg: &TrainConfig,
    data: &Dataset,
    lc: &LoaderConfig,
    head: bool,
) -> Result<((f64, f64), f64)> {
    let t0 = Instant::now();
    let mut model = Model::from_state(dev, state, cfg.precision)?;
    model.set_label_smoothing(cfg.label_smoothing as f32)?;
    let mut ws = model.workspace(cfg.batch, cfg.size, cfg.size)?;
    let mut loader = Loader::train(&data.train, lc, Position::default())?;
    let mut b = loader.new_batch();
    let sgd = Sgd { lr: 0.0, momentum: cfg.momentum as f32, weight_decay: cfg.weight_decay as f32 };
    let mut time = |head: bool| -> Result<f64> {
        let (mut n, mut el) = (0u32, 0.0f64);
        for timed in std::iter::once(false).chain(std::iter::repeat(true)) {
            if timed && (n >= 5 || (n >= 2 && el >= 1.0)) {
                break;
            }
            let ts = Instant::now();
            loader.next(&mut b)?;
            model.set_batch(&mut ws, &b.images, Some(&b.targets))?;
            forward_backward(&mut model, &mut ws, head)?;
            let (scale, _) = clip_scale(&model, head, cfg.clip_grad_norm)?;
            if head {
                model.sgd_step_head(&sgd, scale)?;
            } else {
                model.sgd_step_scaled(&sgd, scale)?;
            }
            if timed {
                el += ts.elapsed().as_secs_f64();
                n += 1;
            }
        }
        Ok(el / n as f64)
    };
    let full = time(false)?;
    let head_s = if head { time(true)? } else { full };
    Ok(((full, head_s), t0.elapsed().as_secs_f64()))
}
