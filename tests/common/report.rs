//! Transfer reports made of chosen rows, for the plot and advisor tests.

use prunekit::transfer::{Law, Optimum, Report, Row};

/// A row of `model` at `budget` with mean error `err` over three seeds (err -+ 0.01).
pub fn row(model: &str, budget: f64, wall_s: f64, err: f64) -> Row {
    let (mode, sparsity) = match model.split_once(':') {
        Some((m, s)) => (m.to_string(), s.parse().unwrap()),
        None => (model.to_string(), 0.0),
    };
    Row {
        model: model.to_string(),
        mode,
        sparsity,
        budget_gflops: budget,
        budget_seconds: None,
        steps: 10,
        train_gflops: budget,
        lr: 0.1,
        seeds: 3,
        diverged: 0,
        diverged_seeds: vec![],
        val_error: err,
        val_error_std: 0.01,
        val_error_min: err - 0.01,
        val_error_max: err + 0.01,
        val_errors: vec![err - 0.01, err, err + 0.01],
        val_loss: 1.0,
        wall_s,
        train_gflops_per_image: 0.1,
        params: 1000,
        search_gflops: 0.0,
        search_wall_s: 0.0,
    }
}

pub fn report(budgets: &[f64], same_time: bool) -> Report {
    let models = ["dense", "filters:0.25", "filters:0.5", "filters:0.75", "channels:0.5", "channels:0.75"];
    let mut rows = Vec::new();
    for (i, m) in models.iter().enumerate() {
        for &b in budgets {
            let wall = if same_time { 12.0 } else { b * 0.37 / (1.0 + i as f64) };
            rows.push(row(m, b, wall, 0.1 + 0.3 / (1.0 + b.ln().max(0.0)) + 0.01 * i as f64));
        }
    }
    let optima = budgets
        .iter()
        .map(|&b| Optimum {
            budget_gflops: b,
            budget_seconds: None,
            best_model: "dense".into(),
            best_val_error: 0.2,
            dense_val_error: Some(0.2),
            best_pruned_model: None,
            best_pruned_val_error: None,
            relative_error_reduction: None,
        })
        .collect();
    Report { settings: None, plan: None, rows, optima, runs: vec![] }
}

/// Budgets doubling from `lo` up to `hi`.
pub fn ladder(lo: f64, hi: f64) -> Vec<f64> {
    let mut v = vec![lo];
    while *v.last().unwrap() * 2.0 <= hi * 1.0001 {
        v.push(v.last().unwrap() * 2.0);
    }
    v
}

/// A report whose models follow the given laws at `budgets`, three seeds each (the law's
/// value -+ `noise`), the run time proportional to the budget.
pub fn lawful_report(models: &[(&str, Law)], budgets: &[f64], noise: f64) -> Report {
    let mut rows = Vec::new();
    for (m, law) in models {
        for &b in budgets {
            let e = law.at(b);
            let mut r = row(m, b, b * 0.1, e);
            r.val_errors = vec![e - noise, e, e + noise];
            r.val_error_min = e - noise;
            r.val_error_max = e + noise;
            r.val_error_std = noise;
            rows.push(r);
        }
    }
    Report { settings: None, plan: None, rows, optima: vec![], runs: vec![] }
}
