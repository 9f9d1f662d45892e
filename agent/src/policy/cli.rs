//! `bulkhead policy check` and `bulkhead policy test`: both work on files alone, without a
//! daemon or a target, so an admin can try a policy before installing it.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::{load_dir, Action, Decision, PolicySet, Request, SshForward, TargetRef};
use crate::{
    config::Config,
    identity::{Ancestor, ProcessIdentity},
    protocol::Protocol,
    text::count,
};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the policy files; errors name file, line and a hint
    Check {
        /// Policy directory [default: the configuration's daemon.policy_dir]
        dir: Option<PathBuf>,
        /// Print the result as JSON (errors and warnings included)
        #[arg(long)]
        json: bool,
    },
    /// Show the verdict and the deciding rules for one request, without a target
    ///
    /// Exit status, for scripts: 0 allow (masks included), 1 deny, 3 approve (held for an
    /// admin). Approve is 3, not 2: 2 is a usage error (a mistyped option) for every command,
    /// and a typo must never read as "needs approval".
    Test(Box<TestArgs>),
    /// Write the example policies into the policy directory, to start enforcing (a daemon
    /// running the built-in starter policy loads them within seconds)
    Init {
        /// Policy directory [default: the configuration's daemon.policy_dir]
        dir: Option<PathBuf>,
    },
}

/// The example policies (`policies/` in the source tree), as `policy init` writes them.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "agent-egress.toml",
        include_str!("../../../policies/agent-egress.toml"),
    ),
    (
        "http-get-only.toml",
        include_str!("../../../policies/http-get-only.toml"),
    ),
    (
        "kubernetes-read-only.toml",
        include_str!("../../../policies/kubernetes-read-only.toml"),
    ),
    ("no-ddl.toml", include_str!("../../../policies/no-ddl.toml")),
    (
        "opaque-tcp.toml",
        include_str!("../../../policies/opaque-tcp.toml"),
    ),
    (
        "pii-masking.toml",
        include_str!("../../../policies/pii-masking.toml"),
    ),
    (
        "read-only-agent.toml",
        include_str!("../../../policies/read-only-agent.toml"),
    ),
    (
        "ssh-safe-commands.toml",
        include_str!("../../../policies/ssh-safe-commands.toml"),
    ),
    (
        "writes-need-approval.toml",
        include_str!("../../../policies/writes-need-approval.toml"),
    ),
];

#[derive(Debug, Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line flags, one per kind of request"
)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["sql", "ssh", "ssh_shell", "sftp_read", "sftp_write", "ssh_forward", "ssh_remote_forward", "ssh_agent", "ssh_x11", "ssh_env", "http", "kube", "connect"])))]
pub struct TestArgs {
    /// Policy directory [default: the configuration's daemon.policy_dir]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Target name (its protocol is taken from the daemon configuration if it is there), or a
    /// destination IP:PORT, judged as the daemon judges a connection to it: as the configured
    /// target whose addresses match, else as a `tcp` target named by the address
    #[arg(long)]
    pub target: String,
    /// tcp, postgres, ssh, http, kubernetes or udp [default: from the configuration, else the request kind]
    #[arg(long)]
    pub protocol: Option<Protocol>,
    /// User id of the process [default: yours]
    #[arg(long)]
    pub uid: Option<u32>,
    /// User name of the process [default: none]
    #[arg(long)]
    pub user: Option<String>,
    /// Process name (comm)
    #[arg(long, default_value = "bash")]
    pub process: String,
    /// Executable path of the process (/usr/bin/psql) [default: none]
    #[arg(long)]
    pub exe: Option<String>,
    /// An ancestor process, nearest first; a name or an executable path (repeatable)
    #[arg(long = "ancestor", value_name = "NAME|PATH")]
    pub ancestors: Vec<String>,
    /// The process's cgroup path (/bulkhead.slice/agent) [default: none]
    #[arg(long)]
    pub cgroup: Option<String>,
    /// The process's systemd unit (agent.service) [default: none]
    #[arg(long)]
    pub unit: Option<String>,
    /// A SQL message (simple query)
    #[arg(long)]
    pub sql: Option<String>,
    /// An SSH exec command line
    #[arg(long)]
    pub ssh: Option<String>,
    /// An interactive SSH shell
    #[arg(long)]
    pub ssh_shell: bool,
    /// An sftp operation that reads or lists PATH
    #[arg(long, value_name = "PATH")]
    pub sftp_read: Option<String>,
    /// An sftp operation that writes, creates, removes or renames PATH
    #[arg(long, value_name = "PATH")]
    pub sftp_write: Option<String>,
    /// An SSH direct-tcpip tunnel (`ssh -L`, `-D`, `-W`, `-J`) to HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    pub ssh_forward: Option<String>,
    /// An SSH remote forward (`ssh -R`): the target listening on ADDRESS:PORT
    #[arg(long, value_name = "ADDRESS:PORT")]
    pub ssh_remote_forward: Option<String>,
    /// SSH agent forwarding (`ssh -A`)
    #[arg(long)]
    pub ssh_agent: bool,
    /// SSH X11 forwarding (`ssh -X`, `-Y`)
    #[arg(long)]
    pub ssh_x11: bool,
    /// An environment variable sent over SSH (`SendEnv`, `SetEnv`)
    #[arg(long, value_name = "NAME")]
    pub ssh_env: Option<String>,
    /// An HTTP request: METHOD URL
    #[arg(long, num_args = 2, value_names = ["METHOD", "URL"])]
    pub http: Option<Vec<String>>,
    /// A Kubernetes request, kubectl style: "get pods", "delete deployments.apps/web" (RESOURCE.GROUP
    /// outside the core group), "logs web-1", "exec web-1", "get pods/web-1/log"
    #[arg(long, value_name = "REQUEST")]
    pub kube: Option<String>,
    /// Namespace of the Kubernetes request (none: cluster-scoped or all namespaces)
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only the connection itself
    #[arg(long)]
    pub connect: bool,
    /// Print the decision as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyCliError {
    #[error("{} in {}", crate::text::count(*count, "error", "errors"), dir.display())]
    Invalid { dir: PathBuf, count: usize },
    #[error("{0}")]
    Usage(String),
    #[error("cannot print JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// `policy test`'s answer as an exit status, for scripts: 1 deny, 3 approve (0 allow; 2 is
    /// a usage error, as for every command).
    #[error("exit status {0}")]
    Verdict(u8),
}

pub fn run(config: &Config, cmd: PolicyCommand) -> Result<(), PolicyCliError> {
    match cmd {
        PolicyCommand::Check { dir, json } => check(
            config,
            &dir.unwrap_or_else(|| config.daemon.policy_dir.clone()),
            json,
        ),
        PolicyCommand::Test(args) => test(config, &args),
        PolicyCommand::Init { dir } => {
            init(&dir.unwrap_or_else(|| config.daemon.policy_dir.clone()))
        }
    }
}

fn load(dir: &Path) -> Result<PolicySet, PolicyCliError> {
    load_dir(dir).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        PolicyCliError::Invalid {
            dir: dir.to_path_buf(),
            count: errors.len(),
        }
    })
}

/// Writes the example policies into `dir` (created if missing); files already there are kept.
pub fn init(dir: &Path) -> Result<(), PolicyCliError> {
    let io =
        |e: std::io::Error, what: &Path| PolicyCliError::Usage(format!("{}: {e}", what.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    for (name, text) in EXAMPLES {
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| io(e, &path))?;
                println!("wrote   {}", path.display());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                println!("kept    {} (already there)", path.display());
            }
            Err(e) => return Err(io(e, &path)),
        }
    }
    let set = load(dir)?;
    println!(
        "{}: {}, {}. Each file says at the top what it does; edit the target names \
         to yours. A running daemon loads the directory within seconds and enforces it.",
        dir.display(),
        count(set.files.len(), "file", "files"),
        count(set.rules.len(), "rule", "rules"),
    );
    Ok(())
}

/// What `policy check --json` prints.
#[derive(Debug, Serialize)]
struct CheckReport {
    dir: PathBuf,
    ok: bool,
    files: usize,
    rules: usize,
    targets: usize,
    errors: Vec<String>,
    warnings: Vec<String>,
}

pub fn check(config: &Config, dir: &Path, json: bool) -> Result<(), PolicyCliError> {
    let loaded = load_dir(dir);
    let (set, errors) = match loaded {
        Ok(set) => (Some(set), Vec::new()),
        Err(errors) => (None, errors.iter().map(ToString::to_string).collect()),
    };
    let warnings = set
        .as_ref()
        .map(|s| unknown_target_names(config, s))
        .unwrap_or_default();
    if json {
        let report = CheckReport {
            dir: dir.to_path_buf(),
            ok: set.is_some(),
            files: set.as_ref().map_or(0, |s| s.files.len()),
            rules: set.as_ref().map_or(0, |s| s.rules.len()),
            targets: set.as_ref().map_or(0, |s| s.targets.len()),
            errors: errors.clone(),
            warnings,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for e in &errors {
            eprintln!("{e}");
        }
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        if let Some(set) = &set {
            println!(
                "{}: ok ({}, {}, {})",
                dir.display(),
                count(set.files.len(), "file", "files"),
                count(set.rules.len(), "rule", "rules"),
                count(set.targets.len(), "target table", "target tables"),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyCliError::Invalid {
            dir: dir.to_path_buf(),
            count: errors.len(),
        })
    }
}

/// Rules whose target names match no target of the configuration (a typo, or a target not
/// configured yet). Patterns with a `:` name destinations by address and are not checked.
fn unknown_target_names(config: &Config, set: &PolicySet) -> Vec<String> {
    let mut out = Vec::new();
    for rule in &set.rules {
        for name in &rule.target.names {
            let by_address = name.as_str().contains(':');
            if by_address || name.matches_all() {
                continue;
            }
            if !config.targets.iter().any(|t| name.is_match(&t.name)) {
                out.push(format!(
                    "rule {} ({}): target name {:?} matches no target of the configuration",
                    rule.id,
                    rule.origin,
                    name.as_str()
                ));
            }
        }
    }
    out
}

#[derive(Debug, Serialize)]
struct TestOutput<'a> {
    target: &'a str,
    protocol: Protocol,
    #[serde(flatten)]
    decision: &'a Decision,
}

pub fn test(config: &Config, args: &TestArgs) -> Result<(), PolicyCliError> {
    let set = load(args.dir.as_deref().unwrap_or(&config.daemon.policy_dir))?;
    let (target, protocol, decision) = decide(config, &set, args)?;
    if args.json {
        let out = TestOutput {
            target: &target,
            protocol,
            decision: &decision,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_decision(&set, &decision);
    }
    match decision.verdict {
        super::Verdict::Allow => Ok(()),
        super::Verdict::Deny => Err(PolicyCliError::Verdict(1)),
        super::Verdict::Approve => Err(PolicyCliError::Verdict(3)),
    }
}

/// What `policy test` decides for `args` under `set`: the target as judged, its protocol, and
/// the decision.
pub fn decide(
    config: &Config,
    set: &PolicySet,
    args: &TestArgs,
) -> Result<(String, Protocol, Decision), PolicyCliError> {
    let identity = identity_of(args);
    let (method, host, path);
    let (verb, resource, subresource, name);
    let action = if let Some(sql) = &args.sql {
        Action::Sql {
            text: sql,
            prepared: None,
        }
    } else if let Some(cmd) = &args.ssh {
        Action::SshExec { command: cmd }
    } else if args.ssh_shell {
        Action::SshShell
    } else if let Some(path) = &args.sftp_read {
        Action::Sftp { write: false, path }
    } else if let Some(path) = &args.sftp_write {
        Action::Sftp { write: true, path }
    } else if let Some(address) = &args.ssh_forward {
        let (host, port) = split_host_port(address)?;
        Action::SshForward {
            kind: SshForward::Local,
            host,
            port,
        }
    } else if let Some(address) = &args.ssh_remote_forward {
        let (host, port) = split_host_port(address)?;
        Action::SshForward {
            kind: SshForward::Remote,
            host,
            port,
        }
    } else if let Some(kind) = channel_forward(args) {
        Action::SshForward {
            kind,
            host: "",
            port: 0,
        }
    } else if let Some(name) = &args.ssh_env {
        Action::SshEnv { name }
    } else if let Some(http) = &args.http {
        let [m, url] = http.as_slice() else {
            return Err(PolicyCliError::Usage("--http takes METHOD URL".into()));
        };
        (host, path) = split_url(url);
        method = m.clone();
        Action::Http {
            method: &method,
            host: &host,
            path: &path,
        }
    } else if let Some(kube) = &args.kube {
        (verb, resource, subresource, name) = parse_kube(kube)?;
        // kubectl's `RESOURCE.GROUP` (`deployments.apps`); a bare resource is the core group's,
        // a path (`/version`) is in none.
        let (res, group) = match resource.split_once('.') {
            _ if resource.starts_with('/') => (resource.as_str(), None),
            Some((r, g)) => (r, Some(g)),
            None => (resource.as_str(), Some("")),
        };
        Action::Kube {
            verb: &verb,
            group,
            resource: res,
            subresource: subresource.as_deref(),
            namespace: args.namespace.as_deref(),
            name: name.as_deref(),
        }
    } else {
        Action::Connect
    };
    let (target, protocol) = resolve_target(config, &args.target);
    let protocol = args
        .protocol
        .or(protocol)
        .or(match action {
            Action::Sql { .. } | Action::SqlClassified(_) => Some(Protocol::Postgres),
            Action::SshExec { .. }
            | Action::SshShell
            | Action::Sftp { .. }
            | Action::SshForward { .. }
            | Action::SshEnv { .. } => Some(Protocol::Ssh),
            Action::Http { .. } => Some(Protocol::Http),
            Action::Kube { .. } => Some(Protocol::Kubernetes),
            Action::Connect | Action::Unknown { .. } => None,
        })
        .ok_or_else(|| {
            PolicyCliError::Usage(format!(
                "target {:?} is not in the configuration: give --protocol",
                args.target
            ))
        })?;
    let req = Request {
        target: TargetRef {
            name: &target,
            protocol,
        },
        identity: &identity,
        action,
    };
    let decision = set.evaluate(&req);
    Ok((target, protocol, decision))
}

/// `HOST:PORT` or `[V6]:PORT` as given to `--ssh-forward` / `--ssh-remote-forward`.
fn split_host_port(address: &str) -> Result<(&str, u32), PolicyCliError> {
    let bad = || PolicyCliError::Usage(format!("{address:?}: give HOST:PORT"));
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok((host, port.parse().map_err(|_| bad())?))
}

/// The target name and protocol `--target` stands for: a configured target by name; else an
/// address, resolved as the daemon resolves a connection's destination (`Config::resolve`);
/// else a name the configuration does not know (the protocol must then be given or implied).
pub fn resolve_target(config: &Config, target: &str) -> (String, Option<Protocol>) {
    if let Some(t) = config.targets.iter().find(|t| t.name == target) {
        return (t.name.clone(), Some(t.protocol()));
    }
    match target.parse::<std::net::SocketAddr>() {
        Ok(addr) => {
            let resolved = config.resolve(crate::net::OrigDstAddr(addr));
            (resolved.name.into_owned(), Some(resolved.protocol))
        }
        Err(_) => (target.to_string(), None),
    }
}

fn print_decision(set: &PolicySet, d: &Decision) {
    if d.observe_only {
        println!(
            "verdict:   allow (observe mode; would have been: {})",
            d.decided
        );
    } else {
        println!("verdict:   {}", d.verdict);
    }
    println!(
        "basis:     {}",
        serde_json::to_value(d.basis)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    for id in &d.rules {
        match set.rules.iter().find(|r| &r.id == id) {
            Some(r) => println!(
                "rule:      {id} ({}){}",
                r.origin,
                r.description
                    .as_deref()
                    .map(|s| format!(" - {s}"))
                    .unwrap_or_default()
            ),
            None => println!("rule:      {id}"),
        }
    }
    if let Some(m) = &d.message {
        println!("message:   {m}");
    }
    if let Some(t) = d.approval_timeout {
        println!("approval:  held up to {}", humantime::format_duration(t));
    }
    if let Some(why) = &d.unknown {
        println!("unknown:   {why}");
    }
    if let Some(sql) = &d.sql {
        let join = |it: &mut dyn Iterator<Item = String>| {
            let v: Vec<String> = it.collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        println!(
            "sql:       {}",
            join(&mut sql.classes.iter().map(ToString::to_string))
        );
        println!("objects:   {}", join(&mut sql.objects.iter().cloned()));
        println!("functions: {}", join(&mut sql.functions.iter().cloned()));
    }
    for m in &d.masks {
        let what: Vec<String> = m
            .detectors
            .iter()
            .map(ToString::to_string)
            .chain(
                serde_json::to_value(&m.columns)
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_string)),
            )
            .collect();
        println!("mask:      {} ({}: {})", m.rule, m.style, what.join(", "));
    }
}

fn identity_of(args: &TestArgs) -> ProcessIdentity {
    let ancestors = args
        .ancestors
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (comm, exe) = if a.contains('/') {
                (
                    a.rsplit('/').next().unwrap_or(a).to_string(),
                    Some(a.clone()),
                )
            } else {
                (a.clone(), None)
            };
            Ancestor {
                pid: u32::try_from(i).unwrap_or(0) + 2,
                comm,
                exe,
                governed: true,
            }
        })
        .collect();
    ProcessIdentity {
        pid: 1,
        tid: 1,
        // SAFETY: getuid has no preconditions.
        uid: args.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
        gid: args.uid.unwrap_or_else(|| unsafe { libc::getgid() }),
        user: args.user.clone(),
        comm: args.process.clone(),
        exe: args.exe.clone(),
        cmdline: vec![args.process.clone()],
        cgroup_id: 0,
        cgroup: args.cgroup.clone(),
        unit: args.unit.clone(),
        ancestors,
    }
}

/// `https://host:port/path?q` → (`host:port`, `/path?q`); a bare `/path` has no host.
fn split_url(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    if rest.starts_with('/') {
        return (String::new(), rest.to_string());
    }
    match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (rest[..i].to_string(), rest[i..].to_string()),
        Some(i) => (rest[..i].to_string(), format!("/{}", &rest[i..])),
        None => (rest.to_string(), "/".to_string()),
    }
}

type KubeParts = (String, String, Option<String>, Option<String>);

/// kubectl-style words into (verb, resource, subresource, name).
fn parse_kube(text: &str) -> Result<KubeParts, PolicyCliError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let usage = || {
        PolicyCliError::Usage(format!(
            "--kube {text:?}: write VERB RESOURCE[/NAME[/SUBRESOURCE]] [NAME]"
        ))
    };
    match words.as_slice() {
        ["logs", name] => Ok((
            "get".into(),
            "pods".into(),
            Some("log".into()),
            Some((*name).into()),
        )),
        ["exec", name, ..] => Ok((
            "create".into(),
            "pods".into(),
            Some("exec".into()),
            Some((*name).into()),
        )),
        [verb, what, rest @ ..] => {
            let mut parts = what.splitn(3, '/');
            let resource = parts.next().ok_or_else(usage)?.to_string();
            let mut name = parts.next().map(str::to_string);
            let sub = parts.next().map(str::to_string);
            if let [n] = rest {
                name = Some((*n).to_string());
            } else if !rest.is_empty() {
                return Err(usage());
            }
            Ok(((*verb).to_string(), resource, sub, name))
        }
        _ => Err(usage()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_kube_words() {
        assert_eq!(
            split_url("https://api.internal:8443/v1/x?y=1"),
            ("api.internal:8443".into(), "/v1/x?y=1".into())
        );
        assert_eq!(split_url("http://h"), ("h".into(), "/".into()));
        assert_eq!(split_url("/v1"), (String::new(), "/v1".into()));
        assert_eq!(
            parse_kube("get pods").unwrap(),
            ("get".into(), "pods".into(), None, None)
        );
        assert_eq!(
            parse_kube("delete deployments/web").unwrap(),
            (
                "delete".into(),
                "deployments".into(),
                None,
                Some("web".into())
            )
        );
        assert_eq!(
            parse_kube("get pods web-1").unwrap().3,
            Some("web-1".into())
        );
        assert_eq!(parse_kube("exec web-1").unwrap().2, Some("exec".into()));
        assert_eq!(
            parse_kube("get pods/web-1/log").unwrap().2,
            Some("log".into())
        );
        assert!(parse_kube("get").is_err());
    }
}

/// `--ssh-agent` / `--ssh-x11`: the forwarding asked about (it names no host).
fn channel_forward(args: &TestArgs) -> Option<SshForward> {
    if args.ssh_agent {
        Some(SshForward::Agent)
    } else if args.ssh_x11 {
        Some(SshForward::X11)
    } else {
        None
    }
}
