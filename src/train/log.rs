//! What a run reports: one JSON line per step ([`Record`]) in the `--log` file, and a
//! progress bar on stderr (hidden when stderr is not a terminal).

use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// One line of the log: the state after a training step, with the evaluation when the
/// step is an evaluation point.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Training steps done (1 after the first).
    pub step: u64,
    /// Training images seen: steps times the batch.
    pub images: u64,
    /// Training compute so far in GFLOPs: images times the training FLOPs per image.
    pub train_gflops: f64,
    /// Seconds since the run started (over every part of an interrupted run), evaluations
    /// included.
    pub wall_s: f64,
    /// The learning rate of this step.
    pub lr: f64,
    /// This step's training loss (mean over the batch, before the update).
    pub loss: f64,
    /// The global L2 norm of the step's gradients before clipping (with gradient clipping only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// Top-1 error on the validation split (evaluation points only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_error: Option<f64>,
    /// Mean cross-entropy on the validation split (evaluation points only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
}

/// The `--log` file: JSON lines, each written whole and flushed.
pub struct JsonLog {
    file: std::fs::File,
    path: String,
}

impl JsonLog {
    /// Creates (or, to continue a resumed run, appends to) the log file.
    pub fn open(path: &Path, append: bool) -> Result<JsonLog> {
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|source| Error::Io { path: shown.clone(), source })?;
        Ok(JsonLog { file, path: shown })
    }

    /// Appends one record.
    pub fn write(&mut self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_string(r).expect("plain values");
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|source| Error::Io { path: self.path.clone(), source })
    }
}

/// The progress bar: step, loss, throughput and the budget left.
pub struct Bar {
    bar: indicatif::ProgressBar,
    gflops_per_step: f64,
    total: u64,
}

impl Bar {
    /// A bar over `total` steps, `done` of them already done; hidden unless `show` and
    /// stderr is a terminal.
    pub fn new(total: u64, done: u64, gflops_per_step: f64, show: bool) -> Bar {
        let bar = if show {
            indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr())
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} ({elapsed}, ~{eta} left)")
                .expect("valid template"),
        );
        bar.set_position(done);
        Bar { bar, gflops_per_step, total }
    }

    /// After a step.
    pub fn step(&self, r: &Record, images_per_s: f64) {
        let left = (self.total - r.step.min(self.total)) as f64 * self.gflops_per_step;
        self.bar.set_position(r.step);
        self.bar.set_message(format!("loss {:.4}, {images_per_s:.0} img/s, {left:.1} GFLOPs left", r.loss));
    }

    /// Prints a line above the bar.
    pub fn println(&self, s: &str) {
        if self.bar.is_hidden() {
            println!("{s}");
        } else {
            self.bar.println(s);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
