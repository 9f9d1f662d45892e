//! The session pipeline, driven in process with a mock kernel record: connections are decided
//! before a byte reaches the target, recorded, refused, held and relayed.

use std::{path::Path, sync::atomic::AtomicU64};

use super::*;
use crate::{
    approval::{ApprovalBroker, Approver},
    config::{Config, Source},
    ebpf::{MockOrigDst, OrigDst},
    identity::ProcReader,
    net::to_kernel_bytes,
    policy::{self, PolicyHandle},
    record::{EventKind, ListFilter, RecordedVerdict, Session, SessionStore, SledStore},
};
use bulkhead_common::ConnectRecord;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A gateway on loopback with a policy directory of its own, fed by a mock kernel record.
struct Harness {
    gw: Arc<Gateway>,
    listener: SocketAddr,
    orig: Arc<MockOrigDst>,
    _policies: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

impl Harness {
    async fn new(config: &str, policy: &str) -> Self {
        let policies = tempfile::tempdir().unwrap();
        std::fs::write(policies.path().join("test.toml"), policy).unwrap();
        Self::with_policy_dir(config, policies).await
    }

    async fn with_policy_dir(config: &str, policies: tempfile::TempDir) -> Self {
        let config = Config::from_toml(config, Source::Embedded).unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::temporary().unwrap());
        let approvals = Arc::new(ApprovalBroker::new(Arc::clone(&store), config.approvals));
        let orig = Arc::new(MockOrigDst::default());
        let gw = Arc::new(Gateway {
            config: Arc::new(config).into(),
            orig_dst: Arc::clone(&orig) as Arc<dyn OrigDst>,
            store,
            proc: ProcReader::new("/", "/none"),
            stats: Arc::default(),
            policy: PolicyHandle::open(policies.path()).unwrap(),
            approvals,
            tls: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::clone(&gw), Arc::default(), rx));
        Self {
            gw,
            listener: addr,
            orig,
            _policies: policies,
            _shutdown: tx,
        }
    }

    /// Connects as a governed process named `comm`, with the record in place before the
    /// gateway can accept, as the kernel does.
    async fn connect_as(&self, comm: &str, dst: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        self.orig.insert(
            ClientAddr(socket.local_addr().unwrap()),
            record_for(dst, comm),
        );
        socket.connect(self.listener).await.unwrap()
    }

    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        self.connect_as("unit-test", dst).await
    }

    /// The newest session, once it has ended.
    async fn closed(&self) -> Session {
        for _ in 0..500 {
            if let Some(s) = self.gw.store.list(&ListFilter::default(), 1).unwrap().pop() {
                if s.outcome != Outcome::Open {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("session never closed");
    }

    /// The request events of a session.
    fn requests(&self, session: SessionId) -> Vec<EventKind> {
        self.gw
            .store
            .events(session)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| matches!(k, EventKind::Request { .. }))
            .collect()
    }

    /// The id of the one approval pending, once it is.
    async fn pending_approval(&self) -> u64 {
        for _ in 0..500 {
            if let [one] = self.gw.approvals.list_pending().as_slice() {
                return one.id;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no approval pending");
    }
}

fn record_for(dst: SocketAddr, comm: &str) -> ConnectRecord {
    let mut name = [0u8; 16];
    name[..comm.len()].copy_from_slice(comm.as_bytes());
    ConnectRecord {
        cgroup_id: 1,
        dst_addr: to_kernel_bytes(dst.ip()),
        dst_port: dst.port(),
        family: bulkhead_common::AF_INET,
        pid: std::process::id(),
        tgid: std::process::id(),
        uid: 0,
        gid: 0,
        comm: name,
        reserved: 0,
    }
}

/// An echo server that counts the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, accepted)
}

/// Sends `text`, half-closes, and returns what came back (an error when the gateway reset).
async fn round_trip(mut c: TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
    c.write_all(text).await?;
    c.shutdown().await?;
    let mut back = Vec::new();
    c.read_to_end(&mut back).await?;
    Ok(back)
}

fn target_config(name: &str, addr: SocketAddr, protocol: &str) -> String {
    // A postgres target without credentials logs in only where the server asks for nothing.
    let auth = if protocol == "postgres" {
        "postgres = { auth = [\"none\"] }\n"
    } else {
        ""
    };
    format!("[[target]]\nname = \"{name}\"\naddresses = [\"{addr}\"]\nprotocol = \"{protocol}\"\n{auth}")
}

fn tcp_target(name: &str, addr: SocketAddr) -> String {
    target_config(name, addr, "tcp")
}

const ALLOW_TCP: &str = "[[target]]\nprotocol = \"tcp\"\ndefault = \"allow\"\n";

/// The one request event's verdict, rules and observed flag.
fn only_request(events: &[EventKind]) -> (RecordedVerdict, Vec<String>, bool, String) {
    match events {
        [EventKind::Request {
            verdict,
            rules,
            observed,
            class,
            ..
        }] => (
            *verdict,
            rules.to_vec(),
            *observed,
            class.as_deref().unwrap_or_default().to_string(),
        ),
        other => panic!("expected one request event: {other:?}"),
    }
}

#[tokio::test]
async fn an_allowed_connection_is_relayed_and_its_decision_recorded() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::new(&tcp_target("echo", echo), ALLOW_TCP).await;
    let back = round_trip(h.connect(echo).await, b"hello through the gateway").await;
    assert_eq!(back.unwrap(), b"hello through the gateway");
    let s = h.closed().await;
    assert_eq!(s.outcome, Outcome::Closed);
    assert_eq!(s.start.destination, OrigDstAddr(echo));
    assert_eq!(s.start.target.as_deref(), Some("echo"));
    assert_eq!((s.bytes_to_target, s.bytes_from_target), (25, 25));
    assert_eq!(s.start.identity.comm, "unit-test");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let (verdict, rules, observed, class) = only_request(&h.requests(s.id));
    assert_eq!(
        (verdict, rules, observed, class.as_str()),
        (
            RecordedVerdict::Allow,
            vec!["target:echo:default".to_string()],
            false,
            "connect"
        )
    );
}

#[tokio::test]
async fn a_tcp_target_whose_default_is_deny_is_refused_before_the_target_sees_anything() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::new(
        &tcp_target("build-host", echo),
        "[[target]]\nname = \"build-host\"\ndefault = \"deny\"\n",
    )
    .await;
    let result = round_trip(h.connect(echo).await, b"must not arrive").await;
    // Reset, not a clean empty answer.
    assert!(
        result.is_err() || result.as_ref().is_ok_and(Vec::is_empty),
        "{result:?}"
    );
    let s = h.closed().await;
    assert!(
        matches!(&s.outcome, Outcome::Refused { reason } if reason.contains("no policy allows")),
        "{:?}",
        s.outcome
    );
    assert!(s.was_denied());
    assert_eq!((s.bytes_to_target, s.bytes_from_target), (0, 0));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the target saw a connection"
    );
    let (verdict, rules, ..) = only_request(&h.requests(s.id));
    assert_eq!(verdict, RecordedVerdict::Deny);
    assert_eq!(rules, vec!["target:build-host:default".to_string()]);
    assert_eq!(h.gw.stats.snapshot().refused, 1);
}

#[tokio::test]
async fn an_identity_gate_lets_one_process_through_and_refuses_another() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::new(
        &tcp_target("build-host", echo),
        "[[target]]\nname = \"build-host\"\ndefault = \"deny\"\n\
         [[rule]]\nid = \"git-may\"\nverdict = \"allow\"\ntarget = { name = [\"build-host\"] }\n\
         identity = { process = [\"git\"] }\n",
    )
    .await;
    let back = round_trip(h.connect_as("git", echo).await, b"fetch").await;
    assert_eq!(back.unwrap(), b"fetch");
    let s = h.closed().await;
    assert_eq!(s.outcome, Outcome::Closed);
    assert_eq!(
        only_request(&h.requests(s.id)).1,
        vec!["git-may".to_string()]
    );

    let _ = round_trip(h.connect_as("curl", echo).await, b"nope").await;
    let s = h.closed().await;
    assert!(
        matches!(s.outcome, Outcome::Refused { .. }),
        "{:?}",
        s.outcome
    );
    assert_eq!(s.start.identity.comm, "curl");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_approve_verdict_holds_the_connection_until_an_admin_decides() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::new(
        &tcp_target("jump", echo),
        "[[target]]\nname = \"jump\"\ndefault = \"deny\"\n\
         [[rule]]\nid = \"jump-needs-approval\"\nverdict = \"approve\"\ntarget = { name = [\"jump\"] }\n",
    )
    .await;
    let admin = Approver {
        uid: 0,
        user: Some("root".into()),
    };

    // Approved: held (the target sees nothing meanwhile), then relayed.
    let client = tokio::spawn(round_trip(h.connect(echo).await, b"after approval"));
    let id = h.pending_approval().await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "relayed before approval"
    );
    let pending = h.gw.approvals.list_pending();
    assert_eq!(pending[0].text, format!("connect {echo}"));
    h.gw.approvals
        .approve(id, admin.clone(), Some("ticket 7".into()), None)
        .unwrap();
    assert_eq!(client.await.unwrap().unwrap(), b"after approval");
    let s = h.closed().await;
    assert_eq!(s.outcome, Outcome::Closed);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Denied: refused and recorded as denied.
    let client = tokio::spawn(round_trip(h.connect(echo).await, b"never"));
    let id = h.pending_approval().await;
    h.gw.approvals
        .deny(id, admin, Some("not now".into()))
        .unwrap();
    let result = client.await.unwrap();
    assert!(
        result.is_err() || result.as_ref().is_ok_and(Vec::is_empty),
        "{result:?}"
    );
    let s = h.closed().await;
    assert!(
        matches!(&s.outcome, Outcome::Refused { reason } if reason.contains("not now")),
        "{:?}",
        s.outcome
    );
    assert!(s.was_denied());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn observe_mode_relays_and_records_what_would_have_been_enforced() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::new(
        &tcp_target("build-host", echo),
        "[[target]]\nname = \"build-host\"\ndefault = \"deny\"\nmode = \"observe\"\n",
    )
    .await;
    let back = round_trip(h.connect(echo).await, b"observed").await;
    assert_eq!(back.unwrap(), b"observed");
    let s = h.closed().await;
    assert_eq!(s.outcome, Outcome::Closed);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let (verdict, _, observed, _) = only_request(&h.requests(s.id));
    assert_eq!((verdict, observed), (RecordedVerdict::Deny, true));
}

#[tokio::test]
async fn an_unmatched_destination_is_judged_as_a_tcp_target_named_by_its_address() {
    let (denied, denied_accepted) = echo_server().await;
    let (allowed, _) = echo_server().await;
    let h = Harness::new(
        "",
        &format!(
            "{ALLOW_TCP}[[rule]]\nid = \"not-that-one\"\nverdict = \"deny\"\n\
             target = {{ name = [\"{denied}\"] }}\n"
        ),
    )
    .await;
    let _ = round_trip(h.connect(denied).await, b"x").await;
    let s = h.closed().await;
    assert!(
        matches!(s.outcome, Outcome::Refused { .. }),
        "{:?}",
        s.outcome
    );
    assert_eq!(s.start.target, None);
    assert_eq!(
        only_request(&h.requests(s.id)).1,
        vec!["not-that-one".to_string()]
    );
    assert_eq!(denied_accepted.load(Ordering::SeqCst), 0);

    let back = round_trip(h.connect(allowed).await, b"y").await;
    assert_eq!(back.unwrap(), b"y");
    let s = h.closed().await;
    assert_eq!(s.outcome, Outcome::Closed);
    assert_eq!(
        only_request(&h.requests(s.id)).1,
        vec![format!("target:{allowed}:default")]
    );
}

#[tokio::test]
async fn with_no_policy_loaded_every_opaque_connection_is_refused() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::with_policy_dir("", tempfile::tempdir().unwrap()).await;
    let _ = round_trip(h.connect(echo).await, b"x").await;
    let s = h.closed().await;
    assert!(
        matches!(s.outcome, Outcome::Refused { .. }),
        "{:?}",
        s.outcome
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_connection_without_a_record_is_closed_and_recorded_as_refused() {
    let h = Harness::new("", ALLOW_TCP).await;
    let mut c = TcpStream::connect(h.listener).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        c.read(&mut buf).await.unwrap_or(0),
        0,
        "closed without data"
    );
    let s = h.closed().await;
    assert!(
        matches!(s.outcome, Outcome::Refused { .. }),
        "{:?}",
        s.outcome
    );
    assert_eq!(h.gw.stats.snapshot().refused, 1);
}

#[tokio::test]
async fn unmatched_destinations_are_refused_when_configured() {
    let (echo, accepted) = echo_server().await;
    let h = Harness::new("[capture]\nunmatched = \"refuse\"\n", ALLOW_TCP).await;
    let _ = round_trip(h.connect(echo).await, b"x").await;
    let s = h.closed().await;
    assert!(matches!(s.outcome, Outcome::Refused { .. }));
    assert_eq!(s.start.destination, OrigDstAddr(echo));
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_target_that_refuses_is_recorded_as_refused_and_the_client_is_reset() {
    // A port we just closed on loopback refuses connections.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let h = Harness::new("", ALLOW_TCP).await;
    let mut c = h.connect(closed).await;
    let mut buf = [0u8; 1];
    let read = c.read(&mut buf).await;
    assert_eq!(
        read.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "a reset, not an empty answer: {read:?}"
    );
    let s = h.closed().await;
    assert!(
        matches!(&s.outcome, Outcome::TargetRefused { reason }
            if reason.contains(&closed.to_string()) && reason.contains("refused the connection")),
        "{:?}",
        s.outcome
    );
    assert_eq!(s.outcome.label(), "refused");
    assert!(!s.was_denied(), "a closed port is not a policy denial");
}

/// `bulkhead policy test --connect` and the live gateway agree on every example policy in
/// `policies/`: for each file, each target the examples name (plus a `tcp` target and a
/// destination no target names) and a few process names, the connection's
/// recorded decision is the one `policy test` prints for the identity the gateway recorded.
#[tokio::test]
async fn policy_test_connect_and_the_live_gateway_agree_on_every_example_policy() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");

    // The examples' SSH, HTTP and Kubernetes targets are configured as `tcp` until their
    // gateways exist (the configuration refuses those protocols), so their tables do not apply.
    let targets = [
        ("prod-orders", "postgres"),
        ("staging-orders", "postgres"),
        ("orders-db", "postgres"),
        ("build-hosts", "tcp"),
        ("internal-api", "tcp"),
        ("prod-cluster", "tcp"),
        ("artifact-cache", "tcp"),
        ("jump-host", "tcp"),
    ];
    let mut config = String::new();
    let mut destinations = Vec::new();
    for (name, protocol) in targets {
        let (addr, _) = echo_server().await;
        config.push_str(&target_config(name, addr, protocol));
        destinations.push(addr);
    }
    let (unmatched, _) = echo_server().await;
    destinations.push(unmatched);

    let mut checked = 0;
    for file in &files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(file, dir.path().join(file.file_name().unwrap())).unwrap();
        let h = Harness::with_policy_dir(&config, dir).await;
        let set = h.gw.policy.current();
        for &dst in &destinations {
            for comm in ["psql", "claude", "git", "bash"] {
                let (identity, live) = live_connect_decision(&h, comm, dst).await;
                let cli = cli_connect_decision(&h.gw.config.current(), &set, &identity, dst);
                assert_eq!(
                    live,
                    cli,
                    "{}: {comm} → {dst}: the gateway recorded {live:?}, `policy test --connect` says {cli:?}",
                    file.display(),
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, files.len() * destinations.len() * 4);
}

/// A connection decision as both sides can state it: the verdict decided, the rules behind it,
/// and whether it was only observed.
type ConnectDecision = (policy::Verdict, Vec<String>, bool);

/// Connects as `comm` and reads back how the gateway decided: the recorded identity, and the
/// recorded decision (none recorded: a protocol target's pass by default). A connection held
/// for approval is denied by an admin so the test goes on; one held that no one releases
/// fails the test (its session never closes).
async fn live_connect_decision(
    h: &Harness,
    comm: &str,
    dst: SocketAddr,
) -> (ProcessIdentity, ConnectDecision) {
    let before = h.gw.store.list(&ListFilter::default(), 1).unwrap();
    let c = h.connect_as(comm, dst).await;
    // Wait for the session to exist and for its connect decision (or its protocol phase).
    let session = loop {
        let now = h.gw.store.list(&ListFilter::default(), 1).unwrap();
        if now.first().map(|s| s.id) != before.first().map(|s| s.id) {
            break now[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The client leaves at once; the gateway decides anyway. A held connection shows up as a
    // pending approval, which an admin denies; every other one ends by itself.
    drop(c);
    loop {
        if let Some(p) = h.gw.approvals.list_pending().first() {
            h.gw.approvals
                .deny(p.id, Approver { uid: 0, user: None }, None)
                .unwrap();
        }
        let now = h.gw.store.get(session.id).unwrap().unwrap();
        if now.outcome != Outcome::Open {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let closed = h.gw.store.get(session.id).unwrap().unwrap();
    let connect = h.requests(session.id).into_iter().find_map(|k| match k {
        EventKind::Request {
            class: Some(class),
            verdict,
            rules,
            observed,
            ..
        } if class == session::CONNECT_CLASS => Some((verdict, rules, observed)),
        _ => None,
    });
    let decision = if let Some((verdict, rules, observed)) = connect {
        let verdict = match verdict {
            RecordedVerdict::Allow => policy::Verdict::Allow,
            RecordedVerdict::Deny => policy::Verdict::Deny,
            RecordedVerdict::Approve => policy::Verdict::Approve,
            RecordedVerdict::Mask => panic!("a connection is never masked"),
        };
        (verdict, rules.to_vec(), observed)
    } else {
        assert!(
            !matches!(closed.outcome, Outcome::Refused { .. }),
            "refused without a recorded decision: {closed:?}"
        );
        let name = closed.start.target.clone().unwrap_or_default();
        (
            policy::Verdict::Allow,
            vec![format!("target:{name}:connect")],
            false,
        )
    };
    (closed.start.identity, decision)
}

/// What `bulkhead policy test --connect` decides for the identity the gateway recorded.
fn cli_connect_decision(
    config: &Config,
    set: &policy::PolicySet,
    identity: &ProcessIdentity,
    dst: SocketAddr,
) -> ConnectDecision {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: policy::cli::TestArgs,
    }
    let mut argv = vec![
        "policy-test".to_string(),
        "--connect".into(),
        "--target".into(),
        dst.to_string(),
        "--uid".into(),
        identity.uid.to_string(),
        "--process".into(),
        identity.comm.clone(),
    ];
    if let Some(user) = &identity.user {
        argv.extend(["--user".into(), user.clone()]);
    }
    if let Some(exe) = &identity.exe {
        argv.extend(["--exe".into(), exe.clone()]);
    }
    for a in &identity.ancestors {
        argv.extend(["--ancestor".into(), a.exe.clone().unwrap_or(a.comm.clone())]);
    }
    if let Some(cgroup) = &identity.cgroup {
        argv.extend(["--cgroup".into(), cgroup.clone()]);
    }
    if let Some(unit) = &identity.unit {
        argv.extend(["--unit".into(), unit.clone()]);
    }
    let cli = Cli::try_parse_from(&argv).unwrap();
    let (_, _, d) = policy::cli::decide(config, set, &cli.args).unwrap();
    (d.decided, d.rules, d.observe_only)
}

/// A connection's task holds no protocol's future inline (each is boxed where it is chosen):
/// the largest of them would size every connection's task, and be copied whole into it at
/// spawn. Inline they made it 10.6 KiB in this (debug) build; boxed, about 3 KiB.
#[tokio::test]
async fn a_connection_task_stays_small() {
    let h = Harness::new("", "").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, peer) = listener.accept().await.unwrap();
    let protocols = super::Protocols::default();
    let task = super::handle(&h.gw, &protocols, accepted, peer);
    let size = std::mem::size_of_val(&task);
    assert!(size < 4096, "a connection's future is {size} bytes");
    drop((task, client));
}
