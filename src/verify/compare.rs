//! The comparisons: a run's values against the expected ones, group by group, with each
//! tensor's bound from its tolerance and noise floor; and the device's ReLU and max-pool
//! decisions against the float64 model's own.

use super::exact::{Decision, Decisions, Gate, Outcome};
use super::policy::{Tolerance, JUDGE_LIMIT, UNJUDGED};
use super::report::{Blind, GateDiff, Group, GroupResult};
use crate::model::StateDict;
use crate::{ensure, invalid, Result};
use std::collections::BTreeMap;

/// The result of one group, accumulated tensor by tensor.
pub(super) struct Acc {
    pub(super) res: GroupResult,
}

impl Acc {
    pub(super) fn new(group: Group, tolerance: Tolerance) -> Acc {
        Acc {
            res: GroupResult {
                group,
                tensors: 0,
                max_abs: 0.0,
                max_scaled: 0.0,
                max_noise: 0.0,
                worst: "-".into(),
                worst_ratio: 0.0,
                failed: Vec::new(),
                blind: Vec::new(),
                unjudged: Vec::new(),
                tolerance,
            },
        }
    }

    /// Compares `got` with `want`; `noise` is the tensor's noise floor (None: none).
    pub(super) fn compare(&mut self, name: &str, got: &[f64], want: &[f64], noise: Option<f64>) -> Result<()> {
        ensure!(got.len() == want.len(), "{name}: {} values, the reference has {}", got.len(), want.len());
        let t = self.res.tolerance;
        let scale = want.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
        let judged = noise.is_some();
        let noise = noise.unwrap_or(0.0);
        if scale > 0.0 {
            self.res.max_noise = self.res.max_noise.max(noise / scale);
            let bound = t.atol * scale + t.k * noise;
            let b = Blind { name: name.into(), bound: bound / scale, noise: noise / scale };
            if judged && noise > UNJUDGED * scale {
                self.unjudged(name, got, want, b);
                return Ok(());
            }
            if judged && bound > JUDGE_LIMIT * scale {
                self.res.blind.push(b);
            }
        }
        // err / bound of the worst element; infinite if any element fails (NaN too).
        let mut ratio = 0.0f64;
        let mut worst_err = 0.0f64;
        let mut first_bad = None;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs();
            let bound = t.atol * scale + t.rtol * w.abs() + t.k * noise;
            worst_err = if err.is_nan() { f64::INFINITY } else { worst_err.max(err) };
            if err.is_nan() || err > bound {
                ratio = f64::INFINITY;
                first_bad.get_or_insert((i, g, w, bound));
            } else if bound > 0.0 {
                ratio = ratio.max(err / bound);
            }
        }
        self.res.max_abs = self.res.max_abs.max(worst_err);
        if scale > 0.0 {
            self.res.max_scaled = self.res.max_scaled.max(worst_err / scale);
        }
        self.res.tensors += 1;
        if ratio > self.res.worst_ratio || self.res.worst == "-" {
            self.res.worst_ratio = ratio;
            self.res.worst = name.to_string();
        }
        if let Some((i, g, w, b)) = first_bad {
            self.res.failed.push(format!(
                "{name}: element {i} is {g:.6e}, expected {w:.6e} (error {:.1e} x scale, bound {:.1e} x scale)",
                (g - w).abs() / scale.max(f64::MIN_POSITIVE),
                b / scale.max(f64::MIN_POSITIVE)
            ));
        }
        Ok(())
    }

    /// Counts a tensor whose values are not judged (`b`: its bound and noise floor, for
    /// the report), but fails it where a value is NaN or infinite and the expected one is
    /// finite: no tolerance makes that rounding.
    pub(super) fn unjudged(&mut self, name: &str, got: &[f64], want: &[f64], b: Blind) {
        self.res.tensors += 1;
        self.res.unjudged.push(b);
        if let Some((i, (g, w))) = got.iter().zip(want).enumerate().find(|(_, (g, w))| !g.is_finite() && w.is_finite())
        {
            self.res.failed.push(format!(
                "{name}: element {i} is {g:e}, expected {w:.6e} (its values are not judged, but must be finite)"
            ));
        }
    }
}

/// What a run of the model produced, in float64 (from f32 on a device), for comparison.
pub(super) struct Values {
    pub(super) eval_logits: Vec<f64>,
    pub(super) logits: Vec<f64>,
    pub(super) loss: f64,
    pub(super) grads: BTreeMap<String, Vec<f64>>,
    pub(super) buffers: BTreeMap<String, Vec<f64>>,
    pub(super) stepped: BTreeMap<String, Vec<f64>>,
}

impl From<&Outcome> for Values {
    fn from(o: &Outcome) -> Values {
        Values {
            eval_logits: o.eval_logits.clone(),
            logits: o.logits.clone(),
            loss: o.loss,
            grads: o.grads.clone(),
            buffers: o.buffers.clone(),
            stepped: o.stepped.clone(),
        }
    }
}

pub(super) fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub(super) fn state_f64(sd: &StateDict) -> Result<BTreeMap<String, Vec<f64>>> {
    sd.tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), f64s(t.as_f32().ok_or_else(|| invalid!("{k} is not F32"))?))))
        .collect()
}

/// The largest |a - b|.
pub(super) fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x - y).abs()))
}

/// Compares every group of `got` with `want`; `noise` is a float64 run and its perturbed
/// twins, whose largest difference is each tensor's noise floor.
pub(super) fn compare_all(
    got: &Values,
    want: &Values,
    noise: Option<(&Values, &[Values])>,
    tol: Tolerance,
) -> Result<Vec<GroupResult>> {
    let floor = |f: &dyn Fn(&Values) -> &[f64]| -> Option<f64> {
        noise.map(|(a, tw)| tw.iter().fold(0.0f64, |m, b| m.max(max_diff(f(a), f(b)))))
    };
    let mut out = Vec::new();
    let mut g = Acc::new(Group::EvalLogits, tol);
    g.compare("eval_logits", &got.eval_logits, &want.eval_logits, floor(&|v| &v.eval_logits))?;
    out.push(g.res);
    let mut g = Acc::new(Group::TrainLogits, tol);
    g.compare("logits", &got.logits, &want.logits, floor(&|v| &v.logits))?;
    out.push(g.res);
    let mut g = Acc::new(Group::Loss, tol);
    g.compare("loss", &[got.loss], &[want.loss], floor(&|v| std::slice::from_ref(&v.loss)))?;
    out.push(g.res);
    for (group, sel) in [
        (Group::Gradients, (|v: &Values| &v.grads) as fn(&Values) -> &BTreeMap<String, Vec<f64>>),
        (Group::RunningStats, |v: &Values| &v.buffers),
        (Group::Step, |v: &Values| &v.stepped),
    ] {
        let mut g = Acc::new(group, tol);
        let (w, gv) = (sel(want), sel(got));
        ensure!(!w.is_empty(), "nothing to compare in {}", group.name());
        // A parameter whose gradient is not judged is not judged after the step either:
        // the step carries the gradient's error beyond where it adds up linearly.
        let unjudged_grads: Vec<String> = match group {
            Group::Step => out
                .iter()
                .filter(|r| r.group == Group::Gradients)
                .flat_map(|r| r.unjudged.iter().map(|b| b.name.clone()))
                .collect(),
            _ => Vec::new(),
        };
        for (name, e) in w {
            let v = gv.get(name).ok_or_else(|| invalid!("{}: {name} names nothing in the model", group.name()))?;
            if let Some(b) =
                out.iter().flat_map(|r| &r.unjudged).find(|b| unjudged_grads.contains(&b.name) && &b.name == name)
            {
                let b = Blind { name: name.clone(), bound: f64::INFINITY, noise: b.noise };
                ensure!(v.len() == e.len(), "{name}: {} values, the reference has {}", v.len(), e.len());
                g.unjudged(name, v, e, b);
                continue;
            }
            let nz = match noise {
                Some((a, tw)) => {
                    let x = sel(a).get(name).ok_or_else(|| invalid!("internal: no base of {name}"))?;
                    let mut m = 0.0f64;
                    for b in tw {
                        m = m
                            .max(max_diff(x, sel(b).get(name).ok_or_else(|| invalid!("internal: no twin of {name}"))?));
                    }
                    Some(m)
                }
                None => None,
            };
            g.compare(name, v, e, nz)?;
        }
        out.push(g.res);
    }
    Ok(out)
}

/// Where the device's decisions differ from the float64 model's own gates.
pub(super) fn decision_diffs(own: &[Gate], device: &Decisions) -> Result<(Vec<GateDiff>, usize)> {
    ensure!(own.len() == device.gates.len(), "internal: {} gates against {}", own.len(), device.gates.len());
    let mut out = Vec::new();
    let mut total = 0;
    for (g, (name, d)) in own.iter().zip(&device.gates) {
        ensure!(&g.name == name, "internal: gate {} against {name}", g.name);
        let (differ, n, min_pre, scale) = match (&g.decision, d) {
            (Decision::Relu(a), Decision::Relu(b)) => {
                let mut min = f64::INFINITY;
                let mut k = 0;
                for ((x, y), p) in a.iter().zip(b).zip(&g.pre) {
                    if x != y {
                        k += 1;
                        min = min.min(p.abs());
                    }
                }
                (k, a.len(), min, g.pre.iter().fold(0.0f64, |m, v| m.max(v.abs())))
            }
            (Decision::MaxPool(a), Decision::MaxPool(b)) => {
                (a.iter().zip(b).filter(|(x, y)| x != y).count(), a.len(), f64::NAN, f64::NAN)
            }
            _ => return Err(invalid!("internal: gate {name} of another kind")),
        };
        total += n;
        if differ > 0 {
            out.push(GateDiff { gate: name.clone(), differ, total: n, min_pre, scale });
        }
    }
    Ok((out, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::policy::tolerance;
    use crate::verify::PrecisionKind;

    /// A tensor too noisy to judge still fails on a NaN or an infinity (where the expected
    /// value is finite), and passes with any finite values.
    #[test]
    fn unjudged_tensors_must_be_finite() {
        let want = [1.0, -2.0, 0.5];
        for (got, fails) in [
            ([9.0, 3.0, -7.0], false),
            ([1.0, f64::NAN, 0.5], true),
            ([f64::INFINITY, -2.0, 0.5], true),
            ([1.0, -2.0, f64::NEG_INFINITY], true),
        ] {
            let mut acc = Acc::new(Group::Gradients, tolerance(PrecisionKind::Bf16));
            acc.compare("g", &got, &want, Some(UNJUDGED * 2.0 * 2.0)).unwrap();
            assert_eq!(acc.res.unjudged.len(), 1, "{got:?}");
            assert_eq!(!acc.res.failed.is_empty(), fails, "{got:?}: {:?}", acc.res.failed);
            assert!(!fails || acc.res.failed[0].contains("must be finite"), "{:?}", acc.res.failed);
        }
    }

    /// A parameter whose gradient is not judged is not judged after the SGD step either,
    /// but its stepped values must be finite.
    #[test]
    fn stepped_parameters_of_unjudged_gradients_must_be_finite() {
        let map = |v: &[f64]| BTreeMap::from([("w".to_string(), v.to_vec())]);
        let values = |grad: &[f64], step: &[f64]| Values {
            eval_logits: vec![1.0],
            logits: vec![1.0],
            loss: 1.0,
            grads: map(grad),
            buffers: map(&[1.0]),
            stepped: map(step),
        };
        let want = values(&[1.0, 1.0], &[1.0, 1.0]);
        // The noise twin moves the gradient by its whole scale: not judged.
        let base = values(&[1.0, 1.0], &[1.0, 1.0]);
        let twins = [values(&[2.0, 0.0], &[1.0, 1.0])];
        let tol = tolerance(PrecisionKind::Bf16);
        for (step, fails) in [([1.0, 5.0], false), ([1.0, f64::NAN], true)] {
            let got = values(&[3.0, -1.0], &step);
            let res = compare_all(&got, &want, Some((&base, &twins)), tol).unwrap();
            let stepped = res.iter().find(|r| r.group == Group::Step).unwrap();
            assert_eq!(stepped.unjudged.len(), 1);
            assert_eq!(!stepped.failed.is_empty(), fails, "{step:?}: {:?}", stepped.failed);
        }
    }
}
