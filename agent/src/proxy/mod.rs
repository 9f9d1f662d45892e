//! The gateway's accept loop: every redirected connection goes through the same phases,
//! accept → identify → decide → forward → record, and a protocol handler (one module per
//! protocol) does the forwarding. Until the protocol gateways land, every target is relayed as
//! opaque TCP ([`tcp`]).

pub mod postgres;
mod splice;
pub mod tcp;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, error, info, info_span, warn, Instrument as _};

use crate::{
    approval::ApprovalBroker,
    config::{Config, Protocol, Unmatched},
    ebpf::OrigDst,
    identity::{ProcReader, ProcessIdentity},
    net::{from_kernel_bytes, ClientAddr, OrigDstAddr},
    record::{now_micros, NewSession, Outcome, SessionEnd, SessionId, SessionStore},
};

/// How long the gateway waits for a target to accept.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters shown by `bulkhead status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub refused: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    pub config: Arc<Config>,
    pub orig_dst: Arc<dyn OrigDst>,
    pub store: Arc<dyn SessionStore>,
    pub proc: ProcReader,
    pub stats: Stats,
    /// The policy in force; protocol handlers take a snapshot per decision.
    pub policy: crate::policy::PolicyHandle,
    /// Cancel keys handed to PostgreSQL clients.
    pub pg_cancels: postgres::CancelKeys,
    /// Column identities read from PostgreSQL targets' catalogs, for column mask rules.
    pub pg_catalogs: postgres::Catalogs,
    /// The local CA for TLS toward clients; `None` declines client TLS.
    pub tls: Option<Arc<crate::tls::LocalCa>>,
    /// Where a handler holds a request whose verdict is `approve` (`ApprovalBroker::request`).
    pub approvals: Arc<ApprovalBroker>,
}

/// Accepts until `shutdown` turns true, then returns; running connections keep their tasks.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                gateway.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let gw = Arc::clone(&gateway);
                tokio::spawn(async move { handle(&gw, stream, peer).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct ActiveGuard<'a>(&'a Stats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection, start to finish.
pub async fn handle(gw: &Gateway, client_stream: TcpStream, peer: SocketAddr) {
    gw.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&gw.stats);
    let client = ClientAddr(SocketAddr::new(peer.ip().to_canonical(), peer.port()));

    // Identify: the kernel's record is the only source of the original destination.
    let Some(rec) = gw.orig_dst.take(client) else {
        gw.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!(%client, "connection without a redirect record (not from a governed connect); closing");
        record_refusal(
            gw,
            client,
            None,
            ProcessIdentity::default(),
            "no redirect record: the connection did not come through the kernel redirect",
        );
        return;
    };
    let destination = OrigDstAddr(SocketAddr::new(
        from_kernel_bytes(rec.dst_addr),
        rec.dst_port,
    ));
    let identity = gw.proc.identify(&rec);
    let target = gw.config.target_for(destination);
    let span = info_span!(
        "conn",
        pid = identity.pid,
        comm = %identity.comm,
        dst = %destination,
        target = target.map_or("-", |t| t.name.as_str()),
        session = tracing::field::Empty,
    );

    async move {
        // Decide: which handler, or refuse.
        let protocol = match target {
            Some(t) => t.protocol,
            None if gw.config.capture.unmatched == Unmatched::Refuse => {
                gw.stats.refused.fetch_add(1, Ordering::Relaxed);
                info!("destination matches no target; refused (capture.unmatched = \"refuse\")");
                record_refusal(
                    gw,
                    client,
                    Some(destination),
                    identity,
                    "destination matches no configured target",
                );
                return;
            }
            None => Protocol::Tcp,
        };

        // Record before act: no byte moves until the session is in the store.
        let id = match gw.store.open(NewSession {
            started_at_us: now_micros(),
            client,
            destination,
            target: target.map(|t| t.name.clone()),
            protocol,
            identity: identity.clone(),
        }) {
            Ok(id) => id,
            Err(e) => {
                error!(error = %e, "cannot record the session; closing the connection");
                return;
            }
        };
        tracing::Span::current().record("session", id.0);
        debug!("session opened");

        let end = match (protocol, target) {
            (Protocol::Postgres, Some(t)) => {
                postgres::serve(gw, client_stream, t, &identity, id, destination).await
            }
            // Other protocols are relayed as opaque TCP until their gateways exist.
            _ => tcp::forward(client_stream, destination).await,
        };
        info!(
            outcome = end.outcome.label(),
            up = end.bytes_to_target,
            down = end.bytes_from_target,
            "session closed"
        );
        close(gw, id, end);
    }
    .instrument(span)
    .await;
}

fn close(gw: &Gateway, id: SessionId, end: SessionEnd) {
    if let Err(e) = gw.store.close(id, end) {
        error!(session = id.0, error = %e, "cannot record the end of the session");
    }
}

fn record_refusal(
    gw: &Gateway,
    client: ClientAddr,
    destination: Option<OrigDstAddr>,
    identity: ProcessIdentity,
    reason: &str,
) {
    let now = now_micros();
    let start = NewSession {
        started_at_us: now,
        client,
        destination: destination.unwrap_or(OrigDstAddr(SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            0,
        ))),
        target: None,
        protocol: Protocol::Tcp,
        identity,
    };
    let result = gw.store.open(start).and_then(|id| {
        gw.store.close(
            id,
            SessionEnd {
                ended_at_us: now,
                bytes_to_target: 0,
                bytes_from_target: 0,
                outcome: Outcome::Refused {
                    reason: reason.to_string(),
                },
            },
        )
    });
    if let Err(e) = result {
        error!(error = %e, "cannot record a refused connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Source, ebpf::MockOrigDst, net::to_kernel_bytes, record::SledStore};
    use bulkhead_common::ConnectRecord;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn record_for(dst: SocketAddr) -> ConnectRecord {
        ConnectRecord {
            cgroup_id: 1,
            dst_addr: to_kernel_bytes(dst.ip()),
            dst_port: dst.port(),
            family: bulkhead_common::AF_INET,
            pid: std::process::id(),
            tgid: std::process::id(),
            uid: 0,
            gid: 0,
            comm: *b"unit-test\0\0\0\0\0\0\0",
            reserved: 0,
        }
    }

    async fn gateway(
        config: &str,
        orig: Arc<MockOrigDst>,
    ) -> (Arc<Gateway>, SocketAddr, watch::Sender<bool>) {
        let config = Config::from_toml(config, Source::Embedded).unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::temporary().unwrap());
        let approvals = Arc::new(ApprovalBroker::new(Arc::clone(&store), config.approvals));
        let gw = Arc::new(Gateway {
            config: Arc::new(config),
            orig_dst: orig,
            store,
            proc: ProcReader::new("/", "/none"),
            stats: Stats::default(),
            policy: crate::policy::PolicyHandle::new("/nonexistent"),
            pg_cancels: postgres::CancelKeys::default(),
            pg_catalogs: postgres::Catalogs::default(),
            approvals,
            tls: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::clone(&gw), rx));
        (gw, addr, tx)
    }

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Connects with the record in place before the gateway can accept, as the kernel does.
    async fn connect_governed(
        gateway: SocketAddr,
        orig: &MockOrigDst,
        dst: SocketAddr,
    ) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        orig.insert(ClientAddr(socket.local_addr().unwrap()), record_for(dst));
        socket.connect(gateway).await.unwrap()
    }

    async fn wait_closed(gw: &Gateway) -> crate::record::Session {
        for _ in 0..200 {
            if let Some(s) = gw
                .store
                .list(&crate::record::ListFilter::default(), 1)
                .unwrap()
                .pop()
            {
                if s.outcome != Outcome::Open {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("session never closed");
    }

    #[tokio::test]
    async fn relays_to_the_original_destination_and_records_the_session() {
        let echo = echo_server().await;
        let orig = Arc::new(MockOrigDst::default());
        let (gw, addr, _shutdown) = gateway(
            &format!("[[target]]\nname = \"echo\"\naddresses = [\"{echo}\"]\n"),
            Arc::clone(&orig),
        )
        .await;
        let mut c = connect_governed(addr, &orig, echo).await;
        c.write_all(b"hello through the gateway").await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello through the gateway");
        let s = wait_closed(&gw).await;
        assert_eq!(s.outcome, Outcome::Closed);
        assert_eq!(s.start.destination, OrigDstAddr(echo));
        assert_eq!(s.start.target.as_deref(), Some("echo"));
        assert_eq!((s.bytes_to_target, s.bytes_from_target), (25, 25));
        assert_eq!(s.start.identity.comm, "unit-test");
    }

    #[tokio::test]
    async fn a_connection_without_a_record_is_closed_and_recorded_as_refused() {
        let orig = Arc::new(MockOrigDst::default());
        let (gw, addr, _shutdown) = gateway("", orig).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            c.read(&mut buf).await.unwrap_or(0),
            0,
            "closed without data"
        );
        let s = wait_closed(&gw).await;
        assert!(
            matches!(s.outcome, Outcome::Refused { .. }),
            "{:?}",
            s.outcome
        );
        assert_eq!(gw.stats.snapshot().refused, 1);
    }

    #[tokio::test]
    async fn unmatched_destinations_are_refused_when_configured() {
        let echo = echo_server().await;
        let orig = Arc::new(MockOrigDst::default());
        let (gw, addr, _shutdown) =
            gateway("[capture]\nunmatched = \"refuse\"\n", Arc::clone(&orig)).await;
        let mut c = connect_governed(addr, &orig, echo).await;
        let _ = c.write_all(b"x").await;
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0);
        let s = wait_closed(&gw).await;
        assert!(matches!(s.outcome, Outcome::Refused { .. }));
        assert_eq!(s.start.destination, OrigDstAddr(echo));
    }

    #[tokio::test]
    async fn an_unreachable_target_is_recorded_as_upstream_failed() {
        // A port we just closed on loopback refuses connections.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let orig = Arc::new(MockOrigDst::default());
        let (gw, addr, _shutdown) = gateway("", Arc::clone(&orig)).await;
        let mut c = connect_governed(addr, &orig, closed).await;
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0);
        let s = wait_closed(&gw).await;
        assert!(
            matches!(s.outcome, Outcome::UpstreamFailed { .. }),
            "{:?}",
            s.outcome
        );
    }
}
