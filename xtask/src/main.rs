//! Project tasks: `cargo xtask setup | test | bench | daemon`.
//!
//! xtask does not build the eBPF object (`agent/build.rs` does); it orchestrates.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and packages the build and tests need (scripts/setup.sh)
    Setup,
    /// Set up, build, then run every unit and integration test (needs root)
    Test {
        /// Extra arguments for `cargo test`, after `--`
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode, and run the benchmarks (prints ratios against baselines)
    Bench,
    /// Set up, build in release mode, and run the daemon on its embedded defaults
    Daemon,
    /// Build in release mode and install as a systemd service (binary, unit, admin group)
    Install,
}

fn main() -> Result<()> {
    let root = workspace_root()?;
    match Cli::parse().task {
        Task::Setup => setup(&root),
        Task::Test { args } => {
            setup(&root)?;
            // The integration tests run the `bulkhead` binary; cargo builds a package's binaries
            // only for that package's own tests, so build it first.
            cargo(&root, &["build", "--package", "bulkhead", "--bins"])?;
            // The default members: every crate but the no_std eBPF one.
            let mut test = vec!["test"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cargo(&root, &test)
        }
        Task::Bench => {
            setup(&root)?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "--package",
                    "bulkhead",
                    "--package",
                    "bulkhead-tests",
                    "--bins",
                ],
            )?;
            let bin = root.join("target/release/bench-foundation");
            run(Command::new(&bin).env("BULKHEAD_BIN", root.join("target/release/bulkhead")))?;
            println!();
            run(&mut Command::new(root.join("target/release/bench-store")))?;
            println!();
            run(&mut Command::new(
                root.join("target/release/bench-postgres"),
            ))
        }
        Task::Daemon => {
            setup(&root)?;
            cargo(
                &root,
                &["run", "--release", "--package", "bulkhead", "--", "daemon"],
            )
        }
        Task::Install => install(&root),
    }
}

/// Installs the release binary, the systemd unit, the example configuration and the
/// `bulkhead` admin group; enables the service where systemd runs.
fn install(root: &Path) -> Result<()> {
    setup(root)?;
    cargo(
        root,
        &["build", "--release", "--package", "bulkhead", "--bins"],
    )?;
    let copy = |from: &str, to: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::copy(root.join(from), to).with_context(|| format!("installing {to}"))?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
        println!("installed {to}");
        Ok(())
    };
    copy("target/release/bulkhead", "/usr/local/bin/bulkhead", 0o755)?;
    std::fs::create_dir_all("/etc/bulkhead/policies")?;
    copy(
        "bulkhead.example.toml",
        "/etc/bulkhead/bulkhead.example.toml",
        0o644,
    )?;
    // The packaged unit runs /usr/bin/bulkhead (the Debian package's path); this one runs
    // the copy above.
    let unit = std::fs::read_to_string(root.join("packaging/bulkhead.service"))?
        .replace("/usr/bin/bulkhead", "/usr/local/bin/bulkhead");
    std::fs::write("/etc/systemd/system/bulkhead.service", unit)?;
    println!("installed /etc/systemd/system/bulkhead.service");
    copy(
        "packaging/bulkhead-governed.slice",
        "/etc/systemd/system/bulkhead-governed.slice",
        0o644,
    )?;
    let group_exists = std::fs::read_to_string("/etc/group")?
        .lines()
        .any(|l| l.starts_with("bulkhead:"));
    if !group_exists {
        run(Command::new("groupadd").args(["--system", "bulkhead"]))?;
        println!("created group bulkhead (its members may use the bulkhead CLI)");
    }
    if Path::new("/run/systemd/system").exists() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        run(Command::new("systemctl").args(["enable", "--now", "bulkhead.service"]))?;
        println!("bulkhead.service enabled and started");
    } else {
        println!("systemd is not running here: start the daemon with `bulkhead daemon`");
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask lives in the workspace")?
        .to_path_buf())
}

fn setup(root: &Path) -> Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(root).args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
