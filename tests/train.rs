//! `prunekit train` and `prunekit eval` end to end on tiny data built here (IDX files of
//! four classes of gray levels, 16x16) and tiny networks (`--layers 1,1,1,1 --width 8`),
//! on the CPU and once through the emulation: the budget's exact stop, the schedule, the
//! classifier swap, pruning before training, bit-identical resumption (after the test hook
//! and after a real SIGINT), the stop on a non-finite loss, the log's fields, `eval` on
//! the trained file, bad inputs refused before any work, and learning an easy task.

mod common;

use common::cli::{bin, fails, ok, prunekit, text, tiny_idx};
use prunekit::model::{init::torchvision_init, Arch, StateDict};
use prunekit::train::{Checkpoint, Schedule, ScheduleKind};
use std::path::Path;
use std::process::{Command, Output};

struct Fixture {
    dir: tempfile::TempDir,
    data: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = tiny_idx(dir.path(), 200);
        Fixture { dir, data }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    /// `train` on the tiny data with a tiny network on the CPU, then `extra`.
    fn train(&self, extra: &[&str]) -> Output {
        prunekit(&self.args(extra).iter().map(String::as_str).collect::<Vec<_>>())
    }
    /// The arguments of [`train`](Self::train): defaults for the flags `extra` lacks.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = vec!["train", "--data", &self.data];
        let defaults = [
            ("--device", "cpu"),
            ("--size", "16"),
            ("--batch", "16"),
            ("--lr", "0.05"),
            ("--augment", "none"),
            ("--val-fraction", "0.2"),
            ("--threads", "2"),
        ];
        for (k, v) in defaults {
            if !extra.contains(&k) {
                a.extend([k, v]);
            }
        }
        if !extra.contains(&"--weights") && !extra.contains(&"--resume") && !extra.contains(&"--layers") {
            a.extend(["--layers", "1,1,1,1", "--width", "8"]);
        }
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect()
    }
}

fn log_lines(path: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn tiny_arch(classes: usize) -> Arch {
    Arch::bottleneck_width([1, 1, 1, 1], 8, classes)
}

#[test]
fn budget_stops_exactly_before_the_step_that_would_exceed_it() {
    let f = Fixture::new();
    let per_image = tiny_arch(4).flops_train(16, 16);
    let step_gf = per_image * 16.0 / 1e9;
    for (budget, want) in [(5.5 * step_gf, 5u64), (3.0 * step_gf, 3), (1.0 * step_gf, 1), (7.999 * step_gf, 7)] {
        let log = f.path("budget.jsonl");
        let b = format!("{budget}");
        let out = ok(&f.train(&["--budget", &b, "--log", &log]));
        assert_eq!(want, (budget * 1e9 / (per_image * 16.0) * (1.0 + 1e-9)).floor() as u64);
        let lines = log_lines(&log);
        assert_eq!(lines.len() as u64, want, "budget {budget} GFLOPs, a step {step_gf}: {out}");
        let last = lines.last().unwrap();
        assert_eq!(last["step"].as_u64().unwrap(), want);
        let used = last["train_gflops"].as_f64().unwrap();
        assert!((used - want as f64 * step_gf).abs() < 1e-9 * used.max(1.0), "{used}");
        assert!(used <= budget * (1.0 + 1e-9) && used + step_gf > budget, "{used} of {budget}");
        assert!(out.contains(&format!("done: {want} steps")), "{out}");
    }
}

#[test]
fn cosine_and_warmup_schedule_values() {
    let s = Schedule::new(0.1, ScheduleKind::Cosine, 0, 10).unwrap();
    assert_eq!(s.lr(0), 0.1);
    assert!((s.lr(5) - 0.05).abs() < 1e-15);
    assert!((s.lr(9) - 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * 0.9).cos())).abs() < 1e-15);
    let w = Schedule::new(0.2, ScheduleKind::Cosine, 4, 14).unwrap();
    let want = [0.05, 0.1, 0.15, 0.2];
    for (i, v) in want.iter().enumerate() {
        assert!((w.lr(i as u64) - v).abs() < 1e-15, "warm-up step {i}: {}", w.lr(i as u64));
    }
    assert_eq!(w.lr(4), 0.2);
    assert!((w.lr(9) - 0.1).abs() < 1e-15, "half way through the cosine: {}", w.lr(9));
    assert!(w.lr(13) > 0.0 && w.lr(13) < 0.01);
    let c = Schedule::new(0.3, ScheduleKind::Constant, 2, 5).unwrap();
    assert_eq!([c.lr(0), c.lr(1), c.lr(2), c.lr(4)], [0.15, 0.3, 0.3, 0.3]);
    assert!(Schedule::new(0.1, ScheduleKind::Cosine, 5, 5).is_err(), "warm-up as long as the run");

    // The log carries the same values, the cosine fitted to the budget's steps.
    let f = Fixture::new();
    let log = f.path("lr.jsonl");
    ok(&f.train(&["--steps", "6", "--warmup", "2", "--lr", "0.08", "--log", &log]));
    let s = Schedule::new(0.08, ScheduleKind::Cosine, 2, 6).unwrap();
    for (i, l) in log_lines(&log).iter().enumerate() {
        let (got, want) = (l["lr"].as_f64().unwrap(), s.lr(i as u64));
        assert!((got - want).abs() <= 1e-15 * want, "step {i}: {got} vs {want}");
        // JSON's last bit
    }
}

#[test]
fn label_smoothing_changes_the_training_loss() {
    let f = Fixture::new();
    let (plain, smooth) = (f.path("plain.jsonl"), f.path("smooth.jsonl"));
    ok(&f.train(&["--steps", "1", "--log", &plain]));
    ok(&f.train(&["--steps", "1", "--log", &smooth, "--label-smoothing", "0.3"]));
    let (a, b) = (log_lines(&plain)[0]["loss"].as_f64().unwrap(), log_lines(&smooth)[0]["loss"].as_f64().unwrap());
    // Same weights and batch: the smoothed loss adds 0.3 * (mean_j (lse - z_j) - (lse - z_t)).
    assert!(a.is_finite() && b.is_finite() && a != b, "{a} {b}");
}

#[test]
fn log_holds_the_documented_fields() {
    let f = Fixture::new();
    let log = f.path("fields.jsonl");
    let step_gf = tiny_arch(4).flops_train(16, 16) * 16.0 / 1e9;
    let every = format!("{}", 2.5 * step_gf);
    ok(&f.train(&["--steps", "7", "--log", &log, "--eval-every", &every]));
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 7);
    let mut evals = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let o = l.as_object().unwrap();
        for k in ["step", "images", "train_gflops", "wall_s", "lr", "loss"] {
            assert!(o.contains_key(k), "line {i} lacks {k}: {l}");
        }
        assert_eq!(o["step"].as_u64().unwrap(), i as u64 + 1);
        assert_eq!(o["images"].as_u64().unwrap(), 16 * (i as u64 + 1));
        assert!(o["loss"].as_f64().unwrap().is_finite());
        if o.contains_key("val_error") {
            assert!(o.contains_key("val_loss"));
            let e = o["val_error"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&e));
            evals.push(i + 1);
        } else {
            assert_eq!(o.len(), 6, "{l}");
        }
    }
    // Every 2.5 steps' worth of GFLOPs: after steps 3, 5 (crossing 2.5 and 5.0), and the end.
    assert_eq!(evals, [3, 5, 7]);
    let t: Vec<f64> = lines.iter().map(|l| l["wall_s"].as_f64().unwrap()).collect();
    assert!(t.windows(2).all(|w| w[1] >= w[0]));
}

#[test]
fn a_short_run_learns_an_easy_task_and_eval_agrees() {
    let f = Fixture::new();
    let out = f.path("trained.safetensors");
    let stdout = ok(&f.train(&["--steps", "60", "--out", &out]));
    let line = stdout.lines().find(|l| l.starts_with("done:")).unwrap();
    let err: f64 = line.split("val error ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert!(err < 0.25, "val error {err} (chance 0.75): {stdout}");
    // eval on the written file gives the same error on the same split.
    let e = ok(&prunekit(&[
        "eval",
        "--weights",
        &out,
        "--data",
        &f.data,
        "--device",
        "cpu",
        "--size",
        "16",
        "--batch",
        "7",
        "--val-fraction",
        "0.2",
    ]));
    let got: f64 = e.split("top-1 error ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert_eq!(format!("{got:.4}"), format!("{err:.4}"), "{e}");
    assert!(e.contains("on 40 val images"), "{e}");
    // The file is a plain torchvision-named model.
    let sd = StateDict::read(Path::new(&out)).unwrap();
    assert_eq!(Arch::from_state(&sd).unwrap(), tiny_arch(4));
    assert!(!sd.tensors.keys().any(|k| k.starts_with("keep.") || k.starts_with("momentum.")));
}

#[test]
fn head_is_swapped_when_the_classes_differ() {
    let f = Fixture::new();
    let w = f.path("ten.safetensors");
    torchvision_init(&tiny_arch(10), 3).write(Path::new(&w)).unwrap();
    let out = f.path("swapped.safetensors");
    let stdout = ok(&f.train(&["--weights", &w, "--steps", "2", "--out", &out]));
    assert!(stdout.contains("replaced the classifier (the weights have 10 outputs, the data 4 classes)"), "{stdout}");
    let sd = StateDict::read(Path::new(&out)).unwrap();
    assert_eq!(sd.tensors["fc.weight"].shape, [4, 256]);
    assert_eq!(sd.tensors["fc.bias"].shape, [4]);
    // Same classes: no swap, no message.
    let w4 = f.path("four.safetensors");
    torchvision_init(&tiny_arch(4), 3).write(Path::new(&w4)).unwrap();
    let stdout = ok(&f.train(&["--weights", &w4, "--steps", "1"]));
    assert!(!stdout.contains("replaced the classifier"), "{stdout}");
    // Same classes with --fresh-head: a new classifier all the same (a step of lr 1e-30 leaves
    // every weight as it was in f32).
    let fresh = f.path("fresh.safetensors");
    let stdout = ok(&f.train(&["--weights", &w4, "--steps", "1", "--lr", "1e-30", "--fresh-head", "--out", &fresh]));
    assert!(stdout.contains("replaced the classifier (a fresh head was asked for)"), "{stdout}");
    let (before, after) = (StateDict::read(Path::new(&w4)).unwrap(), StateDict::read(Path::new(&fresh)).unwrap());
    assert_eq!(after.tensors["fc.weight"].shape, [4, 256]);
    assert_ne!(before.tensors["fc.weight"].data, after.tensors["fc.weight"].data);
    assert_eq!(before.tensors["conv1.weight"].data, after.tensors["conv1.weight"].data);
    fails(&f.train(&["--steps", "1", "--fresh-head"]), "--weights");
}

#[test]
fn pruning_before_training_writes_keep_indices_and_smaller_widths() {
    let f = Fixture::new();
    let w = f.path("dense.safetensors");
    let dense = torchvision_init(&tiny_arch(4), 5);
    dense.write(Path::new(&w)).unwrap();
    for mode in ["filters", "channels"] {
        let out = f.path(&format!("pruned-{mode}.safetensors"));
        let stdout = ok(&f.train(&[
            "--weights",
            &w,
            "--mode",
            mode,
            "--sparsity",
            "0.5",
            "--round-to",
            "1",
            "--steps",
            "3",
            "--out",
            &out,
        ]));
        assert!(stdout.contains("pruned zero-shot"), "{stdout}");
        let sd = StateDict::read(Path::new(&out)).unwrap();
        assert!(sd.tensors.keys().any(|k| k.starts_with("keep.")), "{mode}: no keep.*");
        assert_eq!(sd.metadata.get("mode").map(String::as_str), Some(mode));
        let a = Arch::from_state(&sd).unwrap();
        let d = tiny_arch(4);
        assert_eq!(a.blocks[0].w1, d.blocks[0].w1 / 2, "{mode}");
        assert!(a.params() < d.params());
        if mode == "channels" {
            assert_eq!(a.stem, d.stem / 2);
        }
        // The pruned, trained file loads for training and evaluation again.
        ok(&f.train(&["--weights", &out, "--steps", "1"]));
        ok(&prunekit(&["eval", "--weights", &out, "--data", &f.data, "--device", "cpu", "--size", "16"]));
    }
}

fn assert_same_file_tensors(a: &str, b: &str) {
    let (x, y) = (StateDict::read(Path::new(a)).unwrap(), StateDict::read(Path::new(b)).unwrap());
    assert_eq!(x.tensors.len(), y.tensors.len());
    for (n, t) in &x.tensors {
        let u = &y.tensors[n];
        assert_eq!(t.shape, u.shape, "{n}");
        let (p, q) = (t.as_f32().unwrap(), u.as_f32().unwrap());
        assert!(p.iter().zip(q).all(|(a, b)| a.to_bits() == b.to_bits()), "{n} differs");
    }
}

#[test]
fn interrupted_and_resumed_run_ends_bit_identical() {
    let f = Fixture::new();
    let common = ["--steps", "10", "--checkpoint-every", "4", "--augment", "crop-flip", "--warmup", "2"];
    let (ca, oa, la) = (f.path("a.ckpt"), f.path("a.safetensors"), f.path("a.jsonl"));
    let mut args = common.to_vec();
    args.extend(["--checkpoint", &ca, "--out", &oa, "--log", &la]);
    ok(&f.train(&args));

    let (cb, ob, lb) = (f.path("b.ckpt"), f.path("b.safetensors"), f.path("b.jsonl"));
    let mut args = common.to_vec();
    args.extend(["--checkpoint", &cb, "--out", &ob, "--log", &lb]);
    let mut first = args.clone();
    first.extend(["--stop-after", "5"]);
    let o = f.train(&first);
    assert_eq!(o.status.code(), Some(130), "{:?}", text(&o));
    assert!(text(&o).0.contains("interrupted after step 5"), "{:?}", text(&o));
    assert!(!Path::new(&ob).exists(), "no model file from an interrupted run");
    let ck = Checkpoint::read(Path::new(&cb)).unwrap();
    assert_eq!(ck.progress.step, 5);
    let mut again = args.clone();
    again.extend(["--resume", &cb]);
    let stdout = ok(&f.train(&again));
    assert!(stdout.contains("resuming at step 5 of 10"), "{stdout}");
    assert_same_file_tensors(&oa, &ob);
    // The log of the two parts is the uninterrupted log (times aside).
    let strip = |v: Vec<serde_json::Value>| {
        v.into_iter()
            .map(|mut l| {
                l.as_object_mut().unwrap().remove("wall_s");
                l
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(log_lines(&la)), strip(log_lines(&lb)));

    // Other settings are refused on resume.
    let mut other = args.clone();
    other.extend(["--resume", &cb, "--lr", "0.07"]);
    fails(&f.train(&other), "other settings: lr");
}

#[test]
fn sigint_writes_a_checkpoint_and_resume_matches() {
    let f = Fixture::new();
    let common = ["--steps", "400", "--batch", "8"];
    let (cb, ob, lb) = (f.path("b.ckpt"), f.path("b.safetensors"), f.path("b.jsonl"));
    let mut args = common.to_vec();
    args.extend(["--checkpoint", &cb, "--out", &ob, "--log", &lb]);
    let child = Command::new(bin())
        .args(f.args(&args))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first steps in the log, then interrupt.
    let t = std::time::Instant::now();
    while std::fs::read_to_string(&lb).map_or(0, |s| s.lines().count()) < 3 {
        assert!(t.elapsed().as_secs() < 60, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    if o.status.success() {
        eprintln!("the run finished before the signal arrived; nothing to resume");
        return;
    }
    assert_eq!(o.status.code(), Some(130), "{:?}", text(&o));
    assert!(text(&o).0.contains("interrupted after step"), "{:?}", text(&o));
    let k = Checkpoint::read(Path::new(&cb)).unwrap().progress.step;
    assert!((3..400).contains(&k), "{k}");
    // The uninterrupted reference for the same 400 steps.
    let (cr, or) = (f.path("r.ckpt"), f.path("r.safetensors"));
    let mut reference = common.to_vec();
    reference.extend(["--checkpoint", &cr, "--out", &or]);
    ok(&f.train(&reference));
    let mut again = args.clone();
    again.extend(["--resume", &cb]);
    ok(&f.train(&again));
    assert_same_file_tensors(&or, &ob);
}

#[test]
fn a_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint() {
    let f = Fixture::new();
    let ck = f.path("nan.ckpt");
    let o = f.train(&["--steps", "50", "--lr", "1e6", "--checkpoint", &ck, "--checkpoint-every", "1"]);
    let err = fails(&o, "at step ");
    assert!(err.contains("not finite") || err.contains("non-finite"), "{err}");
    let step: u64 =
        err.split("at step ").nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
    assert!((1..50).contains(&step), "{err}");
    if Path::new(&ck).exists() {
        let c = Checkpoint::read(Path::new(&ck)).unwrap();
        assert!(c.progress.step < step, "checkpoint at {} after failing at {step}", c.progress.step);
        assert!(c.first_non_finite().is_none());
        assert!(err.contains("was left as it was"), "{err}");
    }
}

#[test]
fn bad_inputs_are_refused_before_any_work() {
    let f = Fixture::new();
    let missing = f.dir.path().join("no/such/folder");
    for flag in ["--out", "--log", "--checkpoint"] {
        let p = missing.join("x").display().to_string();
        let mut a = vec!["--steps", "2", flag, &p];
        if flag == "--checkpoint" {
            a.extend(["--checkpoint-every", "1"]);
        }
        fails(&f.train(&a), "does not exist");
        assert!(!missing.exists());
    }
    let log = f.path("refused.jsonl");
    fails(&f.train(&["--steps", "2", "--size", "1000000", "--log", &log]), "needs about");
    fails(&f.train(&["--steps", "2", "--batch", "100000000", "--log", &log]), "fewer than one batch");
    fails(&f.train(&["--budget", "1e-6", "--log", &log]), "smaller than one training step");
    fails(&f.train(&["--budget", "1", "--epochs", "2"]), "cannot be used with");
    fails(&f.train(&["--batch", "16"]), "--budget");
    fails(&f.train(&["--steps", "2", "--label-smoothing", "1"]), "--label-smoothing must be in [0, 1)");
    fails(&f.train(&["--steps", "2", "--lr=-1"]), "--lr");
    fails(&f.train(&["--steps", "2", "--layers", "1,1,1"]), "four numbers");
    fails(&f.train(&["--steps", "2", "--mode", "filters"]), "--sparsity");
    fails(&f.train(&["--steps", "2", "--resume", &f.path("none.ckpt")]), "No such file");
    fails(&f.train(&["--steps", "2", "--classes", "0,9"]), "out of range");
    assert!(!Path::new(&log).exists(), "a refused run leaves no log");
    fails(&prunekit(&["eval", "--weights", &f.path("none"), "--data", &f.data, "--device", "cpu"]), "No such file");
    let w = f.path("ten.safetensors");
    torchvision_init(&tiny_arch(10), 3).write(Path::new(&w)).unwrap();
    fails(&prunekit(&["eval", "--weights", &w, "--data", &f.data, "--device", "cpu"]), "10 outputs");
}

#[test]
fn bench_checks_memory_and_output_paths_first() {
    let t = std::time::Instant::now();
    let o = prunekit(&["bench", "--device", "cpu", "--batch", "100000"]);
    fails(&o, "needs about");
    let (_, err) = text(&o);
    assert!(err.contains("GB") && err.contains("available host memory"), "{err}");
    assert_eq!(o.status.code(), Some(1));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("missing/rows.json").display().to_string();
    let plot = dir.path().join("missing/plot.svg").display().to_string();
    fails(&prunekit(&["bench", "--device", "cpu", "--json", &json]), "does not exist");
    fails(&prunekit(&["bench", "--device", "cpu", "--plot", &plot]), "does not exist");
    assert!(t.elapsed().as_secs() < 30, "refused only after {:?}", t.elapsed());
}

#[test]
fn trains_through_the_emulation() {
    let f = Fixture::new();
    let out = f.path("emu.safetensors");
    let log = f.path("emu.jsonl");
    let o = prunekit(&[
        "train",
        "--data",
        &f.data,
        "--device",
        "emu",
        "--size",
        "16",
        "--batch",
        "4",
        "--layers",
        "1,1,1,1",
        "--width",
        "8",
        "--steps",
        "2",
        "--out",
        &out,
        "--log",
        &log,
        "--val-fraction",
        "0.1",
    ]);
    ok(&o);
    assert_eq!(log_lines(&log).len(), 2);
    assert!(log_lines(&log)[1]["val_error"].is_number());
    let sd = StateDict::read(Path::new(&out)).unwrap();
    assert_eq!(Arch::from_state(&sd).unwrap(), tiny_arch(4));
}

#[test]
fn the_recipe_flags_of_train() {
    let f = Fixture::new();
    let log = f.path("recipe.jsonl");
    let a = ["--steps", "10", "--warmup-fraction", "0.5", "--clip-grad-norm", "0.5", "--head-only-fraction", "0.2"];
    let out = ok(&f.train(&[&a[..], &["--log", &log]].concat()));
    assert!(out.contains("first 2 steps head-only") && out.contains("clipped to norm 0.5"), "{out}");
    let l = log_lines(&log);
    assert!(l.iter().all(|x| x["grad_norm"].is_number()), "{:?}", l[0]);
    // The head-only phase (2 steps) warms up over 1 step (then the cosine's first step, at
    // the peak), the full phase (8) over 4.
    let lr = |i: usize| l[i]["lr"].as_f64().unwrap();
    assert_eq!((lr(0), lr(1)), (0.05, 0.05));
    assert_eq!((lr(2), lr(5), lr(6)), (0.05 / 4.0, 0.05, 0.05));
    // train's defaults: none of them.
    let plain = f.path("plain.jsonl");
    ok(&f.train(&["--steps", "2", "--log", &plain]));
    assert!(log_lines(&plain)[0].get("grad_norm").is_none());
}

#[test]
fn a_separate_evaluation_batch_gives_the_same_evaluation() {
    let f = Fixture::new();
    let val = |extra: &[&str]| -> String {
        let mut a = vec!["--steps", "4"];
        a.extend_from_slice(extra);
        let out = ok(&f.train(&a));
        out.lines().find(|l| l.starts_with("done:")).unwrap().split("val error").nth(1).unwrap().to_string()
    };
    let same = val(&[]);
    assert_eq!(val(&["--eval-batch", "7"]), same, "7 does not divide the 40 val images: a padded last batch");
    assert_eq!(val(&["--eval-batch", "64"]), same);
    fails(&f.train(&["--steps", "1", "--eval-batch", "0"]), "--eval-batch must be at least 1");
}

// ---- The fine-tuning recipes: warm-up fraction, gradient clipping, the head-only phase,
// divergence and time budgets, through the library on the tiny data.

mod recipes {
    use super::tiny_arch;
    use common::cli::tiny_idx;
    use prunekit::data::{Dataset, OpenOptions};
    use prunekit::model::{init::torchvision_init, Model, PrecisionKind, Sgd, StateDict};
    use prunekit::ops::layers;
    use prunekit::train::{
        head_step_flops, phase_steps, steps_for, train, Checkpoint, Length, Outcome, Start, Summary, TrainConfig,
    };
    use prunekit::Device;
    use std::path::Path;

    use super::common;

    fn data(dir: &Path) -> Dataset {
        let spec = tiny_idx(dir, 200);
        Dataset::open(&spec, &OpenOptions { val_fraction: 0.2, ..OpenOptions::default() }).unwrap()
    }

    fn cfg(steps: u64) -> TrainConfig {
        TrainConfig {
            length: Length::Steps(steps),
            batch: 16,
            size: 16,
            lr: 0.05,
            augment: prunekit::data::Augment::None,
            threads: 2,
            ..TrainConfig::default()
        }
    }

    fn finished(o: Outcome) -> Summary {
        match o {
            Outcome::Finished(s) => s,
            o => panic!("{o:?}"),
        }
    }

    fn devices() -> Vec<Device> {
        vec![Device::Cpu, Device::parse("emu").unwrap()]
    }

    /// A model with the gradients of one batch of the tiny data.
    fn with_gradients(dev: &Device, ds: &Dataset) -> (Model, prunekit::model::AnyWorkspace) {
        let mut m = Model::new(dev, &tiny_arch(4), 3, PrecisionKind::F32).unwrap();
        let mut ws = m.workspace(8, 16, 16).unwrap();
        let lc = prunekit::data::LoaderConfig { batch: 8, size: 16, ..Default::default() };
        let mut l = prunekit::data::Loader::train(&ds.train, &lc, Default::default()).unwrap();
        let mut b = l.new_batch();
        l.next(&mut b).unwrap();
        m.set_batch(&mut ws, &b.images, Some(&b.targets)).unwrap();
        m.forward(&mut ws, true).unwrap();
        m.backward(&mut ws).unwrap();
        (m, ws)
    }

    fn f32s(sd: &StateDict, name: &str) -> Vec<f32> {
        sd.get(name).unwrap().as_f32().unwrap().to_vec()
    }

    #[test]
    fn the_gradient_norm_is_the_hand_computed_global_l2_norm() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        for dev in devices() {
            let (m, _) = with_gradients(&dev, &ds);
            let g = m.gradients().unwrap();
            let by_hand: f64 =
                g.tensors.values().flat_map(|t| t.as_f32().unwrap().iter().map(|&x| x as f64 * x as f64)).sum();
            let head: f64 =
                ["fc.weight", "fc.bias"].iter().flat_map(|n| f32s(&g, n)).map(|x| x as f64 * x as f64).sum();
            let n = m.grad_norm(false).unwrap();
            assert!((n - by_hand.sqrt()).abs() <= 1e-9 * n, "{}: {n} vs {}", dev.name(), by_hand.sqrt());
            let h = m.grad_norm(true).unwrap();
            assert!((h - head.sqrt()).abs() <= 1e-9 * h, "{}: {h} vs {}", dev.name(), head.sqrt());
            assert!(n > h && h > 0.0);
        }
    }

    #[test]
    fn a_clipped_step_is_sgd_on_the_scaled_gradients() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        for dev in devices() {
            let (mut m, _) = with_gradients(&dev, &ds);
            let before = m.to_state().unwrap();
            let g = m.gradients().unwrap();
            let (lr, wd, scale) = (0.1f32, 0.01f32, 0.25f32);
            m.sgd_step_scaled(&Sgd { lr, momentum: 0.9, weight_decay: wd }, scale).unwrap();
            let after = m.to_state().unwrap();
            // The first step: buf = d = scale * g + wd * p; p -= lr * buf (in f32).
            for name in ["conv1.weight", "layer1.0.conv2.weight", "bn1.weight", "fc.weight", "fc.bias"] {
                let (p0, g0, p1) = (f32s(&before, name), f32s(&g, name), f32s(&after, name));
                for i in 0..p0.len() {
                    let d = g0[i] * scale + wd * p0[i];
                    let want = p0[i] - lr * d;
                    assert!((p1[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "{} {name}[{i}]", dev.name());
                }
            }
        }
        // The op: a scaled step is bitwise the plain step on gradients scaled beforehand, and
        // a scale of 1 is the plain step.
        for dev in devices() {
            let n = 1003;
            let p: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
            let gr: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 32.0).collect();
            let run = |g: &[f32], scale: f32, first: bool| {
                let mut pb = dev.upload(p.clone()).unwrap();
                let mut bb = dev.upload(vec![0.5f32; n]).unwrap();
                let gb = dev.upload(g.to_vec()).unwrap();
                layers::sgd_step(
                    &dev,
                    &mut pb,
                    &gb,
                    &mut bb,
                    &layers::SgdStep::new(0.1, 0.9, 1e-3, first).scaled(scale),
                )
                .unwrap();
                (pb.to_vec().unwrap(), bb.to_vec().unwrap())
            };
            let plain = |g: &[f32], first: bool| {
                let mut pb = dev.upload(p.clone()).unwrap();
                let mut bb = dev.upload(vec![0.5f32; n]).unwrap();
                let gb = dev.upload(g.to_vec()).unwrap();
                layers::sgd_step(&dev, &mut pb, &gb, &mut bb, &layers::SgdStep::new(0.1, 0.9, 1e-3, first)).unwrap();
                (pb.to_vec().unwrap(), bb.to_vec().unwrap())
            };
            let scaled: Vec<f32> = gr.iter().map(|g| g * 0.3).collect();
            for first in [true, false] {
                assert_eq!(run(&gr, 0.3, first), plain(&scaled, first), "{}", dev.name());
                assert_eq!(run(&gr, 1.0, first), plain(&gr, first), "{}", dev.name());
            }
        }
    }

    #[test]
    fn clipping_bounds_the_update_and_logs_the_norm() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        let sd = torchvision_init(&tiny_arch(4), 5);
        let log = dir.path().join("clip.jsonl");
        let c = TrainConfig { clip_grad_norm: Some(0.01), log: Some(log.clone()), ..cfg(3) };
        let s = finished(train(&Device::Cpu, Start::Fresh(sd.clone()), &ds, &c, &mut |_| {}).unwrap());
        let lines = super::log_lines(log.to_str().unwrap());
        assert!(lines.iter().all(|l| l["grad_norm"].as_f64().unwrap() > 0.01), "the norm is logged, above the clip");
        // Clipped to 0.01 with lr 0.05 and no momentum history on the first step, no weight moves
        // by more than lr * (0.01 + wd * |w|) after it.
        let c1 = TrainConfig { clip_grad_norm: Some(0.01), momentum: 0.0, ..cfg(1) };
        let mut out = None;
        let ck = dir.path().join("one.ckpt");
        let c1 = TrainConfig { checkpoint: Some(ck.clone()), ..c1 };
        finished(train(&Device::Cpu, Start::Fresh(sd.clone()), &ds, &c1, &mut |_| {}).unwrap());
        let after = Checkpoint::read(&ck).unwrap().state;
        let mut sq = 0.0f64;
        for (n, t) in &after.tensors {
            if n.ends_with("running_mean") || n.ends_with("running_var") || n.ends_with("num_batches_tracked") {
                continue;
            }
            let (a, b) = (t.as_f32().unwrap(), sd.get(n).unwrap().as_f32().unwrap());
            for (x, y) in a.iter().zip(b) {
                let step = (x - y) as f64 - (-(0.05 * 5e-4) * *y as f64);
                sq += step * step;
            }
            out = Some(());
        }
        assert!(out.is_some());
        assert!((sq.sqrt() - 0.05 * 0.01).abs() < 1e-5, "the clipped step's norm is lr * max_norm: {}", sq.sqrt());
        assert!(s.steps == 3);
        // Unclipped (a huge limit) is the same run as no clipping, bitwise.
        let a = TrainConfig { checkpoint: Some(dir.path().join("a.ckpt")), ..cfg(3) };
        let b = TrainConfig { checkpoint: Some(dir.path().join("b.ckpt")), clip_grad_norm: Some(1e30), ..cfg(3) };
        finished(train(&Device::Cpu, Start::Fresh(sd.clone()), &ds, &a, &mut |_| {}).unwrap());
        finished(train(&Device::Cpu, Start::Fresh(sd), &ds, &b, &mut |_| {}).unwrap());
        let (sa, sb) = (
            Checkpoint::read(&dir.path().join("a.ckpt")).unwrap().state,
            Checkpoint::read(&dir.path().join("b.ckpt")).unwrap().state,
        );
        assert_eq!(sa.tensors, sb.tensors);
    }

    #[test]
    fn the_warmup_fraction_fits_the_run_and_wins_over_steps() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        let sd = torchvision_init(&tiny_arch(4), 5);
        let lrs = |c: TrainConfig| -> Vec<f64> {
            let log = dir.path().join("w.jsonl");
            let c = TrainConfig { log: Some(log.clone()), ..c };
            finished(train(&Device::Cpu, Start::Fresh(sd.clone()), &ds, &c, &mut |_| {}).unwrap());
            super::log_lines(log.to_str().unwrap()).iter().map(|l| l["lr"].as_f64().unwrap()).collect()
        };
        // 0.25 of 8 steps: 2 warm-up steps, then the cosine over the other 6.
        let base = TrainConfig { warmup_fraction: Some(0.25), ..cfg(8) };
        let v = lrs(base.clone());
        assert_eq!(v[0], 0.05 * 0.5);
        assert_eq!(v[1], 0.05);
        assert_eq!(v[2], 0.05, "the first step after the warm-up is at the peak");
        assert!(v[7] < v[3]);
        // With --warmup too, the fraction wins.
        assert_eq!(lrs(TrainConfig { warmup: 5, ..base.clone() }), v);
        // The same fraction of 16 steps is 4 warm-up steps.
        let v16 = lrs(TrainConfig { length: Length::Steps(16), ..base });
        assert_eq!(v16[3], 0.05);
        assert!((v16[0] - 0.05 / 4.0).abs() < 1e-15);
    }

    #[test]
    fn the_head_only_phase_leaves_the_backbone_bitwise_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        let sd = torchvision_init(&tiny_arch(4), 5);
        for dev in devices() {
            let ck = dir.path().join(format!("head-{}.ckpt", dev.kind()));
            let log = dir.path().join(format!("head-{}.jsonl", dev.kind()));
            // 4 steps, half head-only; stopped after the 2nd (the last head-only) step.
            let c = TrainConfig {
                head_only_fraction: 0.5,
                clip_grad_norm: Some(1.0),
                checkpoint: Some(ck.clone()),
                log: Some(log.clone()),
                stop_after: Some(2),
                ..cfg(4)
            };
            let o = train(&dev, Start::Fresh(sd.clone()), &ds, &c, &mut |_| {}).unwrap();
            assert!(matches!(o, Outcome::Interrupted { step: 2, .. }), "{o:?}");
            let k = Checkpoint::read(&ck).unwrap();
            let mut fc_moved = false;
            for (n, t) in &sd.tensors {
                let after = k.state.get(n).unwrap();
                if n.starts_with("fc.") {
                    fc_moved |= after.as_f32() != t.as_f32();
                } else {
                    assert_eq!(after, t, "{}: {n} changed in the head-only phase", dev.name());
                }
            }
            assert!(fc_moved, "{}", dev.name());
            for (n, t) in &k.momentum.tensors {
                if !n.starts_with("fc.") {
                    assert!(t.as_f32().unwrap().iter().all(|&x| x == 0.0), "{n}'s momentum is untouched");
                }
            }
            // Head-only steps are charged the forward and the classifier's backward.
            let lines = super::log_lines(log.to_str().unwrap());
            let arch = tiny_arch(4);
            let head = head_step_flops(&arch, 16, 16) * 16.0 / 1e9;
            let full = arch.flops_train(16, 16) * 16.0 / 1e9;
            assert!(head < full / 2.0);
            assert!((lines[0]["train_gflops"].as_f64().unwrap() - head).abs() < 1e-12);
            assert!((lines[1]["train_gflops"].as_f64().unwrap() - 2.0 * head).abs() < 1e-12);
            // Resumed, the full fine-tune moves the backbone.
            let c2 = TrainConfig { stop_after: None, log: None, ..c };
            let k = Box::new(Checkpoint::read(&ck).unwrap());
            let s = finished(train(&dev, Start::Resume(k, ck.clone()), &ds, &c2, &mut |_| {}).unwrap());
            assert_eq!((s.steps, s.head_steps), (4, 2));
            assert!((s.train_gflops - (2.0 * head + 2.0 * full)).abs() < 1e-12);
            let end = Checkpoint::read(&ck).unwrap().state;
            assert_ne!(end.get("conv1.weight").unwrap(), sd.get("conv1.weight").unwrap());
        }
    }

    #[test]
    fn a_budget_with_a_head_only_phase_buys_more_steps_and_still_holds() {
        let arch = tiny_arch(4);
        let (full, head) = (arch.flops_train(16, 16), head_step_flops(&arch, 16, 16));
        let batch = 16;
        let budget = 40.0 * full * batch as f64 / 1e9;
        assert_eq!(phase_steps(Length::Gflops(budget), full, head, batch, 10, 0.0, None).unwrap(), (40, 0));
        assert_eq!(steps_for(Length::Gflops(budget), full, batch, 10).unwrap(), 40);
        for f in [0.1, 0.25, 0.5, 0.9] {
            let (t, h) = phase_steps(Length::Gflops(budget), full, head, batch, 10, f, None).unwrap();
            assert_eq!(h, (f * t as f64).floor() as u64);
            let cost = |t: u64, h: u64| (h as f64 * head + (t - h) as f64 * full) * batch as f64 / 1e9;
            assert!(cost(t, h) <= budget * (1.0 + 1e-9), "{f}");
            let h1 = (f * (t + 1) as f64).floor() as u64;
            assert!(cost(t + 1, h1) > budget, "{f}: one more step would fit");
            assert!(t > 40, "{f}");
        }
        assert_eq!(phase_steps(Length::Steps(10), full, head, batch, 10, 0.25, None).unwrap(), (10, 2));
        // A time budget: the probe's seconds per step.
        assert_eq!(phase_steps(Length::Seconds(10.0), full, head, batch, 10, 0.0, Some((0.5, 0.1))).unwrap(), (20, 0));
        let (t, h) = phase_steps(Length::Seconds(10.0), full, head, batch, 10, 0.5, Some((0.5, 0.1))).unwrap();
        assert!(h as f64 * 0.1 + (t - h) as f64 * 0.5 <= 10.0 + 1e-9 && t > 20, "{t} {h}");
        assert!(phase_steps(Length::Seconds(0.1), full, head, batch, 10, 0.0, Some((0.5, 0.1))).is_err());
    }

    #[test]
    fn divergence_stops_the_run_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        let sd = torchvision_init(&tiny_arch(4), 5);
        let c = TrainConfig { lr: 1e6, stop_on_divergence: true, ..cfg(50) };
        let mut said = Vec::new();
        let s = finished(
            train(&Device::Cpu, Start::Fresh(sd.clone()), &ds, &c, &mut |l| said.push(l.to_string())).unwrap(),
        );
        let d = s.diverged.clone().expect("diverged");
        assert!(s.steps < 50 && s.planned_steps == 50, "{s:?}");
        assert_eq!(d.step, s.steps + 1, "the diverged step's update is not applied");
        assert!(!d.loss.is_finite() || d.loss > 10.0 * s.first_loss, "{d}");
        assert!(s.first_loss.is_finite() && s.eval.is_some());
        assert!(said.iter().any(|l| l.contains("diverged")), "{said:?}");
        // A loss above 10x the first, though finite, is a divergence: a factor just above 1
        // catches the first rise of a run at a high rate.
        let c = TrainConfig { lr: 2.0, diverge_factor: 1.0001, stop_on_divergence: true, ..cfg(30) };
        let s = finished(train(&Device::Cpu, Start::Fresh(sd.clone()), &ds, &c, &mut |_| {}).unwrap());
        let d = s.diverged.expect("a rise above the first loss");
        assert!(d.loss.is_finite() && d.loss > 1.0001 * d.first_loss, "{d}");
        // Without stopping, a finite rise is reported and the run goes on.
        let c = TrainConfig { lr: 2.0, diverge_factor: 1.0001, ..cfg(30) };
        let mut said = Vec::new();
        match train(&Device::Cpu, Start::Fresh(sd), &ds, &c, &mut |l| said.push(l.to_string())) {
            Ok(Outcome::Finished(s)) => {
                assert_eq!(s.steps, 30);
                assert!(s.diverged.is_some());
                assert!(said.iter().any(|l| l.starts_with("warning:")), "{said:?}");
            }
            Err(e) => assert!(e.to_string().contains("not finite"), "{e}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_time_budget_stops_at_the_budget_with_a_fitted_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let ds = data(dir.path());
        let sd = torchvision_init(&tiny_arch(4), 5);
        let c = TrainConfig { length: Length::Seconds(0.5), warmup_fraction: Some(0.1), ..cfg(1) };
        let s = finished(train(&Device::Cpu, Start::Fresh(sd), &ds, &c, &mut |_| {}).unwrap());
        assert!(s.steps >= 1 && s.steps <= s.planned_steps, "{s:?}");
        assert!(s.probe_s > 0.0);
        // It stops at the step that reaches the budget, or at the fitted end.
        assert!(s.steps == s.planned_steps || s.train_s >= 0.5, "{s:?}");
        assert!(s.train_gflops > 0.0 && s.eval.is_some());
    }
}
