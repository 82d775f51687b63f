//! The advisor (`prunekit transfer advise`): laws fitted to runs of known curves are
//! recovered, the compute-optimal model and the crossover budget are predicted, its
//! validation scores a predictable experiment as such, and a grid too small to fit is
//! refused with a message that says what to run.

use common::report::{ladder, lawful_report};
use prunekit::transfer::{advise, fit, validate, validation_table, Law};

mod common;

/// Pruned: fast start, high floor. Dense: slow start, low floor. Above 1 GFLOP they cross once.
fn laws() -> [(&'static str, Law); 2] {
    [
        ("dense", Law { e_inf: 0.05, a: 1.0, b: 0.5, rmse: 0.0 }),
        ("filters:0.5", Law { e_inf: 0.15, a: 0.5, b: 0.8, rmse: 0.0 }),
    ]
}

#[test]
fn the_optimum_and_the_crossover_of_known_curves_are_predicted() {
    let laws = laws();
    let report = lawful_report(&laws, &ladder(1.0, 32.0), 0.002);
    let (dense, pruned) = (laws[0].1, laws[1].1);
    let low = advise(&report, 2.0, None).unwrap();
    assert_eq!(low.best, "filters:0.5", "{}", low.table());
    let high = advise(&report, 4096.0, None).unwrap();
    assert_eq!(high.best, "dense", "{}", high.table());
    let truth = (100..10_000_000).map(|i| i as f64 * 0.01).find(|&c| dense.at(c) < pruned.at(c)).unwrap();
    let c = &high.crossovers;
    assert_eq!(c.len(), 1, "{}", high.table());
    assert!((c[0].budget / truth - 1.0).abs() < 0.15, "{} vs {truth}", c[0].budget);
    assert_eq!((c[0].better_below.as_str(), c[0].better_above.as_str()), ("filters:0.5", "dense"));
    assert!(c[0].extrapolated, "the crossover lies past the largest budget run");
    for f in &high.fits {
        let truth = laws.iter().find(|l| l.0 == f.model).unwrap().1.at(4096.0);
        assert!((f.predicted - truth).abs() < 0.02, "{}: {} vs {truth}", f.model, f.predicted);
        assert!(f.interval.0 <= f.predicted && f.predicted <= f.interval.1);
    }
    let t = high.table();
    assert!(t.contains("compute-optimal at 4096 GFLOPs: dense") && t.contains("crossover at"), "{t}");
}

#[test]
fn noisy_seeds_of_a_known_law_are_fitted_close_to_it() {
    let law = Law { e_inf: 0.1, a: 0.8, b: 0.6, rmse: 0.0 };
    // Three seeds per budget, off by -0.01, +0.004, +0.006 (mean +0.0).
    let obs: Vec<(f64, f64)> =
        ladder(2.0, 256.0).into_iter().flat_map(|c| [-0.01, 0.004, 0.006].map(|d| (c, law.at(c) + d))).collect();
    let f = fit(&obs).unwrap();
    assert!((f.e_inf - 0.1).abs() < 0.01 && (f.a - 0.8).abs() < 0.1 && (f.b - 0.6).abs() < 0.1, "{f:?}");
    assert!(f.rmse < 0.01, "{f:?}");
}

#[test]
fn validation_of_a_predictable_experiment_hits_every_budget() {
    let report = lawful_report(&laws(), &ladder(1.0, 1024.0), 0.001);
    let checks = validate(&report).unwrap();
    assert_eq!(checks.first().unwrap().budget, 16.0, "the first B with 3 budgets up to B/4");
    assert!(checks.iter().all(|c| c.hit), "{}", validation_table(&checks));
    assert!(checks.iter().all(|c| c.mean_abs_error < 0.01), "{}", validation_table(&checks));
    assert!(validation_table(&checks).contains(&format!("at {} of {} budgets", checks.len(), checks.len())));
}

#[test]
fn a_grid_too_small_to_fit_is_refused_with_what_to_run() {
    let report = lawful_report(&laws(), &[10.0, 20.0], 0.01);
    let e = advise(&report, 100.0, None).unwrap_err().to_string();
    assert!(e.contains("needs runs at 3 or more budgets") && e.contains("--budgets"), "{e}");
    let e = validate(&lawful_report(&laws(), &ladder(1.0, 8.0), 0.01)).unwrap_err().to_string();
    assert!(e.contains("factor of 16"), "{e}");
    assert!(advise(&report, f64::NAN, None).is_err());
    assert!(advise(&report, -1.0, None).is_err());
}
