//! `prunekit bench` (the main job) end to end on tiny sizes, on the CPU and through the
//! kernels in the emulation: the table, the JSON rows with exactly the documented fields,
//! the plot, the per-op profile (`--profile`), and clear errors for bad arguments.

mod common;

use common::cli::prunekit;

const FIELDS: &[&str] = &[
    "mode",
    "sparsity",
    "params",
    "gflops_forward_per_image",
    "gflops_train_per_image",
    "step_ms",
    "images_per_s",
    "speedup",
    "ideal_speedup",
    "efficiency",
];

const PROFILE_FIELDS: &[&str] = &["bytes", "calls", "device", "families", "flops", "ops_ms", "other_ms", "step_ms"];
const CALL_FIELDS: &[&str] = &["bytes", "family", "flops", "ms"];
const FAMILY_FIELDS: &[&str] = &["bytes", "calls", "family", "flops", "gb_per_s", "gflop_per_s", "ms", "share"];

fn sorted_keys(v: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// Checks a row's "profile" object (of `prunekit bench --profile`) against the row.
fn check_profile(r: &serde_json::Value, batch: f64) {
    let p = &r["profile"];
    assert_eq!(sorted_keys(p), PROFILE_FIELDS);
    let families = p["families"].as_array().unwrap();
    let names: Vec<&str> = families.iter().map(|f| f["family"].as_str().unwrap()).collect();
    for want in ["conv_fprop", "conv_dgrad", "conv_wgrad", "bn_forward", "bn_backward", "pool", "fc"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // The step's residual adds are fused (bn3's apply, the dgrads' epilogues).
    assert!(!names.contains(&"relu_add"), "{names:?}");
    for want in ["loss", "sgd", "layout"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let mut shares = 0.0;
    let mut gemm = 0.0;
    for f in families {
        assert_eq!(sorted_keys(f), FAMILY_FIELDS);
        shares += f["share"].as_f64().unwrap();
        if f["family"].as_str().unwrap().starts_with("conv") || f["family"] == "fc" {
            gemm += f["flops"].as_f64().unwrap();
        }
    }
    let step = p["step_ms"].as_f64().unwrap();
    assert!((shares + p["other_ms"].as_f64().unwrap() / step - 1.0).abs() < 1e-6, "{p}");
    // Every op in order: as many as the families count, their times summing to ops_ms.
    let calls = p["calls"].as_array().unwrap();
    let counted: u64 = families.iter().map(|f| f["calls"].as_u64().unwrap()).sum();
    assert_eq!(calls.len() as u64, counted);
    let mut ms = 0.0;
    for c in calls {
        assert_eq!(sorted_keys(c), CALL_FIELDS);
        assert!(names.contains(&c["family"].as_str().unwrap()), "{c}");
        ms += c["ms"].as_f64().unwrap();
    }
    assert!((ms / p["ops_ms"].as_f64().unwrap() - 1.0).abs() < 1e-9, "calls {ms} ms, ops_ms {}", p["ops_ms"]);
    let want = r["gflops_train_per_image"].as_f64().unwrap() * 1e9 * batch;
    assert!((gemm / want - 1.0).abs() < 1e-9, "conv and fc FLOPs {gemm}, flops_train x batch {want}");
}

fn run_bench(device: &str, modes: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let plot = dir.path().join("speedup.svg");
    let mut args = vec![
        "bench",
        "--device",
        device,
        "--batch",
        "2",
        "--size",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--mode",
        modes,
        "--sparsity",
        "0,0.5",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = prunekit(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("efficiency") && stdout.contains("dense"), "{stdout}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("FLOP-ideal"), "not a plot");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let profiled = extra.contains(&"--profile");
    assert_eq!(stdout.contains("per-op profile"), profiled, "{stdout}");
    for r in &rows {
        let mut keys = sorted_keys(r);
        let mut want = FIELDS.to_vec();
        if profiled {
            want.push("profile");
            check_profile(r, 2.0);
        }
        want.sort_unstable();
        keys.sort_unstable();
        assert_eq!(keys, want);
        assert!(r["step_ms"].as_f64().unwrap() > 0.0);
        let (sp, ideal, eff) =
            (r["speedup"].as_f64().unwrap(), r["ideal_speedup"].as_f64().unwrap(), r["efficiency"].as_f64().unwrap());
        assert!((eff - sp / ideal).abs() < 1e-9);
    }
    rows
}

#[test]
fn bench_on_cpu_writes_rows_and_plot() {
    let rows = run_bench("cpu", "filters,channels,masked", &[]);
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["dense", "filters", "channels", "masked"]);
    let dense = &rows[0];
    assert_eq!(dense["params"].as_u64().unwrap(), 25_557_032);
    assert_eq!(dense["speedup"].as_f64().unwrap(), 1.0);
    let filters = &rows[1];
    assert!(filters["ideal_speedup"].as_f64().unwrap() > 1.5, "filters at 0.5 removes FLOPs");
    assert!(filters["params"].as_u64().unwrap() < 25_557_032);
    let masked = &rows[3];
    assert_eq!(masked["ideal_speedup"].as_f64().unwrap(), 1.0, "masking removes no FLOP");
    assert_eq!(masked["gflops_train_per_image"], dense["gflops_train_per_image"]);
}

#[test]
fn bench_profile_on_cpu() {
    let rows = run_bench("cpu", "filters", &["--profile"]);
    assert_eq!(rows.len(), 2);
    let fprop = |r: &serde_json::Value| {
        r["profile"]["families"].as_array().unwrap().iter().find(|f| f["family"] == "conv_fprop").unwrap()["flops"]
            .as_f64()
            .unwrap()
    };
    assert!(fprop(&rows[1]) < 0.7 * fprop(&rows[0]), "pruning removes conv FLOPs");
}

#[test]
fn bench_in_the_emulation() {
    // (--profile in the emulation: tests/profile.rs; a profiled ResNet50 step here would
    // double this test's minutes.)
    let rows = run_bench("emu", "filters", &["--precision", "bf16"]);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["sparsity"].as_f64().unwrap(), 0.5);
}

/// A `PK_WGMMA` value that is not 0, 1 or ws is an error on the kernel devices, not a
/// silent fallback to the default kernels.
#[test]
fn a_bad_pk_wgmma_is_an_error() {
    for device in ["emu", "emu:count"] {
        let o = std::process::Command::new(common::cli::bin())
            .args(["bench", "--device", device, "--size", "32", "--batch", "2", "--steps", "1", "--sparsity", "0"])
            .env("PK_WGMMA", "yes")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{device}: accepted PK_WGMMA=yes");
        assert!(stderr.contains("PK_WGMMA") && stderr.contains("0, 1 or ws"), "{device}: {stderr}");
    }
}

#[test]
fn bench_refuses_bad_arguments() {
    for (args, needle) in [
        (vec!["--sparsity", "1"], "below 1"),
        (vec!["--sparsity", "0.5,x"], "not a decimal"),
        (vec!["--mode", "pruned"], "unknown bench mode"),
        (vec!["--size", "16"], "at least 32"),
        (vec!["--steps", "0"], "at least 1"),
        (vec!["--batch", "0"], "at least 1"),
        (vec!["--round-to", "0"], "at least 1"),
        (vec!["--precision", "fp8"], "unknown precision"),
        (vec!["--device", "gpu7"], "unknown device"),
        (vec!["--plot", "out.png"], ".svg"),
        (vec!["--weights", "/nonexistent.safetensors"], "No such file"),
    ] {
        let mut opts = vec![
            ("--device", "cpu"),
            ("--size", "32"),
            ("--batch", "2"),
            ("--steps", "1"),
            ("--warmup", "0"),
            ("--mode", "filters"),
            ("--sparsity", "0"),
        ];
        opts.retain(|(k, _)| *k != args[0]);
        opts.push((args[0], args[1]));
        let mut a = vec!["bench"];
        for (k, v) in &opts {
            a.push(k);
            a.push(v);
        }
        let o = prunekit(&a);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "accepted {args:?}");
        assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The `step` lines of the roofline table: (model, GB, limit ms, roofline-ideal, FLOP-ideal).
fn roofline_steps(stdout: &str) -> Vec<(String, f64, f64, f64, f64)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("step ") && !l.contains("limit ms"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // step, model (one or two words), GFLOP, GB, limit, roofline, FLOP, eff roof, eff FLOP
            let n = w.len();
            let f = |i: usize| w[i].parse::<f64>().unwrap();
            (w[1..n - 7].join(" "), f(n - 6), f(n - 5), f(n - 4), f(n - 3))
        })
        .collect()
}

#[test]
fn bench_counts_a_full_size_step_without_running_it() {
    // 256 x 224x224 bf16, ResNet50: the emulation would take hours and 60 GB; counting
    // takes seconds and maps its buffers without touching them.
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.json");
    let o = prunekit(&[
        "bench",
        "--device",
        "emu:count",
        "--mode",
        "filters,channels",
        "--sparsity",
        "0,0.5",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("batch 256, 224x224, bf16") && stdout.contains("roofline of h200"), "{stdout}");
    assert!(!stdout.contains("img/s"), "no timing table when nothing ran: {stdout}");
    let steps = roofline_steps(&stdout);
    assert_eq!(steps.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["dense", "filters 0.5", "channels 0.5"]);
    let (dense, filters, channels) = (&steps[0], &steps[1], &steps[2]);
    assert_eq!((dense.3, dense.4), (1.0, 1.0));
    // Filters keep the residual stream's width: their bytes fall far less than their FLOPs.
    assert!(filters.1 < dense.1 && filters.1 > 0.7 * dense.1, "{steps:?}");
    assert!(1.0 < filters.3 && filters.3 < filters.4, "roofline-ideal below FLOP-ideal: {steps:?}");
    assert!(channels.3 > filters.3, "{steps:?}");
    // The step's limit is the dense limit over the roofline-ideal speedup (printed with
    // two decimals).
    assert!((dense.2 / filters.2 - filters.3).abs() <= 0.005 + 1e-9, "{steps:?}");
    // The JSON rows carry the counts, and null for what was not measured.
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for r in &rows {
        assert!(r["step_ms"].is_null() && r["speedup"].is_null(), "{r}");
        let gb = r["profile"]["bytes"].as_f64().unwrap() / 1e9;
        assert!(steps.iter().any(|s| (s.1 - gb).abs() < 0.006), "{gb} GB not in {steps:?}");
    }
    for (args, needle) in
        [(vec!["--plot", "x.svg"], "leave out --plot"), (vec!["--roofline", "v100"], "known are h200, h100, a100")]
    {
        let mut a = vec!["bench", "--device", "emu:count", "--sparsity", "0"];
        a.extend(args);
        let o = prunekit(&a);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(needle), "{stderr}");
    }
    // Only bench counts: a command that computes refuses it.
    let o = prunekit(&["eval", "--device", "emu:count", "--weights", "x.safetensors", "--data", "x"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("only `prunekit bench`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
