//! What the kernel refused a governed process without the gateway seeing it: datagrams to
//! destinations that are neither a resolver nor allowed, and sockets of kinds governed
//! processes may not open. The eBPF programs report each refusal through a ring buffer; this
//! module records them as sessions, one per process and destination (or socket kind), with the
//! first and last attempt's time and how many there were, so a process retrying in a loop
//! leaves one session, not thousands.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bulkhead_common::{
    ConnectRecord, Refusal, UnixRefusal, REFUSED_SOCKET, REFUSED_UDP_CONNECT, REFUSED_UDP_SENDMSG,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    identity::ProcReader,
    net::{from_kernel_bytes, ClientAddr, OrigDstAddr},
    protocol::Protocol,
    record::{
        now_micros, EventKind, NewSession, Outcome, RecordedVerdict, SessionEnd, SessionId,
        SessionStore,
    },
};

/// A refusal's session closes once the process has made no attempt of the same kind for this
/// long.
pub const QUIET: Duration = Duration::from_secs(2);

/// One refused attempt, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attempt {
    pub tgid: u32,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A datagram (or a UDP `connect()`) to this destination.
    Udp(SocketAddr),
    /// A unix socket connect or send to this address (`@name` for an abstract one).
    Unix(std::sync::Arc<str>),
    /// `socket(family, type, protocol)`.
    Socket {
        family: u32,
        sock_type: u32,
        protocol: u32,
    },
}

impl Kind {
    fn from_refusal(r: &Refusal) -> Option<Self> {
        match r.kind {
            REFUSED_UDP_CONNECT | REFUSED_UDP_SENDMSG => Some(Kind::Udp(SocketAddr::new(
                from_kernel_bytes(r.record.dst_addr).to_canonical(),
                r.record.dst_port,
            ))),
            REFUSED_SOCKET => Some(Kind::Socket {
                family: r.family,
                // Without SOCK_NONBLOCK / SOCK_CLOEXEC: the same socket kind either way.
                sock_type: r.sock_type & 0xf,
                protocol: r.protocol,
            }),
            _ => None,
        }
    }

    /// The request text an admin reads: `udp 10.0.0.9:443`, `socket(AF_PACKET, SOCK_RAW, 768)`.
    pub fn text(&self) -> String {
        match self {
            Kind::Udp(dst) => format!("udp {dst}"),
            Kind::Unix(path) => format!("unix {path}"),
            Kind::Socket {
                family,
                sock_type,
                protocol,
            } => format!(
                "socket({}, {}, {protocol})",
                family_name(*family),
                type_name(*sock_type)
            ),
        }
    }

    fn protocol(&self) -> Protocol {
        match self {
            Kind::Udp(_) => Protocol::Udp,
            Kind::Unix(_) => Protocol::Unix,
            Kind::Socket { .. } => Protocol::Socket,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Kind::Udp(_) => {
                "UDP to a destination that is neither a resolver in capture.dns nor in \
                 capture.udp_allow"
            }
            Kind::Socket { .. } => {
                "a socket kind governed processes may not open (capture.sockets allows ping, \
                 raw, sctp, mptcp, packet)"
            }
            Kind::Unix(_) => "a unix socket address not in capture.unix_allow",
        }
    }
}

fn family_name(family: u32) -> String {
    match family {
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        40 => "AF_VSOCK".into(),
        44 => "AF_XDP".into(),
        other => format!("family {other}"),
    }
}

fn type_name(sock_type: u32) -> String {
    match sock_type {
        1 => "SOCK_STREAM".into(),
        2 => "SOCK_DGRAM".into(),
        3 => "SOCK_RAW".into(),
        5 => "SOCK_SEQPACKET".into(),
        other => format!("type {other}"),
    }
}

/// Decodes one ring buffer item written as a `UnixRefusal` (144 bytes).
pub fn decode_unix(bytes: &[u8]) -> Option<UnixRefusal> {
    if bytes.len() != std::mem::size_of::<UnixRefusal>() {
        return None;
    }
    // SAFETY: the length is checked above; `UnixRefusal` is plain integers and byte arrays,
    // valid for any bytes, and read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<UnixRefusal>()) })
}

/// Decodes one ring buffer item (bytes the kernel wrote as a `Refusal`).
pub fn decode(bytes: &[u8]) -> Option<Refusal> {
    if bytes.len() < std::mem::size_of::<Refusal>() {
        return None;
    }
    // SAFETY: the length is checked above; `Refusal` is plain integers (`aya::Pod`), valid for
    // any bytes, and read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Refusal>()) })
}

struct Open {
    session: SessionId,
    count: u64,
    last_us: u64,
}

/// Turns refusals into sessions: opened at the first attempt, counted, closed after
/// [`QUIET`].
pub struct Recorder {
    store: Arc<dyn SessionStore>,
    proc: ProcReader,
    open: HashMap<Attempt, Open>,
}

impl Recorder {
    pub fn new(store: Arc<dyn SessionStore>, proc: ProcReader) -> Self {
        Self {
            store,
            proc,
            open: HashMap::new(),
        }
    }

    /// Records one refusal the kernel reported at `now_us`.
    pub fn refused(&mut self, r: &Refusal, now_us: u64) {
        let Some(kind) = Kind::from_refusal(r) else {
            warn!(kind = r.kind, "unknown refusal kind from the kernel");
            return;
        };
        self.attempt(&r.record, kind, now_us);
    }

    /// Records a unix socket connect or send the kernel refused.
    pub fn refused_unix(&mut self, r: &UnixRefusal, now_us: u64) {
        let record = ConnectRecord {
            cgroup_id: 0,
            dst_addr: [0; 16],
            dst_port: 0,
            family: 1,
            pid: r.tgid,
            tgid: r.tgid,
            uid: r.uid,
            gid: 0,
            comm: r.comm,
            reserved: 0,
        };
        let path = crate::net::unix_address(&r.path);
        self.attempt(&record, Kind::Unix(path.into()), now_us);
    }

    fn attempt(&mut self, record: &ConnectRecord, kind: Kind, now_us: u64) {
        let attempt = Attempt {
            tgid: record.tgid,
            kind: kind.clone(),
        };
        if let Some(open) = self.open.get_mut(&attempt) {
            open.count += 1;
            open.last_us = now_us;
            return;
        }
        let identity = self.proc.identify(record);
        let destination = match kind {
            Kind::Udp(dst) => dst,
            Kind::Socket { .. } | Kind::Unix(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        };
        info!(
            pid = identity.pid,
            comm = %identity.comm,
            attempt = %kind.text(),
            "refused by the kernel"
        );
        let opened = self.store.open(NewSession {
            started_at_us: now_us,
            client: ClientAddr(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
            destination: OrigDstAddr(destination),
            target: None,
            protocol: kind.protocol(),
            identity,
        });
        let session = match opened {
            Ok(id) => id,
            Err(e) => {
                error!(error = %e, "cannot record a refused attempt");
                return;
            }
        };
        let event = EventKind::request(
            &kind.text(),
            Some(kind.protocol().to_string().into()),
            RecordedVerdict::Deny,
            Vec::new(),
        )
        .with_error(kind.reason().to_string());
        if let Err(e) = self.store.append(session, event) {
            error!(error = %e, "cannot record a refused attempt");
        }
        self.open.insert(
            attempt,
            Open {
                session,
                count: 1,
                last_us: now_us,
            },
        );
    }

    /// Closes the sessions quiet since before `now_us - QUIET` (all of them with `all`).
    pub fn close_quiet(&mut self, now_us: u64, all: bool) {
        let quiet_us = u64::try_from(QUIET.as_micros()).unwrap_or(u64::MAX);
        let store = &self.store;
        self.open.retain(|attempt, open| {
            if !all && now_us.saturating_sub(open.last_us) < quiet_us {
                return true;
            }
            let end = SessionEnd {
                ended_at_us: open.last_us,
                bytes_to_target: 0,
                bytes_from_target: 0,
                outcome: Outcome::Refused {
                    reason: format!(
                        "{}; refused {} time{}",
                        attempt.kind.reason(),
                        open.count,
                        if open.count == 1 { "" } else { "s" }
                    ),
                },
            };
            if let Err(e) = store.close(open.session, end) {
                error!(session = open.session.0, error = %e, "cannot record the end of a refusal");
            }
            false
        });
    }
}

/// Reads the kernel's refusals until shutdown, recording them.
pub async fn record(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    mut recorder: Recorder,
    mut shutdown: watch::Receiver<bool>,
) {
    // SAFETY: the ring buffer owns its map's descriptor for as long as it lives, and the
    // `AsyncFd` owns the ring buffer, so the descriptor stays open and the same until dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot read the kernel's refusals: they are refused, not recorded");
            return;
        }
    };
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                let now = now_micros();
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(r) = decode_unix(&item) {
                        recorder.refused_unix(&r, now);
                    } else if let Some(r) = decode(&item) {
                        recorder.refused(&r, now);
                    }
                }
                guard.clear_ready();
            }
            _ = sweep.tick() => recorder.close_quiet(now_micros(), false),
            _ = shutdown.changed() => {
                recorder.close_quiet(now_micros(), true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_common::ConnectRecord;

    use super::*;
    use crate::record::{ListFilter, SledStore};

    fn refusal(tgid: u32, kind: u32, dst: [u8; 16], port: u16) -> Refusal {
        Refusal {
            record: ConnectRecord {
                cgroup_id: 0,
                dst_addr: dst,
                dst_port: port,
                family: 2,
                pid: tgid,
                tgid,
                uid: 1000,
                gid: 1000,
                comm: *b"tool\0\0\0\0\0\0\0\0\0\0\0\0",
                reserved: 0,
            },
            kind,
            family: 17,
            sock_type: 3 | 0o2_000_000,
            protocol: 768,
        }
    }

    #[test]
    fn repeated_attempts_are_one_session_closed_when_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let proc = ProcReader::new(dir.path(), "governed");
        let mut rec = Recorder::new(Arc::clone(&store), proc);
        let dst = bulkhead_common::v4_mapped([192, 0, 2, 7]);
        for i in 0..5 {
            rec.refused(&refusal(42, REFUSED_UDP_SENDMSG, dst, 443), 1_000 + i);
        }
        rec.refused(&refusal(42, REFUSED_SOCKET, [0; 16], 0), 1_000);
        rec.refused(&refusal(43, REFUSED_UDP_CONNECT, dst, 443), 1_000);
        rec.close_quiet(1_000 + 1_000, false);
        assert_eq!(rec.open.len(), 3, "nothing is quiet yet");
        rec.close_quiet(1_004 + u64::try_from(QUIET.as_micros()).unwrap(), false);
        assert!(rec.open.is_empty());

        let sessions = store.list(&ListFilter::default(), 100).unwrap();
        assert_eq!(sessions.len(), 3);
        let udp: Vec<_> = sessions
            .iter()
            .filter(|s| s.start.protocol == Protocol::Udp)
            .collect();
        assert_eq!(udp.len(), 2, "one per process");
        let five = udp.iter().find(|s| s.start.identity.pid == 42).unwrap();
        assert_eq!(five.start.destination.0, "192.0.2.7:443".parse().unwrap());
        assert_eq!(five.start.started_at_us, 1_000);
        assert_eq!(five.ended_at_us, Some(1_004));
        match &five.outcome {
            Outcome::Refused { reason } => assert!(reason.ends_with("refused 5 times"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(five.denied, 1);
        let socket = sessions
            .iter()
            .find(|s| s.start.protocol == Protocol::Socket)
            .unwrap();
        let events = store.events(socket.id).unwrap();
        assert!(
            events.iter().any(|e| matches!(&e.kind,
                EventKind::Request { text, verdict: RecordedVerdict::Deny, .. }
                    if text == "socket(AF_PACKET, SOCK_RAW, 768)")),
            "{events:?}"
        );
    }

    #[test]
    fn short_items_are_not_decoded() {
        assert!(decode(&[0; 79]).is_none());
        let r = refusal(7, REFUSED_SOCKET, [0; 16], 0);
        // SAFETY: reading the bytes of a plain-integer struct.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const r).cast::<u8>(), std::mem::size_of::<Refusal>())
        };
        assert_eq!(decode(bytes), Some(r));
    }
}
