//! Compiles every kernels/*.cu twice:
//!
//! 1. with nvcc, when one is found (NVCC, CUDA_HOME/CUDA_PATH, PATH, then the project's
//!    pinned copy in .cuda/, installed by scripts/install-cuda-compiler.sh): a fatbin per
//!    file with SASS for each architecture of PK_CUDA_ARCHS (default 80,86,89,90; 90 is
//!    built as sm_90a, for the warpgroup MMA) and PTX for the first, embedded in the
//!    crate. ptxas' resource report (registers, spills, shared memory per kernel) goes to
//!    OUT_DIR/kernels-resource-report.txt and is embedded too; any spill is a cargo
//!    warning. Fatbins are cached by content in target/pk-nvcc-cache, so check, test and
//!    release builds compile each kernel once.
//! 2. with the host C++ compiler and the emulation header (kernels/emu), always, into a
//!    static library that the emu back end calls. PK_EMU_SANITIZE=address or =thread
//!    builds the emulation with AddressSanitizer or ThreadSanitizer (see build_emu), links
//!    every binary of the crate with that sanitizer's runtime, and sets the cfg
//!    `pk_emu_sanitize = "address"` (or "thread") for the tests.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,86,89,90";

/// Emulation-only modules with a planted bug (variant, module, the define that plants it),
/// for the tests that show verify and the differential tests catch a real kernel bug. They
/// are never compiled by nvcc and no device but a test's faulty emulation loads them.
const EMU_FAULTS: &[(&str, &str, &str)] = &[
    ("conv_fault_skip_last_channel", "conv", "PK_FAULT_CONV_SKIP_LAST_CHANNEL"),
    ("bn_fault_drop_row", "bn", "PK_FAULT_BN_DROP_ROW"),
    ("conv_fault_ws_early_release", "conv", "PK_FAULT_CONV_WS_EARLY_RELEASE"),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels = manifest.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PK_CUDA_ARCHS", "PK_NVCC_CACHE", "PK_EMU_SANITIZE"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let pinned = manifest.join(".cuda/nvidia/cu13/bin/nvcc");
    if pinned.exists() {
        println!("cargo:rerun-if-changed={}", pinned.display());
    }

    let modules = cu_modules(&kernels);
    let headers = header_digest(&kernels);

    println!("cargo::rustc-check-cfg=cfg(pk_emu_sanitize, values(\"address\", \"thread\"))");
    let sanitize = match std::env::var("PK_EMU_SANITIZE").as_deref() {
        Err(_) | Ok("") => None,
        Ok("address") => Some(Sanitizer::Address),
        Ok("thread") => Some(Sanitizer::Thread),
        Ok(other) => panic!(
            "PK_EMU_SANITIZE={other:?} is not a sanitizer the emulation knows: use address, thread, or leave it \
             unset (or empty) for the plain emulation"
        ),
    };
    build_emu(&kernels, &out, &modules, sanitize);
    let nvcc = find_nvcc(&pinned);
    let fatbins = match &nvcc {
        Some(nvcc) => Some(build_cuda(nvcc, &kernels, &out, &modules, &headers, &manifest)),
        None => {
            println!(
                "cargo:warning=prunekit: nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH, {}): the CUDA kernels \
                 were not compiled and the cuda device will say so; cpu and emu work. Install the pinned \
                 compiler with scripts/install-cuda-compiler.sh.",
                pinned.display()
            );
            fs::write(out.join("kernels-resource-report.txt"), "kernels built without nvcc: no resource report\n")
                .unwrap();
            None
        }
    };
    write_rust_table(&out, &modules, fatbins.as_ref(), nvcc.as_ref());
}

/// Module names: kernels/<name>.cu, sorted.
fn cu_modules(kernels: &Path) -> Vec<String> {
    let mut names = BTreeSet::new();
    for e in fs::read_dir(kernels).expect("kernels/") {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) == Some("cu") {
            names.insert(p.file_stem().unwrap().to_str().unwrap().to_string());
        }
    }
    names.into_iter().collect()
}

/// Every header a kernel can include, as bytes, for the cache key.
fn header_digest(kernels: &Path) -> Vec<u8> {
    let mut files = Vec::new();
    collect(kernels, &mut files);
    files.sort();
    let mut bytes = Vec::new();
    for f in files {
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "h" | "cuh") {
            bytes.extend_from_slice(f.to_string_lossy().as_bytes());
            bytes.extend_from_slice(&fs::read(&f).unwrap());
        }
    }
    bytes
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Sanitizer {
    Address,
    Thread,
}

/// The emulation: the kernels (one wrapper per module) and layout.cpp in one library,
/// runtime.cpp in another. With AddressSanitizer both are instrumented; with
/// ThreadSanitizer only the kernels are (the runtime's scheduler and its bookkeeping are
/// trusted; it tells TSan what orders the CUDA threads through TSan's annotations, see
/// runtime.cpp).
fn build_emu(kernels: &Path, out: &Path, modules: &[String], sanitize: Option<Sanitizer>) {
    let dir = out.join("emu");
    fs::create_dir_all(&dir).unwrap();
    if let Some(s) = sanitize {
        // The sanitizer's runtime (a shared library) must come first in the list of
        // libraries the program loads, ahead of libstdc++ and libc, so that its malloc,
        // memcpy and pthread functions are the ones found. rustc links with
        // -nodefaultlibs, which keeps `gcc -fsanitize=...` from adding it, and link
        // arguments come last: name it here, before the emulation's own libraries.
        println!(
            "cargo:rustc-link-lib=dylib={}",
            match s {
                Sanitizer::Address => "asan",
                Sanitizer::Thread => "tsan",
            }
        );
    }
    let mut build = emu_build(kernels, sanitize, true);
    for m in modules {
        let wrapper = dir.join(format!("{m}.cpp"));
        let src = format!(
            "// generated by build.rs: kernels/{m}.cu for the host emulation\n\
             #include \"{}\"\n\
             extern \"C\" const ::pk_emu::Module* pk_emu_module_{m}(void) {{ return &pk_tu_module; }}\n",
            kernels.join(format!("{m}.cu")).display()
        );
        write_if_changed(&wrapper, &src);
        build.file(&wrapper);
    }
    for (variant, m, define) in EMU_FAULTS {
        let wrapper = dir.join(format!("{variant}.cpp"));
        let src = format!(
            "// generated by build.rs: kernels/{m}.cu with a planted bug, for the host emulation only\n\
             #define {define} 1\n\
             #include \"{}\"\n\
             extern \"C\" const ::pk_emu::Module* pk_emu_module_{variant}(void) {{ return &pk_tu_module; }}\n",
            kernels.join(format!("{m}.cu")).display()
        );
        write_if_changed(&wrapper, &src);
        build.file(&wrapper);
    }
    build.file(kernels.join("emu/layout.cpp"));
    build.compile("pk_emu");
    let mut rt = emu_build(kernels, sanitize, sanitize == Some(Sanitizer::Address));
    rt.file(kernels.join("emu/runtime.cpp"));
    rt.compile("pk_emu_rt");
    if let Some(s) = sanitize {
        let name = match s {
            Sanitizer::Address => "address",
            Sanitizer::Thread => "thread",
        };
        println!("cargo:rustc-link-arg=-fsanitize={name}");
        // The runtime's hooks (default options, the report callback) must be visible to
        // the sanitizer's shared library.
        let hooks: &[&str] = match s {
            Sanitizer::Address => &["__asan_default_options"],
            Sanitizer::Thread => &["__tsan_default_options", "__tsan_on_report"],
        };
        for h in hooks {
            println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol={h}");
        }
        println!("cargo::rustc-cfg=pk_emu_sanitize=\"{name}\"");
    }
}

/// The compiler settings of the emulation's C++; `instrument`: with the sanitizer's
/// instrumentation (otherwise only its interface and the mode's define).
fn emu_build(kernels: &Path, sanitize: Option<Sanitizer>, instrument: bool) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .define("PK_EMU", "1")
        .include(kernels)
        .flag_if_supported("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-variable")
        // A misaligned load or store (a float4 at an address that is not a multiple of
        // 16, say) faults on a GPU: make it trap here too (SIGILL, reported by the
        // runtime's handler with the kernel, block and thread).
        .flag_if_supported("-fsanitize=alignment")
        .flag_if_supported("-fsanitize-undefined-trap-on-error");
    match sanitize {
        None => {}
        Some(s) => {
            let (define, flag) = match s {
                Sanitizer::Address => ("PK_EMU_ASAN", "-fsanitize=address"),
                Sanitizer::Thread => ("PK_EMU_TSAN", "-fsanitize=thread"),
            };
            build.define(define, "1");
            // Symbolized reports with whole stacks.
            build.debug(true).flag("-fno-omit-frame-pointer");
            if instrument {
                build.flag(flag);
            }
        }
    }
    build
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap();
    }
}

struct Nvcc {
    path: PathBuf,
    version: String,
}

fn find_nvcc(pinned: &Path) -> Option<Nvcc> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("NVCC") {
        candidates.push(p.into());
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(v) {
            candidates.push(Path::new(&p).join("bin/nvcc"));
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            candidates.push(d.join("nvcc"));
        }
    }
    candidates.push(pinned.to_path_buf());
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        if let Ok(o) = Command::new(&c).arg("--version").output() {
            if o.status.success() {
                let text = String::from_utf8_lossy(&o.stdout);
                let version = text
                    .lines()
                    .find_map(|l| l.split("release ").nth(1))
                    .map(|s| s.split(',').next().unwrap_or(s).trim().to_string())
                    .unwrap_or_else(|| "unknown".into());
                return Some(Nvcc { path: c, version });
            }
        }
    }
    None
}

fn fnv1a(chunks: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for c in chunks {
        for &b in *c {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Compiles every module (in parallel, one nvcc per module) and returns the fatbin paths.
fn build_cuda(
    nvcc: &Nvcc,
    kernels: &Path,
    out: &Path,
    modules: &[String],
    headers: &[u8],
    manifest: &Path,
) -> Vec<PathBuf> {
    let archs = std::env::var("PK_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into());
    let archs: Vec<String> = archs.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    assert!(
        !archs.is_empty() && archs.iter().all(|a| a.chars().all(|c| c.is_ascii_alphanumeric())),
        "PK_CUDA_ARCHS must be a comma-separated list like 80,86,89,90"
    );
    let mut flags: Vec<String> = vec![
        "-fatbin".into(),
        "-std=c++17".into(),
        "-O3".into(),
        "-Xptxas".into(),
        "-v".into(),
        format!("-I{}", kernels.display()),
    ];
    for a in &archs {
        // sm_90 is built as sm_90a, whose SASS the 9.0 GPUs (H100, H200) run: the warpgroup
        // MMA (wgmma) exists only there. The kernels that use it trap on other targets.
        let a = if a == "90" { "90a" } else { a.as_str() };
        flags.push("-gencode".into());
        flags.push(format!("arch=compute_{a},code=sm_{a}"));
    }
    flags.push("-gencode".into());
    flags.push(format!("arch=compute_{0},code=compute_{0}", archs[0]));

    let cache =
        std::env::var("PK_NVCC_CACHE").map(PathBuf::from).unwrap_or_else(|_| manifest.join("target/pk-nvcc-cache"));
    fs::create_dir_all(&cache).unwrap();
    let dir = out.join("cuda");
    fs::create_dir_all(&dir).unwrap();

    let jobs: Vec<_> = modules
        .iter()
        .map(|m| {
            let src = kernels.join(format!("{m}.cu"));
            let text = fs::read(&src).unwrap();
            let key = fnv1a(&[
                nvcc.path.to_string_lossy().as_bytes(),
                nvcc.version.as_bytes(),
                flags.join(" ").as_bytes(),
                headers,
                &text,
            ]);
            let cached = cache.join(format!("{m}-{key:016x}.fatbin"));
            let cached_report = cache.join(format!("{m}-{key:016x}.txt"));
            let flags = flags.clone();
            let nvcc_path = nvcc.path.clone();
            std::thread::spawn(move || {
                if !(cached.exists() && cached_report.exists()) {
                    let tmp = cached.with_extension("tmp");
                    let o = Command::new(&nvcc_path)
                        .args(&flags)
                        .arg(&src)
                        .arg("-o")
                        .arg(&tmp)
                        .output()
                        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc_path.display()));
                    let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                    if !o.status.success() {
                        panic!("nvcc failed on {}:\n{log}", src.display());
                    }
                    fs::write(&cached_report, &log).unwrap();
                    fs::rename(&tmp, &cached).unwrap();
                }
                (cached, fs::read_to_string(&cached_report).unwrap())
            })
        })
        .collect();

    let mut report = format!(
        "nvcc {} ({}), SASS for sm_{}, PTX for compute_{}\n",
        nvcc.version,
        nvcc.path.display(),
        archs.join(", sm_"),
        archs[0]
    );
    let mut paths = Vec::new();
    for (m, job) in modules.iter().zip(jobs) {
        let (fatbin, log) = job.join().expect("nvcc thread");
        let dst = dir.join(format!("{m}.fatbin"));
        fs::copy(&fatbin, &dst).unwrap();
        paths.push(dst);
        let _ = writeln!(report, "\n== kernels/{m}.cu");
        report.push_str(&summarize_ptxas(m, &log));
    }
    fs::write(out.join("kernels-resource-report.txt"), &report).unwrap();
    paths
}

/// One line per (kernel, arch): registers, spills, shared memory. Spills become cargo
/// warnings.
fn summarize_ptxas(module: &str, log: &str) -> String {
    let mut out = String::new();
    let mut kernel = String::new();
    let mut arch = String::new();
    let mut spill = String::new();
    for line in log.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("ptxas info    : Compiling entry function '") {
            let mut it = rest.split('\'');
            kernel = it.next().unwrap_or("").to_string();
            arch = rest.split("for '").nth(1).and_then(|s| s.split('\'').next()).unwrap_or("").to_string();
        } else if l.contains("bytes spill stores") {
            spill = l.to_string();
        } else if let Some(used) = l.strip_prefix("ptxas info    : Used ") {
            let _ = writeln!(out, "{kernel:<44} {arch:<8} used {used}; {spill}");
            let stores = spill
                .split(',')
                .find(|s| s.contains("spill stores"))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            if stores > 0 {
                println!("cargo:warning=prunekit: kernel {kernel} ({module}.cu, {arch}) spills registers: {spill}");
            }
            spill.clear();
        } else if l.contains("error") || l.starts_with("ptxas warning") {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}

fn write_rust_table(out: &Path, modules: &[String], fatbins: Option<&Vec<PathBuf>>, nvcc: Option<&Nvcc>) {
    let mut s = String::new();
    s.push_str("// generated by build.rs\n");
    let _ = writeln!(
        s,
        "pub const NVCC_VERSION: Option<&str> = {};",
        match nvcc {
            Some(n) => format!("Some({:?})", n.version),
            None => "None".into(),
        }
    );
    let _ =
        writeln!(s, "pub const RESOURCE_REPORT: &str = include_str!({:?});", out.join("kernels-resource-report.txt"));
    s.push_str("extern \"C\" {\n");
    for m in modules {
        let _ = writeln!(s, "    fn pk_emu_module_{m}() -> *const EmuModule;");
    }
    for (variant, _, _) in EMU_FAULTS {
        let _ = writeln!(s, "    fn pk_emu_module_{variant}() -> *const EmuModule;");
    }
    s.push_str("}\n");
    s.push_str("pub static MODULES: &[ModuleSource] = &[\n");
    for (i, m) in modules.iter().enumerate() {
        let fatbin = match fatbins {
            Some(f) => format!("Some(include_bytes!({:?}))", f[i]),
            None => "None".into(),
        };
        let _ = writeln!(s, "    ModuleSource {{ name: {m:?}, fatbin: {fatbin}, emu: pk_emu_module_{m} }},");
    }
    s.push_str("];\n");
    s.push_str("/// Emulation-only modules with a planted bug: (variant, the module it stands in for).\n");
    s.push_str("pub static EMU_FAULTS: &[(ModuleSource, &str)] = &[\n");
    for (variant, m, _) in EMU_FAULTS {
        let _ = writeln!(
            s,
            "    (ModuleSource {{ name: {variant:?}, fatbin: None, emu: pk_emu_module_{variant} }}, {m:?}),"
        );
    }
    s.push_str("];\n");
    fs::write(out.join("kernels.rs"), s).unwrap();
}
