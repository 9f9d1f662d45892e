//! DNS sessions: one per governed process and resolver while it keeps asking, with a `request`
//! event per query (its questions) and a `response` event per answer (response code, answers,
//! addresses). A session closes after [`QUIET`] without queries, or after
//! [`MAX_QUERIES`] queries (the next query opens a new one), so every query is recorded and
//! every session stays bounded.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bulkhead_common::ConnectRecord;
use tracing::error;

use crate::{
    identity::ProcReader,
    net::{ClientAddr, OrigDstAddr},
    protocol::Protocol,
    record::{
        EventKind, NewSession, Outcome, RecordedVerdict, SessionEnd, SessionId, SessionStore,
    },
};

/// A DNS session closes once its process has asked nothing of that resolver for this long.
pub const QUIET: Duration = Duration::from_secs(5);
/// Queries recorded in one session before the next opens a new one.
pub const MAX_QUERIES: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    tgid: u32,
    resolver: SocketAddr,
}

struct Open {
    session: SessionId,
    queries: u64,
    last_us: u64,
    bytes_to: u64,
    bytes_from: u64,
}

/// Where a recorded query's answer goes.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    key: Key,
    session: SessionId,
    request: u64,
}

pub struct Recorder {
    store: Arc<dyn SessionStore>,
    proc: ProcReader,
    open: Mutex<HashMap<Key, Open>>,
}

impl Recorder {
    pub fn new(store: Arc<dyn SessionStore>, proc: ProcReader) -> Self {
        Self {
            store,
            proc,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Records a query (or a datagram to the resolver that is not one: `refused` says why) of
    /// the process in `rec` to `resolver`, before it is relayed. `None` when it could not be
    /// recorded: then it must not be relayed.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; each is a fact of the datagram"
    )]
    pub fn query(
        &self,
        rec: &ConnectRecord,
        client: SocketAddr,
        resolver: SocketAddr,
        text: &str,
        refused: Option<String>,
        bytes: usize,
        now_us: u64,
    ) -> Option<Asked> {
        let key = Key {
            tgid: rec.tgid,
            resolver,
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.get(&key).is_some_and(|o| o.queries >= MAX_QUERIES) {
            if let Some(full) = open.remove(&key) {
                self.close(&full);
            }
        }
        let o = match open.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let session = self
                    .store
                    .open(NewSession {
                        started_at_us: now_us,
                        client: ClientAddr(client),
                        destination: OrigDstAddr(resolver),
                        target: None,
                        protocol: Protocol::Dns,
                        identity: self.proc.identify(rec),
                    })
                    .map_err(|e| error!(error = %e, "cannot record a DNS query: not relayed"))
                    .ok()?;
                v.insert(Open {
                    session,
                    queries: 0,
                    last_us: now_us,
                    bytes_to: 0,
                    bytes_from: 0,
                })
            }
        };
        let verdict = if refused.is_some() {
            RecordedVerdict::Deny
        } else {
            RecordedVerdict::Allow
        };
        let mut event = EventKind::request(text, Some("dns".into()), verdict, Vec::new());
        if let Some(why) = refused {
            event = event.with_error(why);
        }
        let request = self
            .store
            .append(o.session, event)
            .map_err(|e| error!(error = %e, "cannot record a DNS query: not relayed"))
            .ok()?;
        o.queries += 1;
        o.last_us = now_us;
        o.bytes_to += bytes as u64;
        Some(Asked {
            key,
            session: o.session,
            request,
        })
    }

    /// Records how a query went (`Ok(summary)` or `Err(why not)`), before the answer goes
    /// back. `false` when it could not be recorded: then it must not go back.
    pub fn answer(
        &self,
        asked: Asked,
        outcome: Result<String, String>,
        bytes: usize,
        duration: Duration,
        now_us: u64,
    ) -> bool {
        let (summary, error) = match outcome {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        let event = EventKind::Response {
            request: asked.request,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            summary: summary.map(|s| crate::record::bounded(&s)),
            error,
            masked_rows: None,
            mask_rules: Vec::new(),
        };
        if let Err(e) = self.store.append(asked.session, event) {
            error!(error = %e, "cannot record a DNS answer: not delivered");
            return false;
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = open.get_mut(&asked.key) {
            if o.session == asked.session {
                o.bytes_from += bytes as u64;
                o.last_us = o.last_us.max(now_us);
            }
        }
        true
    }

    fn close(&self, o: &Open) {
        let end = SessionEnd {
            ended_at_us: o.last_us,
            bytes_to_target: o.bytes_to,
            bytes_from_target: o.bytes_from,
            outcome: Outcome::Closed,
        };
        if let Err(e) = self.store.close(o.session, end) {
            error!(session = o.session.0, error = %e, "cannot record the end of a DNS session");
        }
    }

    /// Closes the sessions quiet since before `now_us - QUIET` (all of them with `all`).
    pub fn close_quiet(&self, now_us: u64, all: bool) {
        let quiet_us = u64::try_from(QUIET.as_micros()).unwrap_or(u64::MAX);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let done: Vec<Key> = open
            .iter()
            .filter(|(_, o)| all || now_us.saturating_sub(o.last_us) >= quiet_us)
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            if let Some(o) = open.remove(&k) {
                self.close(&o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ListFilter, SledStore};

    fn rec(tgid: u32) -> ConnectRecord {
        ConnectRecord {
            cgroup_id: 0,
            dst_addr: bulkhead_common::v4_mapped([192, 0, 2, 53]),
            dst_port: 53,
            family: 2,
            pid: tgid,
            tgid,
            uid: 1000,
            gid: 1000,
            comm: *b"resolver-user\0\0\0",
            reserved: 0,
        }
    }

    #[test]
    fn queries_of_a_process_to_a_resolver_are_one_session_with_every_query_and_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Recorder::new(Arc::clone(&store), ProcReader::new(dir.path(), "governed"));
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let resolver: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let a = r
            .query(&rec(7), client, resolver, "a.example A", None, 30, 1_000)
            .unwrap();
        assert!(r.answer(
            a,
            Ok("NOERROR: a.example A 192.0.2.1".into()),
            46,
            Duration::from_millis(2),
            1_500
        ));
        let b = r
            .query(&rec(7), client, resolver, "b.example AAAA", None, 30, 2_000)
            .unwrap();
        assert_eq!(a.session, b.session);
        assert!(r.answer(b, Err("no reply".into()), 0, Duration::ZERO, 2_000));
        let refused = r
            .query(
                &rec(8),
                client,
                resolver,
                "3 bytes",
                Some("not a DNS query".into()),
                3,
                2_000,
            )
            .unwrap();
        assert_ne!(
            refused.session, a.session,
            "another process, another session"
        );
        r.close_quiet(2_001, false);
        assert_eq!(r.open.lock().unwrap().len(), 2, "not quiet yet");
        r.close_quiet(2_000 + u64::try_from(QUIET.as_micros()).unwrap(), false);
        assert!(r.open.lock().unwrap().is_empty());

        let s = store.get(a.session).unwrap().unwrap();
        assert_eq!(s.start.protocol, Protocol::Dns);
        assert_eq!(s.start.destination.0, resolver);
        assert_eq!((s.start.started_at_us, s.ended_at_us), (1_000, Some(2_000)));
        assert_eq!((s.bytes_to_target, s.bytes_from_target), (60, 46));
        assert_eq!(s.outcome, Outcome::Closed);
        let events = store.events(a.session).unwrap();
        let texts: Vec<String> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Request { text, .. } => Some(text.clone()),
                EventKind::Response { summary, error, .. } => {
                    Some(summary.clone().or(error.clone()).unwrap_or_default())
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            texts,
            [
                "a.example A",
                "NOERROR: a.example A 192.0.2.1",
                "b.example AAAA",
                "no reply"
            ]
        );
        let denied = store.get(refused.session).unwrap().unwrap();
        assert_eq!(denied.denied, 1);
        assert_eq!(
            store
                .list(
                    &ListFilter {
                        protocol: Some(Protocol::Dns),
                        ..ListFilter::default()
                    },
                    10
                )
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_full_session_is_closed_and_the_next_query_opens_another() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Recorder::new(Arc::clone(&store), ProcReader::new(dir.path(), "governed"));
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let resolver: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let first = r
            .query(&rec(7), client, resolver, "q", None, 1, 1)
            .unwrap()
            .session;
        for i in 1..MAX_QUERIES {
            r.query(&rec(7), client, resolver, "q", None, 1, 1 + i);
        }
        let next = r
            .query(&rec(7), client, resolver, "q", None, 1, 5_000)
            .unwrap()
            .session;
        assert_ne!(first, next);
        let s = store.get(first).unwrap().unwrap();
        assert_eq!(s.outcome, Outcome::Closed);
        assert_eq!(s.bytes_to_target, MAX_QUERIES);
    }
}
