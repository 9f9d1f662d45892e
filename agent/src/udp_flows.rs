//! Datagrams that left for allowed UDP destinations, recorded as sessions. The kernel counts
//! them per socket and destination (`UDP_FLOWS`, from `cgroup_skb/egress`: datagrams, payload
//! bytes, first and last time) and keeps who owns each socket (`UDP_OWNER`); this module reads
//! the counters every second and records one `udp` session per process and destination while
//! datagrams keep leaving: opened with an allowed `request` event (`udp 192.0.2.7:514`), closed
//! [`QUIET`] after the last one with the datagram count as its response and the bytes as
//! `bytes_to_target`. Replies are not counted (the counter sits on egress).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use bulkhead_common::{ConnectRecord, UdpFlow, UdpFlowKey};
use tokio::sync::watch;
use tracing::error;

use crate::{
    identity::ProcReader,
    net::{from_kernel_bytes, ClientAddr, OrigDstAddr},
    protocol::Protocol,
    record::{
        now_micros, EventKind, NewSession, Outcome, RecordedVerdict, SessionEnd, SessionId,
        SessionStore,
    },
};

/// A session closes once no datagram has left for its destination for this long.
pub const QUIET: Duration = Duration::from_secs(3);

/// The kernel's maps.
pub struct FlowMaps {
    pub owners: BpfHashMap<MapData, u64, ConnectRecord>,
    pub flows: BpfHashMap<MapData, UdpFlowKey, UdpFlow>,
}

/// Where the counters come from: the kernel, or a test.
pub trait FlowSource {
    fn flows(&self) -> Vec<(UdpFlowKey, UdpFlow)>;
    fn owner(&self, cookie: u64) -> Option<ConnectRecord>;
    fn forget(&mut self, key: &UdpFlowKey);
}

impl FlowSource for FlowMaps {
    fn flows(&self) -> Vec<(UdpFlowKey, UdpFlow)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }
    fn owner(&self, cookie: u64) -> Option<ConnectRecord> {
        self.owners.get(&cookie, 0).ok()
    }
    fn forget(&mut self, key: &UdpFlowKey) {
        let _ = self.flows.remove(key);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Dest {
    tgid: u32,
    dst: SocketAddr,
}

struct Open {
    session: SessionId,
    /// The id of its `request` event, which the closing `response` names.
    request: u64,
    datagrams: u64,
    bytes: u64,
    last_us: u64,
    /// When its counters last moved, by the daemon's clock.
    moved_us: u64,
}

pub struct Recorder {
    store: Arc<dyn SessionStore>,
    proc: ProcReader,
    /// Last counters seen per kernel key, and the destination they count for.
    seen: HashMap<UdpFlowKey, (UdpFlow, Dest)>,
    open: HashMap<Dest, Open>,
}

/// Microseconds to add to a `CLOCK_MONOTONIC` time for wall-clock time.
fn monotonic_offset_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let mono_us = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000;
    now_micros().saturating_sub(mono_us)
}

impl Recorder {
    pub fn new(store: Arc<dyn SessionStore>, proc: ProcReader) -> Self {
        Self {
            store,
            proc,
            seen: HashMap::new(),
            open: HashMap::new(),
        }
    }

    /// Reads the counters once at `now_us` (`offset_us` turns kernel times into wall time).
    pub fn sweep(&mut self, source: &mut dyn FlowSource, now_us: u64, offset_us: u64, all: bool) {
        let current = source.flows();
        let present: std::collections::HashSet<UdpFlowKey> =
            current.iter().map(|(k, _)| *k).collect();
        for (key, flow) in current {
            let (before, dest) = if let Some((before, dest)) = self.seen.get(&key) {
                (*before, *dest)
            } else {
                let destination = Dest {
                    tgid: source.owner(key.cookie).map_or(0, |o| o.tgid),
                    dst: SocketAddr::new(from_kernel_bytes(key.addr).to_canonical(), key.port),
                };
                (UdpFlow::default(), destination)
            };
            let datagrams = flow.datagrams.saturating_sub(before.datagrams);
            if datagrams == 0 {
                continue;
            }
            let bytes = flow.bytes.saturating_sub(before.bytes);
            self.seen.insert(key, (flow, dest));
            let first_us = (if before.datagrams == 0 {
                flow.first_ns
            } else {
                flow.last_ns
            }) / 1_000
                + offset_us;
            let last_us = flow.last_ns / 1_000 + offset_us;
            if !self.open.contains_key(&dest) {
                let record = source.owner(key.cookie).unwrap_or(ConnectRecord {
                    cgroup_id: 0,
                    dst_addr: key.addr,
                    dst_port: key.port,
                    family: key.family,
                    pid: 0,
                    tgid: 0,
                    uid: 0,
                    gid: 0,
                    comm: [0; 16],
                    reserved: 0,
                });
                let Some((session, request)) = self.open_session(&record, dest.dst, first_us)
                else {
                    continue;
                };
                self.open.insert(
                    dest,
                    Open {
                        session,
                        request,
                        datagrams: 0,
                        bytes: 0,
                        last_us,
                        moved_us: now_us,
                    },
                );
            }
            if let Some(o) = self.open.get_mut(&dest) {
                o.datagrams += datagrams;
                o.bytes += bytes;
                o.last_us = o.last_us.max(last_us);
                o.moved_us = now_us;
            }
        }
        // Keys the kernel evicted are gone; their counts were taken.
        self.seen.retain(|k, _| present.contains(k));
        let quiet_us = u64::try_from(QUIET.as_micros()).unwrap_or(u64::MAX);
        let done: Vec<Dest> = self
            .open
            .iter()
            .filter(|(_, o)| all || now_us.saturating_sub(o.moved_us) >= quiet_us)
            .map(|(d, _)| *d)
            .collect();
        for dest in done {
            let Some(o) = self.open.remove(&dest) else {
                continue;
            };
            self.close(&o);
            let keys: Vec<UdpFlowKey> = self
                .seen
                .iter()
                .filter(|(_, (_, d))| *d == dest)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                source.forget(&k);
                self.seen.remove(&k);
            }
        }
    }

    fn open_session(
        &self,
        record: &ConnectRecord,
        dst: SocketAddr,
        at_us: u64,
    ) -> Option<(SessionId, u64)> {
        let session = self
            .store
            .open(NewSession {
                started_at_us: at_us,
                client: ClientAddr(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
                destination: OrigDstAddr(dst),
                target: None,
                protocol: Protocol::Udp,
                identity: self.proc.identify(record),
            })
            .map_err(|e| error!(error = %e, "cannot record allowed datagrams"))
            .ok()?;
        let event = EventKind::request(
            &format!("udp {dst}"),
            Some("udp".into()),
            RecordedVerdict::Allow,
            Vec::new(),
        );
        let request = self
            .store
            .append(session, event)
            .map_err(|e| error!(error = %e, "cannot record allowed datagrams"))
            .unwrap_or(0);
        Some((session, request))
    }

    fn close(&self, o: &Open) {
        let s = |n: u64| if n == 1 { "" } else { "s" };
        let summary = EventKind::Response {
            request: o.request,
            duration_us: 0,
            summary: Some(format!(
                "{} datagram{} sent, {} byte{}",
                o.datagrams,
                s(o.datagrams),
                o.bytes,
                s(o.bytes)
            )),
            error: None,
            masked_rows: None,
            mask_rules: Vec::new(),
        };
        if let Err(e) = self.store.append(o.session, summary) {
            error!(error = %e, "cannot record allowed datagrams");
        }
        let end = SessionEnd {
            ended_at_us: o.last_us,
            bytes_to_target: o.bytes,
            bytes_from_target: 0,
            outcome: Outcome::Closed,
        };
        if let Err(e) = self.store.close(o.session, end) {
            error!(session = o.session.0, error = %e, "cannot record allowed datagrams");
        }
    }
}

/// Reads the kernel's counters every second until shutdown, recording them.
pub async fn record(
    mut maps: FlowMaps,
    mut recorder: Recorder,
    mut shutdown: watch::Receiver<bool>,
) {
    let offset = monotonic_offset_us();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => recorder.sweep(&mut maps, now_micros(), offset, false),
            _ = shutdown.changed() => {
                recorder.sweep(&mut maps, now_micros(), offset, true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SledStore;

    #[derive(Default)]
    struct Fake {
        flows: HashMap<UdpFlowKey, UdpFlow>,
        owners: HashMap<u64, ConnectRecord>,
    }

    impl FlowSource for Fake {
        fn flows(&self) -> Vec<(UdpFlowKey, UdpFlow)> {
            self.flows.iter().map(|(k, v)| (*k, *v)).collect()
        }
        fn owner(&self, cookie: u64) -> Option<ConnectRecord> {
            self.owners.get(&cookie).copied()
        }
        fn forget(&mut self, key: &UdpFlowKey) {
            self.flows.remove(key);
        }
    }

    fn key(cookie: u64) -> UdpFlowKey {
        UdpFlowKey {
            cookie,
            addr: bulkhead_common::v4_mapped([192, 0, 2, 7]),
            port: 514,
            family: 2,
            reserved: 0,
        }
    }

    #[test]
    fn counters_of_a_process_to_a_destination_are_one_session_closed_when_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut r = Recorder::new(Arc::clone(&store), ProcReader::new(dir.path(), "governed"));
        let mut fake = Fake::default();
        let owner = ConnectRecord {
            cgroup_id: 0,
            dst_addr: [0; 16],
            dst_port: 0,
            family: 2,
            pid: 9,
            tgid: 9,
            uid: 1000,
            gid: 1000,
            comm: *b"logger\0\0\0\0\0\0\0\0\0\0",
            reserved: 0,
        };
        fake.owners.insert(1, owner);
        fake.owners.insert(2, owner);
        let flow = |first_ns, last_ns, datagrams, bytes| UdpFlow {
            first_ns,
            last_ns,
            datagrams,
            bytes,
        };
        fake.flows.insert(key(1), flow(1_000_000, 2_000_000, 2, 20));
        r.sweep(&mut fake, 10_000, 100, false);
        // More on the same socket, and a second socket of the same process.
        fake.flows.insert(key(1), flow(1_000_000, 3_000_000, 3, 30));
        fake.flows.insert(key(2), flow(3_000_000, 4_000_000, 1, 5));
        r.sweep(&mut fake, 11_000, 100, false);
        assert_eq!(r.open.len(), 1);
        r.sweep(&mut fake, 11_000 + 3_000_000, 100, false);
        assert!(r.open.is_empty());
        assert!(
            fake.flows.is_empty(),
            "closed flows are dropped from the kernel map"
        );

        let sessions = store
            .list(&crate::record::ListFilter::default(), 10)
            .unwrap();
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.start.protocol, Protocol::Udp);
        assert_eq!(s.start.destination.0, "192.0.2.7:514".parse().unwrap());
        assert_eq!(s.start.identity.pid, 9);
        assert_eq!((s.start.started_at_us, s.ended_at_us), (1_100, Some(4_100)));
        assert_eq!(s.bytes_to_target, 35);
        assert_eq!(s.outcome, Outcome::Closed);
        let events = store.events(s.id).unwrap();
        assert!(
            events.iter().any(|e| matches!(&e.kind,
            EventKind::Response { summary: Some(t), .. } if t == "4 datagrams sent, 35 bytes")),
            "{events:?}"
        );
    }
}
