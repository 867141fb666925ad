//! `cargo xtask`: the developer tasks. `setup` installs what is missing (and
//! is quick when nothing is), `build` builds everything, `run` starts a local
//! daemon with a working default, `lint` checks formatting, clippy and the
//! module graph, `test` runs the lint and the whole suite (CI calls it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;

mod bench;
mod lint;

#[derive(Parser)]
#[command(about = "proxyd developer tasks")]
enum Task {
    /// Install what building and testing need: Debian packages, rust-src, bpf-linker.
    Setup,
    /// Build the daemon (with its BPF programs).
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the daemon in the foreground, enabled on 127.0.0.1:1080.
    Run {
        /// Data path: auto, kernel or userspace.
        #[arg(long, default_value = "auto")]
        data_path: String,
    },
    /// Build everything and run the daemon with the BPF programs loaded (data-path=kernel).
    BuildAndLoad,
    /// Benchmark proxyd (kernel and userspace) against Dante and the direct path.
    Bench(bench::BenchArgs),
    /// Run every fuzz target for a bounded time from the committed seed corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Check formatting (rustfmt), clippy (host crates, and the BPF crate for its target) and the
    /// daemon's module graph (no import cycle).
    Lint,
    /// Set up, lint, build, and run every test (unit and integration).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

/// Debian packages the tests and the bench use (real clients and peers).
const DEBIAN_PACKAGES: &[&str] = &[
    "curl",
    "iproute2",
    "bpftool",
    "dante-server",
    "dante-client",
    "proxychains4",
    "python3-socks",
    "python3-pyftpdlib",
    "iperf3",
    "microsocks",
    "tmux",
    "systemd",
    "python3-prometheus-client",
    "groff-base",
    "nftables",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    match Task::parse() {
        Task::Setup => setup(),
        Task::Build { release } => build(release),
        Task::Run { data_path } => run(&data_path),
        Task::Lint => lint(),
        Task::Test { args } => test(&args),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::BuildAndLoad => run("kernel"),
        Task::Bench(args) => {
            setup()?;
            build(true)?;
            bench::run(args)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs a command; fails with the command line when it fails.
fn exec(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}

/// True when `cmd` runs and exits 0 (output discarded).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    // SAFETY-free check: /proc/self/status has the effective uid on the Uid line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    // Debian packages.
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
    } else if is_root() {
        eprintln!("setup: installing {}", missing.join(" "));
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    } else {
        eprintln!(
            "setup: not root, cannot install Debian packages: {} (tests that need them will skip)",
            missing.join(" ")
        );
    }

    // rust-src for the nightly toolchain (the BPF target builds core from source).
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")));
    if has_src {
        eprintln!("setup: nightly rust-src present");
    } else {
        exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    // The Kubernetes schemas the manifests are checked against (PyPI only).
    let has_validator = succeeds(Command::new("python3").args(["-c", "import kubernetes_validate"]));
    if has_validator {
        eprintln!("setup: kubernetes-validate present");
    } else {
        eprintln!("setup: installing kubernetes-validate (pip)");
        exec(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            "kubernetes-validate",
        ]))?;
    }

    // bpf-linker, built against the nightly toolchain's own libLLVM.
    let linker_ok = succeeds(Command::new("bpf-linker").arg("--version").env_remove("LD_LIBRARY_PATH"));
    if linker_ok {
        eprintln!("setup: bpf-linker present");
    } else {
        install_bpf_linker()?;
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".cache/proxyd/llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let sysroot = Command::new("rustc").args(["+nightly", "--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim());
    let llvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .context("the nightly toolchain has no libLLVM (rustup component add llvm-tools?)")?;
    let name = llvm.file_name().unwrap().to_owned();
    for link in [lib.join("libLLVM.so"), lib.join(&name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {}", llvm.display());
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !succeeds(Command::new("bpf-linker").arg("--version").env_remove("LD_LIBRARY_PATH")) {
        bail!("bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--package", "proxy-daemon"]);
    if release {
        c.arg("--release");
    }
    exec(&mut c)
}

fn run(data_path: &str) -> Result<()> {
    setup()?;
    build(true)?;
    let dir = root().join(".proxyd");
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("config.rsc");
    if !state.exists() {
        std::fs::write(
            &state,
            "# proxyd configuration written by `cargo xtask run`: local clients only\n\
             /ip socks\nset enabled=yes port=1080 listen-address=127.0.0.1\n\
             /ip socks access\nadd src-address=127.0.0.0/8 action=allow\nadd action=deny\n",
        )?;
    }
    let control = if is_root() { PathBuf::from("/run/proxyd/control.sock") } else { dir.join("control.sock") };
    let bin = root().join("target/release/proxyd");
    eprintln!(
        "\nproxyd: SOCKS4, SOCKS4a and SOCKS5 on 127.0.0.1:1080, state in {}.\nIn another shell:\n  {}{} ip socks print\n  curl --socks4a 127.0.0.1:1080 http://example.test/\nCtrl-C stops it.\n",
        state.display(),
        if is_root() { String::new() } else { format!("PROXYD_CONTROL={} ", control.display()) },
        bin.display()
    );
    exec(
        Command::new(&bin)
            .args(["run", "--data-path", data_path])
            .arg("--state")
            .arg(&state)
            .arg("--control")
            .arg(&control),
    )
}

fn lint() -> Result<()> {
    setup()?;
    lint::run(&root(), || {
        // The way build.rs (aya-build) compiles it: nightly, core from source.
        // A separate target dir: this build must not invalidate the host's.
        let mut c = Command::new("rustup");
        c.args(["run", "nightly", "cargo", "clippy", "--package", "proxy-ebpf", "-Z", "build-std=core"])
            .args(["--target", "bpfel-unknown-none", "--target-dir", "target/lint-bpf", "--", "-D", "warnings"])
            .current_dir(root());
        for var in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN", "RUSTC_WRAPPER", "CARGO_ENCODED_RUSTFLAGS"] {
            c.env_remove(var);
        }
        exec(&mut c)
    })
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    if args.is_empty() {
        lint().context("the lint step failed (run `cargo xtask lint`)")?;
        validate_manifests()?;
    }
    build(false)?;
    let bin = root().join("target/debug/proxyd");
    exec(cargo().args(["test", "--no-fail-fast"]).args(args).env("PROXYD_BIN", &bin))?;
    if args.is_empty() {
        // A few seconds of every benchmark measurement, so the bench cannot rot
        // (no timing is asserted: it must run and write its report).
        eprintln!("test: bench smoke run");
        bench::run(bench::BenchArgs {
            smoke: true,
            repeats: None,
            seconds: None,
            systems: "direct,dante,auto,userspace,kernel,microsocks,auto-socks5".into(),
            tunnels: None,
            tests: "bulk,latency,slow,mixed,scale,conn".into(),
            no_iperf: true,
            out: None,
            proxyd: Some(bin),
        })
        .context("the bench smoke run failed")?;
        check_smoke_report(&root().join("target/bench/smoke/results.json"))?;
    }
    Ok(())
}

/// The Kubernetes manifests against the API's schemas (strict: no unknown fields).
fn validate_manifests() -> Result<()> {
    let dir = root().join("packaging/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    eprintln!("test: validating {} Kubernetes manifests", files.len());
    exec(Command::new("python3").args(["-m", "kubernetes_validate", "--strict", "--quiet"]).args(&files))
        .context("the Kubernetes manifests do not validate")
}

/// The smoke run must have measured every system (the kernel path only where
/// BPF can load: as root), or the bench has rotted.
fn check_smoke_report(path: &Path) -> Result<()> {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path)?).context("bench smoke report")?;
    let systems = report["systems"].as_array().context("bench smoke report has no systems")?;
    for s in systems {
        let name = s["name"].as_str().unwrap_or("?");
        let optional = ["proxyd-kernel", "proxyd-auto", "proxyd-auto-socks5"].contains(&name) && !is_root();
        if s["available"] != serde_json::Value::Bool(true) {
            if !optional {
                bail!("bench smoke run: {name} was not measured: {}", s["reason"]);
            }
            continue;
        }
        // Figures every system gets (bulk and memory are not measured on all).
        for key in ["lat_mean_us", "lat_threaded_mean_us", "pp8_msgs", "conn_c1", "conn_c1_threaded"] {
            if s["metrics"][key]["median"].is_null() {
                bail!("bench smoke run: {name} has no {key} figure: {}", s["metrics"][key]["note"]);
            }
        }
    }
    // As root the run has a network namespace of its own (bench/netns.rs).
    let network = report["machine"]["network"].as_str().unwrap_or("");
    if is_root() && !network.starts_with("a network namespace of its own") {
        bail!("bench smoke run: as root it should run in a namespace of its own, ran in {network:?}");
    }
    eprintln!("test: bench smoke run measured {} systems", systems.len());
    Ok(())
}

/// Fuzz targets under fuzz/ (cargo-fuzz, nightly).
const FUZZ_TARGETS: &[&str] = &["socks4_request", "socks5_messages", "command_script"];

fn fuzz(seconds: u32) -> Result<()> {
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        exec(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root().join("fuzz");
    for target in FUZZ_TARGETS {
        // Work on a copy so the committed seed corpus changes only on purpose.
        let work = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        for seed in std::fs::read_dir(fuzz_dir.join("corpus").join(target))? {
            let seed = seed?.path();
            std::fs::copy(&seed, work.join(seed.file_name().unwrap()))?;
        }
        eprintln!("fuzz: {target} for {seconds}s");
        exec(
            Command::new("cargo")
                .current_dir(&fuzz_dir)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&work)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .env("PROXYD_SKIP_EBPF", "1"),
        )
        .with_context(|| format!("fuzz target {target} found a problem (see fuzz/artifacts/{target}/)"))?;
    }
    Ok(())
}
