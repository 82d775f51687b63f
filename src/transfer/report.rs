//! The experiment's result: one row per (model, budget) over its seeds, the compute-optimal
//! model per budget with the relative error reduction of the best pruned model over dense,
//! a text table and JSON; and [`merge`], which builds it from a runs folder.

use super::spec::{parse_models, parse_positive_list, ModelSpec};
use super::{settings_diff, Plan, RunKind, RunRecord};
use crate::{ensure, invalid, Error, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One (model, budget) pair over its seeds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// The model spec (`dense`, `filters:0.5`).
    pub model: String,
    /// `dense`, `filters` or `channels`.
    pub mode: String,
    /// The sparsity (0 for dense).
    pub sparsity: f64,
    /// The budget in GFLOPs (NaN, null in JSON, for a time budget).
    pub budget_gflops: f64,
    /// The budget in seconds of training time (time budgets only).
    pub budget_seconds: Option<f64>,
    /// Steps the budget allowed (for a time budget, the first seed's: the probe sets each
    /// run's).
    pub steps: u64,
    /// Training compute of one run in GFLOPs (at most the budget; the mean over the seeds
    /// when diverged runs stopped early).
    pub train_gflops: f64,
    /// The learning rate (the search's choice when there was one).
    pub lr: f64,
    /// Seeds run.
    pub seeds: usize,
    /// Seeds whose run diverged (see [`RunRecord::diverged`]): left out of the mean, the
    /// spread, the min and max and the mean loss (which are NaN, null in JSON, when every
    /// seed diverged).
    pub diverged: usize,
    /// Mean top-1 validation error over the seeds that did not diverge.
    pub val_error: f64,
    /// Its sample standard deviation (0 for one seed).
    pub val_error_std: f64,
    /// The lowest of the seeds' errors.
    pub val_error_min: f64,
    /// The highest.
    pub val_error_max: f64,
    /// Each seed's error, in seed order, but for the seeds whose run diverged.
    pub val_errors: Vec<f64>,
    /// The seeds whose run diverged (their errors, as evaluated where they stopped, are in
    /// the run records).
    pub diverged_seeds: Vec<u64>,
    /// Mean validation cross-entropy over the seeds.
    pub val_loss: f64,
    /// Mean seconds of training of one run (evaluation excluded).
    pub wall_s: f64,
    /// Training FLOPs per image of the model in GFLOPs.
    pub train_gflops_per_image: f64,
    /// Parameters of the model.
    pub params: usize,
    /// Training compute of the learning-rate search for this pair, in GFLOPs (0 without one).
    pub search_gflops: f64,
    /// Its seconds of training.
    pub search_wall_s: f64,
}

/// The compute-optimal model at one budget.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Optimum {
    /// The budget in GFLOPs (NaN, null in JSON, for a time budget).
    pub budget_gflops: f64,
    /// The budget in seconds (time budgets only).
    pub budget_seconds: Option<f64>,
    /// The model with the lowest mean validation error (the first in the table's order on ties).
    pub best_model: String,
    /// Its mean error.
    pub best_val_error: f64,
    /// The dense model's mean error, when it ran at this budget.
    pub dense_val_error: Option<f64>,
    /// The pruned model with the lowest mean error.
    pub best_pruned_model: Option<String>,
    /// Its mean error.
    pub best_pruned_val_error: Option<f64>,
    /// (dense error - best pruned error) / dense error: the paper's headline metric
    /// (positive when pruning wins).
    pub relative_error_reduction: Option<f64>,
}

/// Rows, optima and every run behind them.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The experiment's settings (absent only for an empty report).
    pub settings: Option<BTreeMap<String, String>>,
    /// Its plan: models, budgets, seeds.
    pub plan: Option<Plan>,
    /// One per (model, budget) that ran, models outer in the experiment's order.
    pub rows: Vec<Row>,
    /// One per budget that has rows.
    pub optima: Vec<Optimum>,
    /// Every run, search runs included.
    pub runs: Vec<RunRecord>,
}

/// The learning rate a search picks among `lrs` (in their order) from its runs, each rate
/// judged over all its runs (one per seed): the fewest diverged runs, then the lowest mean
/// held-out error over the others, then the lowest mean held-out loss (a non-finite loss
/// counts as the worst), then the first given. None when no rate has a run.
pub fn chosen_lr(searched: &[RunRecord], lrs: &[f64]) -> Option<f64> {
    let mut best: Option<((usize, f64, f64), f64)> = None;
    for &lr in lrs {
        let runs: Vec<&RunRecord> = searched.iter().filter(|r| r.lr == lr).collect();
        if runs.is_empty() {
            continue;
        }
        let ok: Vec<&RunRecord> = runs.iter().copied().filter(|r| r.diverged.is_none()).collect();
        let (err, loss) = if ok.is_empty() {
            (f64::INFINITY, f64::INFINITY)
        } else {
            let loss = mean(&ok.iter().map(|r| r.val_loss).collect::<Vec<_>>());
            (
                mean(&ok.iter().map(|r| r.val_error).collect::<Vec<_>>()),
                if loss.is_finite() { loss } else { f64::INFINITY },
            )
        };
        let key = (runs.len() - ok.len(), err, loss);
        if best.is_none_or(|(b, _)| key < b) {
            best = Some((key, lr));
        }
    }
    best.map(|(_, lr)| lr)
}

impl Row {
    /// The budget in the experiment's unit: seconds for a time budget, else GFLOPs.
    pub fn budget(&self) -> f64 {
        self.budget_seconds.unwrap_or(self.budget_gflops)
    }
}

/// A sum that is +0 for no terms (`Iterator::sum` of f64 gives -0).
fn total(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(0.0, |a, x| a + x)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

impl Report {
    /// Groups runs into rows (pairs without final runs are left out) and finds the optima.
    /// Every final run of a pair must have the same learning rate and steps.
    pub fn from_records(
        mut runs: Vec<RunRecord>,
        models: &[ModelSpec],
        budgets: &[f64],
        settings: Option<&BTreeMap<String, String>>,
        plan: Option<&Plan>,
    ) -> Result<Report> {
        let order = |r: &RunRecord| {
            (
                models.iter().position(|m| m.to_string() == r.model).unwrap_or(usize::MAX),
                budgets.iter().position(|&b| b == r.budget()).unwrap_or(usize::MAX),
                r.kind == RunKind::Final,
                r.seed,
                r.lr.to_bits(),
            )
        };
        runs.sort_by_key(order);
        let mut rows = Vec::new();
        for m in models {
            for &b in budgets {
                let of = |k: RunKind| -> Vec<&RunRecord> {
                    runs.iter().filter(|r| r.kind == k && r.model == m.to_string() && r.budget() == b).collect()
                };
                let finals = of(RunKind::Final);
                let search = of(RunKind::Search);
                let Some(first) = finals.first() else { continue };
                for r in &finals {
                    // A time budget's steps come from each run's probe.
                    let timed = r.budget_seconds.is_some();
                    ensure!(
                        r.lr == first.lr && (timed || r.steps == first.steps),
                        "{m} at budget {b}: final runs with different learning rates or steps ({} and {}, {} and {})",
                        first.lr,
                        r.lr,
                        first.steps,
                        r.steps
                    );
                }
                let ok: Vec<&&RunRecord> = finals.iter().filter(|r| r.diverged.is_none()).collect();
                let errs: Vec<f64> = ok.iter().map(|r| r.val_error).collect();
                let mu = mean(&errs);
                let std = if errs.is_empty() {
                    f64::NAN
                } else if errs.len() > 1 {
                    (errs.iter().map(|e| (e - mu).powi(2)).sum::<f64>() / (errs.len() - 1) as f64).sqrt()
                } else {
                    0.0
                };
                rows.push(Row {
                    model: m.to_string(),
                    mode: m.mode(),
                    sparsity: m.sparsity(),
                    budget_gflops: first.budget_gflops,
                    budget_seconds: first.budget_seconds,
                    steps: first.steps,
                    train_gflops: if finals.iter().all(|r| r.train_gflops == first.train_gflops) {
                        first.train_gflops
                    } else {
                        mean(&finals.iter().map(|r| r.train_gflops).collect::<Vec<_>>())
                    },
                    lr: first.lr,
                    seeds: finals.len(),
                    diverged: finals.len() - ok.len(),
                    val_error: mu,
                    val_error_std: std,
                    val_error_min: if errs.is_empty() {
                        f64::NAN
                    } else {
                        errs.iter().copied().fold(f64::INFINITY, f64::min)
                    },
                    val_error_max: if errs.is_empty() {
                        f64::NAN
                    } else {
                        errs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                    },
                    val_errors: errs.clone(),
                    diverged_seeds: finals.iter().filter(|r| r.diverged.is_some()).map(|r| r.seed).collect(),
                    val_loss: mean(&ok.iter().map(|r| r.val_loss).collect::<Vec<_>>()),
                    wall_s: mean(&finals.iter().map(|r| r.wall_s).collect::<Vec<_>>()),
                    train_gflops_per_image: first.train_gflops_per_image,
                    params: first.params,
                    search_gflops: total(search.iter().map(|r| r.train_gflops)),
                    search_wall_s: total(search.iter().map(|r| r.wall_s)),
                });
            }
        }
        let mut optima = Vec::new();
        for &b in budgets {
            // Rows whose every seed diverged have no mean to compare.
            let at: Vec<&Row> = rows.iter().filter(|r| r.budget() == b && !r.val_error.is_nan()).collect();
            let best = |rs: &[&Row]| -> Option<Row> {
                rs.iter()
                    .fold(None::<&Row>, |a, r| if a.is_none_or(|a| r.val_error < a.val_error) { Some(r) } else { a })
                    .cloned()
            };
            let Some(top) = best(&at) else { continue };
            let dense = at.iter().find(|r| r.mode == "dense").map(|r| r.val_error);
            let pruned: Vec<&Row> = at.iter().copied().filter(|r| r.mode != "dense").collect();
            let bp = best(&pruned);
            let rel = match (dense, &bp) {
                (Some(d), Some(p)) if d > 0.0 => Some((d - p.val_error) / d),
                _ => None,
            };
            optima.push(Optimum {
                budget_gflops: top.budget_gflops,
                budget_seconds: top.budget_seconds,
                best_model: top.model.clone(),
                best_val_error: top.val_error,
                dense_val_error: dense,
                best_pruned_model: bp.as_ref().map(|r| r.model.clone()),
                best_pruned_val_error: bp.as_ref().map(|r| r.val_error),
                relative_error_reduction: rel,
            });
        }
        Ok(Report { settings: settings.cloned(), plan: plan.cloned(), rows, optima, runs })
    }

    /// The table: one line per row, then the optimum per budget.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let searched = self.rows.iter().any(|r| r.search_gflops > 0.0);
        let diverged = self.rows.iter().any(|r| r.diverged > 0);
        let _ = writeln!(
            s,
            "{:<14} {:>9} {:>6} {:>9} {:>9} {:>8} {:>5} {:>9} {:>8} {:>15} {:>8} {:>8}{}{}",
            "model",
            if self.rows.iter().any(|r| r.budget_seconds.is_some()) { "budget s" } else { "budget GF" },
            "steps",
            "GF/image",
            "train GF",
            "lr",
            "seeds",
            "val error",
            "+-std",
            "min..max",
            "val loss",
            "train s",
            if searched { "  search GF  search s" } else { "" },
            if diverged { "  diverged" } else { "" }
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<14} {:>9} {:>6} {:>9.4} {:>9.1} {:>8} {:>5} {:>9.4} {:>8.4} {:>15} {:>8.4} {:>8.1}{}{}",
                r.model,
                r.budget(),
                r.steps,
                r.train_gflops_per_image,
                r.train_gflops,
                r.lr,
                r.seeds,
                r.val_error,
                r.val_error_std,
                format!("{:.4}..{:.4}", r.val_error_min, r.val_error_max),
                r.val_loss,
                r.wall_s,
                if searched { format!("  {:>9.1} {:>9.1}", r.search_gflops, r.search_wall_s) } else { String::new() },
                if diverged { format!("  {:>4} of {}", r.diverged, r.seeds) } else { String::new() }
            );
        }
        if diverged {
            let _ = writeln!(
                s,
                "(diverged runs (training loss not finite or above the divergence factor times the first) stopped \
                 there; they are left out of the row's mean, spread and loss)"
            );
        }
        if !self.optima.is_empty() {
            let _ = writeln!(s, "\ncompute-optimal model per budget (lowest mean val error):");
            for o in &self.optima {
                let vs = match (
                    o.dense_val_error,
                    &o.best_pruned_model,
                    o.best_pruned_val_error,
                    o.relative_error_reduction,
                ) {
                    (Some(d), Some(p), Some(pe), Some(rel)) => format!(
                        "; best pruned {p} {pe:.4} vs dense {d:.4}: relative error reduction {:+.1}% {}",
                        rel * 100.0,
                        if rel > 0.0 { "(pruning wins)" } else { "(dense wins)" }
                    ),
                    _ => String::new(),
                };
                let (b, unit) = match o.budget_seconds {
                    Some(t) => (t, "s "),
                    None => (o.budget_gflops, "GF"),
                };
                let _ = writeln!(s, "  budget {b:>9} {unit}: {} ({:.4}){vs}", o.best_model, o.best_val_error);
            }
        }
        s
    }

    /// The report as JSON: `settings`, `plan`, `rows`, `optima` and `runs` (each run without
    /// the settings and plan, which are the report's).
    pub fn to_json(&self) -> serde_json::Value {
        let runs: Vec<serde_json::Value> = self
            .runs
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).expect("plain values");
                let o = v.as_object_mut().expect("an object");
                o.remove("settings");
                o.remove("plan");
                v
            })
            .collect();
        serde_json::json!({
            "settings": self.settings,
            "plan": self.plan,
            "rows": self.rows,
            "optima": self.optima,
            "runs": runs,
        })
    }

    /// Writes [`to_json`](Report::to_json) to `path` (atomically).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        crate::limits::write_atomic(
            path,
            &(serde_json::to_string_pretty(&self.to_json()).expect("plain values") + "\n"),
        )
    }
}

/// Assembles the runs folder that one or several shards filled into the report of the whole
/// experiment. Every `*.json` file in it must be a run of the same experiment, and every
/// run the experiment plans must be there (the message lists what is missing).
pub fn merge(dir: &Path) -> Result<Report> {
    let shown = dir.display();
    ensure!(dir.is_dir(), "--runs {shown}: no such folder");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io { path: shown.to_string(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "--runs {shown}: holds no run file (*.json)");
    let mut runs = Vec::new();
    let mut settings: Option<(BTreeMap<String, String>, std::path::PathBuf)> = None;
    let mut plan: Option<Plan> = None;
    for f in &files {
        let r = RunRecord::read(f)?;
        match &settings {
            None => settings = Some((r.settings.clone(), f.clone())),
            Some((s, first)) => ensure!(
                *s == r.settings,
                "{} and {} are runs of different experiments ({})",
                first.display(),
                f.display(),
                settings_diff(s, &r.settings)
            ),
        }
        match &mut plan {
            None => plan = Some(r.plan.clone()),
            Some(p) => p.extend(&r.plan),
        }
        runs.push(r);
    }
    let (settings, _) = settings.expect("at least one file");
    let plan = plan.expect("at least one file");
    let models = parse_models(&plan.models.join(","))?;
    let budgets = plan.budgets.clone();
    let seeds = plan.seeds.clone();
    let lrs = parse_positive_list(
        "lrs",
        settings.get("lrs").ok_or_else(|| invalid!("the run files lack the setting 'lrs'"))?,
    )?;
    let mut missing = Vec::new();
    for m in &models {
        for &b in &budgets {
            let of =
                |k: RunKind| runs.iter().filter(move |r| r.kind == k && r.model == m.to_string() && r.budget() == b);
            let lr = if lrs.len() > 1 {
                let searched: Vec<RunRecord> =
                    of(RunKind::Search).filter(|r| seeds.contains(&r.seed)).cloned().collect();
                let absent: Vec<String> = lrs
                    .iter()
                    .flat_map(|l| seeds.iter().map(move |s| (*l, *s)))
                    .filter(|(l, s)| !searched.iter().any(|r| r.lr == *l && r.seed == *s))
                    .map(|(l, s)| format!("lr {l} seed {s}"))
                    .collect();
                if !absent.is_empty() {
                    missing.push(format!("{m} at budget {b}: search runs for {}", absent.join(", ")));
                    continue;
                }
                chosen_lr(&searched, &lrs).expect("every rate searched")
            } else {
                lrs[0]
            };
            for &s in &seeds {
                if !of(RunKind::Final).any(|r| r.seed == s && r.lr == lr) {
                    missing.push(format!("{m} at budget {b}: seed {s} (lr {lr})"));
                }
            }
            if let Some(r) = of(RunKind::Final).find(|r| r.lr != lr) {
                return Err(invalid!("{m} at budget {b}: a final run with lr {} where the search chose {lr}", r.lr));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "--runs {shown}: {} runs of the experiment are missing (run the shards that own them): {}{}",
        missing.len(),
        missing.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
        if missing.len() > 5 { "; ..." } else { "" }
    );
    Report::from_records(runs, &models, &budgets, Some(&settings), Some(&plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(model: &str, budget: f64, seed: u64, kind: RunKind, lr: f64, err: f64) -> RunRecord {
        let m: ModelSpec = model.parse().unwrap();
        RunRecord {
            format: super::super::RUN_FORMAT,
            kind,
            model: model.into(),
            mode: m.mode(),
            sparsity: m.sparsity(),
            budget_gflops: budget,
            budget_seconds: None,
            seed,
            lr,
            steps: 3,
            steps_done: 3,
            head_steps: 0,
            train_gflops: budget * 0.9,
            train_gflops_per_image: 0.1,
            head_gflops_per_image: 0.04,
            params: 10,
            val_error: err,
            val_loss: err * 2.0,
            val_images: 100,
            last_train_loss: 1.0,
            first_train_loss: 2.0,
            diverged: None,
            wall_s: 1.0,
            eval_s: 0.5,
            probe_s: 0.0,
            device: "cpu".into(),
            settings: BTreeMap::new(),
            plan: Plan { models: vec![], budgets: vec![], seeds: vec![] },
        }
    }

    #[test]
    fn rows_optima_and_the_relative_error_reduction() {
        let models = parse_models("dense,filters:0.5,channels:0.5").unwrap();
        let f = RunKind::Final;
        let runs = vec![
            rec("dense", 10.0, 0, f, 0.1, 0.40),
            rec("dense", 10.0, 1, f, 0.1, 0.60),
            rec("filters:0.5", 10.0, 0, f, 0.1, 0.30),
            rec("filters:0.5", 10.0, 1, f, 0.1, 0.34),
            rec("channels:0.5", 10.0, 0, f, 0.1, 0.35),
            rec("channels:0.5", 10.0, 1, f, 0.1, 0.35),
            rec("dense", 20.0, 0, f, 0.1, 0.20),
            rec("dense", 20.0, 1, f, 0.1, 0.20),
            rec("filters:0.5", 20.0, 0, f, 0.1, 0.25),
            rec("filters:0.5", 20.0, 1, f, 0.1, 0.25),
            rec("filters:0.5", 20.0, 0, RunKind::Search, 0.1, 0.1),
            rec("filters:0.5", 20.0, 0, RunKind::Search, 0.3, 0.2),
        ];
        let r = Report::from_records(runs, &models, &[10.0, 20.0], None, None).unwrap();
        assert_eq!(r.rows.len(), 5, "channels:0.5 did not run at 20");
        let d10 = &r.rows[0];
        assert_eq!((d10.model.as_str(), d10.budget_gflops), ("dense", 10.0));
        assert!((d10.val_error - 0.5).abs() < 1e-12);
        assert!((d10.val_error_std - 0.02f64.sqrt()).abs() < 1e-12, "{}", d10.val_error_std);
        assert_eq!((d10.val_error_min, d10.val_error_max), (0.4, 0.6));
        let f20 = r.rows.iter().find(|x| x.model == "filters:0.5" && x.budget_gflops == 20.0).unwrap();
        assert!((f20.search_gflops - 36.0).abs() < 1e-12);
        let o10 = &r.optima[0];
        assert_eq!(o10.best_model, "filters:0.5");
        assert!((o10.relative_error_reduction.unwrap() - (0.5 - 0.32) / 0.5).abs() < 1e-12);
        let o20 = &r.optima[1];
        assert_eq!(o20.best_model, "dense");
        assert!((o20.relative_error_reduction.unwrap() + 0.25).abs() < 1e-12, "dense wins: negative");
        let t = r.table();
        assert!(t.contains("relative error reduction +36.0% (pruning wins)"), "{t}");
        assert!(t.contains("(dense wins)"), "{t}");
        // Final runs of one pair with different rates are an error.
        let bad = vec![rec("dense", 10.0, 0, f, 0.1, 0.4), rec("dense", 10.0, 1, f, 0.2, 0.4)];
        assert!(Report::from_records(bad, &models, &[10.0], None, None).is_err());
    }

    #[test]
    fn the_search_picks_the_lowest_error_then_loss_then_the_first() {
        let s = RunKind::Search;
        let lrs = [0.1, 0.2];
        let mut a = rec("dense", 1.0, 0, s, 0.1, 0.3);
        let mut b = rec("dense", 1.0, 0, s, 0.2, 0.3);
        assert_eq!(chosen_lr(&[a.clone(), b.clone()], &lrs), Some(0.1));
        assert_eq!(chosen_lr(&[b.clone(), a.clone()], &lrs), Some(0.1), "ties go to the first of lrs");
        b.val_loss = 0.1;
        assert_eq!(chosen_lr(&[a.clone(), b.clone()], &lrs), Some(0.2));
        a.val_loss = f64::NAN;
        b.val_loss = 5.0;
        assert_eq!(chosen_lr(&[a.clone(), b.clone()], &lrs), Some(0.2));
        b.val_error = 0.5;
        assert_eq!(chosen_lr(&[a, b], &lrs), Some(0.1));
        assert_eq!(chosen_lr(&[], &lrs), None);
    }

    #[test]
    fn the_search_judges_each_rate_by_its_mean_over_every_seed() {
        let s = RunKind::Search;
        let lrs = [0.01, 0.1];
        // 0.1 wins seed 0 by far but loses on the mean over three seeds.
        let runs = vec![
            rec("dense", 1.0, 0, s, 0.01, 0.30),
            rec("dense", 1.0, 1, s, 0.01, 0.30),
            rec("dense", 1.0, 2, s, 0.01, 0.30),
            rec("dense", 1.0, 0, s, 0.1, 0.10),
            rec("dense", 1.0, 1, s, 0.1, 0.50),
            rec("dense", 1.0, 2, s, 0.1, 0.40),
        ];
        assert_eq!(chosen_lr(&runs[3..4], &lrs), Some(0.1), "one seed alone picks 0.1");
        assert_eq!(chosen_lr(&runs, &lrs), Some(0.01), "mean 0.30 against 0.333");
        // A rate with a diverged run loses to one without, whatever its mean.
        let mut runs2 = runs.clone();
        for r in runs2.iter_mut().filter(|r| r.lr == 0.1) {
            r.val_error = 0.05;
        }
        assert_eq!(chosen_lr(&runs2, &lrs), Some(0.1));
        runs2[3].diverged = Some("the training loss is not finite (NaN) at step 2".into());
        assert_eq!(chosen_lr(&runs2, &lrs), Some(0.01));
    }

    #[test]
    fn no_search_is_zero_search_gflops_not_minus_zero() {
        let models = parse_models("dense").unwrap();
        let r =
            Report::from_records(vec![rec("dense", 10.0, 0, RunKind::Final, 0.1, 0.4)], &models, &[10.0], None, None)
                .unwrap();
        let g = r.rows[0].search_gflops;
        assert!(g == 0.0 && g.is_sign_positive(), "{g:?}");
        assert!(r.rows[0].search_wall_s.is_sign_positive());
        let j = serde_json::to_string(&r.to_json()).unwrap();
        assert!(!j.contains("-0.0"), "{j}");
    }

    #[test]
    fn diverged_runs_are_counted_and_left_out_of_the_mean() {
        let models = parse_models("dense,filters:0.5").unwrap();
        let f = RunKind::Final;
        let mut bad = rec("dense", 10.0, 1, f, 0.1, 0.8);
        bad.diverged = Some("the training loss 30.0000 at step 4 is above 10x the first step's 2.3000".into());
        let runs = vec![
            rec("dense", 10.0, 0, f, 0.1, 0.2),
            bad.clone(),
            rec("dense", 10.0, 2, f, 0.1, 0.4),
            rec("filters:0.5", 10.0, 0, f, 0.1, 0.25),
        ];
        let r = Report::from_records(runs, &models, &[10.0], None, None).unwrap();
        let d = &r.rows[0];
        assert_eq!((d.seeds, d.diverged, d.diverged_seeds.clone()), (3, 1, vec![1]));
        assert!((d.val_error - 0.3).abs() < 1e-12, "{}", d.val_error);
        assert_eq!(d.val_errors, vec![0.2, 0.4], "the seeds that did not diverge");
        assert_eq!((d.val_error_min, d.val_error_max), (0.2, 0.4));
        let t = r.table();
        assert!(t.contains("1 of 3") && t.contains("diverged"), "{t}");
        // A row whose every seed diverged has no mean and is no optimum.
        let mut all_bad = bad.clone();
        all_bad.seed = 0;
        let r = Report::from_records(
            vec![all_bad, bad, rec("filters:0.5", 10.0, 0, f, 0.1, 0.9)],
            &models,
            &[10.0],
            None,
            None,
        )
        .unwrap();
        assert!(r.rows[0].val_error.is_nan());
        assert_eq!(r.optima[0].best_model, "filters:0.5");
        assert_eq!(r.optima[0].dense_val_error, None);
    }

    #[test]
    fn run_records_keep_non_finite_losses() {
        let mut a = rec("dense", 1.0, 0, RunKind::Final, 0.1, 0.5);
        a.val_loss = f64::NAN;
        a.first_train_loss = f64::INFINITY;
        a.diverged = Some("x".into());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        a.write(&p).unwrap();
        let b = RunRecord::read(&p).unwrap();
        assert!(b.val_loss.is_nan() && b.first_train_loss == f64::INFINITY);
        assert_eq!(b.diverged.as_deref(), Some("x"));
        // Files of the format before are refused with a message that says what to do.
        let text = std::fs::read_to_string(&p).unwrap().replace("\"format\": 3", "\"format\": 2");
        std::fs::write(&p, text).unwrap();
        let e = RunRecord::read(&p).unwrap_err().to_string();
        assert!(e.contains("format 2") && e.contains("another --runs folder"), "{e}");
    }
}
