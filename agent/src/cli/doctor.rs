//! `bulkhead doctor`: what an admin checks after installing, in one place. Each check says what
//! it found and, when something is wrong, the command or key that fixes it. Exit status 1 when
//! a check fails (governing cannot work as configured), 0 with only warnings.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use serde::Serialize;

use super::{print_json, CliError};
use crate::{cgroup, config::Config, control};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// `bulkhead doctor [--json]`.
pub fn run(config: &Config, json: bool) -> Result<(), CliError> {
    let checks = checks(config);
    if json {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let tag = match c.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            println!("{tag}  {:<12} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("      {:<12} fix: {fix}", "");
            }
        }
        let count = |l| checks.iter().filter(|c| c.level == l).count();
        println!(
            "{} ok, {} warnings, {} failed",
            count(Level::Ok),
            count(Level::Warn),
            count(Level::Fail)
        );
    }
    if checks.iter().any(|c| c.level == Level::Fail) {
        return Err(CliError::Status(1));
    }
    Ok(())
}

/// Every check, in the order an admin would fix them: kernel, file systems, daemon, files.
pub fn checks(config: &Config) -> Vec<Check> {
    let mut out = vec![kernel(), btf()];
    let status = control::call(
        &config.control_socket(),
        &config.daemon.admin_group,
        &control::Request::Status,
    );
    out.push(bpf_lsm(status.as_ref().ok()));
    out.push(fast_path(config, status.as_ref().ok()));
    let mount = cgroup::cgroup2_mount();
    out.push(match &mount {
        Ok(m) => check("cgroup v2", Level::Ok, format!("mounted at {}", m.display())),
        Err(e) => check("cgroup v2", Level::Fail, e.to_string())
            .fix("mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd.unified_cgroup_hierarchy=1)"),
    });
    if let Ok(m) = &mount {
        out.push(match config.governed.resolve(m) {
            Ok(path) if path.is_dir() => {
                check("governed", Level::Ok, format!("cgroup {}", path.display()))
            }
            Ok(path) => check(
                "governed",
                Level::Warn,
                format!(
                    "cgroup {} does not exist yet (the daemon creates it)",
                    path.display()
                ),
            ),
            Err(e) => check("governed", Level::Fail, e.to_string())
                .fix("set [governed] cgroup or users in the configuration"),
        });
    }
    out.push(bpffs(&config.daemon.bpf_pin_dir));
    out.push(listener_port(config.listener.port));
    // A fail-open daemon attaches without pinning: no links is then what it should be.
    let fail_open = status
        .as_ref()
        .is_ok_and(|v| v["daemon"]["mode"] == "fail-open");
    let running = daemon(status, &mut out);
    out.push(pins(config, running, fail_open));
    out.push(state_dir(
        &config.daemon.state_dir,
        &config.daemon.admin_group,
    ));
    if running {
        out.push(control_socket(config));
    }
    out.push(policies(config));
    out.extend(credentials(config));
    out.push(ca_trust(config));
    out.extend(privileges(config));
    out
}

/// `6.1.0-18-amd64` -> (6, 1).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match kernel_version(release) {
        Some(v) if v < (5, 8) => check("kernel", Level::Fail, format!("{release}: BPF ring buffers need 5.8 or later")),
        Some(v) if v < (6, 7) => check(
            "kernel",
            Level::Warn,
            format!("{release}: no cgroup connect_unix hook before 6.7, so unix-socket connects of governed processes are not governed"),
        ),
        Some(_) => check("kernel", Level::Ok, format!("{release}: TCP, UDP and unix-socket hooks available")),
        None => check("kernel", Level::Warn, format!("cannot read the kernel version ({release:?})")),
    }
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        check("btf", Level::Ok, "/sys/kernel/btf/vmlinux present")
    } else {
        check(
            "btf",
            Level::Warn,
            "no kernel BTF: the unix-socket and BPF LSM programs cannot load",
        )
        .fix("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)")
    }
}

/// The kernel's LSM list, and what a running daemon could load: a kernel may list `bpf` and
/// still refuse BPF LSM programs (some virtual machines do).
fn bpf_lsm(status: Option<&serde_json::Value>) -> Check {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let in_use = status.and_then(|s| s["daemon"]["containment"]["socket_filter"].as_str());
    if lsms.split(',').any(|l| l.trim() == "bpf") {
        match in_use {
            Some(f) if f != crate::ebpf::SocketFilter::Lsm.describe() => check(
                "bpf lsm",
                Level::Warn,
                format!("listed ({}) but the daemon could not load its LSM program; socket() filter: {f}", lsms.trim()),
            ),
            _ => check("bpf lsm", Level::Ok, format!("active ({})", lsms.trim())),
        }
    } else {
        check(
            "bpf lsm",
            Level::Warn,
            "not active: socket() is filtered for inet families only (packet, vsock and other families are not)",
        )
        .fix(format!(
            "add bpf to the kernel's lsm= boot parameter (lsm={},bpf)",
            if lsms.trim().is_empty() { "landlock,lockdown,yama,apparmor" } else { lsms.trim() }
        ))
    }
}

/// The kernel fast path (`capture.fast_path`): asked for, and whether the daemon attached it.
fn fast_path(config: &Config, status: Option<&serde_json::Value>) -> Check {
    let in_use = status.and_then(|s| s["daemon"]["containment"]["fast_path"].as_str());
    match (config.capture.fast_path, in_use) {
        (false, _) => check("fast path", Level::Ok, "off (capture.fast_path = false)"),
        (true, Some("on")) => check(
            "fast path",
            Level::Warn,
            "on (experimental): on Linux 6.18 a governed program's blocking read can fail with \
             EAGAIN (docs/BENCHMARKS.md)",
        )
        .fix("set capture.fast_path = false unless every governed tool reads non-blocking"),
        (true, Some(other)) => check(
            "fast path",
            Level::Warn,
            format!("asked for, but the daemon runs without it ({other}); connections use TCP"),
        ),
        (true, None) => check(
            "fast path",
            Level::Ok,
            "asked for (capture.fast_path = true); the daemon is not running",
        ),
    }
}

fn bpffs(pin_dir: &Path) -> Check {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let probe = if pin_dir.exists() {
        pin_dir
    } else {
        pin_dir.parent().unwrap_or(pin_dir)
    };
    let Ok(path) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return check(
            "bpffs",
            Level::Fail,
            format!("bad path {}", probe.display()),
        );
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &raw mut st) } != 0 {
        return check(
            "bpffs",
            Level::Fail,
            format!("{}: {}", probe.display(), std::io::Error::last_os_error()),
        );
    }
    #[allow(clippy::unnecessary_cast, clippy::cast_lossless)]
    if st.f_type as i64 == BPF_FS_MAGIC {
        check(
            "bpffs",
            Level::Ok,
            format!("{} is on the BPF file system", probe.display()),
        )
    } else {
        check(
            "bpffs",
            Level::Fail,
            format!(
                "{} is not on the BPF file system: programs cannot stay pinned",
                probe.display()
            ),
        )
        .fix("mount -t bpf bpf /sys/fs/bpf")
    }
}

/// A port any local user could bind would receive governed connections while the daemon is down.
fn listener_port(port: u16) -> Check {
    let start = crate::daemon::unprivileged_port_start();
    if port < start {
        check(
            "listener",
            Level::Ok,
            format!("port {port} is privileged (below {start})"),
        )
    } else {
        check(
            "listener",
            Level::Warn,
            format!("port {port} can be bound by any local user (ip_unprivileged_port_start is {start}): while the daemon is down, such a user could receive governed connections"),
        )
        .fix(format!("set listener.port below {start} (the default is {})", crate::config::DEFAULT_LISTENER_PORT))
    }
}

/// Whether the daemon answers, with a check saying so.
fn daemon(status: Result<serde_json::Value, control::ClientError>, out: &mut Vec<Check>) -> bool {
    match status {
        Ok(v) => {
            let pid = v["daemon"]["pid"].as_u64().unwrap_or_default();
            let listeners = v["daemon"]["listeners"].to_string();
            out.push(check(
                "daemon",
                Level::Ok,
                format!("running, pid {pid}, listening on {listeners}"),
            ));
            true
        }
        Err(control::ClientError::NotRunning { path, stale }) => {
            out.push(
                check(
                    "daemon",
                    Level::Fail,
                    format!("not running ({})", control::socket_absence(&path, stale)),
                )
                .fix("systemctl start bulkhead (or: bulkhead daemon)"),
            );
            false
        }
        Err(e) => {
            out.push(check("daemon", Level::Warn, e.to_string()));
            false
        }
    }
}

fn pins(config: &Config, running: bool, fail_open: bool) -> Check {
    let pin_dir = &config.daemon.bpf_pin_dir;
    let links = crate::ebpf::pinned_links(pin_dir).len();
    let to = control::Redirect::read(pin_dir, None)
        .map(|r| r.to.join(", "))
        .unwrap_or_default();
    match (links, running) {
        (0, true) if fail_open => check(
            "programs",
            Level::Warn,
            "attached without pins (fail open): if the daemon stops, governed processes connect directly",
        )
        .fix("run the daemon without --fail-open (daemon.fail_open = false) to fail closed"),
        (0, true) => check("programs", Level::Fail, "the daemon runs but no links are pinned"),
        (0, false) => check("programs", Level::Warn, "none pinned: governed processes connect directly")
            .fix("start the daemon"),
        (n, true) => check("programs", Level::Ok, format!("{n} links pinned in {}, connects go to {to}", pin_dir.display())),
        (n, false) => check(
            "programs",
            Level::Warn,
            format!("{n} links pinned, no daemon: governed connects to {to} are refused (fail closed)"),
        )
        .fix("start the daemon, or `bulkhead uninstall-programs` to let governed processes connect directly"),
    }
}

/// The record and the CA key: root's, readable by the admin group (the CLI reads the store
/// while the daemon is down), by nobody else.
fn state_dir(dir: &Path, admin_group: &str) -> Check {
    let admin = control::group_gid(admin_group);
    match std::fs::metadata(dir) {
        Err(_) => check(
            "state dir",
            Level::Ok,
            format!("{} not created yet (the daemon creates it)", dir.display()),
        ),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            let group_ok = m.gid() == 0 || Some(m.gid()) == admin || mode & 0o070 == 0;
            if m.uid() == 0 && mode & 0o007 == 0 && group_ok {
                check(
                    "state dir",
                    Level::Ok,
                    format!("{} (root, mode {mode:o})", dir.display()),
                )
            } else {
                check(
                    "state dir",
                    Level::Fail,
                    format!(
                        "{} is uid {} gid {} mode {mode:o}: the record must be root's and the admin group's only",
                        dir.display(),
                        m.uid(),
                        m.gid(),
                    ),
                )
                .fix(format!("chown root:{admin_group} {0} && chmod 750 {0}", dir.display()))
            }
        }
    }
}

fn control_socket(config: &Config) -> Check {
    let path = config.control_socket();
    let Ok(m) = std::fs::metadata(&path) else {
        return check(
            "control",
            Level::Fail,
            format!("{} is missing", path.display()),
        );
    };
    let mode = m.permissions().mode() & 0o777;
    let admin = control::group_gid(&config.daemon.admin_group);
    if mode & 0o007 != 0 {
        check(
            "control",
            Level::Fail,
            format!(
                "{} mode {mode:o}: any user may ask the daemon",
                path.display()
            ),
        )
    } else if admin.is_some_and(|g| g != m.gid()) {
        check(
            "control",
            Level::Warn,
            format!(
                "{} is not group {}: its members cannot use the CLI",
                path.display(),
                config.daemon.admin_group
            ),
        )
        .fix("restart the daemon (it sets the group when it binds the socket)")
    } else {
        check(
            "control",
            Level::Ok,
            format!(
                "{} mode {mode:o}, for {}",
                path.display(),
                if admin.is_some() {
                    format!("root and group {}", config.daemon.admin_group)
                } else {
                    "root only (no admin group)".to_string()
                }
            ),
        )
    }
}

fn policies(config: &Config) -> Check {
    let dir = &config.daemon.policy_dir;
    if !dir.exists() {
        return check(
            "policies",
            Level::Warn,
            format!("{} does not exist: the built-in starter policy records everything and enforces nothing", dir.display()),
        )
        .fix("bulkhead policy init (writes the example policies there), then edit them");
    }
    match crate::policy::load_dir(dir) {
        Ok(set) => check(
            "policies",
            Level::Ok,
            format!(
                "{}: {}",
                dir.display(),
                crate::text::count(set.rules.len(), "rule", "rules")
            ),
        ),
        Err(errors) => check(
            "policies",
            Level::Fail,
            format!(
                "{}: {} (the daemon keeps its last good set; at start it denies everything)",
                dir.display(),
                crate::text::count(errors.len(), "error", "errors")
            ),
        )
        .fix("bulkhead policy check"),
    }
}

fn credentials(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    for t in &config.targets {
        let Some(crate::credentials::CredentialRef::File(path)) = &t.credentials else {
            continue;
        };
        out.push(match std::fs::metadata(path) {
            Err(e) => check(
                "credentials",
                Level::Fail,
                format!("target {}: {}: {e}", t.name, path.display()),
            ),
            Ok(m) if m.permissions().mode() & 0o077 != 0 || m.uid() != 0 => check(
                "credentials",
                Level::Warn,
                format!(
                    "target {}: {} is uid {} mode {:o}: others than root could read the secret",
                    t.name,
                    path.display(),
                    m.uid(),
                    m.permissions().mode() & 0o777
                ),
            )
            .fix(format!("chown root: {0} && chmod 600 {0}", path.display())),
            Ok(_) => check(
                "credentials",
                Level::Ok,
                format!("target {}: {} (root, 600)", t.name, path.display()),
            ),
        });
    }
    out
}

/// Whether the system trust store holds the gateway's CA (clients that verify TLS need it).
fn ca_trust(config: &Config) -> Check {
    let ca = config.daemon.state_dir.join("ca/ca.pem");
    let Ok(pem) = std::fs::read_to_string(&ca) else {
        return check(
            "ca trust",
            Level::Ok,
            "no gateway CA yet (the daemon creates it on first start)",
        );
    };
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let bundled: String = bundle.lines().filter(|l| !l.starts_with("-----")).collect();
    if !body.is_empty() && bundled.contains(&body) {
        check(
            "ca trust",
            Level::Ok,
            "the gateway CA is in the system trust store",
        )
    } else {
        check(
            "ca trust",
            Level::Warn,
            "the gateway CA is not in the system trust store: tools that verify TLS trust it only under `bulkhead run` or with `bulkhead ca export`",
        )
        .fix("sudo bulkhead trust install")
    }
}

fn privileges(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    if control::group_gid(&config.daemon.admin_group).is_none() {
        out.push(
            check(
                "admin group",
                Level::Warn,
                format!(
                    "{:?} does not exist: only root can use the CLI",
                    config.daemon.admin_group
                ),
            )
            .fix(format!("groupadd --system {}", config.daemon.admin_group)),
        );
    } else {
        out.push(check(
            "admin group",
            Level::Ok,
            config.daemon.admin_group.clone(),
        ));
    }
    for w in crate::privilege::warnings(config) {
        out.push(check("privileges", Level::Warn, w));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.9+bpo-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("5.10"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
