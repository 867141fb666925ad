//! Builds the BPF programs (`proxy-ebpf`) with aya-build, the aya-template way,
//! and leaves the object at `$OUT_DIR/proxy-ebpf` for `include_bytes_aligned!`.
//!
//! Needs the `nightly` toolchain (with `rust-src`) and `bpf-linker` on `PATH`
//! (`cargo xtask setup` installs both). With `PROXYD_SKIP_EBPF=1` the build
//! writes an empty object instead and warns: the daemon then builds and runs
//! with the userspace relay only.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{anyhow, bail, Context as _};

const EBPF_PACKAGE: &str = "proxy-ebpf";
const SKIP_VAR: &str = "PROXYD_SKIP_EBPF";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP_VAR}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_PACKAGE);

    if env::var_os(SKIP_VAR).is_some_and(|v| v == "1") {
        fs::write(&object, b"").with_context(|| format!("writing {}", object.display()))?;
        println!("cargo:warning={SKIP_VAR}=1: BPF programs not built; this proxyd has only the userspace data path");
        return Ok(());
    }

    check_toolchain()?;

    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("package {EBPF_PACKAGE} not found in the workspace"))?;
    let root_dir =
        package.manifest_path.parent().ok_or_else(|| anyhow!("{} has no parent folder", package.manifest_path))?;
    // Also rebuild when the shared types change (aya-build watches only the
    // BPF crate's own folder).
    if let Some(common) = root_dir.parent().map(|p| p.join("proxy-common")) {
        println!("cargo:rerun-if-changed={common}");
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: EBPF_PACKAGE, root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the BPF programs (set PROXYD_SKIP_EBPF=1 to build without them)")?;
    Ok(())
}

/// Fails early, with what to do, when the BPF toolchain is missing.
fn check_toolchain() -> anyhow::Result<()> {
    const HINT: &str = "run `cargo xtask setup`, or build without the kernel data path with PROXYD_SKIP_EBPF=1";
    let linker = Command::new("bpf-linker").arg("--version").output();
    match linker {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "bpf-linker is on PATH but `bpf-linker --version` failed ({}): {}; {HINT}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("bpf-linker not found on PATH ({e}); {HINT}"),
    }
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "--version"]).output();
    match nightly {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "the nightly toolchain is not usable (`rustup run nightly rustc --version`: {}); {HINT}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("rustup not found ({e}); the BPF crate needs the nightly toolchain; {HINT}"),
    }
    Ok(())
}
