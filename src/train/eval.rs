//! Evaluation: top-1 error and mean cross-entropy of a model over one pass of an
//! evaluation loader, with eval-mode batch norm (running statistics).

use crate::data::{Batch, Loader};
use crate::model::{AnyWorkspace, Model};
use crate::{ensure, Result};

/// The result of one evaluation pass.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EvalResult {
    /// Images evaluated.
    pub images: usize,
    /// Fraction of images whose largest logit (the first, on ties) is not their class.
    pub error: f64,
    /// Mean cross-entropy (natural log), computed in f64 from the logits.
    pub loss: f64,
}

/// One pass of `loader` (an evaluation loader of the workspace's batch size): every valid
/// image of every batch through an eval-mode forward.
pub fn evaluate(
    model: &mut Model,
    ws: &mut AnyWorkspace,
    loader: &mut Loader,
    batch: &mut Batch,
) -> Result<EvalResult> {
    let classes = model.arch().classes;
    let (mut images, mut wrong, mut loss) = (0usize, 0usize, 0.0f64);
    while loader.next(batch)? {
        model.set_batch(ws, &batch.images, None)?;
        model.forward(ws, false)?;
        let logits = model.logits(ws)?;
        for (i, &t) in batch.targets.iter().enumerate().take(batch.valid) {
            let z = &logits[i * classes..(i + 1) * classes];
            ensure!(t >= 0 && (t as usize) < classes, "class {t} is outside the model's {classes} classes");
            let (arg, mx) = z
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(ai, a), (j, &v)| if v > a { (j, v) } else { (ai, a) });
            if arg != t as usize {
                wrong += 1;
            }
            let mx = mx as f64;
            let lse = mx + z.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            loss += lse - z[t as usize] as f64;
            images += 1;
        }
    }
    ensure!(images > 0, "the evaluation split has no images");
    Ok(EvalResult { images, error: wrong as f64 / images as f64, loss: loss / images as f64 })
}
