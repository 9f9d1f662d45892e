//! `bulkhead trust install | remove`: the gateway's CA in the system trust store
//! (`update-ca-certificates`) and its SSH CA in `/etc/ssh/ssh_known_hosts`, for tools outside
//! `bulkhead run` (which hands governed tools trust of their own, touching no system file). `--root` works on another file system tree (an
//! image being built, a test) instead of `/`.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::CliError;
use crate::config::Config;

/// The name the gateway's CA has in the local certificate directory.
pub const CA_FILE_NAME: &str = "bulkhead-gateway.crt";

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Add the gateway's CA to the system trust store (update-ca-certificates) and its SSH CA
    /// to /etc/ssh/ssh_known_hosts
    Install(RootArg),
    /// Remove it again (the package's purge does the same)
    Remove(RootArg),
}

#[derive(Debug, clap::Args)]
pub struct RootArg {
    /// Work on this file system tree instead of / (an image being built)
    #[arg(long, value_name = "DIR", hide = true)]
    pub root: Option<PathBuf>,
}

struct Paths {
    known_hosts: PathBuf,
    local: PathBuf,
    etc_certs: PathBuf,
    conf: PathBuf,
    hooks: PathBuf,
    root: Option<PathBuf>,
}

impl Paths {
    fn new(root: Option<&Path>) -> Self {
        let at = |p: &str| root.map_or_else(|| PathBuf::from(p), |r| r.join(&p[1..]));
        Self {
            known_hosts: at("/etc/ssh/ssh_known_hosts"),
            local: at("/usr/local/share/ca-certificates"),
            etc_certs: at("/etc/ssl/certs"),
            conf: at("/etc/ca-certificates.conf"),
            hooks: at("/etc/ca-certificates/update.d"),
            root: root.map(Path::to_path_buf),
        }
    }

    /// Without `--fresh`: a removed certificate is found by its dangling link and taken out of
    /// the bundle; `--fresh` clears the links first and then leaves the bundle as it was.
    fn update(&self) -> Result<(), CliError> {
        let mut cmd = std::process::Command::new("update-ca-certificates");
        if self.root.is_some() {
            cmd.arg("--localcertsdir")
                .arg(&self.local)
                .arg("--etccertsdir")
                .arg(&self.etc_certs)
                .arg("--certsconf")
                .arg(&self.conf)
                .arg("--hooksdir")
                .arg(&self.hooks);
        }
        let out = cmd.output().map_err(|e| {
            CliError::Other(format!(
                "update-ca-certificates: {e} (install Debian's ca-certificates)"
            ))
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(CliError::Other(format!(
                "update-ca-certificates failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

pub fn run(config: &Config, command: &TrustCommand) -> Result<(), CliError> {
    match command {
        TrustCommand::Install(r) => install(config, &Paths::new(r.root.as_deref())),
        TrustCommand::Remove(r) => remove(&Paths::new(r.root.as_deref())),
    }
}

fn install(config: &Config, paths: &Paths) -> Result<(), CliError> {
    let ca = config.daemon.state_dir.join("ca/ca.pem");
    let pem = std::fs::read_to_string(&ca).map_err(|e| {
        CliError::Other(format!(
            "{}: {e}: the daemon creates its CA on first start; start it, then run this again",
            ca.display()
        ))
    })?;
    let to = paths.local.join(CA_FILE_NAME);
    let written = std::fs::create_dir_all(&paths.local).and_then(|()| std::fs::write(&to, pem));
    written.map_err(|e| CliError::Other(format!("{}: {e}", to.display())))?;
    paths.update()?;
    println!(
        "the gateway CA is trusted system-wide ({}); `bulkhead trust remove` undoes it",
        to.display()
    );
    if let Ok(line) = crate::proxy::ssh::ca::export_line(&config.daemon.state_dir) {
        let text = std::fs::read_to_string(&paths.known_hosts).unwrap_or_default();
        let mut kept = without_ssh_ca(&text);
        kept.push_str(line.trim_end());
        kept.push('\n');
        let written = paths
            .known_hosts
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&paths.known_hosts, kept));
        written.map_err(|e| CliError::Other(format!("{}: {e}", paths.known_hosts.display())))?;
        println!(
            "OpenSSH clients trust the gateway's SSH CA ({})",
            paths.known_hosts.display()
        );
    }
    Ok(())
}

/// The known_hosts text without the gateway's SSH CA line (it ends `bulkhead SSH CA`).
fn without_ssh_ca(text: &str) -> String {
    text.lines()
        .filter(|l| !(l.starts_with("@cert-authority") && l.ends_with(" bulkhead SSH CA")))
        .flat_map(|l| [l, "\n"])
        .collect()
}

fn remove(paths: &Paths) -> Result<(), CliError> {
    if let Ok(text) = std::fs::read_to_string(&paths.known_hosts) {
        let kept = without_ssh_ca(&text);
        if kept != text {
            // A file that held only the gateway's line (`trust install` made it) goes too.
            let done = if kept.trim().is_empty() {
                std::fs::remove_file(&paths.known_hosts)
            } else {
                std::fs::write(&paths.known_hosts, kept)
            };
            done.map_err(|e| CliError::Other(format!("{}: {e}", paths.known_hosts.display())))?;
            println!(
                "the gateway's SSH CA is no longer in {}",
                paths.known_hosts.display()
            );
        }
    }
    let at = paths.local.join(CA_FILE_NAME);
    match std::fs::remove_file(&at) {
        Ok(()) => {
            paths.update()?;
            remove_dangling_links(paths);
            println!("the gateway CA is no longer trusted system-wide");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("the gateway CA was not in the system trust store");
        }
        Err(e) => return Err(CliError::Other(format!("{}: {e}", at.display()))),
    }
    Ok(())
}

/// update-ca-certificates takes a removed local CA out of the bundle but leaves its links in
/// /etc/ssl/certs (`bulkhead-gateway.pem` and the hash link to it) dangling: remove those two.
fn remove_dangling_links(paths: &Paths) {
    let pem = Path::new(CA_FILE_NAME).with_extension("pem");
    let ours = |target: &Path| target == paths.local.join(CA_FILE_NAME) || target == pem;
    let Ok(entries) = std::fs::read_dir(&paths.etc_certs) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let dangling = std::fs::metadata(&path).is_err();
        if dangling && std::fs::read_link(&path).is_ok_and(|t| ours(&t)) {
            let _ = std::fs::remove_file(&path);
        }
    }
}
