//! The training loop.

use super::budget::steps_for;
use super::checkpoint::{check_settings, Checkpoint, Progress};
use super::eval::{evaluate, EvalResult};
use super::log::{Bar, JsonLog, Record};
use super::schedule::Schedule;
use super::TrainConfig;
use crate::data::{Dataset, Loader, LoaderConfig, Position};
use crate::device::Device;
use crate::model::{Arch, Model, Sgd, StateDict};
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
    /// The loss of the last step.
    pub last_loss: f64,
    /// The evaluation at the end (None when the validation split is empty).
    pub eval: Option<EvalResult>,
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
/// that the length is at least one step. A non-finite training loss stops the run with an
/// error that names the step.
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
    let steps_per_epoch = data.train.len() / batch;
    let total = steps_for(cfg.length, image_flops, batch, steps_per_epoch)?;
    let schedule = Schedule::new(cfg.lr, cfg.schedule, cfg.warmup, total)?;
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
        step_gflops * total as f64,
        data.train.len(),
        data.val.len(),
        cfg.lr,
        cfg.schedule,
        if cfg.warmup > 0 { format!(", {} warm-up steps", cfg.warmup) } else { String::new() },
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
    let mut final_eval = None;
    let mut eval_s = 0.0f64;
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
            let sgd = Sgd { lr: lr as f32, momentum: cfg.momentum as f32, weight_decay: cfg.weight_decay as f32 };
            model.train_step(&mut ws, &sgd)?;
            let loss = model.loss(&ws)? as f64;
            if !loss.is_finite() {
                let kept = match &cfg.checkpoint {
                    Some(p) if p.exists() => format!("; the last checkpoint {} was left as it was", p.display()),
                    _ => String::new(),
                };
                return Err(invalid!("the training loss is not finite ({loss}) at step {}{kept}", step + 1));
            }
            let gf_before = step as f64 * step_gflops;
            step += 1;
            last_loss = loss;
            let gf = step as f64 * step_gflops;
            let mut rec = Record {
                step,
                images: step * batch as u64,
                train_gflops: gf,
                wall_s: 0.0,
                lr,
                loss,
                val_error: None,
                val_loss: None,
            };
            let at_eval = step == total || cfg.eval_every.is_some_and(|e| (gf / e).floor() > (gf_before / e).floor());
            if at_eval {
                if let Some(vl) = val_loader.as_mut() {
                    let te = Instant::now();
                    let r = if eval_batch == batch {
                        evaluate(&mut model, &mut ws, vl, &mut vb)?
                    } else {
                        if eval_ws.is_none() {
                            eval_ws = Some(model.workspace(eval_batch, size, size)?);
                        }
                        evaluate(&mut model, eval_ws.as_mut().expect("made above"), vl, &mut vb)?
                    };
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
                    if step == total {
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
            if cfg.checkpoint.is_some() && (every || step == total) {
                write_checkpoint(&snapshot(&model, step, train_loader.position(), wall(&t0))?)?;
            }
        }
        Ok(Outcome::Finished(Summary {
            steps: step,
            images: step * batch as u64,
            train_gflops: step as f64 * step_gflops,
            gflops_per_image: image_flops / 1e9,
            wall_s: wall(&t0),
            eval_s,
            last_loss,
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
