//! `bulkhead daemon`: put the pieces together and run until told to stop.
//!
//! Order matters: the listeners are bound before the programs are attached, so there is no
//! moment when a redirected connect finds nobody listening because of us; the store is open
//! before the first accept, so every connection is recorded.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tracing::{error, info, warn};

use crate::{
    approval::ApprovalBroker,
    cgroup,
    config::{Config, Source, TargetKind},
    control::{self, Containment, ControlState, DaemonInfo},
    credentials::CredentialRef,
    ebpf::{rules::CaptureRules, Mode, Redirector},
    exclusive::{lock_dir, LockError},
    identity::ProcReader,
    proxy::{self, Gateway, StatsSnapshot},
    record::{now_micros, SessionStore, SledStore},
};

/// How long running sessions get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Ebpf(#[from] crate::ebpf::EbpfError),
    #[error(transparent)]
    Store(#[from] crate::record::StoreError),
    #[error(
        "cannot listen on {addr}: {source}{}",
        if source.kind() == std::io::ErrorKind::AddrInUse {
            " (another program holds the port: `ss -ltnp` names it; the port is `listener.port` in the configuration)"
        } else {
            ""
        }
    )]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Exclusive(#[from] LockError),
}

/// The lowest port an unprivileged process may bind (`net.ipv4.ip_unprivileged_port_start`;
/// 1024 when unreadable, the kernel's default).
pub(crate) fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// What can be checked before any session and is wrong, without being a reason to refuse
/// to start: credentials the gateway cannot read, an admin group that does not exist, a
/// governed user in the admin group, a listener port any user could bind.
fn startup_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for t in &config.targets {
        let mut creds: Vec<&CredentialRef> = t.credentials.iter().collect();
        if let TargetKind::Postgres(pg) = &t.kind {
            creds.extend(pg.map.iter().filter_map(|m| m.credentials.as_ref()));
        }
        for c in creds {
            if let Err(e) = c.read_secret() {
                problems.push(format!(
                    "target {}: credentials unreadable ({e}): its sessions will fail to log in",
                    t.name
                ));
            }
        }
    }
    if control::group_gid(&config.daemon.admin_group).is_none() {
        problems.push(format!(
            "admin group {:?} does not exist: only root can use the CLI (groupadd --system {})",
            config.daemon.admin_group, config.daemon.admin_group
        ));
    }
    let port = config.listener.port;
    if port >= unprivileged_port_start() {
        problems.push(format!(
            "listener.port {port} can be bound by any local user (ip_unprivileged_port_start is \
             {}): while the daemon is down such a user could receive the governed connections \
             the pinned programs still send there; use a port below it (the default is {})",
            unprivileged_port_start(),
            crate::config::DEFAULT_LISTENER_PORT
        ));
    }
    problems.extend(crate::privilege::warnings(config));
    problems
}

/// Verbosity of the kernel side's aya-log messages, from the daemon's log filter.
fn kernel_log_level(filter: &str) -> u8 {
    // aya-log levels: error 1, warn 2, info 3, debug 4, trace 5.
    if filter.contains("trace") {
        5
    } else if filter.contains("debug") {
        4
    } else {
        2
    }
}

pub async fn run(config: Config) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let mount = cgroup::cgroup2_mount()?;
    let governed = config.governed.resolve(&mount)?;
    cgroup::ensure(&governed)?;
    let governed_rel = cgroup::relative(&mount, &governed);
    // One daemon per governed cgroup and pin directory, held until this one exits (a
    // fail-open daemon pins nothing).
    let _exclusive = {
        let cgroup_lock = lock_dir(&governed)?;
        let pins = &config.daemon.bpf_pin_dir;
        let pin_lock = if config.daemon.fail_open {
            None
        } else {
            crate::ebpf::ensure_pin_dir(pins)?;
            Some(lock_dir(pins)?)
        };
        (cgroup_lock, pin_lock)
    };

    // Records the pinned programs left for connections nobody accepted (the previous daemon
    // stopped with them queued) go before the listener exists: none can be lent to a later
    // connection from the same local address and port.
    if !config.daemon.fail_open {
        match crate::ebpf::clear_stale_records(&config.daemon.bpf_pin_dir) {
            Ok(0) => {}
            Ok(n) => info!(records = n, "removed connection records nobody accepted"),
            Err(e) => warn!(error = %e, "cannot clear stale connection records"),
        }
    }
    let mut listeners = vec![bind(config.listener_v4()).await?];
    // An IPv6 listener that cannot be bound is fatal: set `listener.ipv6 = ""` to run without
    // one (governed IPv6 connects are then refused).
    if let Some(v6) = config.listener_v6() {
        listeners.push(bind(v6).await?);
    }
    let listener_names: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
        .collect();
    // The DNS forwarder: the same addresses and port, over UDP, where the kernel sends
    // governed processes' queries to the configured resolvers. Fatal like the listeners: a
    // port someone else holds would receive those queries.
    let mut dns_sockets = Vec::new();
    if !config.capture.dns.is_empty() {
        for addr in std::iter::once(config.listener_v4()).chain(config.listener_v6()) {
            dns_sockets.push(crate::dns::bind(addr).await.map_err(|source| {
                DaemonError::Listen {
                    addr: format!("{addr}/udp (the DNS forwarder)"),
                    source,
                }
            })?);
        }
    }

    // The record is for admins only: root and the admin group may read it (the CLI does when
    // the daemon is down), nobody else may even list the directory.
    let admin_gid = control::group_gid(&config.daemon.admin_group);
    for (dir, mode) in [
        (&config.daemon.state_dir, 0o750),
        (&config.daemon.run_dir, 0o755),
    ] {
        let dir_err = |source| DaemonError::Dir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(dir_err)?;
        if mode == 0o750 {
            std::os::unix::fs::chown(dir, Some(0), admin_gid).map_err(dir_err)?;
        }
    }
    let store = SledStore::open_waiting(&config.store_path(), Duration::from_secs(5))?;
    let interrupted = store.mark_interrupted()?;
    if interrupted > 0 {
        warn!(
            sessions = interrupted,
            "sessions left open by the previous daemon marked interrupted"
        );
    }
    let store: Arc<dyn SessionStore> = Arc::new(store);

    let mode = if config.daemon.fail_open {
        Mode::FailOpen
    } else {
        Mode::FailClosed
    };
    let rules = CaptureRules::from_config(&config);
    let mut redirector = Redirector::attach(
        &governed,
        &rules,
        &config.daemon.bpf_pin_dir,
        mode,
        kernel_log_level(&config.daemon.log),
    )?;
    match redirector.logger() {
        Ok(logger) => {
            tokio::spawn(forward_kernel_logs(logger));
        }
        Err(e) => warn!(error = %e, "kernel-side logs unavailable"),
    }
    let mut orig_dst = redirector.orig_dst()?;
    orig_dst.fast_path = redirector.take_fast_path()?;
    if orig_dst.fast_path.is_some() {
        info!("kernel fast path on: sk_msg moves loopback sends between governed sockets and the gateway");
    }
    let orig_dst = Arc::new(orig_dst);
    let dns_origin: Arc<dyn crate::dns::DnsOrigin> = Arc::new(redirector.dns_origin()?);
    let udp_flows = redirector.udp_flows()?;
    let refusals = redirector.refusals()?;
    info!(
        cgroup = %governed.display(),
        mode = ?mode,
        listeners = ?listener_names,
        config = %config.source,
        "governing connections"
    );

    let startup_problems = startup_problems(&config);
    for problem in &startup_problems {
        warn!("{problem}");
    }
    let policy = crate::policy::PolicyHandle::new(&config.daemon.policy_dir);
    let embedded = matches!(config.source, Source::Embedded);
    if embedded && policy.start_with_starter_if_missing() {
        warn!(
            dir = %config.daemon.policy_dir.display(),
            "NO POLICY DIRECTORY: running the built-in starter policy in OBSERVE MODE. Every \
             connection and statement is recorded with the verdict an enforcing policy would \
             give, and NOTHING IS BLOCKED OR MASKED. To enforce: `bulkhead policy init` (writes \
             the example policies to the directory; they load within seconds)"
        );
    } else {
        match policy.reload() {
            Ok(version) => {
                info!(dir = %config.daemon.policy_dir.display(), version, "policies loaded");
            }
            Err(e) => warn!(
            dir = %config.daemon.policy_dir.display(),
            error = %e,
            "no valid policies: every decision is deny until they load (fail closed)"
            ),
        }
    }
    tokio::spawn(crate::policy::watch(policy.clone()));
    // The policy's UDP destinations, in the kernel now and after every reload.
    sync_udp_policy(&mut redirector, &rules, &policy);
    // Approvals: one broker for every protocol handler and the control socket.
    let approvals = Arc::new(ApprovalBroker::new(Arc::clone(&store), config.approvals));

    let gateway = Arc::new(Gateway {
        config: Arc::clone(&config).into(),
        orig_dst,
        store: Arc::clone(&store),
        proc: ProcReader::new("/", governed_rel.clone())
            .governing_uids(config.governed.uids.clone()),
        stats: Arc::default(),
        policy,
        tls: match crate::tls::LocalCa::load_or_create(&config.daemon.state_dir.join("ca")) {
            Ok(ca) => Some(Arc::new(ca)),
            Err(e) => {
                warn!(error = %e, "no local CA: clients asking for TLS are declined");
                None
            }
        },
        approvals: Arc::clone(&approvals),
    });
    // The bundle governed tools trust (system roots and the gateway's CA), for `bulkhead run`.
    if let Some(ca) = &gateway.tls {
        match crate::tls::write_bundle(
            ca,
            std::path::Path::new(crate::proxy::http::SYSTEM_ROOTS),
            &config.daemon.run_dir,
        ) {
            Ok(path) => info!(path = %path.display(), "CA bundle for governed tools written"),
            Err(e) => warn!(error = %e, "cannot write the CA bundle for governed tools"),
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let control_path = config.control_socket();
    let control_listener =
        control::bind(&control_path, &config.daemon.admin_group).map_err(|source| {
            DaemonError::Control {
                path: control_path.clone(),
                source,
            }
        })?;
    let state = Arc::new(ControlState {
        store: Arc::clone(&gateway.store),
        stats: Arc::clone(&gateway.stats),
        policy: gateway.policy.clone(),
        info: DaemonInfo {
            pid: std::process::id(),
            started_at_us: now_micros(),
            config: config.source.to_string(),
            mode: match mode {
                Mode::FailClosed => "fail-closed".into(),
                Mode::FailOpen => "fail-open".into(),
            },
            listeners: listener_names,
            connections: StatsSnapshot::default(),
            targets: control::target_infos(&config),
            warnings: startup_problems,
            config_changed: false,
            restart_needed: Vec::new(),
            containment: Containment {
                socket_filter: redirector.socket_filter.describe().to_string(),
                sockets_allowed: config
                    .capture
                    .sockets
                    .iter()
                    .map(|k| format!("{k:?}").to_lowercase())
                    .collect(),
                dns: config.capture.dns.iter().map(ToString::to_string).collect(),
                dns_forwarder: dns_sockets
                    .iter()
                    .filter_map(|s| s.local_addr().ok().map(|a| format!("{a}/udp")))
                    .collect(),
                udp_allow: config
                    .capture
                    .udp_allow
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                udp_policy: Vec::new(),
                udp_policy_notes: Vec::new(),
                unix: match &redirector.unix_filter {
                    Ok(()) => format!(
                        "connects and sends only to {} (cgroup/connect_unix); every other \
                         address refused and recorded",
                        if config.capture.unix_allow.is_empty() {
                            "none".to_string()
                        } else {
                            config.capture.unix_allow.join(", ")
                        }
                    ),
                    Err(why) => format!("NOT governed: {why}"),
                },
                fast_path: match &redirector.fast_path {
                    Ok(true) => "on".into(),
                    Ok(false) => "off".into(),
                    Err(why) => format!("off: {why}"),
                },
                fast_path_counters: None,
            },
        },
        reloaded: std::sync::Mutex::default(),
        config_file: match &config.source {
            Source::File(path) => Some((path.clone(), crate::config::file_digest(path))),
            Source::Embedded => None,
        },
        governed_cgroup: governed.clone(),
        governed_uids: config.governed.uids.clone(),
        cgroup_mount: mount,
        pin_dir: config.daemon.bpf_pin_dir.clone(),
        admin_group: config.daemon.admin_group.clone(),
        retention: config.store.retention,
        approvals: Arc::clone(&approvals),
    });
    tokio::spawn(prune_periodically(
        Arc::clone(&store),
        config.store,
        shutdown_rx.clone(),
    ));
    tokio::spawn(control::serve(
        control_listener,
        Arc::clone(&state),
        shutdown_rx.clone(),
    ));
    let refusals_done = tokio::spawn(crate::refusals::record(
        refusals,
        crate::refusals::Recorder::new(
            Arc::clone(&store),
            ProcReader::new("/", governed_rel.clone()).governing_uids(config.governed.uids.clone()),
        ),
        shutdown_rx.clone(),
    ));
    let dns_recorder = Arc::new(crate::dns::record::Recorder::new(
        Arc::clone(&store),
        ProcReader::new("/", governed_rel.clone()).governing_uids(config.governed.uids.clone()),
    ));
    let dns_forwarder = Arc::new(crate::dns::Forwarder::new(
        dns_origin,
        Arc::clone(&dns_recorder),
    ));
    for socket in dns_sockets {
        tokio::spawn(crate::dns::serve(
            socket,
            Arc::clone(&dns_forwarder),
            shutdown_rx.clone(),
        ));
    }
    let dns_sweep = tokio::spawn(crate::dns::sweep(dns_recorder, shutdown_rx.clone()));
    let flows_done = tokio::spawn(crate::udp_flows::record(
        udp_flows,
        crate::udp_flows::Recorder::new(
            Arc::clone(&store),
            ProcReader::new("/", governed_rel.clone()).governing_uids(config.governed.uids.clone()),
        ),
        shutdown_rx.clone(),
    ));
    let redirector = Arc::new(std::sync::Mutex::new(redirector));
    tokio::spawn(follow_udp_policy(
        Arc::clone(&redirector),
        rules,
        gateway.policy.clone(),
        shutdown_rx.clone(),
    ));
    let protocols = Arc::new(proxy::Protocols {
        ssh: proxy::ssh::Shared::load(&config.daemon.state_dir, &config.daemon.run_dir),
        ..proxy::Protocols::default()
    });
    if let Source::File(path) = &config.source {
        tokio::spawn(reload_on_hangup(
            path.clone(),
            Arc::clone(&state),
            Arc::clone(&gateway),
            Arc::clone(&protocols),
        ));
    }
    let accept_loops: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            tokio::spawn(proxy::serve(
                l,
                Arc::clone(&gateway),
                Arc::clone(&protocols),
                shutdown_rx.clone(),
            ))
        })
        .collect();

    wait_for_signal().await?;
    info!("stopping: no new connections");
    let _ = shutdown_tx.send(true);
    // Nobody can approve once the control socket stops: refuse held requests now, so their
    // sessions can finish within the drain.
    approvals.shutdown();
    for l in accept_loops {
        let _ = l.await;
    }
    let deadline = tokio::time::Instant::now() + DRAIN;
    while gateway.stats.snapshot().active > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = gateway.stats.snapshot().active;
    if left > 0 {
        warn!(
            sessions = left,
            "sessions still open at the drain deadline; they will be marked interrupted"
        );
    }
    // The refusals recorder closes its open sessions on shutdown.
    let _ = refusals_done.await;
    let _ = dns_sweep.await;
    let _ = flows_done.await;
    if let Err(e) = store.flush() {
        error!(error = %e, "flushing the session store");
    }
    let _ = std::fs::remove_file(&control_path);
    match mode {
        Mode::FailClosed => info!("stopped; programs stay attached: governed connections are refused until the daemon returns"),
        Mode::FailOpen => info!("stopped; programs detached (fail-open)"),
    }
    drop(redirector);
    Ok(())
}

/// Writes the UDP destinations the policy in force opens into the kernel (with the
/// configuration's). Returns the policy version it compiled.
fn sync_udp_policy(
    redirector: &mut Redirector,
    rules: &CaptureRules,
    policy: &crate::policy::PolicyHandle,
) -> u64 {
    let version = policy.status().version;
    let compiled = crate::ebpf::udp_policy::compile(&policy.current());
    for note in &compiled.notes {
        warn!("{note}");
    }
    match redirector.sync_udp_allow(rules, &compiled.entries) {
        Ok(()) => info!(
            destinations = ?compiled.allowed,
            "UDP destinations opened by the policy"
        ),
        Err(e) => error!(error = %e, "cannot write the policy's UDP destinations"),
    }
    version
}

/// Recompiles the policy's UDP destinations after each reload.
async fn follow_udp_policy(
    redirector: Arc<std::sync::Mutex<Redirector>>,
    rules: CaptureRules,
    policy: crate::policy::PolicyHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut done = policy.status().version;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if policy.status().version == done {
                    continue;
                }
                let mut r = redirector.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                done = sync_udp_policy(&mut r, &rules, &policy);
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Applies retention now and then, off the runtime's worker threads.
async fn prune_periodically(
    store: Arc<dyn SessionStore>,
    cfg: crate::config::StoreConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    if cfg.retention == crate::record::Retention::default() {
        return;
    }
    loop {
        let st = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || st.prune(&cfg.retention, now_micros())).await {
            Ok(Ok(r)) if r.sessions > 0 => info!(
                sessions = r.sessions,
                events = r.events,
                bytes = r.bytes,
                "pruned the session record"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!(error = %e, "pruning the session record"),
            Err(e) => error!(error = %e, "pruning task failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(cfg.prune_interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, DaemonError> {
    let listen_err = |source| DaemonError::Listen {
        addr: addr.to_string(),
        source,
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(listen_err)?;
    socket.set_reuseaddr(true).map_err(listen_err)?;
    socket.bind(addr).map_err(listen_err)?;
    // Deep enough for bursts of connects while the accept loop shares the runtime with relays.
    socket.listen(4096).map_err(listen_err)
}

async fn wait_for_signal() -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Moves aya-log records from the kernel's ring buffer into `tracing`.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's descriptor for as long as it lives, and the
    // `AsyncFd` owns the logger, so the descriptor stays open and the same until it is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "kernel-side logs unavailable");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// SIGHUP reloads policies (they also reload by themselves) and, when the configuration file
/// changed, its targets: connections accepted from then on resolve their destination under
/// the new target table; sessions already open keep the one they started with. A file that
/// does not load changes nothing (the log says why). Other sections that differ from what runs
/// (listener, cgroup, capture rules, store, approvals) apply after a restart: the log and
/// `status` name them.
async fn reload_on_hangup(
    path: PathBuf,
    state: Arc<ControlState>,
    gateway: Arc<Gateway>,
    protocols: Arc<proxy::Protocols>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let mut read = state.config_file.as_ref().and_then(|(_, d)| *d);
    while hup.recv().await.is_some() {
        let digest = crate::config::file_digest(&path);
        if digest == read {
            continue;
        }
        let newer = match Config::load(Some(&path)) {
            Ok(c) => c,
            Err(e) => {
                warn!(
                    config = %path.display(),
                    error = %e,
                    "configuration file not reloaded: it does not load; the daemon keeps what it runs"
                );
                continue;
            }
        };
        let running = gateway.config.current();
        let restart: Vec<String> = running
            .restart_needed(&newer)
            .into_iter()
            .map(str::to_string)
            .collect();
        let applied = Arc::new(running.with_targets_of(&newer));
        let names = |c: &Config| -> std::collections::BTreeSet<String> {
            c.targets.iter().map(|t| t.name.clone()).collect()
        };
        let (before, after) = (names(&running), names(&applied));
        let problems = startup_problems(&applied);
        let targets = control::target_infos(&applied);
        gateway.config.replace(applied);
        // Upstream TLS settings are cached by target name: a target's CA or client
        // certificate may have changed with it.
        protocols.http.forget_upstream_tls();
        info!(
            config = %path.display(),
            targets = targets.len(),
            added = ?after.difference(&before).collect::<Vec<_>>(),
            removed = ?before.difference(&after).collect::<Vec<_>>(),
            "configuration reloaded: its targets apply to new connections; open sessions keep theirs"
        );
        for problem in &problems {
            warn!("{problem}");
        }
        if !restart.is_empty() {
            warn!(
                config = %path.display(),
                sections = ?restart,
                "configuration file changed in sections that apply after a restart \
                 (systemctl restart bulkhead)"
            );
        }
        *state
            .reloaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(control::Reloaded {
            digest,
            targets,
            warnings: problems,
            restart_needed: restart,
        });
        read = digest;
    }
}
