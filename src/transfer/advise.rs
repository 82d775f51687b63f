//! The advisor (`prunekit transfer advise`): from the runs an experiment has, predict each
//! model's error at a budget it has not run, the compute-optimal model there, and the
//! budgets where one model overtakes another.
//!
//! Each model's validation error against its training compute C (the budget: GFLOPs, or
//! device seconds for an experiment run with `--budgets-seconds`) is
//! fitted with a saturating power law, the form of neural scaling laws in data and compute
//! (Hestness et al. 2017; Kaplan et al. 2020; Hoffmann et al. 2022):
//!
//! ```text
//! e(C) = e_inf + a * C^(-b)      e_inf in [0, 1], a >= 0, b in [0.01, 3]
//! ```
//!
//! `e_inf` is the error the model tends to with unlimited fine-tuning compute (the paper's
//! "asymptotic performance"), `a` and `b` how fast it gets there (its "compute
//! efficiency"). For a fixed `b` the law is linear in (`e_inf`, `a`), so the fit is exact
//! least squares over every seed's error for each `b` of a log-spaced grid, refined by a
//! golden-section search around the grid's best; the bounds are kept by solving the
//! constrained problem on the boundary when the free solution leaves them. A pruned model
//! typically has the larger `e_inf` and the faster start, so curves cross: the crossover
//! budgets are the roots of `e_i(C) - e_j(C)`.
//!
//! The interval of a prediction is a bootstrap: the seeds' errors are resampled with
//! replacement within each budget, the law refitted, and the 5th and 95th percentiles of
//! the predictions taken (a 90% interval that carries the seeds' noise, not the law's own
//! misspecification).

use super::report::{Report, Row};
use crate::{ensure, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::fmt::Write as _;

/// Fewest distinct budgets a model needs for a fit: three parameters need three.
pub const MIN_BUDGETS: usize = 3;
/// Bootstrap resamples behind an interval.
const RESAMPLES: usize = 200;
/// The exponent's bounds.
const B_RANGE: (f64, f64) = (0.01, 3.0);

/// A fitted law `e(C) = e_inf + a * C^(-b)`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Law {
    /// The asymptotic error.
    pub e_inf: f64,
    /// The scale of the reducible error.
    pub a: f64,
    /// The exponent.
    pub b: f64,
    /// Root-mean-square residual of the fit over the observations.
    pub rmse: f64,
}

impl Law {
    /// The predicted error at budget `c`.
    pub fn at(&self, c: f64) -> f64 {
        self.e_inf + self.a * c.powf(-self.b)
    }
}

/// The least-squares (e_inf, a) for a fixed exponent, within the bounds, and its squared error.
fn fit_linear(obs: &[(f64, f64)], b: f64) -> (f64, f64, f64) {
    let xs: Vec<f64> = obs.iter().map(|&(c, _)| c.powf(-b)).collect();
    let n = obs.len() as f64;
    let (sx, sy) = (xs.iter().sum::<f64>(), obs.iter().map(|o| o.1).sum::<f64>());
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(obs).map(|(x, o)| (x - mx) * (o.1 - my)).sum();
    let sse = |e: f64, a: f64| xs.iter().zip(obs).map(|(x, o)| (o.1 - e - a * x).powi(2)).sum::<f64>();
    let mut cands = Vec::new();
    if sxx > 0.0 {
        let a = sxy / sxx;
        cands.push((my - a * mx, a));
    }
    // The boundaries: a = 0 (flat), e_inf = 0, e_inf = 1 (each with the best other parameter).
    cands.push((my.clamp(0.0, 1.0), 0.0));
    let sxx0: f64 = xs.iter().map(|x| x * x).sum();
    if sxx0 > 0.0 {
        for e in [0.0, 1.0] {
            let a = xs.iter().zip(obs).map(|(x, o)| x * (o.1 - e)).sum::<f64>() / sxx0;
            cands.push((e, a.max(0.0)));
        }
    }
    cands
        .into_iter()
        .filter(|&(e, a)| (0.0..=1.0).contains(&e) && a >= 0.0 && a.is_finite())
        .map(|(e, a)| (e, a, sse(e, a)))
        .min_by(|x, y| x.2.total_cmp(&y.2))
        .unwrap_or((my.clamp(0.0, 1.0), 0.0, sse(my.clamp(0.0, 1.0), 0.0)))
}

/// Fits the law to observations (compute, error); at least [`MIN_BUDGETS`] distinct
/// compute values, all positive and finite.
pub fn fit(obs: &[(f64, f64)]) -> Result<Law> {
    ensure!(
        obs.iter().all(|&(c, e)| c.is_finite() && c > 0.0 && e.is_finite()),
        "observations need positive, finite compute and finite errors"
    );
    let mut budgets: Vec<f64> = obs.iter().map(|o| o.0).collect();
    budgets.sort_by(f64::total_cmp);
    budgets.dedup();
    ensure!(budgets.len() >= MIN_BUDGETS, "a fit needs runs at {MIN_BUDGETS} or more budgets, not {}", budgets.len());
    // The exponent: a log-spaced grid, then golden-section refinement around the best.
    let sse = |b: f64| fit_linear(obs, b).2;
    let grid: Vec<f64> = (0..=240).map(|i| B_RANGE.0 * (B_RANGE.1 / B_RANGE.0).powf(i as f64 / 240.0)).collect();
    let best = (0..grid.len()).min_by(|&i, &j| sse(grid[i]).total_cmp(&sse(grid[j]))).expect("grid");
    let (mut lo, mut hi) = (grid[best.saturating_sub(1)].ln(), grid[(best + 1).min(grid.len() - 1)].ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..60 {
        let (m1, m2) = (hi - g * (hi - lo), lo + g * (hi - lo));
        if sse(m1.exp()) <= sse(m2.exp()) {
            hi = m2;
        } else {
            lo = m1;
        }
    }
    let b = ((lo + hi) / 2.0).exp();
    let b = if sse(b) <= sse(grid[best]) { b } else { grid[best] };
    let (e_inf, a, s) = fit_linear(obs, b);
    Ok(Law { e_inf, a, b, rmse: (s / obs.len() as f64).sqrt() })
}

/// Observations grouped by compute value.
fn groups(obs: &[(f64, f64)]) -> Vec<(f64, Vec<f64>)> {
    let mut groups: Vec<(f64, Vec<f64>)> = Vec::new();
    for &(c, e) in obs {
        match groups.iter_mut().find(|g| g.0 == c) {
            Some(g) => g.1.push(e),
            None => groups.push((c, vec![e])),
        }
    }
    groups
}

/// One bootstrap resample: each compute value's errors drawn with replacement.
fn resample(groups: &[(f64, Vec<f64>)], rng: &mut StdRng) -> Vec<(f64, f64)> {
    groups
        .iter()
        .flat_map(|(c, es)| (0..es.len()).map(|_| (*c, es[rng.random_range(0..es.len())])).collect::<Vec<_>>())
        .collect()
}

/// The 5th and 95th percentiles of sorted values.
fn percentiles(mut p: Vec<f64>) -> (f64, f64) {
    if p.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    p.sort_by(f64::total_cmp);
    let q = |f: f64| p[((p.len() - 1) as f64 * f).round() as usize];
    (q(0.05), q(0.95))
}

/// Bootstrap refits of one model's law: its seeds' errors resampled with replacement
/// within each compute value and the law refitted, [`RESAMPLES`] times (`None` where a
/// refit fails). `key` (the model's name) seeds the draws, so that two models' resamples
/// are independent and each model's are the same in every use.
fn bootstrap_laws(obs: &[(f64, f64)], key: &str) -> Vec<Option<Law>> {
    let groups = groups(obs);
    // FNV-1a of the key: stable across runs and platforms.
    let seed = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    let mut rng = StdRng::seed_from_u64(seed ^ 0x00AD_015E);
    (0..RESAMPLES).map(|_| fit(&resample(&groups, &mut rng)).ok()).collect()
}

/// The 5th and 95th percentiles of the bootstrap laws' predictions at `c`.
fn interval_at(laws: &[Option<Law>], c: f64) -> (f64, f64) {
    percentiles(laws.iter().flatten().map(|l| l.at(c)).collect())
}

/// The seeds' spread of the crossover near `near` between two models, from their
/// bootstrap laws taken in pairs (resample i of one with resample i of the other): the
/// root in [lo, hi] nearest `near` (in log compute) of each pair. Returns the 5th and 95th
/// percentiles of those roots and the fraction of pairs that cross in [lo, hi] at all.
fn crossover_spread(x: &[Option<Law>], y: &[Option<Law>], near: f64, lo: f64, hi: f64) -> ((f64, f64), f64) {
    let mut found = Vec::with_capacity(RESAMPLES);
    let mut tried = 0usize;
    for (lx, ly) in x.iter().zip(y).filter_map(|(a, b)| Some(((*a)?, (*b)?))) {
        tried += 1;
        let nearest = roots(|c| lx.at(c) - ly.at(c), lo, hi)
            .into_iter()
            .min_by(|a, b| (a / near).ln().abs().total_cmp(&(b / near).ln().abs()));
        found.extend(nearest);
    }
    let share = if tried == 0 { 0.0 } else { found.len() as f64 / tried as f64 };
    (percentiles(found), share)
}

/// One model's fit and its prediction at the asked budget.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelFit {
    /// The model spec.
    pub model: String,
    /// The budgets its fit used.
    pub budgets: Vec<f64>,
    /// The fitted law.
    pub law: Law,
    /// Predicted mean error at the asked budget.
    pub predicted: f64,
    /// Its 90% bootstrap interval.
    pub interval: (f64, f64),
    /// The measured mean error there, when the model ran at that budget.
    pub measured: Option<f64>,
}

/// A budget where one model's predicted error crosses another's.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Crossover {
    /// The budget, in the advice's unit.
    pub budget: f64,
    /// The model that is better below it.
    pub better_below: String,
    /// The model that is better above it.
    pub better_above: String,
    /// Whether it lies beyond the largest budget that was run (an extrapolation).
    pub extrapolated: bool,
    /// The seeds' spread: the 5th and 95th percentiles of the crossover over bootstrap
    /// refits of both models (the seeds' errors resampled within each budget).
    pub interval: (f64, f64),
    /// The fraction of those refits that cross in the searched range at all.
    pub resamples_crossing: f64,
}

/// The advice at one budget.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Advice {
    /// The budgets' unit: `GFLOPs` (training compute) or `s` (device seconds, for an
    /// experiment run with time budgets).
    pub unit: &'static str,
    /// The budget asked about, in `unit`.
    pub budget: f64,
    /// Every model's fit, in the report's order.
    pub fits: Vec<ModelFit>,
    /// The model with the lowest predicted error.
    pub best: String,
    /// The models whose interval overlaps the best one's (indistinguishable from it within
    /// the seeds' noise), the best included.
    pub contenders: Vec<String>,
    /// Crossovers between the best model and each other one, from the smallest budget run
    /// to 100 times the largest.
    pub crossovers: Vec<Crossover>,
}

/// The models of a report in its order, with their (budget, error) observations (every
/// seed's error).
fn observations(rows: &[Row]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let obs: Vec<(f64, f64)> = r.val_errors.iter().map(|&e| (r.budget(), e)).collect();
        match out.iter_mut().find(|(m, _)| *m == r.model) {
            Some((_, o)) => o.extend(obs),
            None => out.push((r.model.clone(), obs)),
        }
    }
    out
}

fn distinct(obs: &[(f64, f64)]) -> Vec<f64> {
    let mut b: Vec<f64> = obs.iter().map(|o| o.0).collect();
    b.sort_by(f64::total_cmp);
    b.dedup();
    b
}

/// The roots of `f` on a log grid over [lo, hi], refined by bisection.
fn roots(f: impl Fn(f64) -> f64, lo: f64, hi: f64) -> Vec<f64> {
    let n = 400;
    let at = |i: usize| lo * (hi / lo).powf(i as f64 / n as f64);
    let mut out = Vec::new();
    for i in 0..n {
        let (mut a, mut b) = (at(i), at(i + 1));
        let (fa, fb) = (f(a), f(b));
        if fa == 0.0 {
            out.push(a);
        } else if fa * fb < 0.0 {
            for _ in 0..60 {
                let m = (a * b).sqrt();
                if f(a) * f(m) <= 0.0 {
                    b = m;
                } else {
                    a = m;
                }
            }
            out.push((a * b).sqrt());
        }
    }
    out
}

/// The unit of a report's budgets; a report mixing both is refused.
fn budget_unit(rows: &[Row]) -> Result<&'static str> {
    let timed = rows.iter().filter(|r| r.budget_seconds.is_some()).count();
    ensure!(
        timed == 0 || timed == rows.len(),
        "the runs mix GFLOPs and time budgets: advise on the runs of one kind of budget"
    );
    Ok(if timed > 0 { "s" } else { "GFLOPs" })
}

/// Advises at `budget` from the rows of `report` whose budget is at most `fit_up_to`
/// (`None`: every row).
pub fn advise(report: &Report, budget: f64, fit_up_to: Option<f64>) -> Result<Advice> {
    ensure!(budget.is_finite() && budget > 0.0, "--budget must be positive and finite, not {budget}");
    let rows: Vec<Row> =
        report.rows.iter().filter(|r| fit_up_to.is_none_or(|u| r.budget() <= u * (1.0 + 1e-12))).cloned().collect();
    let unit = budget_unit(&report.rows)?;
    let models = observations(&rows);
    ensure!(
        !models.is_empty(),
        "no runs to fit{}",
        fit_up_to.map_or(String::new(), |u| format!(" at budgets up to {u}"))
    );
    let mut fits = Vec::new();
    let mut laws = Vec::new();
    for (model, obs) in &models {
        let budgets = distinct(obs);
        ensure!(
            budgets.len() >= MIN_BUDGETS,
            "{model} ran at {} budget{} ({}); the advisor fits three parameters and needs runs at {MIN_BUDGETS} or more \
             budgets: run `prunekit transfer` with more --budgets (for example doubling from the smallest) into the \
             same --runs folder",
            budgets.len(),
            if budgets.len() == 1 { "" } else { "s" },
            budgets.iter().map(|b| format!("{b}")).collect::<Vec<_>>().join(", ")
        );
        let law = fit(obs)?;
        let resampled = bootstrap_laws(obs, model);
        let interval = interval_at(&resampled, budget);
        laws.push((model.clone(), resampled));
        let measured = report
            .rows
            .iter()
            .find(|r| r.model == *model && (r.budget() / budget - 1.0).abs() < 1e-9)
            .map(|r| r.val_error);
        fits.push(ModelFit { model: model.clone(), budgets, law, predicted: law.at(budget), interval, measured });
    }
    let best = fits.iter().min_by(|a, b| a.predicted.total_cmp(&b.predicted)).expect("at least one fit");
    let contenders =
        fits.iter().filter(|f| f.interval.0 <= best.interval.1).map(|f| f.model.clone()).collect::<Vec<_>>();
    let all_budgets: Vec<f64> = fits.iter().flat_map(|f| f.budgets.iter().copied()).collect();
    let (lo, hi) =
        (all_budgets.iter().copied().fold(f64::INFINITY, f64::min), all_budgets.iter().copied().fold(0.0, f64::max));
    let mut crossovers = Vec::new();
    let laws_of = |m: &str| &laws.iter().find(|(n, _)| n == m).expect("every fit has its resamples").1;
    let range = (lo, hi.max(budget) * 100.0);
    for other in fits.iter().filter(|f| f.model != best.model) {
        for c in roots(|c| best.law.at(c) - other.law.at(c), range.0, range.1) {
            let below = best.law.at(c / 1.01) < other.law.at(c / 1.01);
            let (b, a) = if below { (&best.model, &other.model) } else { (&other.model, &best.model) };
            let (interval, resamples_crossing) =
                crossover_spread(laws_of(&best.model), laws_of(&other.model), c, range.0, range.1);
            crossovers.push(Crossover {
                budget: c,
                better_below: b.clone(),
                better_above: a.clone(),
                extrapolated: c > hi,
                interval,
                resamples_crossing,
            });
        }
    }
    crossovers.sort_by(|a, b| a.budget.total_cmp(&b.budget));
    Ok(Advice { budget, unit, best: best.model.clone(), contenders, crossovers, fits })
}

impl Advice {
    /// The advice as a text table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "prediction at {} {} (fit e(C) = e_inf + a*C^-b over every seed's error):",
            self.budget, self.unit
        );
        let _ = writeln!(
            s,
            "{:<14} {:>9} {:>19} {:>9}  {:>7} {:>9} {:>6} {:>7}  budgets fitted",
            "model", "predicted", "90% interval", "measured", "e_inf", "a", "b", "rmse"
        );
        for f in &self.fits {
            let _ = writeln!(
                s,
                "{:<14} {:>9.4} {:>19} {:>9}  {:>7.4} {:>9.4} {:>6.3} {:>7.4}  {}",
                f.model,
                f.predicted,
                format!("[{:.4}, {:.4}]", f.interval.0, f.interval.1),
                f.measured.map_or("-".to_string(), |m| format!("{m:.4}")),
                f.law.e_inf,
                f.law.a,
                f.law.b,
                f.law.rmse,
                f.budgets.iter().map(|b| format!("{b}")).collect::<Vec<_>>().join(",")
            );
        }
        let _ = writeln!(s, "compute-optimal at {} {}: {}", self.budget, self.unit, self.best);
        if self.contenders.len() > 1 {
            let _ = writeln!(s, "within the seeds' noise of it: {}", self.contenders.join(", "));
        }
        if self.crossovers.is_empty() {
            let _ = writeln!(s, "no crossover with {} between the smallest budget run and 100x the largest", self.best);
        }
        for c in &self.crossovers {
            let _ = writeln!(
                s,
                "crossover at {:.4} {} (seeds' 90% interval [{:.4}, {:.4}], {:.0}% of resamples cross): {} below, {} above{}",
                c.budget,
                self.unit,
                c.interval.0,
                c.interval.1,
                100.0 * c.resamples_crossing,
                c.better_below,
                c.better_above,
                if c.extrapolated { " (beyond the largest budget run: extrapolated)" } else { "" }
            );
        }
        s
    }
}

/// One line of the advisor's validation: fit at budgets up to B/4, predict at B.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Check {
    /// The budget predicted, in the experiment's unit.
    pub budget: f64,
    /// The largest budget fitted.
    pub fit_up_to: f64,
    /// The predicted optimum.
    pub predicted_best: String,
    /// The measured optimum.
    pub measured_best: String,
    /// Whether the predicted optimum is the measured one, or its measured error is within
    /// two standard errors (of the difference of the two means) of the measured best's.
    pub hit: bool,
    /// Mean absolute error of the predicted mean errors over the models measured at B.
    pub mean_abs_error: f64,
}

/// The advisor's validation on a report: for every budget B with at least [`MIN_BUDGETS`]
/// budgets at or below B/4, fit there, predict at B and compare with what was measured.
pub fn validate(report: &Report) -> Result<Vec<Check>> {
    let mut budgets: Vec<f64> = report.rows.iter().map(|r| r.budget()).collect();
    budgets.sort_by(f64::total_cmp);
    budgets.dedup();
    let mut out = Vec::new();
    for &b in &budgets {
        let below: Vec<f64> = budgets.iter().copied().filter(|&x| x <= b / 4.0 * (1.0 + 1e-12)).collect();
        if below.len() < MIN_BUDGETS {
            continue;
        }
        let measured: Vec<&Row> = report.rows.iter().filter(|r| r.budget() == b).collect();
        let Ok(adv) = advise(report, b, Some(b / 4.0)) else { continue };
        let mbest = measured.iter().min_by(|x, y| x.val_error.total_cmp(&y.val_error)).expect("rows at b");
        let se = |r: &Row| r.val_error_std / (r.seeds.max(1) as f64).sqrt();
        let hit = adv.best == mbest.model
            || measured
                .iter()
                .find(|r| r.model == adv.best)
                .is_some_and(|p| p.val_error - mbest.val_error <= 2.0 * (se(p).powi(2) + se(mbest).powi(2)).sqrt());
        let errs: Vec<f64> = adv.fits.iter().filter_map(|f| f.measured.map(|m| (f.predicted - m).abs())).collect();
        out.push(Check {
            budget: b,
            fit_up_to: *below.last().expect("non-empty"),
            predicted_best: adv.best.clone(),
            measured_best: mbest.model.clone(),
            hit,
            mean_abs_error: errs.iter().sum::<f64>() / errs.len().max(1) as f64,
        });
    }
    ensure!(
        !out.is_empty(),
        "no budget B has runs at {MIN_BUDGETS} or more budgets up to B/4: validating the advisor needs a ladder of \
         budgets spanning a factor of 16 or more (for example 3,6,12,24,48)"
    );
    Ok(out)
}

/// The validation as a text table with its summary line.
pub fn validation_table(checks: &[Check]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>10} {:>10}  {:<14} {:<14} {:>4} {:>9}",
        "budget", "fit up to", "predicted", "measured", "hit", "MAE"
    );
    for c in checks {
        let _ = writeln!(
            s,
            "{:>10} {:>10}  {:<14} {:<14} {:>4} {:>9.4}",
            c.budget,
            c.fit_up_to,
            c.predicted_best,
            c.measured_best,
            if c.hit { "yes" } else { "no" },
            c.mean_abs_error
        );
    }
    let hits = checks.iter().filter(|c| c.hit).count();
    let mae = checks.iter().map(|c| c.mean_abs_error).sum::<f64>() / checks.len().max(1) as f64;
    let _ = writeln!(
        s,
        "optimum predicted (or within 2 standard errors of the measured one) at {hits} of {} budgets; mean absolute \
         error of the predicted error {mae:.4}",
        checks.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations from a known law with deterministic noise of amplitude `noise`.
    fn synth(law: Law, budgets: &[f64], seeds: usize, noise: f64) -> Vec<(f64, f64)> {
        let mut m = StdRng::seed_from_u64(7);
        budgets
            .iter()
            .flat_map(|&c| (0..seeds).map(|_| (c, law.at(c) + noise * m.random_range(-1.0..=1.0))).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn a_known_law_is_recovered_without_noise() {
        let law = Law { e_inf: 0.12, a: 0.9, b: 0.45, rmse: 0.0 };
        let obs = synth(law, &[3.0, 6.0, 12.0, 24.0, 48.0, 96.0], 1, 0.0);
        let f = fit(&obs).unwrap();
        assert!((f.e_inf - 0.12).abs() < 1e-6 && (f.a - 0.9).abs() < 1e-5 && (f.b - 0.45).abs() < 1e-6, "{f:?}");
    }

    #[test]
    fn a_known_law_is_recovered_from_noisy_seeds_and_predicted_within_its_interval() {
        let law = Law { e_inf: 0.2, a: 0.6, b: 0.7, rmse: 0.0 };
        let budgets = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
        let obs = synth(law, &budgets, 5, 0.01);
        let f = fit(&obs).unwrap();
        assert!((f.e_inf - 0.2).abs() < 0.02 && (f.b - 0.7).abs() < 0.25, "{f:?}");
        let (lo, hi) = interval_at(&bootstrap_laws(&obs, "model"), 512.0);
        assert!(lo <= law.at(512.0) + 0.01 && law.at(512.0) - 0.01 <= hi, "[{lo}, {hi}] vs {}", law.at(512.0));
        assert!(lo <= f.at(512.0) && f.at(512.0) <= hi);
    }

    #[test]
    fn bounds_hold_for_data_that_rise_with_compute() {
        let obs: Vec<(f64, f64)> = [(1.0, 0.1), (2.0, 0.2), (4.0, 0.3), (8.0, 0.4)].to_vec();
        let f = fit(&obs).unwrap();
        assert!(f.a >= 0.0 && (0.0..=1.0).contains(&f.e_inf), "{f:?}");
        assert!((f.at(4.0) - 0.25).abs() < 1e-9, "a flat law at the mean: {f:?}");
    }

    #[test]
    fn too_few_budgets_are_refused_with_what_to_run() {
        let e = fit(&[(1.0, 0.3), (2.0, 0.2), (2.0, 0.21)]).unwrap_err().to_string();
        assert!(e.contains("3 or more budgets"), "{e}");
        assert!(fit(&[(0.0, 0.3), (2.0, 0.2), (3.0, 0.1)]).is_err());
    }

    #[test]
    fn crossing_laws_give_their_crossover() {
        // Pruned: fast start, high floor; dense: slow start, low floor.
        let pruned = Law { e_inf: 0.15, a: 0.5, b: 0.8, rmse: 0.0 };
        let dense = Law { e_inf: 0.05, a: 1.0, b: 0.5, rmse: 0.0 };
        let c = roots(|c| pruned.at(c) - dense.at(c), 1.0, 1e6);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!((pruned.at(c[0]) - dense.at(c[0])).abs() < 1e-9);
    }

    #[test]
    fn a_crossover_from_noisy_seeds_has_an_interval_around_the_true_one() {
        let pruned = Law { e_inf: 0.15, a: 0.5, b: 0.8, rmse: 0.0 };
        let dense = Law { e_inf: 0.05, a: 1.0, b: 0.5, rmse: 0.0 };
        let truth = roots(|c| pruned.at(c) - dense.at(c), 1.0, 1e6)[0];
        let budgets: Vec<f64> = (0..10).map(|i| 2f64.powi(i)).collect();
        let (p, d) = (synth(pruned, &budgets, 3, 0.005), synth(dense, &budgets, 3, 0.005));
        let ((lo, hi), share) =
            crossover_spread(&bootstrap_laws(&p, "pruned"), &bootstrap_laws(&d, "dense"), truth, 1.0, 1e5);
        assert!(share > 0.9, "{share}");
        assert!(lo <= truth && truth <= hi && hi / lo < 10.0, "[{lo}, {hi}] vs {truth}");
        // Without noise every refit is the same law: the interval is the point.
        let (p0, d0) = (synth(pruned, &budgets, 3, 0.0), synth(dense, &budgets, 3, 0.0));
        let ((lo, hi), share) =
            crossover_spread(&bootstrap_laws(&p0, "pruned"), &bootstrap_laws(&d0, "dense"), truth, 1.0, 1e5);
        assert_eq!(share, 1.0);
        assert!((lo / truth - 1.0).abs() < 1e-3 && (hi / truth - 1.0).abs() < 1e-3, "[{lo}, {hi}] vs {truth}");
    }
}
