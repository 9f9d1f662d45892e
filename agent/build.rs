//! Builds the eBPF object (`agent-ebpf`) and leaves it in `OUT_DIR/bulkhead-ebpf.o` for
//! `include_bytes!`.
//!
//! Two toolchains are accepted, tried in this order:
//! 1. Debian's `rustc-web` (`/usr/bin/rustc`, `/usr/bin/cargo`) with the prebuilt `core` for
//!    `bpfel-unknown-none` from `libstd-rust-web-dev-bpf` (what `scripts/setup.sh` installs);
//! 2. rustup nightly with `rust-src`, building `core` with `-Z build-std`.
//!
//! Both need `bpf-linker` on `PATH` (or in `$CARGO_HOME/bin`). `BULKHEAD_SKIP_EBPF=1` embeds an
//! empty object instead, for lint-only builds; such a binary refuses to start the daemon.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("agent/ has a parent")?
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("bulkhead-ebpf.o");

    println!("cargo:rerun-if-env-changed=BULKHEAD_SKIP_EBPF");
    for dir in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }

    if env::var_os("BULKHEAD_SKIP_EBPF").is_some_and(|v| v == "1") {
        std::fs::write(&object, [])?;
        return Ok(());
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = ebpf_cargo(&workspace)?;
    cmd.current_dir(&workspace)
        .args([
            "build",
            "-p",
            "bulkhead-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args([
            "--config",
            "profile.release.panic=\"abort\"",
            "--config",
            "profile.release.lto=true",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}); run scripts/setup.sh first");
    }
    let built = target_dir.join("bpfel-unknown-none/release/bulkhead-ebpf");
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(())
}

/// A `cargo` command for the bpf target with a clean environment: nothing of the outer build
/// (its `RUSTC`, flags, wrappers, target dir, jobserver) may leak into the nested one.
fn ebpf_cargo(workspace: &Path) -> Result<Command> {
    let home = env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let cargo_home = env::var_os("CARGO_HOME")
        .map_or_else(|| PathBuf::from(&home).join(".cargo"), PathBuf::from);
    let mut path = OsString::from(cargo_home.join("bin"));
    if let Some(p) = env::var_os("PATH") {
        path.push(":");
        path.push(p);
    }
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");

    let mut cmd;
    if Path::new(DEBIAN_RUSTC).exists()
        && Path::new(DEBIAN_CARGO).exists()
        && Path::new(DEBIAN_BPF_CORE).exists()
    {
        cmd = Command::new(DEBIAN_CARGO);
        cmd.env_clear()
            .env("RUSTC", DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1");
    } else if nightly_has_rust_src(workspace) {
        cmd = Command::new("rustup");
        cmd.env_clear();
        cmd.args(["run", "nightly", "cargo"]);
        cmd.args(["-Z", "build-std=core"]);
    } else {
        bail!(
            "no toolchain for the eBPF programs: install Debian's rustc-web, cargo-web and \
             libstd-rust-web-dev-bpf, or rustup nightly with rust-src (scripts/setup.sh does the \
             first), or set BULKHEAD_SKIP_EBPF=1 for a lint-only build"
        );
    }
    cmd.env("PATH", path)
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    if let Some(rustup_home) = env::var_os("RUSTUP_HOME") {
        cmd.env("RUSTUP_HOME", rustup_home);
    }
    Ok(cmd)
}

fn nightly_has_rust_src(workspace: &Path) -> bool {
    Command::new("rustup")
        .current_dir(workspace)
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}
