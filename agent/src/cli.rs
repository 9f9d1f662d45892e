//! The `bulkhead` command line.

pub mod approvals;
pub mod doctor;
pub mod generate;
mod help;
mod run;
pub mod sessions;
pub mod trust;

pub use help::{command, leaf_commands, parse};
pub use run::{run, Account, RunOptions};

pub use sessions::SessionsCommand;

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::{
    cgroup,
    config::Config,
    control::{self, ClientError, Request, StatusReport},
    record::{SessionStore as _, SledStore},
};

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "Governs the outbound connections of AI tools through a local gateway"
)]
pub struct Cli {
    /// Configuration file [default: /etc/bulkhead/bulkhead.toml if present, else built-in defaults]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: attach the eBPF programs to the governed cgroup and relay its connections
    Daemon {
        /// Detach the programs when the daemon exits, letting governed connections go direct
        #[arg(long)]
        fail_open: bool,
    },
    /// Run a command governed: inside the governed cgroup, as the invoking user under sudo
    /// (or --user), with that user's HOME, USER, LOGNAME and SHELL; setuid programs cannot
    /// raise its privileges, and it keeps only the supplementary groups `[run] keep_groups`
    /// lists (never the admin group)
    Run {
        /// Run as this user (name or uid) instead of the sudo caller
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Allow the command to run as root. Refused without it: a root process can leave the
        /// governed cgroup and detach the gateway, so nothing it does would be governed
        #[arg(long)]
        allow_root: bool,
        /// Keep the terminal as the command's controlling terminal even when it is not the
        /// command's user's own (by default the command then gets a new session without one)
        #[arg(long, conflicts_with = "new_session")]
        keep_tty: bool,
        /// Start the command in a new session, without a controlling terminal, even from its
        /// user's own terminal
        #[arg(long)]
        new_session: bool,
        /// The command and its arguments
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
    /// Show whether connections are governed, where, and how many sessions were recorded
    ///
    /// Exit status, for scripts: 0 the daemon governs with a loaded policy, 1 the daemon is not
    /// running, 3 it runs but the last policy reload failed (2 is a usage error).
    Status(JsonFlag),
    /// Recorded sessions
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// The gateway's local certificate authority (clients that want TLS trust it)
    #[command(subcommand)]
    Ca(CaCommand),
    /// Policy files: validate them, or see what they decide for a request
    #[command(subcommand)]
    Policy(crate::policy::cli::PolicyCommand),
    /// Requests held for approval: list, approve, deny, watch; grant windows (needs the daemon)
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Remove the pinned programs a stopped daemon left (fail closed) so governed processes
    /// connect directly again; refused while a daemon runs
    UninstallPrograms,
    /// The gateway's CA in the system trust store, for tools outside `bulkhead run`
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// Check the host, the daemon and the files after installing: kernel features, cgroup v2,
    /// BPF file system, pinned programs, listener, permissions, policies, credentials, CA trust
    /// (exit status 1 when a check fails)
    Doctor(JsonFlag),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, or write one page per command into a directory
    Man {
        /// Write bulkhead.1 and a page per subcommand (bulkhead-sessions-list.1, ...) here
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `bulkhead uninstall-programs`.
pub fn uninstall_programs(config: &Config) -> Result<(), CliError> {
    let pins = &config.daemon.bpf_pin_dir;
    let mount = cgroup::cgroup2_mount()?;
    let governed = config.governed.resolve(&mount)?;
    let refused = |e: crate::exclusive::LockError| {
        CliError::Other(format!(
            "{e}; stop the daemon first (it detaches or keeps its programs itself)"
        ))
    };
    // Held while removing: no daemon can start and adopt half-removed pins meanwhile.
    let _cgroup = if governed.is_dir() {
        Some(crate::exclusive::lock_dir(&governed).map_err(refused)?)
    } else {
        None
    };
    if !pins.is_dir() {
        println!(
            "nothing pinned at {}: no programs to remove",
            pins.display()
        );
        return Ok(());
    }
    let _pins = crate::exclusive::lock_dir(pins).map_err(refused)?;
    let links = crate::ebpf::remove_pins(pins).map_err(|e| CliError::Other(e.to_string()))?;
    println!(
        "removed {links} pinned links and their maps from {}: processes in {} connect directly now",
        pins.display(),
        governed.display()
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), for a trust store or `sslrootcert`; with --ssh, the
    /// SSH CA's `@cert-authority` line for ssh_known_hosts
    Export {
        /// The SSH CA, as a known_hosts line (`@cert-authority * ssh-ed25519 ...`)
        #[arg(long)]
        ssh: bool,
    },
}

/// `bulkhead ca export`.
pub fn ca(config: &Config, command: &CaCommand) -> Result<(), CliError> {
    match command {
        CaCommand::Export { ssh: true } => {
            let line =
                crate::proxy::ssh::ca::export_line(&config.daemon.state_dir).map_err(|e| {
                    CliError::Other(format!(
                        "{e} (the daemon creates the SSH CA when it first starts)"
                    ))
                })?;
            println!("{line}");
            Ok(())
        }
        CaCommand::Export { ssh: false } => {
            let path = config.daemon.state_dir.join("ca/ca.pem");
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                CliError::Other(format!(
                    "{}: {e} (the daemon creates the CA when it first starts)",
                    path.display()
                ))
            })?;
            print!("{pem}");
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Control(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] crate::record::StoreError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{0}")]
    Other(String),
    /// Exit with this status after printing the message (as a shell does for a command it
    /// cannot run: 127 not found, 126 not executable).
    #[error("{1}")]
    Exit(u8, String),
    /// The command did its work and its answer is this exit status (nothing more to print).
    #[error("exit status {0}")]
    Status(u8),
}

/// Asks the daemon; when it is not running, answers from the store and the pins directly.
fn ask_or_read<T>(
    config: &Config,
    req: &Request,
    offline: impl FnOnce() -> Result<T, CliError>,
) -> Result<T, CliError>
where
    T: serde::de::DeserializeOwned,
{
    match control::call(&config.control_socket(), &config.daemon.admin_group, req) {
        Ok(v) => serde_json::from_value(v)
            .map_err(|e| CliError::Other(format!("unexpected answer from the daemon: {e}"))),
        Err(ClientError::NotRunning { .. }) => offline(),
        Err(e) => Err(e.into()),
    }
}

/// What a follower does after one streamed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// The reader went away (`| head`): stop quietly.
    Stop,
}

/// How long a follower waits between attempts to reach a daemon that went away.
const RECONNECT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Follows a streaming request (`sessions tail`, `approvals watch`). The first connection
/// must succeed (an error says why); after that, when the daemon goes away (restart, stop),
/// a note goes to stderr and the request is sent again, built anew by `request`, once the
/// daemon is back.
pub(crate) fn follow(
    config: &Config,
    mut request: impl FnMut() -> Request,
    mut on: impl FnMut(control::Response) -> Result<Flow, CliError>,
) -> Result<(), CliError> {
    let mut followed = false;
    loop {
        let started =
            control::Client::connect(&config.control_socket(), &config.daemon.admin_group)
                .and_then(|mut c| c.call(&request()).map(|_| c));
        let mut client = match started {
            Ok(c) => c,
            Err(e) if !followed => return Err(e.into()),
            Err(_) => {
                std::thread::sleep(RECONNECT_EVERY);
                continue;
            }
        };
        if followed {
            eprintln!("bulkhead: reconnected to the daemon");
        }
        followed = true;
        loop {
            match client.next() {
                Ok(Some(control::Response::End) | None) | Err(_) => break,
                Ok(Some(answer)) => {
                    if on(answer)? == Flow::Stop {
                        return Ok(());
                    }
                }
            }
        }
        eprintln!(
            "bulkhead: the daemon went away; following again when it is back (Ctrl-C to stop)"
        );
        std::thread::sleep(RECONNECT_EVERY);
    }
}

fn open_store(config: &Config) -> Result<SledStore, CliError> {
    let path = config.store_path();
    if !path.exists() {
        return Err(CliError::Other(format!(
            "no session store at {} (the daemon has not run with this configuration)",
            path.display()
        )));
    }
    SledStore::open_waiting(&path, std::time::Duration::from_secs(2)).map_err(|e| {
        CliError::Other(format!(
            "{e} (is a daemon starting, or running without its control socket?)"
        ))
    })
}

/// `status`'s exit status: 0 governing with a loaded policy, 1 the daemon is not running,
/// 3 it runs but the last policy reload failed (2 is a usage error, as for every command).
pub fn status(config: &Config, json: bool) -> Result<(), CliError> {
    let report = status_report(config)?;
    print_status(&report, json)?;
    match (&report.daemon, &report.policy) {
        (None, _) => Err(CliError::Status(1)),
        (Some(_), Some(p)) if p.last_error.is_some() => Err(CliError::Status(3)),
        _ => Ok(()),
    }
}

fn status_report(config: &Config) -> Result<StatusReport, CliError> {
    ask_or_read(config, &Request::Status, || {
        let mount = cgroup::cgroup2_mount()?;
        let governed = config.governed.resolve(&mount)?;
        let pinned = crate::ebpf::pinned_links(&config.daemon.bpf_pin_dir).len();
        let store = open_store(config).ok().and_then(|s| s.stats().ok());
        Ok(StatusReport {
            daemon: None,
            governed_cgroup: governed.display().to_string(),
            governed_uids: config.governed.uids.clone(),
            redirect: crate::control::Redirect::read(&config.daemon.bpf_pin_dir, None),
            pinned_links: pinned,
            programs_attached: pinned > 0,
            store,
            retention: config.store.retention,
            policy: None,
            warnings: {
                let mut w = crate::privilege::warnings(config);
                let socket = config.control_socket();
                if socket.exists() {
                    w.push(control::socket_absence(&socket, true));
                }
                w
            },
        })
    })
}

fn print_containment(c: &crate::control::Containment) {
    println!("sockets:     filtered at socket(): {}", c.socket_filter);
    if !c.sockets_allowed.is_empty() {
        println!(
            "             also allowed: {}",
            c.sockets_allowed.join(", ")
        );
    }
    let or_none = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "udp:         DNS to {}; other UDP to {}; every other datagram refused and recorded",
        or_none(&c.dns),
        or_none(&c.udp_allow)
    );
    if !c.udp_policy.is_empty() {
        println!(
            "             the policy opens UDP to {}",
            c.udp_policy.join(", ")
        );
    }
    for note in &c.udp_policy_notes {
        println!("             note: {note}");
    }
    if !c.dns_forwarder.is_empty() {
        println!(
            "dns:         every query to those resolvers recorded (names, answers) through the \
             forwarder on {}",
            c.dns_forwarder.join(", ")
        );
    }
    if !c.fast_path.is_empty() {
        match &c.fast_path_counters {
            Some(n) => println!(
                "fast path:   {} ({} sends / {} bytes redirected in the kernel, {} sends through \
                 TCP; {} governed sockets in the map)",
                c.fast_path, n.redirected, n.redirected_bytes, n.passed, n.governed_sockets
            ),
            None => println!("fast path:   {}", c.fast_path),
        }
    }
    if !c.unix.is_empty() {
        println!("unix:        {}", c.unix);
    }
}

fn print_status(report: &StatusReport, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(report);
    }
    match &report.daemon {
        Some(d) => {
            println!(
                "daemon:      running (pid {}, {}, config: {})",
                d.pid, d.mode, d.config
            );
            println!("listeners:   {}", d.listeners.join(", "));
            println!(
                "connections: {} active, {} accepted, {} refused since start",
                d.connections.active, d.connections.accepted, d.connections.refused
            );
            for (i, t) in d.targets.iter().enumerate() {
                println!(
                    "{}{} ({}) {}",
                    if i == 0 {
                        "targets:     "
                    } else {
                        "             "
                    },
                    t.name,
                    t.protocol,
                    t.addresses.join(", ")
                );
            }
            if d.targets.is_empty() {
                println!(
                    "targets:     none configured (every destination is judged by its address)"
                );
            }
            if !d.restart_needed.is_empty() {
                println!(
                    "config:      CHANGED in sections that apply after a restart ({}): {} \
                     (systemctl restart bulkhead)",
                    d.config,
                    d.restart_needed.join(", ")
                );
            } else if d.config_changed {
                println!(
                    "config:      CHANGED since the daemon read it ({}): `systemctl reload \
                     bulkhead` (SIGHUP) applies its targets; listener and capture rules apply \
                     after a restart; policies reload by themselves",
                    d.config
                );
            }
            print_containment(&d.containment);
            for w in &d.warnings {
                println!("warning:     {w}");
            }
        }
        None => println!("daemon:      not running"),
    }
    for w in &report.warnings {
        println!("warning:     {w}");
    }
    if report.governed_uids.is_empty() {
        println!("governed:    {}", report.governed_cgroup);
    } else {
        let users: Vec<String> = report
            .governed_uids
            .iter()
            .map(|&u| crate::account::Account::by_uid(u).map_or_else(|| u.to_string(), |a| a.name))
            .collect();
        println!(
            "governed:    {} and below, processes of {} only",
            report.governed_cgroup,
            users.join(", ")
        );
    }
    let programs = match (&report.daemon, report.programs_attached) {
        (Some(_), _) => format!("attached ({} pinned links)", report.pinned_links),
        (None, true) => format!(
            "attached, pinned ({} links): governed connections are refused until the daemon runs",
            report.pinned_links
        ),
        (None, false) => "not attached: governed processes connect directly".to_string(),
    };
    println!("programs:    {programs}");
    if let Some(r) = &report.redirect {
        let to = if let Some(e) = &r.error {
            format!("unreadable ({e})")
        } else {
            r.to.join(", ")
        };
        let whose = match r.this_daemon {
            Some(true) => " (this daemon's listeners)",
            Some(false) => {
                " — NOT this daemon's listeners: governed connections do not reach it; restart \
                 it so it rewrites the redirect"
            }
            None => "",
        };
        let ready = if r.ready {
            ""
        } else {
            ", not ready (every governed connect is refused)"
        };
        println!("redirect:    governed connects go to {to}{whose}{ready}");
    }
    if let Some(p) = &report.policy {
        for line in p.lines() {
            println!("{line}");
        }
    }
    match &report.store {
        Some(st) => {
            println!(
                "sessions:    {} recorded, {} open, {} events",
                st.sessions, st.open_sessions, st.events
            );
            println!(
                "store:       {} recorded, {} on disk{}",
                format_bytes(st.recorded_bytes),
                format_bytes(st.disk_bytes),
                st.oldest_session_us
                    .map(|t| format!(", oldest session {}", format_time(t)))
                    .unwrap_or_default()
            );
        }
        None => println!("sessions:    store unavailable"),
    }
    let r = report.retention;
    println!(
        "retention:   {}, {}",
        r.max_age_us.map_or_else(
            || "kept forever".to_string(),
            |a| format!(
                "{} max age",
                crate::text::duration(std::time::Duration::from_micros(a))
            )
        ),
        r.max_bytes.map_or_else(
            || "no size limit".to_string(),
            |b| format!("{} max", format_bytes(b))
        )
    );
    Ok(())
}

fn format_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// RFC 3339 UTC to the second (`2026-12-01T05:40:12Z`), as every time the CLI prints.
fn format_time(micros: u64) -> String {
    crate::text::timestamp(micros)
}
