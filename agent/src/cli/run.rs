//! `bulkhead run`: enter the governed cgroup, become the user the tool should run as, exec.

use std::{
    ffi::{CStr, CString, OsString},
    path::Path,
};

use super::CliError;
use crate::{
    cgroup,
    config::Config,
    control::{self, ClientError, Request, StatusReport},
};

/// A local account, as the C library's user database (NSS) knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

impl Account {
    /// By name, or by uid when `who` is a number.
    pub fn lookup(who: &str) -> Option<Self> {
        if let Ok(uid) = who.parse::<u32>() {
            return Self::by_uid(uid);
        }
        let name = CString::new(who).ok()?;
        // SAFETY: getpwnam_r with a valid NUL-terminated name and buffers we own.
        with_passwd(|pwd, buf, out| unsafe {
            libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), out)
        })
    }

    pub fn by_uid(uid: u32) -> Option<Self> {
        // SAFETY: getpwuid_r with buffers we own.
        with_passwd(|pwd, buf, out| unsafe {
            libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), out)
        })
    }
}

/// Calls a `getpw*_r` function with a buffer that grows on ERANGE.
fn with_passwd(
    call: impl Fn(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> libc::c_int,
) -> Option<Account> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero passwd is a valid value for the call to fill in.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        match call(&raw mut pwd, &mut buf, &raw mut out) {
            0 if out.is_null() => return None,
            0 => {
                let text = |p: *const libc::c_char| {
                    // SAFETY: the call filled these with NUL-terminated strings in `buf`.
                    (!p.is_null())
                        .then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                };
                return Some(Account {
                    name: text(pwd.pw_name)?,
                    uid: pwd.pw_uid,
                    gid: pwd.pw_gid,
                    home: text(pwd.pw_dir).unwrap_or_else(|| "/".into()),
                    shell: text(pwd.pw_shell).unwrap_or_else(|| "/bin/sh".into()),
                });
            }
            libc::ERANGE if size < 1 << 20 => size *= 4,
            _ => return None,
        }
    }
}

/// Whom the command runs as: `--user`, else the sudo caller, else nobody else (stay root).
fn account_to_run_as(user: Option<&str>) -> Result<Option<Account>, CliError> {
    if let Some(who) = user {
        return Account::lookup(who)
            .map(Some)
            .ok_or_else(|| CliError::Other(format!("--user {who}: no such user")));
    }
    Ok(sudo_caller().and_then(Account::by_uid))
}

/// The uid of the user who ran `sudo bulkhead run`, when we are root because of sudo.
fn sudo_caller() -> Option<u32> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    (uid != 0).then_some(uid)
}

/// `bulkhead run`.
pub fn run(
    config: &Config,
    user: Option<&str>,
    command: &[OsString],
) -> Result<std::convert::Infallible, CliError> {
    use std::os::unix::process::CommandExt as _;

    let mount = cgroup::cgroup2_mount()?;
    let governed = cgroup::resolve(&mount, &config.governed.cgroup)?;
    if !governed.is_dir() {
        return Err(CliError::Other(format!(
            "the governed cgroup {} does not exist: start the daemon first (bulkhead daemon)",
            governed.display()
        )));
    }
    let account = account_to_run_as(user)?;
    announce(config);
    cgroup::enter(&governed, 0).map_err(|e| {
        CliError::Other(format!(
            "{e} (bulkhead run must be started as root, e.g. with sudo)"
        ))
    })?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| CliError::Other("no command given".into()))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    match &account {
        Some(a) => {
            // As `sudo -i` / `runuser -l` set them: the tool finds its own files, not root's.
            cmd.env("HOME", &a.home)
                .env("USER", &a.name)
                .env("LOGNAME", &a.name)
                .env("SHELL", &a.shell);
            become_user(a)?;
        }
        // SAFETY: geteuid has no preconditions.
        None if unsafe { libc::geteuid() } == 0 => eprintln!(
            "bulkhead: warning: {} runs as root: a root process can leave the governed cgroup; \
             run bulkhead with sudo from your own account, or give --user",
            Path::new(program).display()
        ),
        None => {}
    }
    let err = cmd.exec();
    let code = match err.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    };
    Err(CliError::Exit(
        code,
        format!("cannot run {}: {err}", Path::new(program).display()),
    ))
}

/// Says what governs the command, on stderr, before it starts.
fn announce(config: &Config) {
    match control::call(
        &config.control_socket(),
        &config.daemon.admin_group,
        &Request::Status,
    ) {
        Err(ClientError::NotRunning(_)) => {
            if crate::ebpf::pinned_links(&config.daemon.bpf_pin_dir).is_empty() {
                eprintln!(
                    "bulkhead: warning: the daemon is not running and no programs are pinned: \
                     connections are NOT governed; they go direct and are not recorded"
                );
            } else {
                eprintln!(
                    "bulkhead: warning: the daemon is not running; governed connections will be \
                     refused until it runs (fail closed)"
                );
            }
        }
        Ok(report) => {
            let starter = serde_json::from_value::<StatusReport>(report)
                .ok()
                .and_then(|r| r.policy)
                .is_some_and(|p| p.starter);
            if starter {
                eprintln!(
                    "bulkhead: OBSERVE MODE (built-in starter policy): connections are recorded, \
                     nothing is enforced; `sudo bulkhead policy init` to enforce"
                );
            }
        }
        Err(_) => {}
    }
}

fn become_user(a: &Account) -> Result<(), CliError> {
    let name = CString::new(a.name.as_str())
        .map_err(|_| CliError::Other("the user name contains NUL".into()))?;
    // SAFETY: plain syscalls with valid arguments; order is groups, gid, then uid, so each
    // step still has the privilege it needs.
    let ok = unsafe {
        libc::initgroups(name.as_ptr(), a.gid) == 0
            && libc::setgid(a.gid) == 0
            && libc::setuid(a.uid) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "cannot switch to {} (uid {}): {}",
            a.name,
            a.uid,
            std::io::Error::last_os_error()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_found_by_name_and_by_uid() {
        let root = Account::lookup("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(Account::lookup("0"), Some(root.clone()));
        assert_eq!(Account::by_uid(0), Some(root));
        let nobody = Account::lookup("nobody").expect("nobody exists");
        assert_eq!(nobody.uid, 65534);
        assert!(Account::lookup("no-such-user-bulkhead").is_none());
    }
}
