//! `prunekit transfer` end to end on tiny data built here (IDX files of four classes of gray
//! levels, 16x16) and a tiny pretrained network (`--layers 1,1,1,1 --width 8`, 10 classes,
//! so the classifier is swapped): the report's fields, the learning-rate search, re-runs
//! that skip finished runs, shards merged into the single run's report, bad inputs refused
//! before any work, and one run through the emulation.

mod common;

use common::cli::{fails, ok, prunekit, tiny_idx};
use prunekit::model::{init::torchvision_init, Arch};
use serde_json::Value;
use std::path::Path;

struct Fixture {
    dir: tempfile::TempDir,
    data: String,
    weights: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = tiny_idx(dir.path(), 160);
        let weights = dir.path().join("pretrained.safetensors").display().to_string();
        torchvision_init(&Arch::bottleneck_width([1, 1, 1, 1], 8, 10), 7).write(Path::new(&weights)).unwrap();
        Fixture { dir, data, weights }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    /// `transfer` with the tiny data's defaults (and weights) for the flags `extra` lacks.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = vec!["transfer", "--data", &self.data];
        let defaults = [
            ("--weights", self.weights.as_str()),
            ("--device", "cpu"),
            ("--size", "16"),
            ("--batch", "8"),
            ("--augment", "none"),
            ("--val-fraction", "0.25"),
            ("--threads", "2"),
            ("--models", "dense,filters:0.5,channels:0.5"),
            ("--budgets", "0.05,0.1"),
        ];
        for (k, v) in defaults {
            let timed = k == "--budgets" && extra.contains(&"--budgets-seconds");
            if !extra.contains(&k) && !timed {
                a.extend([k, v]);
            }
        }
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect()
    }
    fn run(&self, extra: &[&str]) -> std::process::Output {
        prunekit(&self.args(extra).iter().map(String::as_str).collect::<Vec<_>>())
    }
}

fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The report without the measured times (which differ between runs).
fn untimed(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for k in ["wall_s", "eval_s", "search_wall_s"] {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

#[test]
fn report_has_every_documented_field_and_search_picks_a_searched_rate() {
    let f = Fixture::new();
    let (j, svg, runs) = (f.path("t.json"), f.path("t.svg"), f.path("runs"));
    let out = ok(&f.run(&["--seeds", "2", "--lrs", "0.02,0.05", "--json", &j, "--plot", &svg, "--runs", &runs]));
    assert!(out.contains("compute-optimal model per budget"), "{out}");
    let v = json(&j);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 models x 2 budgets: {v}");
    for k in [
        "model",
        "mode",
        "sparsity",
        "budget_gflops",
        "steps",
        "val_error",
        "val_error_std",
        "val_error_min",
        "val_error_max",
        "val_errors",
        "val_loss",
        "wall_s",
        "train_gflops_per_image",
        "train_gflops",
        "lr",
        "seeds",
        "search_gflops",
        "params",
    ] {
        assert!(rows.iter().all(|r| !r[k].is_null()), "{k} missing: {}", rows[0]);
    }
    for r in rows {
        let e = r["val_errors"].as_array().unwrap();
        assert_eq!(e.len(), 2);
        let (lo, hi, mean) = (
            r["val_error_min"].as_f64().unwrap(),
            r["val_error_max"].as_f64().unwrap(),
            r["val_error"].as_f64().unwrap(),
        );
        assert!(lo <= mean && mean <= hi && (0.0..=1.0).contains(&mean), "{r}");
        // The budget holds: the steps' FLOPs (the first 10% head-only, charged less: the
        // forward and the classifier's backward) never exceed it, one more step would.
        let (b, gpi, steps) = (
            r["budget_gflops"].as_f64().unwrap(),
            r["train_gflops_per_image"].as_f64().unwrap(),
            r["steps"].as_u64().unwrap(),
        );
        let step = gpi * 8.0;
        let run = v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["kind"] == "final" && x["model"] == r["model"] && x["budget_gflops"] == r["budget_gflops"])
            .unwrap();
        let head = run["head_steps"].as_u64().unwrap();
        assert_eq!(head, steps / 10, "{run}");
        assert_eq!(run["steps_done"].as_u64().unwrap(), steps, "{run}");
        let spent = r["train_gflops"].as_f64().unwrap();
        let head_step = run["head_gflops_per_image"].as_f64().unwrap() * 8.0;
        assert!(head_step < step / 2.0, "{r}");
        assert!((spent - (head as f64 * head_step + (steps - head) as f64 * step)).abs() < 1e-9 * b, "{r}");
        let next = if (steps + 1) / 10 > head { head_step } else { step };
        assert!(spent <= b * (1.0 + 1e-9) && spent + next > b, "{r}");
        // Two rates searched at the pair's budget with both seeds: the search's compute is
        // four runs' worth.
        assert!((r["search_gflops"].as_f64().unwrap() - 4.0 * r["train_gflops"].as_f64().unwrap()).abs() < 1e-9, "{r}");
        assert!([0.02, 0.05].contains(&r["lr"].as_f64().unwrap()), "{r}");
        // The rate chosen has the lowest mean held-out error over the seeds (the first on ties;
        // no run diverges here), then the lowest mean loss.
        let search: Vec<&Value> = v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["kind"] == "search" && x["model"] == r["model"] && x["budget_gflops"] == r["budget_gflops"])
            .collect();
        assert_eq!(search.len(), 4);
        let mean = |lr: f64, k: &str| {
            let v: Vec<f64> = search.iter().filter(|x| x["lr"] == lr).map(|x| x[k].as_f64().unwrap()).collect();
            assert_eq!(v.len(), 2, "one search run per seed");
            v.iter().sum::<f64>() / 2.0
        };
        let key = |lr: f64| (mean(lr, "val_error"), mean(lr, "val_loss"));
        let want = if key(0.05) < key(0.02) { 0.05 } else { 0.02 };
        assert_eq!(r["lr"].as_f64().unwrap(), want, "{r}");
    }
    // Pruned models are cheaper per image, so the same budget buys more steps.
    let steps = |m: &str| {
        rows.iter().find(|r| r["model"] == m && r["budget_gflops"] == 0.1).unwrap()["steps"].as_u64().unwrap()
    };
    assert!(steps("filters:0.5") > steps("dense") && steps("channels:0.5") > steps("filters:0.5"));
    let optima = v["optima"].as_array().unwrap();
    assert_eq!(optima.len(), 2);
    for o in optima {
        let (d, p) = (o["dense_val_error"].as_f64().unwrap(), o["best_pruned_val_error"].as_f64().unwrap());
        if d > 0.0 {
            let rel = o["relative_error_reduction"].as_f64().unwrap();
            assert!((rel - (d - p) / d).abs() < 1e-12, "{o}");
        }
        let best = o["best_val_error"].as_f64().unwrap();
        assert!(best <= d && best <= p, "{o}");
    }
    // Every run is in the report: 6 pairs x (2 rates x 2 seeds searched + 2 final), and as files.
    assert_eq!(v["runs"].as_array().unwrap().len(), 36);
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 36);
    assert_eq!(v["settings"]["lrs"], "0.02,0.05");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("compute-optimal"), "{}", &plot[..200.min(plot.len())]);

    // A re-run finds every run done and reports the same.
    let j2 = f.path("again.json");
    let out = ok(&f.run(&["--seeds", "2", "--lrs", "0.02,0.05", "--json", &j2, "--runs", &runs]));
    assert_eq!(out.matches("done before").count(), 36, "{out}");
    assert_eq!(json(&j2), v);
    // A larger plan over the same folder runs only what is new (one more budget: 3 pairs x
    // 6 runs), and merge reads the union of the plans.
    let j3 = f.path("more.json");
    let out = ok(&f.run(&[
        "--seeds",
        "2",
        "--lrs",
        "0.02,0.05",
        "--budgets",
        "0.05,0.1,0.2",
        "--json",
        &j3,
        "--runs",
        &runs,
    ]));
    assert_eq!(out.matches("done before").count(), 36, "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("budget 0.2 GFLOPs") && l.contains("val error")).count(), 18, "{out}");
    let merged = f.path("merged.json");
    ok(&prunekit(&["transfer", "merge", "--runs", &runs, "--json", &merged]));
    assert_eq!(json(&merged)["rows"], json(&j3)["rows"]);
    assert_eq!(json(&merged)["rows"].as_array().unwrap().len(), 9);
    assert_eq!(json(&j3)["plan"]["budgets"], serde_json::json!([0.05, 0.1, 0.2]));
    // Other settings against the same folder are refused, naming the difference.
    let e = fails(&f.run(&["--seeds", "2", "--lrs", "0.02,0.06", "--runs", &runs]), "another experiment");
    assert!(e.contains("lrs"), "{e}");
}

#[test]
fn shards_merge_into_the_single_runs_report() {
    let f = Fixture::new();
    let common = ["--seeds", "2", "--models", "dense,filters:0.5", "--budgets", "0.05,0.1,0.2"];
    let single = f.path("single.json");
    let mut a = common.to_vec();
    a.extend(["--json", &single]);
    ok(&f.run(&a));
    let runs = f.path("shards");
    // 6 pairs (models outer) over 3 shards: shard i takes pairs i and i + 3; shard 2 owns
    // both models' largest budget.
    for i in 0..3 {
        let shard = format!("{i}/3");
        let mut a = common.to_vec();
        a.extend(["--shard", &shard, "--runs", &runs]);
        let out = ok(&f.run(&a));
        assert!(out.contains("transfer merge --runs"), "{out}");
        if i == 1 {
            // Before the last shard ran, merge says what is missing and writes nothing.
            let partial = f.path("partial.json");
            let e = fails(&prunekit(&["transfer", "merge", "--runs", &runs, "--json", &partial]), "are missing");
            assert!(e.contains("dense at budget 0.2") && e.contains("filters:0.5 at budget 0.2"), "{e}");
            assert!(!e.contains("budget 0.1"), "{e}");
            assert!(!Path::new(&partial).exists());
        }
    }
    let merged = f.path("merged.json");
    let svg = f.path("merged.svg");
    let out = ok(&prunekit(&["transfer", "merge", "--runs", &runs, "--json", &merged, "--plot", &svg]));
    assert!(out.contains("compute-optimal"), "{out}");
    let (s, m) = (untimed(json(&single)), untimed(json(&merged)));
    assert_eq!(s["rows"], m["rows"]);
    assert_eq!(s["optima"], m["optima"]);
    assert_eq!(s["runs"], m["runs"]);
    assert_eq!(s["settings"], m["settings"]);
    assert!(Path::new(&svg).exists());
}

#[test]
fn bad_inputs_are_refused_before_any_work() {
    let f = Fixture::new();
    let missing = f.path("no/such/dir/out.json");
    for (extra, needle) in [
        (vec!["--models", "dense,sparse:0.5"], "the mode must be filters or channels"),
        (vec!["--models", "dense,filters"], "expected dense, filters:SPARSITY"),
        (vec!["--models", "filters:1.5"], "filters:1.5"),
        (vec!["--models", "dense,dense"], "twice"),
        (vec!["--budgets", "0"], "--budgets"),
        (vec!["--budgets", "0.0001"], "smaller than one training step"),
        (vec!["--seeds", "0"], "--seeds"),
        (vec!["--lrs", "0.1,-1"], "--lrs"),
        (vec!["--shard", "2/2", "--runs", "x"], "--shard"),
        (vec!["--shard", "0/2"], "--shard needs --runs"),
        (vec!["--json", missing.as_str()], "does not exist"),
        (vec!["--plot", "out.png"], "SVG"),
        (vec!["--runs", missing.as_str()], "does not exist"),
        (vec!["--lrs", "0.1,0.2", "--search-fraction", "0.95"], "learning-rate search trains on"),
        (vec!["--lrs", "0.1,0.2", "--search-fraction", "1"], "--search-fraction"),
        (vec!["--batch", "1000"], "fewer than one batch"),
        (vec!["--classes", "0-5"], "class"),
        (vec!["--val-fraction", "0"], "validation split is empty"),
    ] {
        let o = f.run(&extra);
        fails(&o, needle);
    }
    fails(
        &prunekit(&["transfer", "--weights", &f.path("none.safetensors"), "--data", &f.data, "--budgets", "1"]),
        "none.safetensors",
    );
    fails(&prunekit(&["transfer", "merge", "--runs", &f.path("nothing")]), "no such folder");
    let empty = f.path("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(&prunekit(&["transfer", "merge", "--runs", &empty]), "holds no run file");
    std::fs::write(f.path("empty/junk.json"), "{}").unwrap();
    fails(&prunekit(&["transfer", "merge", "--runs", &empty]), "not a prunekit transfer run file");
    std::fs::write(f.path("empty/junk.json"), r#"{"format": 1}"#).unwrap();
    fails(&prunekit(&["transfer", "merge", "--runs", &empty]), "this prunekit reads format 3");
}

#[test]
fn transfer_runs_through_the_emulation() {
    let f = Fixture::new();
    let j = f.path("emu.json");
    ok(&f.run(&[
        "--device",
        "emu",
        "--models",
        "dense,filters:0.5",
        "--budgets",
        "0.05",
        "--batch",
        "4",
        "--json",
        &j,
    ]));
    let v = json(&j);
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
    assert!(v["runs"][0]["device"].as_str().unwrap().starts_with("emu"), "{v}");
}

/// Weights with as many classes as the target: by default every run still fine-tunes a
/// fresh classifier (the paper's protocol), `--keep-head` keeps the weights' own; the
/// choice is part of the settings, so a runs folder never mixes the two.
#[test]
fn the_classifier_is_fresh_unless_kept() {
    let f = Fixture::new();
    let same = f.path("four-classes.safetensors");
    torchvision_init(&Arch::bottleneck_width([1, 1, 1, 1], 8, 4), 7).write(Path::new(&same)).unwrap();
    let (fresh, kept) = (f.path("fresh.json"), f.path("kept.json"));
    let runs = f.path("runs");
    std::fs::create_dir(&runs).unwrap();
    let base = ["--weights", same.as_str(), "--models", "dense", "--budgets", "0.05"];
    ok(&f.run(&[&base[..], &["--json", &fresh, "--runs", &runs]].concat()));
    ok(&f.run(&[&base[..], &["--json", &kept, "--keep-head"]].concat()));
    let (a, b) = (json(&fresh), json(&kept));
    assert_eq!(a["settings"]["head"], "Fresh", "{a}");
    assert_eq!(b["settings"]["head"], "KeepIfSameClasses", "{b}");
    let loss = |v: &Value| v["runs"][0]["val_loss"].as_f64().unwrap();
    assert_ne!(loss(&a), loss(&b), "a fresh classifier trains to another model than the kept one");
    // The same seed with a fresh head is reproducible.
    let again = f.path("again.json");
    ok(&f.run(&[&base[..], &["--json", &again]].concat()));
    assert_eq!(loss(&a), loss(&json(&again)));
    fails(&f.run(&[&base[..], &["--runs", &runs, "--keep-head"]].concat()), "head");
}

/// Shards that share one runs folder, one of them killed (SIGKILL) while the others run and
/// run again: the merge is the single process's report. A killed shard leaves at most a
/// temporary file (`.NAME.tmp-PID`), which is no run file; its finished runs are skipped
/// when it runs again.
#[test]
fn a_killed_shard_reruns_and_the_merge_matches_one_process() {
    let f = Fixture::new();
    let common = ["--seeds", "2", "--models", "dense,filters:0.5", "--budgets", "0.05,0.1,0.2"];
    let single = f.path("single.json");
    ok(&f.run(&[&common[..], &["--json", &single]].concat()));
    let runs = f.path("runs");
    let spawn = |i: usize| {
        let shard = format!("{i}/3");
        let a = f.args(&[&common[..], &["--shard", &shard, "--runs", &runs]].concat());
        std::process::Command::new(common::cli::bin())
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut children: Vec<_> = (0..3).map(spawn).collect();
    // Kill shard 1 once some run is on disk (or at once, if it is quicker than that).
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs_f64() < 20.0 {
        let n = std::fs::read_dir(&runs).map_or(0, |d| d.count());
        if n > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    children[1].kill().unwrap(); // SIGKILL
    let status = children[1].wait().unwrap();
    for i in [0, 2] {
        assert!(children[i].wait().unwrap().success());
    }
    if !status.success() {
        // Killed before it finished: the merge says what is missing.
        let e = prunekit(&["transfer", "merge", "--runs", &runs]);
        if !e.status.success() {
            fails(&e, "are missing");
        }
    }
    let out = ok(&f.run(&[&common[..], &["--shard", "1/3", "--runs", &runs]].concat()));
    assert!(out.contains("shard 1/3 done"), "{out}");
    let merged = f.path("merged.json");
    ok(&prunekit(&["transfer", "merge", "--runs", &runs, "--json", &merged]));
    let (s, m) = (untimed(json(&single)), untimed(json(&merged)));
    assert_eq!(s["rows"], m["rows"]);
    assert_eq!(s["optima"], m["optima"]);
    assert_eq!(s["runs"], m["runs"]);
    assert_eq!(s["settings"], m["settings"]);
}

/// The library: diverged runs recorded and counted, and time budgets.
mod library {
    use common::cli::tiny_idx;
    use prunekit::data::{Augment, Dataset, OpenOptions};
    use prunekit::model::{init::torchvision_init, Arch};
    use prunekit::transfer::{run_experiment, BudgetUnit, Experiment, ModelSpec, RunRecord};
    use prunekit::Device;

    use super::common;

    fn setup(dir: &std::path::Path, budgets: Vec<f64>) -> (Experiment, Dataset) {
        let spec = tiny_idx(dir, 160);
        let ds = Dataset::open(&spec, &OpenOptions { val_fraction: 0.25, ..OpenOptions::default() }).unwrap();
        let w = torchvision_init(&Arch::bottleneck_width([1, 1, 1, 1], 8, 10), 7);
        let mut exp = Experiment::new(w, "tiny", vec![ModelSpec::DENSE], budgets);
        exp.recipe.batch = 8;
        exp.recipe.size = 16;
        exp.recipe.augment = Augment::None;
        exp.recipe.threads = 2;
        (exp, ds)
    }

    #[test]
    fn the_stable_recipe_is_the_default_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (exp, ds) = setup(dir.path(), vec![0.05]);
        let r = &exp.recipe;
        assert_eq!((r.warmup_fraction, r.clip_grad_norm, r.head_only_fraction), (Some(0.1), Some(1.0), 0.1));
        assert!(r.stop_on_divergence && r.diverge_factor == 10.0);
        let s = exp.settings(&ds);
        for (k, v) in [
            ("warmup_fraction", "0.1"),
            ("clip_grad_norm", "1.0"),
            ("head_only_fraction", "0.1"),
            ("diverge_factor", "10.0"),
            ("search_seeds", "all"),
            ("budget_unit", "gflops"),
        ] {
            assert_eq!(s.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[test]
    fn diverged_runs_are_recorded_and_left_out_of_the_mean() {
        let dir = tempfile::tempdir().unwrap();
        let (mut exp, ds) = setup(dir.path(), vec![0.1]);
        exp.seeds = 2;
        exp.lrs = vec![1e6];
        exp.recipe.clip_grad_norm = None;
        exp.recipe.head_only_fraction = 0.0;
        exp.runs = Some(dir.path().join("runs"));
        let mut said = Vec::new();
        let rep = run_experiment(&Device::Cpu, &exp, &ds, &mut |l| said.push(l.to_string())).unwrap();
        let row = &rep.rows[0];
        assert_eq!((row.seeds, row.diverged), (2, 2), "{said:?}");
        assert!(row.val_error.is_nan() && row.val_errors.is_empty());
        assert!(rep.optima.is_empty(), "no row has a mean");
        assert!(said.iter().any(|l| l.contains("DIVERGED")), "{said:?}");
        for r in &rep.runs {
            assert!(r.diverged.is_some() && r.steps_done < r.steps, "{r:?}");
        }
        assert!(rep.table().contains("2 of 2"), "{}", rep.table());
        // The records on disk say so too, and a rerun reads them back.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|p| RunRecord::read(p).unwrap().diverged.is_some()));
        let again = run_experiment(&Device::Cpu, &exp, &ds, &mut |_| {}).unwrap();
        assert_eq!(again.rows[0].diverged, 2);
    }

    #[test]
    fn a_time_budget_reports_seconds_and_gflops() {
        let dir = tempfile::tempdir().unwrap();
        let (mut exp, ds) = setup(dir.path(), vec![0.3]);
        exp.budget_unit = BudgetUnit::Seconds;
        exp.runs = Some(dir.path().join("runs"));
        let rep = run_experiment(&Device::Cpu, &exp, &ds, &mut |_| {}).unwrap();
        let row = &rep.rows[0];
        assert_eq!(row.budget_seconds, Some(0.3));
        assert!(row.budget_gflops.is_nan());
        assert!(row.train_gflops > 0.0 && row.wall_s > 0.0 && row.steps >= 1);
        let run = &rep.runs[0];
        assert!(run.probe_s > 0.0 && run.steps_done <= run.steps);
        assert!(run.steps_done == run.steps || run.wall_s >= 0.3, "{run:?}");
        let t = rep.table();
        assert!(t.contains("budget s") && t.contains("train GF"), "{t}");
        assert_eq!(rep.optima[0].budget_seconds, Some(0.3));
        let name = std::fs::read_dir(dir.path().join("runs")).unwrap().next().unwrap().unwrap().file_name();
        assert!(name.to_string_lossy().starts_with("dense-t0.3-"), "{name:?}");
        let j = rep.to_json();
        assert_eq!(j["rows"][0]["budget_seconds"], 0.3);
        assert!(j["runs"][0]["train_gflops"].as_f64().unwrap() > 0.0 && j["runs"][0]["wall_s"].is_number());
        // GFLOPs runs and time runs never share a folder.
        exp.budget_unit = BudgetUnit::Gflops;
        exp.budgets = vec![0.3];
        let e = run_experiment(&Device::Cpu, &exp, &ds, &mut |_| {});
        assert!(e.is_ok(), "other file names: {e:?}");
        let e = prunekit::transfer::merge(&dir.path().join("runs")).unwrap_err().to_string();
        assert!(e.contains("budget_unit"), "{e}");
    }
}

/// The recipe's flags: transfer's stable defaults, each one turned off or set, recorded in
/// the settings; a time budget through `--budgets-seconds`.
#[test]
fn the_recipe_flags_reach_the_settings_and_time_budgets_run() {
    let f = Fixture::new();
    let base = ["--models", "dense", "--budgets", "0.05"];
    let (d, o) = (f.path("default.json"), f.path("off.json"));
    ok(&f.run(&[&base[..], &["--json", &d]].concat()));
    let v = json(&d);
    assert_eq!(v["settings"]["warmup_fraction"], "0.1");
    assert_eq!(v["settings"]["clip_grad_norm"], "1.0");
    assert_eq!(v["settings"]["head_only_fraction"], "0.1");
    let off = ["--warmup", "2", "--clip-grad-norm", "0", "--head-only-fraction", "0", "--json", &o];
    ok(&f.run(&[&base[..], &off[..]].concat()));
    let v = json(&o);
    assert_eq!(v["settings"]["warmup_fraction"], "none", "--warmup alone: steps, no fraction");
    assert_eq!(v["settings"]["warmup"], "2");
    assert_eq!(v["settings"]["clip_grad_norm"], "none");
    assert_eq!(v["runs"][0]["head_steps"], 0);
    let t = f.path("time.json");
    let out = ok(&f.run(&["--models", "dense", "--budgets-seconds", "0.3", "--json", &t]));
    assert!(out.contains("budget s"), "{out}");
    let v = json(&t);
    assert_eq!(v["settings"]["budget_unit"], "seconds");
    assert_eq!(v["rows"][0]["budget_seconds"], 0.3);
    assert!(v["runs"][0]["train_gflops"].as_f64().unwrap() > 0.0 && v["runs"][0]["wall_s"].is_number());
    fails(&f.run(&["--budgets", "1", "--budgets-seconds", "1"]), "cannot be used with");
    fails(&f.run(&["--budgets", "0.05", "--warmup-fraction", "1.5"]), "--warmup-fraction");
    fails(&f.run(&["--budgets", "0.05", "--clip-grad-norm=-1"]), "--clip-grad-norm");
}

#[test]
fn advise_predicts_from_a_runs_folder_and_refuses_a_grid_too_small() {
    let f = Fixture::new();
    let runs = f.path("runs");
    ok(&f.run(&["--models", "dense,filters:0.5", "--budgets", "0.03,0.06", "--seeds", "2", "--runs", &runs]));
    let few = fails(&prunekit(&["transfer", "advise", "--runs", &runs, "--budget", "1"]), "3 or more budgets");
    assert!(few.contains("--budgets"), "{few}");
    // One budget more over the same runs folder: three budgets, a fit.
    ok(&f.run(&["--models", "dense,filters:0.5", "--budgets", "0.03,0.06,0.12", "--seeds", "2", "--runs", &runs]));
    let (j, svg) = (f.path("advice.json"), f.path("advice.svg"));
    let out = ok(&prunekit(&["transfer", "advise", "--runs", &runs, "--budget", "1", "--json", &j, "--plot", &svg]));
    assert!(out.contains("compute-optimal at 1 GFLOPs:"), "{out}");
    let v = json(&j);
    let fits = v["advice"]["fits"].as_array().unwrap();
    assert_eq!(fits.len(), 2);
    for fit in fits {
        let (lo, p, hi) = (
            fit["interval"][0].as_f64().unwrap(),
            fit["predicted"].as_f64().unwrap(),
            fit["interval"][1].as_f64().unwrap(),
        );
        assert!(lo <= p + 1e-12 && p <= hi + 1e-12 && (0.0..=1.0).contains(&p), "{fit}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().contains("asked budget"));
    // --validate needs budgets spanning a factor of 16.
    fails(&prunekit(&["transfer", "advise", "--runs", &runs, "--budget", "1", "--validate"]), "factor of 16");
    fails(&prunekit(&["transfer", "advise", "--runs", &runs, "--budget", "-1"]), "--budget");
    fails(&prunekit(&["transfer", "advise", "--runs", &f.path("none"), "--budget", "1"]), "no such folder");
}
