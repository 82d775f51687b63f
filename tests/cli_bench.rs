//! `prunekit bench` (the main job) end to end on tiny sizes, on the CPU and through the
//! kernels in the emulation: the table, the JSON rows with exactly the documented fields,
//! the plot, and clear errors for bad arguments.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn prunekit(args: &[&str]) -> std::process::Output {
    let bin =
        std::env::var_os("PRUNEKIT_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_prunekit")), PathBuf::from);
    Command::new(bin).args(args).output().unwrap()
}

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
    for r in &rows {
        let obj = r.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = FIELDS.to_vec();
        want.sort_unstable();
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
fn bench_in_the_emulation() {
    let rows = run_bench("emu", "filters", &["--precision", "bf16"]);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["sparsity"].as_f64().unwrap(), 0.5);
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
