//! How a governed OpenSSH client comes to trust the gateway's host certificate without any of
//! its user's files changing.
//!
//! OpenSSH reads known hosts only from files (no environment variable names one), so the
//! daemon writes, under its run directory (world-readable):
//!
//! - `ssh/ssh_known_hosts`: the `@cert-authority * ssh-ed25519 ...` line of the SSH CA;
//! - `ssh/bin/ssh`, `ssh/bin/scp`, `ssh/bin/sftp`: wrappers that run the system's client with
//!   `-o GlobalKnownHostsFile=<that file> /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2`
//!   (the system's files stay trusted; the user's `~/.ssh/known_hosts` is read as usual).
//!
//! `bulkhead run` puts `ssh/bin` first on the command's `PATH`. A tool that runs
//! `/usr/bin/ssh` by its full path, or another SSH implementation, needs the line added to
//! its own known hosts (`bulkhead ca export --ssh`).

use std::{
    ffi::{OsStr, OsString},
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// The clients wrapped, each with the places its system binary is looked for.
const CLIENTS: [&str; 3] = ["ssh", "scp", "sftp"];
const SYSTEM_DIRS: [&str; 3] = ["/usr/bin", "/bin", "/usr/local/bin"];

pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("ssh")
}

/// Writes the known hosts file and the wrappers (replacing older ones).
pub fn write(run_dir: &Path, known_hosts_line: &str) -> io::Result<()> {
    let dir = dir(run_dir);
    let bin = dir.join("bin");
    let known_hosts = dir.join("ssh_known_hosts");
    let text = known_hosts.to_str().unwrap_or_default();
    // GlobalKnownHostsFile splits its value at whitespace.
    if text.is_empty() || text.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: a path with spaces or quotes", known_hosts.display()),
        ));
    }
    std::fs::create_dir_all(&bin)?;
    for d in [&dir, &bin] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    replace(&known_hosts, &format!("{known_hosts_line}\n"), 0o644)?;
    for client in CLIENTS {
        let Some(system) = SYSTEM_DIRS
            .iter()
            .map(|d| Path::new(d).join(client))
            .find(|p| p.is_file())
        else {
            continue;
        };
        let script = format!(
            "#!/bin/sh\n# Written by the bulkhead daemon: {client}, trusting the gateway's SSH CA besides the system's known hosts.\n\
             exec {} -o 'GlobalKnownHostsFile={text} /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2' \"$@\"\n",
            system.display()
        );
        replace(&bin.join(client), &script, 0o755)?;
    }
    Ok(())
}

/// Writes `path` whole through a temporary file, so a client never reads half of it.
fn replace(path: &Path, text: &str, mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// `PATH` for a governed command: the wrappers' directory first, when the daemon wrote it.
pub fn path_with_wrappers(run_dir: &Path, path: Option<&OsStr>) -> Option<OsString> {
    let bin = dir(run_dir).join("bin");
    if !bin.join("ssh").is_file() {
        return None;
    }
    let mut out = bin.into_os_string();
    out.push(":");
    out.push(path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin")));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappers_name_the_known_hosts_file_and_come_first_on_the_path() {
        let run = tempfile::tempdir().unwrap();
        assert_eq!(path_with_wrappers(run.path(), None), None);
        write(run.path(), "@cert-authority * ssh-ed25519 AAAA x").unwrap();
        let kh = std::fs::read_to_string(dir(run.path()).join("ssh_known_hosts")).unwrap();
        assert_eq!(kh, "@cert-authority * ssh-ed25519 AAAA x\n");
        if Path::new("/usr/bin/ssh").is_file() {
            let script = std::fs::read_to_string(dir(run.path()).join("bin/ssh")).unwrap();
            assert!(
                script.contains("exec /usr/bin/ssh -o 'GlobalKnownHostsFile="),
                "{script}"
            );
            let path = path_with_wrappers(run.path(), Some(OsStr::new("/usr/bin"))).unwrap();
            assert_eq!(
                path,
                OsString::from(format!(
                    "{}:/usr/bin",
                    dir(run.path()).join("bin").display()
                ))
            );
        }
        assert!(write(Path::new("/tmp/with space"), "x").is_err());
    }
}
