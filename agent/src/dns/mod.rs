//! The DNS forwarder: every datagram a governed process sends to a configured resolver is sent
//! by the kernel to this forwarder instead (the listener's address and port, over UDP), which
//! records the query, relays it to the resolver the process asked, records the answer and
//! only then hands it back.
//!
//! The forwarder sees the sender's address only; the kernel keeps who sent and to which
//! resolver under the socket's cookie (`DNS_BY_COOKIE`), and `sock_diag` names the socket's
//! cookie from its address ([`diag`]). A datagram with no kernel record (a process outside the
//! governed cgroup, or one that addressed the forwarder itself) is dropped: the forwarder is
//! nobody's open relay. What is not a standard DNS query is recorded as refused and dropped;
//! a reply that cannot be read is recorded and not delivered (fail closed).

pub mod diag;
pub mod message;
pub mod record;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use bulkhead_common::ConnectRecord;
use tokio::{net::UdpSocket, sync::watch};
use tracing::{debug, warn};

use self::{
    message::{parse_query, parse_reply, MAX_MESSAGE, MAX_REPLY},
    record::Recorder,
};
use crate::{net::from_kernel_bytes, record::now_micros};

/// How long the forwarder waits for the resolver's answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries relayed at once; more are dropped (the client retries).
pub const MAX_IN_FLIGHT: usize = 256;

/// The kernel's record of the governed socket that sent a datagram. A trait so the forwarder
/// runs in tests without a kernel.
pub trait DnsOrigin: Send + Sync + 'static {
    /// The record of the socket at `client` that sent to the forwarder's socket at `local`.
    fn lookup(&self, client: SocketAddr, local: SocketAddr) -> Option<ConnectRecord>;
}

/// The kernel's records, from the `DNS_BY_COOKIE` map, found through `sock_diag`.
pub struct BpfDnsOrigin {
    pub(crate) map: Mutex<BpfHashMap<MapData, u64, ConnectRecord>>,
}

impl DnsOrigin for BpfDnsOrigin {
    fn lookup(&self, client: SocketAddr, local: SocketAddr) -> Option<ConnectRecord> {
        let cookie = match diag::udp_cookie(client, local) {
            Ok(Some(c)) => c,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %e, "sock_diag lookup of a DNS client failed");
                return None;
            }
        };
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&cookie, 0).ok()
    }
}

/// Records set by tests, by client address.
#[derive(Default)]
pub struct MockDnsOrigin {
    pub records: Mutex<std::collections::HashMap<SocketAddr, ConnectRecord>>,
}

impl DnsOrigin for MockDnsOrigin {
    fn lookup(&self, client: SocketAddr, _local: SocketAddr) -> Option<ConnectRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&client)
            .copied()
    }
}

pub struct Forwarder {
    pub origin: Arc<dyn DnsOrigin>,
    pub recorder: Arc<Recorder>,
    pub timeout: Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Forwarder {
    pub fn new(origin: Arc<dyn DnsOrigin>, recorder: Arc<Recorder>) -> Self {
        Self {
            origin,
            recorder,
            timeout: UPSTREAM_TIMEOUT,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

/// Binds the forwarder's socket on `addr` (the listener's address and port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    UdpSocket::bind(addr).await.map(Arc::new)
}

/// Serves queries arriving on `socket` until shutdown.
pub async fn serve(
    socket: Arc<UdpSocket>,
    forwarder: Arc<Forwarder>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                let (n, client) = match got {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors from earlier replies surface here; keep serving.
                        debug!(error = %e, "DNS forwarder receive");
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&forwarder.in_flight).try_acquire_owned() else {
                    warn!(%client, "too many DNS queries in flight: one dropped (the client retries)");
                    continue;
                };
                let query = buf[..n].to_vec();
                let socket = Arc::clone(&socket);
                let forwarder = Arc::clone(&forwarder);
                tokio::spawn(async move {
                    handle(&socket, &forwarder, local, client, &query).await;
                    drop(permit);
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Closes quiet DNS sessions now and then, and all of them at shutdown.
pub async fn sweep(recorder: Arc<Recorder>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => recorder.close_quiet(now_micros(), false),
            _ = shutdown.changed() => {
                recorder.close_quiet(now_micros(), true);
                return;
            }
        }
    }
}

/// One datagram: attribute, record, relay, record, answer.
pub async fn handle(
    socket: &UdpSocket,
    forwarder: &Forwarder,
    local: SocketAddr,
    client: SocketAddr,
    query: &[u8],
) {
    let Some(rec) = forwarder.origin.lookup(client, local) else {
        debug!(%client, "DNS datagram from a socket the kernel did not send here: dropped");
        return;
    };
    let resolver = SocketAddr::new(from_kernel_bytes(rec.dst_addr).to_canonical(), rec.dst_port);
    let parsed = parse_query(query);
    let (text, refused) = match &parsed {
        Ok(q) => (q.text(), None),
        Err(e) => (
            format!("{} bytes to the resolver", query.len()),
            Some(format!("{e}: not relayed")),
        ),
    };
    let Some(asked) = forwarder.recorder.query(
        &rec,
        client,
        resolver,
        &text,
        refused,
        query.len(),
        now_micros(),
    ) else {
        return;
    };
    let Ok(q) = parsed else {
        return;
    };
    let started = Instant::now();
    let (outcome, reply) = match relay(query, q.id, resolver, forwarder.timeout).await {
        Ok(reply) => match parse_reply(&reply) {
            Ok(r) => (Ok(r.summary()), Some(reply)),
            Err(e) => (Err(format!("unreadable reply, not delivered: {e}")), None),
        },
        Err(e) => (Err(e), None),
    };
    let bytes = reply.as_ref().map_or(0, Vec::len);
    if !forwarder
        .recorder
        .answer(asked, outcome, bytes, started.elapsed(), now_micros())
    {
        return;
    }
    if let Some(reply) = reply {
        if let Err(e) = socket.send_to(&reply, client).await {
            debug!(%client, error = %e, "DNS answer not delivered");
        }
    }
}

/// Sends `query` to `resolver` from a fresh socket and waits for the reply with its id.
async fn relay(
    query: &[u8],
    id: u16,
    resolver: SocketAddr,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let any: SocketAddr = if resolver.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io = |e: std::io::Error| format!("resolver {resolver}: {e}");
    let sock = UdpSocket::bind(any).await.map_err(io)?;
    sock.connect(resolver).await.map_err(io)?;
    sock.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; MAX_REPLY];
    let wait = async {
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            if message::id(&buf[..n]) == Some(id) {
                return Ok(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no reply from resolver {resolver} in {} s",
                timeout.as_secs()
            ))
        })
}

#[cfg(test)]
mod tests {
    use simple_dns::TYPE;

    use super::*;
    use crate::{
        identity::ProcReader,
        record::{EventKind, SessionStore, SledStore},
    };

    /// A resolver on loopback that answers every A query with 192.0.2.1 and drops queries for
    /// `silent.example`.
    async fn resolver() -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let q = parse_query(&buf[..n]).unwrap();
                let name = q.questions[0].split(' ').next().unwrap().to_string();
                if name == "silent.example" {
                    continue;
                }
                let reply = message::tests::reply(q.id, &name, [192, 0, 2, 1]);
                let _ = sock.send_to(&reply, peer).await;
            }
        });
        addr
    }

    #[tokio::test]
    #[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
    async fn queries_are_recorded_relayed_and_answered_and_strangers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let upstream = resolver().await;
        let origin = Arc::new(MockDnsOrigin::default());
        let recorder = Arc::new(Recorder::new(
            Arc::clone(&store),
            ProcReader::new(dir.path(), "governed"),
        ));
        let mut fwd = Forwarder::new(origin.clone(), Arc::clone(&recorder));
        fwd.timeout = Duration::from_millis(300);
        let fwd = Arc::new(fwd);
        let socket = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let local = socket.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve(Arc::clone(&socket), Arc::clone(&fwd), rx));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(local).await.unwrap();
        let SocketAddr::V4(up) = upstream else {
            unreachable!()
        };
        origin.records.lock().unwrap().insert(
            client.local_addr().unwrap(),
            ConnectRecord {
                cgroup_id: 0,
                dst_addr: bulkhead_common::v4_mapped(up.ip().octets()),
                dst_port: up.port(),
                family: 2,
                pid: 77,
                tgid: 77,
                uid: 1000,
                gid: 1000,
                comm: *b"getent\0\0\0\0\0\0\0\0\0\0",
                reserved: 0,
            },
        );
        let mut buf = [0u8; 512];
        client
            .send(&message::tests::query(5, "db.example", TYPE::A))
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = parse_reply(&buf[..n]).unwrap();
        assert_eq!(r.id, 5);
        assert_eq!(r.addresses, vec![std::net::IpAddr::from([192, 0, 2, 1])]);

        // Not a query: recorded as refused, nothing comes back.
        client.send(b"hello").await.unwrap();
        // No answer from the resolver: recorded, nothing comes back.
        client
            .send(&message::tests::query(6, "silent.example", TYPE::A))
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(600), client.recv(&mut buf))
                .await
                .is_err()
        );
        // A socket the kernel has no record of gets nothing and leaves no record.
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        stranger
            .send_to(&message::tests::query(7, "x.example", TYPE::A), local)
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stranger.recv(&mut buf))
                .await
                .is_err()
        );
        recorder.close_quiet(u64::MAX, true);

        let sessions = store
            .list(&crate::record::ListFilter::default(), 10)
            .unwrap();
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        let s = &sessions[0];
        assert_eq!(s.start.destination.0, upstream);
        assert_eq!(s.start.identity.pid, 77);
        assert_eq!(s.denied, 1);
        let lines: Vec<String> = store
            .events(s.id)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::Request { text, error, .. } => Some(format!(
                    "{text}{}",
                    error.map(|e| format!(" [{e}]")).unwrap_or_default()
                )),
                EventKind::Response { summary, error, .. } => summary.or(error),
                _ => None,
            })
            .collect();
        assert_eq!(lines[0], "db.example A");
        assert_eq!(
            lines[1],
            "NOERROR: alias.example CNAME db.example, db.example A 192.0.2.1"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("5 bytes to the resolver [not a DNS message")),
            "{lines:?}"
        );
        assert!(lines.contains(&"silent.example A".to_string()), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("no reply from resolver")),
            "{lines:?}"
        );
    }
}
