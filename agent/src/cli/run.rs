//! `bulkhead run`: enter the governed cgroup, become the user the tool should run as, exec.

use std::{ffi::OsString, path::Path};

use super::CliError;
pub use crate::account::Account;
use crate::{
    cgroup,
    config::Config,
    control::{self, ClientError, Request, StatusReport},
    privilege,
};

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

/// How `bulkhead run` was asked to start the command.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// `--user`: run as this user (name or uid) instead of the sudo caller.
    pub user: Option<&'a str>,
    /// `--allow-root`: the command may run as root.
    pub allow_root: bool,
    /// `--keep-tty`: keep the controlling terminal whoever owns it.
    pub keep_tty: bool,
    /// `--new-session`: a new session without a controlling terminal, always.
    pub new_session: bool,
}

/// Why a root command is refused without `--allow-root`.
const ROOT_REFUSED: &str = "refusing to run a governed command as root: a root process can \
    leave the governed cgroup, detach or unpin the gateway's programs and read its held \
    credentials, so nothing it does would be governed. Run `sudo bulkhead run` from your own \
    account, give --user NAME, or pass --allow-root if that is what you want";

/// `bulkhead run`.
pub fn run(
    config: &Config,
    options: &RunOptions<'_>,
    command: &[OsString],
) -> Result<std::convert::Infallible, CliError> {
    use std::os::unix::process::CommandExt as _;

    let mount = cgroup::cgroup2_mount()?;
    let governed = config.governed.resolve(&mount)?;
    if !governed.is_dir() {
        return Err(CliError::Other(format!(
            "the governed cgroup {} does not exist: start the daemon first (bulkhead daemon)",
            governed.display()
        )));
    }
    let (program, args) = command
        .split_first()
        .ok_or_else(|| CliError::Other("no command given".into()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let account = match account_to_run_as(options.user)? {
        Some(a) => Some(a),
        // Root without sudo or --user: root itself (refused below unless allowed).
        None if euid == 0 => {
            Some(Account::by_uid(0).ok_or_else(|| CliError::Other("no account for uid 0".into()))?)
        }
        None => None,
    };
    let run_as = account.as_ref().map_or(euid, |a| a.uid);
    let uids = &config.governed.uids;
    if !uids.is_empty() && !uids.contains(&run_as) {
        return Err(CliError::Other(format!(
            "{} would run as uid {run_as}, which is not governed (governed.users / \
             governed.uids: {uids:?}): nothing it did would go through the gateway; use --user \
             with a governed user",
            Path::new(program).display()
        )));
    }
    if run_as == 0 {
        if !options.allow_root {
            return Err(CliError::Other(ROOT_REFUSED.into()));
        }
        eprintln!(
            "bulkhead: warning: {} runs as root (--allow-root): a root process can leave the \
             governed cgroup; what it does is governed only as long as it stays",
            Path::new(program).display()
        );
    }
    let groups = if let Some(a) = &account {
        Some(groups_for(config, a)?)
    } else {
        refuse_admin_group_without_root(config)?;
        None
    };
    announce(config);
    let session = choose_session(options, run_as);
    if let Some(note) = &session.note {
        eprintln!("bulkhead: {note}");
    }
    if session.new && is_process_group_leader() {
        // setsid() is refused to a process group leader (a shell's job): the command runs in
        // a child, and this process, still root and outside the governed cgroup, waits for it.
        fork_and_wait()?;
    }
    // Governing users everywhere (the hierarchy's root): every process of theirs below it is
    // governed already; moving this one to the root cgroup would only take it out of its unit.
    if governed != mount {
        cgroup::enter(&governed, 0).map_err(|e| {
            CliError::Other(format!(
                "{e} (bulkhead run must be started as root, e.g. with sudo)"
            ))
        })?;
    }
    // SAFETY: setsid has no preconditions; this process is not a process group leader here.
    if session.new && unsafe { libc::setsid() } < 0 {
        return Err(CliError::Other(format!(
            "cannot start a new session: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if let (Some(a), Some(groups)) = (&account, &groups) {
        // As `sudo -i` / `runuser -l` set them: the tool finds its own files, not root's.
        cmd.env("HOME", &a.home)
            .env("USER", &a.name)
            .env("LOGNAME", &a.name)
            .env("SHELL", &a.shell);
        become_user(a, groups)?;
    }
    // TLS clients trust the gateway's leaves through the bundle the daemon wrote (system
    // roots plus its CA); the user's own files are left alone.
    let bundle = config.daemon.run_dir.join(crate::tls::CA_BUNDLE);
    if bundle.is_file() {
        for var in crate::tls::CA_BUNDLE_VARS {
            cmd.env(var, &bundle);
        }
        kubeconfig(config, &bundle, &mut cmd);
    }
    if let Some(path) = crate::proxy::ssh::trust::path_with_wrappers(
        &config.daemon.run_dir,
        std::env::var_os("PATH").as_deref(),
    ) {
        // OpenSSH clients then trust the gateway's SSH CA (see proxy::ssh::trust).
        cmd.env("PATH", path);
    }
    no_new_privileges()?;
    restrict_sockets(config)?;
    scope_abstract_unix_sockets()?;
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

/// The supplementary groups `a` keeps under `[run] keep_groups`, said on stderr when some are
/// dropped; refused when its primary group is the admin group.
fn groups_for(config: &Config, a: &Account) -> Result<Vec<u32>, CliError> {
    let admin_name = &config.daemon.admin_group;
    let admin = privilege::group_gid(admin_name);
    if admin == Some(a.gid) {
        return Err(CliError::Other(format!(
            "the primary group of {} is the admin group `{admin_name}`, which a governed \
             command must never have (it opens the control socket): give {} another primary \
             group",
            a.name, a.name
        )));
    }
    let (keep, unknown) = privilege::keep_gids(config);
    for name in unknown {
        eprintln!("bulkhead: warning: run.keep_groups: no group {name:?}");
    }
    let member_of = privilege::user_groups(&a.name, a.gid)
        .map_err(|e| CliError::Other(format!("cannot list the groups of {}: {e}", a.name)))?;
    let plan = privilege::plan_groups(a.gid, &member_of, &keep, admin);
    if plan.admin_refused {
        eprintln!(
            "bulkhead: not keeping the admin group `{admin_name}` although run.keep_groups lists \
             it: a governed command must never reach the control socket"
        );
    }
    if !plan.dropped.is_empty() {
        let names = |gids: &[u32]| {
            gids.iter()
                .map(|&g| privilege::describe_group(g))
                .collect::<Vec<_>>()
                .join(", ")
        };
        eprintln!(
            "bulkhead: supplementary groups of {} dropped: {} (keep one with [run] keep_groups){}",
            a.name,
            names(&plan.dropped),
            if plan.keep.len() > 1 {
                format!("; kept: {}", names(&plan.keep[1..]))
            } else {
                String::new()
            }
        );
    }
    Ok(plan.keep)
}

/// Without root the groups cannot be changed: refuse when the admin group is among them.
fn refuse_admin_group_without_root(config: &Config) -> Result<(), CliError> {
    let admin_name = &config.daemon.admin_group;
    let Some(admin) = privilege::group_gid(admin_name) else {
        return Ok(());
    };
    // SAFETY: getgid has no preconditions; getgroups writes at most `len` gids into `groups`.
    let (primary, groups) = unsafe {
        let mut groups = vec![0 as libc::gid_t; 4096];
        let n = libc::getgroups(
            libc::c_int::try_from(groups.len()).unwrap_or(0),
            groups.as_mut_ptr(),
        );
        groups.truncate(usize::try_from(n).unwrap_or(0));
        (libc::getgid(), groups)
    };
    if primary == admin || groups.contains(&admin) {
        return Err(CliError::Other(format!(
            "you are in the admin group `{admin_name}`, and without root bulkhead run cannot \
             drop it: run it with sudo so the command gets only the groups [run] keep_groups \
             keeps"
        )));
    }
    Ok(())
}

/// Setuid and setcap programs cannot raise the privileges of the command or its children.
fn no_new_privileges() -> Result<(), CliError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) has no memory arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(CliError::Other(format!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The address families a command under `bulkhead run` may open sockets of: unix, inet,
/// inet6, netlink, and packet when `capture.sockets` allows it.
fn allowed_families(config: &Config) -> Vec<u64> {
    let mut families = vec![
        libc::AF_UNIX as u64,
        libc::AF_INET as u64,
        libc::AF_INET6 as u64,
        libc::AF_NETLINK as u64,
    ];
    if config
        .capture
        .sockets
        .contains(&crate::config::SocketKind::Packet)
    {
        families.push(libc::AF_PACKET as u64);
    }
    families
}

/// A seccomp filter for the command and everything it starts (inherited, and it cannot be
/// lifted): `socket()` and `socketpair()` of any other address family fail with EPERM, and so
/// does `io_uring_setup` (an io_uring can create sockets without the `socket()` system call).
/// The kernel's socket filter does the same for the governed cgroup, for every family only
/// where the BPF LSM runs; this covers `bulkhead run` everywhere (vsock, for one, reaches the
/// hypervisor of a virtual machine).
fn restrict_sockets(config: &Config) -> Result<(), CliError> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        CliError::Other(format!(
            "cannot restrict the command's sockets ({what}: {e})"
        ))
    };
    let other_family = || -> Result<SeccompRule, CliError> {
        let conditions = allowed_families(config)
            .into_iter()
            .map(|f| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail("condition", &e))?;
        SeccompRule::new(conditions).map_err(|e| fail("rule", &e))
    };
    let rules = std::collections::BTreeMap::from([
        (libc::SYS_socket, vec![other_family()?]),
        (libc::SYS_socketpair, vec![other_family()?]),
        (libc::SYS_io_uring_setup, Vec::new()),
    ]);
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| fail("architecture", &e))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| fail("filter", &e))?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(|e| fail("compile", &e))?;
    seccompiler::apply_filter(&program).map_err(|e| fail("install", &e))
}

/// Landlock (ABI 6, Linux 6.12+): the command and what it starts may not connect to abstract
/// unix sockets made outside their Landlock domain (an X server's, a desktop session's, other
/// services'), which would let them ask something ungoverned to act for them. (Pathname and
/// abstract addresses are also decided in the kernel by `cgroup/connect_unix` on Linux 6.7+,
/// `ebpf/unix.rs`; this holds under `bulkhead run` on any kernel with Landlock ABI 6.) Without
/// it this is said on stderr and the command still runs.
fn scope_abstract_unix_sockets() -> Result<(), CliError> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }
    // SAFETY: the version query takes no memory (null attribute, size 0).
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi < 6 {
        eprintln!(
            "bulkhead: note: this kernel's Landlock ({}) cannot keep the command from abstract \
             unix sockets outside it (needs Landlock ABI 6, Linux 6.12)",
            if abi < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                format!("ABI {abi}")
            }
        );
        return Ok(());
    }
    let attr = RulesetAttr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET,
    };
    // SAFETY: `attr` is a valid ruleset attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &raw const attr,
            std::mem::size_of::<RulesetAttr>(),
            0,
        )
    };
    let fd = i32::try_from(fd).unwrap_or(-1);
    if fd < 0 {
        return Err(CliError::Other(format!(
            "cannot create a Landlock ruleset: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is the ruleset just created; no_new_privs is set.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor we own.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(CliError::Other(format!(
            "cannot restrict the command with Landlock: {err}"
        )));
    }
    Ok(())
}

fn is_process_group_leader() -> bool {
    // SAFETY: getpgrp and getpid have no preconditions.
    unsafe { libc::getpgrp() == libc::getpid() }
}

/// The child being waited for, for the signal forwarder.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; the pid is our own child's.
        unsafe {
            libc::kill(child, signal);
        }
    }
}

/// Forks: returns in the child; the parent waits for it, passing on the signals a terminal or
/// a service manager sends (the child is in a session of its own and gets none of them), and
/// exits with its status.
fn fork_and_wait() -> Result<(), CliError> {
    use std::sync::atomic::Ordering;
    // SAFETY: the CLI is single-threaded here, so the child may carry on as usual.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(CliError::Other(format!(
            "cannot fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    if child == 0 {
        return Ok(());
    }
    CHILD.store(child, Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: the handler only loads an atomic and calls kill.
        unsafe {
            libc::signal(
                signal,
                forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child into a local.
        let r = unsafe { libc::waitpid(child, &raw mut status, 0) };
        if r == child {
            break;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            std::process::exit(1);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code);
}

/// Whether the command gets a session of its own, and what to tell the admin about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SessionChoice {
    new: bool,
    note: Option<String>,
}

/// A process above `bulkhead run`, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ancestor {
    pid: u32,
    ruid: u32,
    euid: u32,
    comm: String,
}

/// Whose terminal it is, from the processes above us up to the terminal's session leader.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TerminalOwner {
    /// Made for this command (we lead its session, or it is the pty `sudo` made for us):
    /// nobody else reads it once the command ends.
    Private,
    /// The command's user's own session: every process between us and the session leader
    /// runs as that user (`sudo` itself, our parent, aside).
    User,
    /// Someone else's: this process runs as another user (`pid`, `comm`, `uid`).
    Other { pid: u32, comm: String, uid: u32 },
}

/// Decides whose terminal `sid` (the session of our controlling terminal) is. `ancestors`
/// start with our parent.
fn terminal_owner(me: u32, sid: u32, ancestors: &[Ancestor], run_as: u32) -> TerminalOwner {
    if sid == me {
        return TerminalOwner::Private;
    }
    for (i, a) in ancestors.iter().enumerate() {
        if i == 0 && a.comm == "sudo" {
            if a.pid == sid {
                return TerminalOwner::Private;
            }
            continue;
        }
        if a.ruid != run_as || a.euid != run_as {
            return TerminalOwner::Other {
                pid: a.pid,
                comm: a.comm.clone(),
                uid: a.euid,
            };
        }
        if a.pid == sid {
            return TerminalOwner::User;
        }
    }
    // The session leader is not above us (we were moved under another parent): unknown.
    TerminalOwner::Other {
        pid: sid,
        comm: "session leader".into(),
        uid: u32::MAX,
    }
}

/// Reads `/proc/PID/status` for the real and effective uid, the name and the parent.
fn read_ancestor(pid: u32) -> Option<(Ancestor, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mut uids = field("Uid:")?.split_whitespace();
    let ruid = uids.next()?.parse().ok()?;
    let euid = uids.next()?.parse().ok()?;
    let parent = field("PPid:")?.parse().ok()?;
    let comm = field("Name:")?.to_string();
    Some((
        Ancestor {
            pid,
            ruid,
            euid,
            comm,
        },
        parent,
    ))
}

/// The controlling terminal's session and the processes above us, up to that session's
/// leader (or init); `None` without a controlling terminal.
fn controlling_terminal() -> Option<(u32, Vec<Ancestor>)> {
    // SAFETY: opening /dev/tty without making it ours; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is the descriptor opened above.
    let sid = unsafe {
        let sid = libc::tcgetsid(fd);
        libc::close(fd);
        sid
    };
    let sid = u32::try_from(sid).ok()?;
    let mut ancestors = Vec::new();
    // SAFETY: getppid has no preconditions.
    let mut pid = u32::try_from(unsafe { libc::getppid() }).ok()?;
    while pid > 1 && ancestors.len() < 64 {
        let Some((a, parent)) = read_ancestor(pid) else {
            break;
        };
        ancestors.push(a);
        if pid == sid {
            break;
        }
        pid = parent;
    }
    Some((sid, ancestors))
}

/// A new session (no controlling terminal) unless the terminal is the command's user's own or
/// was made for this command, or `--keep-tty` says to keep it.
fn choose_session(options: &RunOptions<'_>, run_as: u32) -> SessionChoice {
    if options.new_session {
        return SessionChoice {
            new: true,
            note: None,
        };
    }
    let Some((sid, ancestors)) = controlling_terminal() else {
        // Nothing to keep; a session of its own keeps it from gaining one of somebody else's.
        return SessionChoice {
            new: true,
            note: None,
        };
    };
    let owner = terminal_owner(std::process::id(), sid, &ancestors, run_as);
    let TerminalOwner::Other { pid, comm, uid } = owner else {
        return SessionChoice {
            new: false,
            note: None,
        };
    };
    let whose = if uid == u32::MAX {
        format!("the terminal's session (led by pid {pid}) is not above this command")
    } else {
        format!("the terminal is shared with {comm} (pid {pid}, uid {uid}), another user's process")
    };
    if options.keep_tty {
        return SessionChoice {
            new: false,
            note: Some(format!(
                "warning: {whose}, and --keep-tty keeps it as the command's controlling \
                 terminal: the command can read it and, unless the sysctl \
                 dev.tty.legacy_tiocsti is 0, type into it"
            )),
        };
    }
    SessionChoice {
        new: true,
        note: Some(format!(
            "{whose}: the command runs in a new session without a controlling terminal (no job \
             control; Ctrl-C reaches it through bulkhead run). --keep-tty keeps the terminal"
        )),
    }
}

/// Says what governs the command, on stderr, before it starts.
fn announce(config: &Config) {
    match control::call(
        &config.control_socket(),
        &config.daemon.admin_group,
        &Request::Status,
    ) {
        Err(ClientError::NotRunning { .. }) => {
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

fn become_user(a: &Account, groups: &[u32]) -> Result<(), CliError> {
    // SAFETY: plain syscalls with valid arguments; order is groups, gid, then uid, so each
    // step still has the privilege it needs.
    let ok = unsafe {
        libc::setgroups(groups.len(), groups.as_ptr()) == 0
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

/// kubectl (and client-go tools) reach the configured Kubernetes targets through the gateway:
/// `KUBECONFIG` names a kubeconfig written for this run (as the user the command runs as, in a
/// private directory under the temporary directory) with each target's address, the gateway's
/// CA bundle and no credential. The user's own kubeconfig is not read or changed.
fn kubeconfig(config: &Config, bundle: &Path, cmd: &mut std::process::Command) {
    let Some(text) = crate::kube::kubeconfig::for_targets(&config.targets, bundle) else {
        return;
    };
    match crate::kube::kubeconfig::write_private(&std::env::temp_dir(), &text) {
        Ok(path) => {
            cmd.env("KUBECONFIG", path);
        }
        Err(e) => eprintln!("bulkhead: warning: cannot write a kubeconfig for kubectl: {e}"),
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

    fn ancestor(pid: u32, uid: u32, euid: u32, comm: &str) -> Ancestor {
        Ancestor {
            pid,
            ruid: uid,
            euid,
            comm: comm.into(),
        }
    }

    #[test]
    fn the_terminal_is_kept_only_when_it_is_the_users_own_or_made_for_the_command() {
        let alice = 1000;
        // `sudo bulkhead run` from alice's shell: sudo (alice, euid root), then her shell.
        let from_her_shell = [
            ancestor(20, alice, 0, "sudo"),
            ancestor(10, alice, alice, "bash"),
        ];
        assert_eq!(
            terminal_owner(30, 10, &from_her_shell, alice),
            TerminalOwner::User
        );
        // sudo's own pty (use_pty): sudo leads the terminal's session.
        let sudo_pty = [ancestor(20, 0, 0, "sudo"), ancestor(19, alice, 0, "sudo")];
        assert_eq!(
            terminal_owner(30, 20, &sudo_pty, alice),
            TerminalOwner::Private
        );
        // We lead the session (sshd or script made the terminal for this command).
        assert_eq!(terminal_owner(30, 30, &[], alice), TerminalOwner::Private);
        // The same terminal, run as another user: the shell is not theirs.
        assert!(matches!(
            terminal_owner(30, 10, &from_her_shell, 2000),
            TerminalOwner::Other {
                pid: 10,
                uid: 1000,
                ..
            }
        ));
        // A root shell (`sudo -i`) in alice's login session: root reads the terminal next.
        let root_shell = [
            ancestor(25, 0, 0, "bash"),
            ancestor(20, alice, 0, "sudo"),
            ancestor(10, alice, alice, "bash"),
        ];
        assert!(matches!(
            terminal_owner(30, 10, &root_shell, alice),
            TerminalOwner::Other {
                pid: 25,
                uid: 0,
                ..
            }
        ));
        // sudo further up is not skipped: only our direct parent exits with us.
        let sudo_above = [
            ancestor(25, alice, alice, "sh"),
            ancestor(20, alice, 0, "sudo"),
        ];
        assert!(matches!(
            terminal_owner(30, 10, &sudo_above, alice),
            TerminalOwner::Other {
                pid: 20,
                uid: 0,
                ..
            }
        ));
        // The session leader is not above us: unknown, so not kept.
        assert!(matches!(
            terminal_owner(30, 99, &from_her_shell, alice),
            TerminalOwner::Other { .. }
        ));
    }
}
