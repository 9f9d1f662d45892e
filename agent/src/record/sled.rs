//! `SessionStore` on sled.
//!
//! * tree `sessions`: key = session id (big-endian u64, so key order is start order and the
//!   newest session is the last key), value = the session as JSON;
//! * tree `events`: key = session id ++ event id (both big-endian), value = the event as JSON,
//!   so a session's events are one ordered prefix scan.
//!
//! Ids come from sled's crash-safe generator and keep increasing across restarts.
//!
//! Events, and sessions as they open, close and count, are appended to an in-memory queue (an
//! id, a lock, a push: nothing on the connection's path touches a tree), and a writer thread
//! (`record/writer.rs`) moves the queue into the trees every
//! [`WRITE_EVERY_MS`], one value per session per batch: a *chunk* of length-prefixed JSON
//! events keyed by its first event, LZ4-compressed (see `record/chunk.rs`). sled copies a whole
//! leaf (up to 16 values) on every insert and rewrites it to its log every tenth, so the bytes
//! per value are what the store costs; a session's events repeat themselves and compress
//! several times over. Reads that need events first write
//! the queue out, so they see everything appended before them. sled writes its log to disk
//! every [`FLUSH_EVERY_MS`] (group commit): after `kill -9`, everything older than the sum of
//! the two is on disk. If the writer fails, or falls too far behind, appends fail, and callers
//! that must record before they act refuse to act.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, PoisonError,
    },
    thread::JoinHandle,
};

use tokio::sync::broadcast;

use super::chunk::{chunk_events, chunk_plain, corrupt, event_count};
pub use super::writer::WRITE_EVERY_MS;
use super::writer::{Queue, QueueState, Sink, Spare, WRITE_BATCH};

use super::{
    Event, EventKind, ListFilter, NewSession, Outcome, PruneReport, RecordedVerdict, Retention,
    Session, SessionCounts, SessionEnd, SessionId, SessionStore, StoreError, StoreStats,
    EVENT_SCHEMA_VERSION,
};

/// How far out of start order sessions may be keyed (ids are handed out as sessions open, a
/// few microseconds after their start time is taken): `since` and `until` scans allow this much.
const START_ORDER_SLACK_US: u64 = 1_000_000;
/// How often sled writes its log to disk: the most that a crash can lose.
pub const FLUSH_EVERY_MS: u64 = 100;
/// Queued events beyond which appends fail: the writer is stuck, and a gateway that records
/// before it acts must stop acting rather than grow without bound.
const MAX_QUEUED: usize = 256 * 1024;
/// Events buffered for slow `tail` readers before they miss some.
const TAIL_BUFFER: usize = 4096;

pub struct SledStore {
    db: sled::Db,
    sessions: sled::Tree,
    events: sled::Tree,
    tail: broadcast::Sender<Event>,
    queue: Arc<Queue>,
    /// Shared with the writer thread.
    sink: Arc<Sink>,
    writer: Option<JoinHandle<()>>,
    open_count: AtomicU64,
    event_count: AtomicU64,
    /// Results written into their requests ([`SessionStore::complete`]) since opening.
    merged_count: AtomicU64,
    /// The sessions this process opened and has not closed, as last queued for the tree:
    /// closing one and counting its denials update this copy, with no read and decode of the
    /// tree's value on the connection's path.
    live: Mutex<HashMap<SessionId, Session>>,
}

/// Whether opening failed only because another handle holds the store's lock. sled reports it
/// as an `Other` error wrapping the `WouldBlock` of the lock call.
fn lock_busy(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(FLUSH_EVERY_MS))
            .open()?;
        Self::from_db(db)
    }

    /// Opens the store, waiting up to `patience` while its lock is held: by a CLI reading it
    /// while the daemon was down, or by this process's previous handle, whose background
    /// flusher releases the lock a moment after the last handle is dropped.
    pub fn open_waiting(path: &Path, patience: std::time::Duration) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Self::open(path) {
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if lock_busy(&e) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// A store that lives in memory only, for tests.
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let sessions = db.open_tree("sessions")?;
        let events = db.open_tree("events")?;
        let (tail, _) = broadcast::channel(TAIL_BUFFER);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            write: Mutex::new(Spare::default()),
        });
        let sink = Arc::new(Sink {
            sessions: sessions.clone(),
            events: events.clone(),
            recorded_bytes: AtomicU64::new(0),
            session_count: AtomicU64::new(0),
        });
        let writer = {
            let (queue, sink) = (Arc::clone(&queue), Arc::clone(&sink));
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || sink.run(&queue))
                .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?
        };
        let store = Self {
            db,
            sessions,
            events,
            tail,
            queue,
            sink,
            writer: Some(writer),
            open_count: AtomicU64::new(0),
            event_count: AtomicU64::new(0),
            merged_count: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        };
        // One pass at startup so retention and status need no scans later.
        let (mut bytes, mut sessions, mut open, mut events) = (0u64, 0u64, 0u64, 0u64);
        for kv in &store.sessions {
            let (k, v) = kv?;
            bytes += (k.len() + v.len()) as u64;
            sessions += 1;
            if Self::decode_session(&k, &v)?.outcome == Outcome::Open {
                open += 1;
            }
        }
        for kv in &store.events {
            let (k, v) = kv?;
            bytes += (k.len() + v.len()) as u64;
            events += event_count(&k, &v)?;
        }
        store.sink.recorded_bytes.store(bytes, Ordering::Relaxed);
        store.sink.session_count.store(sessions, Ordering::Relaxed);
        store.open_count.store(open, Ordering::Relaxed);
        store.event_count.store(events, Ordering::Relaxed);
        Ok(store)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Session>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn decode_session(key: &[u8], value: &[u8]) -> Result<Session, StoreError> {
        serde_json::from_slice(value).map_err(|e| corrupt(key, e))
    }

    /// Queues a session's value for the writer thread, as events are: the JSON and the tree
    /// insert happen off the connection's path. Fails as appends do when the writer has.
    fn queue_session(&self, session: Session) -> Result<(), StoreError> {
        let mut state = self.queue.lock();
        if let Some(why) = &state.failed {
            return Err(StoreError::Unavailable(why.clone()));
        }
        state.sessions.push(session);
        Ok(())
    }

    /// Queues an event; ids are taken under the queue's lock, so queue order is id order.
    fn put_event(
        &self,
        session: SessionId,
        kind: EventKind,
        at_us: u64,
    ) -> Result<u64, StoreError> {
        let mut state = self.queue.lock();
        if let Some(why) = &state.failed {
            return Err(StoreError::Unavailable(why.clone()));
        }
        if state.events.len() >= MAX_QUEUED {
            return Err(StoreError::Unavailable(format!(
                "{MAX_QUEUED} events waiting to be written"
            )));
        }
        let id = self.db.generate_id()?;
        let event = Event {
            v: EVENT_SCHEMA_VERSION,
            session,
            id,
            at_us,
            kind,
        };
        // Nobody tailing is the normal case: no copy then.
        if self.tail.receiver_count() > 0 {
            let _ = self.tail.send(event.clone());
        }
        state.events.push(event);
        if state.events.len() == WRITE_BATCH {
            self.queue.wake.notify_one();
        }
        drop(state);
        self.event_count.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Writes queued events into the tree, so a read sees every event appended before it.
    fn write_out(&self) -> Result<(), StoreError> {
        self.sink.write_out(&self.queue)
    }

    /// The key of the newest session started at or before `t`, found by bisecting the key
    /// space (session keys are in start order): a few dozen lookups, however many sessions.
    fn last_started_by(&self, t: u64) -> Result<Option<[u8; 8]>, StoreError> {
        let started = |k: &[u8], v: &[u8]| -> Result<u64, StoreError> {
            Ok(Self::decode_session(k, v)?.start.started_at_us)
        };
        let id = |k: &[u8]| -> u64 {
            let mut b = [0u8; 8];
            let n = k.len().min(8);
            b[..n].copy_from_slice(&k[..n]);
            u64::from_be_bytes(b)
        };
        let (Some((first_k, first_v)), Some((last_k, last_v))) =
            (self.sessions.first()?, self.sessions.last()?)
        else {
            return Ok(None);
        };
        if started(&first_k, &first_v)? > t {
            return Ok(None);
        }
        if started(&last_k, &last_v)? <= t {
            return Ok(Some(id(&last_k).to_be_bytes()));
        }
        // `lo` is a session started by `t`; every session keyed at or after `hi` started later.
        let (mut lo, mut hi) = (id(&first_k), id(&last_k));
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match self
                .sessions
                .range(mid.to_be_bytes()..)
                .next()
                .transpose()?
            {
                Some((k, v)) if id(&k) < hi => {
                    if started(&k, &v)? <= t {
                        lo = id(&k);
                    } else {
                        hi = id(&k);
                    }
                }
                // No session keyed in [mid, hi).
                _ => hi = mid,
            }
        }
        Ok(Some(lo.to_be_bytes()))
    }

    /// Removes a session and its events; returns (events, bytes) removed.
    fn remove_session(&self, id: SessionId) -> Result<(u64, u64), StoreError> {
        let mut bytes = 0u64;
        let mut events = 0u64;
        for kv in self.events.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = kv?;
            bytes += (k.len() + v.len()) as u64;
            events += event_count(&k, &v)?;
            self.events.remove(k)?;
        }
        if let Some(v) = self.sessions.remove(id.0.to_be_bytes())? {
            bytes += (8 + v.len()) as u64;
            self.sink.session_count.fetch_sub(1, Ordering::Relaxed);
        }
        self.event_count.fetch_sub(events, Ordering::Relaxed);
        self.sink.recorded_bytes.fetch_sub(bytes, Ordering::Relaxed);
        Ok((events, bytes))
    }
}

impl SessionStore for SledStore {
    fn open(&self, start: NewSession) -> Result<SessionId, StoreError> {
        let id = SessionId(self.db.generate_id()?);
        let connect = EventKind::Connect {
            client: start.client,
            destination: start.destination,
            target: start.target.clone(),
            protocol: start.protocol,
            pid: start.identity.pid,
            uid: start.identity.uid,
            comm: start.identity.comm.clone(),
        };
        let at = start.started_at_us;
        self.open_count.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id,
            start,
            ended_at_us: None,
            bytes_to_target: 0,
            bytes_from_target: 0,
            outcome: Outcome::Open,
            denied: 0,
            held: 0,
            masked: 0,
        };
        self.queue_session(session.clone())?;
        self.live().insert(id, session);
        self.put_event(id, connect, at)?;
        Ok(id)
    }

    fn append(&self, session: SessionId, kind: EventKind) -> Result<u64, StoreError> {
        // The session's counters that `sessions list --verdict` selects by.
        let counter: Option<fn(&mut Session)> = match &kind {
            EventKind::Request {
                verdict: RecordedVerdict::Deny,
                ..
            } => Some(|s| s.denied += 1),
            EventKind::Approval { state, .. } if state == "requested" => Some(|s| s.held += 1),
            EventKind::Response {
                masked_rows: Some(_),
                ..
            } => Some(|s| s.masked += 1),
            _ => None,
        };
        if let Some(count) = counter {
            // Events are recorded whether or not their session is known (as every other
            // event is); only a known session has counters to keep.
            let mut live = self.live();
            if let Some(s) = live.get_mut(&session) {
                count(s);
                self.queue_session(s.clone())?;
            } else {
                drop(live);
                if let Some(mut s) = self.get(session)? {
                    count(&mut s);
                    self.queue_session(s)?;
                }
            }
        }
        self.put_event(session, kind, super::now_micros())
    }

    /// A result without masked rows, while its request waits in the queue with no result of
    /// its own, and while nobody tails (a tail has already been sent the request as it was):
    /// written into the request, one event less for the writer. Anything else is appended.
    fn complete(&self, session: SessionId, result: EventKind) -> Result<u64, StoreError> {
        let request = match &result {
            EventKind::Response {
                request,
                masked_rows: None,
                mask_rules,
                ..
            } if mask_rules.is_empty() && self.tail.receiver_count() == 0 => *request,
            _ => return self.append(session, result),
        };
        let mut state = self.queue.lock();
        let unanswered = state
            .events
            .binary_search_by_key(&request, |e| e.id)
            .ok()
            .and_then(|at| state.events.get_mut(at))
            .filter(|e| e.session == session)
            .and_then(|e| match &mut e.kind {
                EventKind::Request {
                    duration_us: held_duration @ None,
                    summary: held_summary @ None,
                    error: held_error @ None,
                    ..
                } => Some((held_duration, held_summary, held_error)),
                _ => None,
            });
        if let Some((held_duration, held_summary, held_error)) = unanswered {
            if let EventKind::Response {
                duration_us,
                summary,
                error,
                ..
            } = result
            {
                *held_duration = Some(duration_us);
                *held_summary = summary;
                *held_error = error;
                drop(state);
                self.merged_count.fetch_add(1, Ordering::Relaxed);
                return Ok(request);
            }
        }
        drop(state);
        self.append(session, result)
    }

    fn close(&self, id: SessionId, end: SessionEnd) -> Result<(), StoreError> {
        let live = self.live().remove(&id);
        let mut session = match live {
            Some(s) => s,
            None => self.get(id)?.ok_or(StoreError::UnknownSession(id))?,
        };
        if session.outcome == Outcome::Open {
            self.open_count.fetch_sub(1, Ordering::Relaxed);
        }
        session.ended_at_us = Some(end.ended_at_us);
        session.bytes_to_target = end.bytes_to_target;
        session.bytes_from_target = end.bytes_from_target;
        session.outcome = end.outcome.clone();
        self.queue_session(session)?;
        self.put_event(
            id,
            EventKind::Close {
                outcome: end.outcome,
                bytes_to_target: end.bytes_to_target,
                bytes_from_target: end.bytes_from_target,
            },
            end.ended_at_us,
        )?;
        Ok(())
    }

    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        // Sessions are written by the writer thread: what was queued first.
        self.write_out()?;
        let key = id.0.to_be_bytes();
        self.sessions
            .get(key)?
            .map(|v| Self::decode_session(&key, &v))
            .transpose()
    }

    fn list(&self, filter: &ListFilter, limit: usize) -> Result<Vec<Session>, StoreError> {
        self.write_out()?;
        let mut out = Vec::with_capacity(limit.min(1024));
        // With `until`, the newest-first scan starts at the last session that can match, not
        // at the newest one (the same ordering, with the same second of slack, as `since`).
        let sessions = match filter.until_us {
            Some(until) => {
                match self.last_started_by(until.saturating_add(START_ORDER_SLACK_US))? {
                    Some(last) => self.sessions.range(..=last),
                    None => return Ok(out),
                }
            }
            None => self.sessions.iter(),
        };
        for kv in sessions.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let s = Self::decode_session(&k, &v)?;
            // Keys are in start order (ids are handed out as sessions open, a few microseconds
            // after their start time is taken): far enough past `since`, stop scanning.
            if filter.since_us.is_some_and(|since| {
                s.start.started_at_us.saturating_add(START_ORDER_SLACK_US) < since
            }) {
                break;
            }
            if filter.matches(&s) {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn events(&self, id: SessionId) -> Result<Vec<Event>, StoreError> {
        self.write_out()?;
        let mut out: Vec<Event> = Vec::new();
        for kv in self.events.scan_prefix(id.0.to_be_bytes()) {
            let (k, v) = kv?;
            let plain = chunk_plain(&k, &v)?;
            for json in chunk_events(&k, &plain)? {
                out.push(serde_json::from_slice(json).map_err(|e| corrupt(&k, e))?);
            }
        }
        // Chunks are keyed by their first event and written in id order; sorting keeps the
        // promise even for a store written otherwise.
        out.sort_by_key(|e| e.id);
        Ok(out)
    }

    fn counts(&self) -> Result<SessionCounts, StoreError> {
        self.write_out()?;
        Ok(SessionCounts {
            total: self.sink.session_count.load(Ordering::Relaxed),
            open: self.open_count.load(Ordering::Relaxed),
        })
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let counts = self.counts()?;
        let oldest = match self.sessions.first()? {
            Some((k, v)) => Some(Self::decode_session(&k, &v)?.start.started_at_us),
            None => None,
        };
        Ok(StoreStats {
            sessions: counts.total,
            open_sessions: counts.open,
            events: self.event_count.load(Ordering::Relaxed),
            results_in_requests: self.merged_count.load(Ordering::Relaxed),
            recorded_bytes: self.sink.recorded_bytes.load(Ordering::Relaxed),
            disk_bytes: self.db.size_on_disk()?,
            oldest_session_us: oldest,
        })
    }

    fn prune(&self, retention: &Retention, now_us: u64) -> Result<PruneReport, StoreError> {
        // A closed session's last events may still be queued: write them so they go too.
        self.write_out()?;
        let mut report = PruneReport::default();
        let too_old = |s: &Session| {
            retention
                .max_age_us
                .is_some_and(|age| s.start.started_at_us < now_us.saturating_sub(age))
        };
        let too_big = || {
            retention
                .max_bytes
                .is_some_and(|max| self.sink.recorded_bytes.load(Ordering::Relaxed) > max)
        };
        for kv in &self.sessions {
            let (k, v) = kv?;
            let s = Self::decode_session(&k, &v)?;
            let (old, big) = (too_old(&s), too_big());
            if !old && !big {
                break; // oldest first: the rest are younger, and the store fits
            }
            if s.outcome == Outcome::Open {
                continue; // never cut a live session
            }
            // Remove as we go so `too_big` sees the store shrink.
            let (events, bytes) = self.remove_session(s.id)?;
            report.sessions += 1;
            report.events += events;
            report.bytes += bytes;
        }
        Ok(report)
    }

    fn mark_interrupted(&self) -> Result<u64, StoreError> {
        let mut open = Vec::new();
        for kv in &self.sessions {
            let (k, v) = kv?;
            let s = Self::decode_session(&k, &v)?;
            if s.outcome == Outcome::Open {
                open.push(s);
            }
        }
        for mut s in open.iter().cloned() {
            s.outcome = Outcome::Interrupted;
            self.open_count.fetch_sub(1, Ordering::Relaxed);
            self.sink.put_session(&s)?;
            self.put_event(
                s.id,
                EventKind::Close {
                    outcome: Outcome::Interrupted,
                    bytes_to_target: s.bytes_to_target,
                    bytes_from_target: s.bytes_from_target,
                },
                super::now_micros(),
            )?;
        }
        Ok(open.len() as u64)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.write_out()?;
        self.db.flush()?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tail.subscribe()
    }
}

impl Drop for SledStore {
    /// Stops the writer after it has written everything queued.
    fn drop(&mut self) {
        self.queue.lock().stop = true;
        self.queue.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{
        chunk::{encode_chunk, ChunkBuffers},
        writer::event_key,
    };
    use crate::{
        identity::ProcessIdentity,
        net::{ClientAddr, OrigDstAddr},
        protocol::Protocol,
        record::{
            chunk::{event_json, CHUNK_LZ4, CHUNK_MAGIC, CHUNK_TARGET},
            MAX_EVENT_TEXT,
        },
    };

    fn start(n: u16) -> NewSession {
        NewSession {
            started_at_us: u64::from(n) * 1_000_000_000,
            client: ClientAddr(format!("127.0.0.1:{}", 40000 + n).parse().unwrap()),
            destination: OrigDstAddr("10.0.0.5:5432".parse().unwrap()),
            target: Some(if n % 2 == 0 { "db" } else { "api" }.into()),
            protocol: Protocol::Tcp,
            identity: ProcessIdentity {
                pid: u32::from(n),
                uid: u32::from(n % 3),
                comm: "psql".into(),
                exe: Some("/usr/bin/psql".into()),
                ..ProcessIdentity::default()
            },
        }
    }

    fn end(outcome: Outcome) -> SessionEnd {
        SessionEnd {
            ended_at_us: 99,
            bytes_to_target: 10,
            bytes_from_target: 20,
            outcome,
        }
    }

    fn request(verdict: RecordedVerdict) -> EventKind {
        EventKind::Request {
            text: "SELECT 1".into(),
            class: Some("read".into()),
            verdict,
            rules: vec![].into(),
            observed: false,
            duration_us: None,
            summary: None,
            error: None,
        }
    }

    /// Opening, counting and closing a session queue its value for the writer thread: the
    /// connection's path writes no tree (the writer, held here, has not run), and every read
    /// writes the queue out first, so it sees the session as it now is.
    #[test]
    fn sessions_are_written_by_the_writer_and_read_as_they_now_are() {
        let store = SledStore::temporary().unwrap();
        let hold = store.queue.write.lock().unwrap();
        let id = store.open(start(1)).unwrap();
        store.append(id, request(RecordedVerdict::Deny)).unwrap();
        assert!(store.sessions.get(id.0.to_be_bytes()).unwrap().is_none());
        assert_eq!(store.queue.lock().sessions.len(), 2, "opened, then counted");
        drop(hold);
        let s = store.get(id).unwrap().unwrap();
        assert_eq!((s.outcome.clone(), s.denied), (Outcome::Open, 1));
        store.close(id, end(Outcome::Closed)).unwrap();
        let listed = store.list(&ListFilter::default(), 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].outcome.clone(), listed[0].denied),
            (Outcome::Closed, 1)
        );
        assert_eq!(store.counts().unwrap(), SessionCounts { total: 1, open: 0 });

        // Opened, counted and closed within one batch: written once, as last queued.
        let hold = store.queue.write.lock().unwrap();
        let short = store.open(start(2)).unwrap();
        store.append(short, request(RecordedVerdict::Deny)).unwrap();
        store.close(short, end(Outcome::Closed)).unwrap();
        assert_eq!(store.queue.lock().sessions.len(), 3);
        drop(hold);
        let s = store.get(short).unwrap().unwrap();
        assert_eq!(
            (s.outcome, s.denied, s.ended_at_us),
            (Outcome::Closed, 1, Some(99))
        );
        assert_eq!(store.counts().unwrap(), SessionCounts { total: 2, open: 0 });
    }

    #[test]
    fn sessions_are_listed_newest_first_and_closed_in_place() {
        let store = SledStore::temporary().unwrap();
        let ids: Vec<_> = (0..5).map(|n| store.open(start(n)).unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        store.close(ids[1], end(Outcome::Closed)).unwrap();
        let list = store.list(&ListFilter::default(), 3).unwrap();
        assert_eq!(
            list.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![ids[4], ids[3], ids[2]]
        );
        let s = store.get(ids[1]).unwrap().unwrap();
        assert_eq!(
            (s.bytes_to_target, s.bytes_from_target, s.ended_at_us),
            (10, 20, Some(99))
        );
        assert_eq!(s.outcome, Outcome::Closed);
        assert_eq!(s.start, start(1));
        assert_eq!(store.counts().unwrap(), SessionCounts { total: 5, open: 4 });
        assert!(matches!(
            store.close(SessionId(123_456), end(Outcome::Closed)),
            Err(StoreError::UnknownSession(_))
        ));
    }

    #[test]
    fn sessions_are_selected_by_what_happened_in_them() {
        let store = SledStore::temporary().unwrap();
        let plain = store.open(start(1)).unwrap();
        let denied = store.open(start(2)).unwrap();
        let held = store.open(start(3)).unwrap();
        let masked = store.open(start(4)).unwrap();
        store
            .append(plain, request(RecordedVerdict::Allow))
            .unwrap();
        store
            .append(denied, request(RecordedVerdict::Deny))
            .unwrap();
        store
            .append(
                held,
                EventKind::Approval {
                    request: "DELETE FROM t".into(),
                    state: "requested".into(),
                    by_uid: None,
                    by_user: None,
                    reason: None,
                    approval: None,
                    target: None,
                    rule: None,
                    grant: None,
                    until_us: None,
                    waited_us: None,
                },
            )
            .unwrap();
        store
            .append(
                masked,
                EventKind::Response {
                    request: 1,
                    duration_us: 5,
                    summary: None,
                    error: None,
                    masked_rows: Some(2),
                    mask_rules: vec!["pii".into()],
                },
            )
            .unwrap();
        let ids = |f: ListFilter| -> Vec<SessionId> {
            let mut v: Vec<SessionId> = store.list(&f, 10).unwrap().iter().map(|s| s.id).collect();
            v.sort();
            v
        };
        assert_eq!(
            ids(ListFilter {
                denied: true,
                ..ListFilter::default()
            }),
            vec![denied]
        );
        assert_eq!(
            ids(ListFilter {
                held: true,
                ..ListFilter::default()
            }),
            vec![held]
        );
        assert_eq!(
            ids(ListFilter {
                masked: true,
                ..ListFilter::default()
            }),
            vec![masked]
        );
        assert_eq!(
            ids(ListFilter {
                allowed: true,
                ..ListFilter::default()
            }),
            vec![plain, held, masked]
        );
    }

    #[test]
    fn until_finds_the_same_sessions_as_a_full_scan() {
        let store = SledStore::temporary().unwrap();
        for n in 0..300u16 {
            store.open(start(n)).unwrap();
        }
        let every = store.list(&ListFilter::default(), usize::MAX).unwrap();
        assert_eq!(every.len(), 300);
        for until in [
            0,
            1,
            999_999_999,
            1_000_000_000,
            77_500_000_000,
            299_000_000_000,
            u64::MAX,
        ] {
            let filter = ListFilter {
                until_us: Some(until),
                ..ListFilter::default()
            };
            let expected: Vec<SessionId> = every
                .iter()
                .filter(|s| filter.matches(s))
                .map(|s| s.id)
                .collect();
            for limit in [1, 50, usize::MAX] {
                let got: Vec<SessionId> = store
                    .list(&filter, limit)
                    .unwrap()
                    .iter()
                    .map(|s| s.id)
                    .collect();
                let want: Vec<SessionId> = expected.iter().copied().take(limit).collect();
                assert_eq!(got, want, "until {until}, limit {limit}");
            }
        }
    }

    #[test]
    fn events_are_ordered_per_session_and_published_to_tail() {
        let store = SledStore::temporary().unwrap();
        let mut tail = store.subscribe();
        let a = store.open(start(1)).unwrap();
        let b = store.open(start(2)).unwrap();
        store.append(a, request(RecordedVerdict::Allow)).unwrap();
        store.append(b, request(RecordedVerdict::Deny)).unwrap();
        store
            .append(
                a,
                EventKind::Error {
                    message: "x".into(),
                },
            )
            .unwrap();
        store.close(a, end(Outcome::Closed)).unwrap();
        let kinds: Vec<&str> = store
            .events(a)
            .unwrap()
            .iter()
            .map(|e| e.kind.label())
            .collect();
        assert_eq!(kinds, vec!["connect", "request", "error", "close"]);
        assert_eq!(store.events(b).unwrap().len(), 2);
        let mut seen = Vec::new();
        while let Ok(e) = tail.try_recv() {
            seen.push((e.session, e.kind.label()));
        }
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert_eq!(seen[3], (b, "request"));
        assert!(store.get(b).unwrap().unwrap().was_denied());
        assert!(!store.get(a).unwrap().unwrap().was_denied());
    }

    #[test]
    fn filters_narrow_the_list() {
        let store = SledStore::temporary().unwrap();
        let ids: Vec<_> = (1..=6).map(|n| store.open(start(n)).unwrap()).collect();
        store
            .append(ids[2], request(RecordedVerdict::Deny))
            .unwrap();
        let f = |filter: ListFilter| -> Vec<SessionId> {
            store
                .list(&filter, 100)
                .unwrap()
                .iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(
            f(ListFilter {
                target: Some("db".into()),
                ..ListFilter::default()
            }),
            vec![ids[5], ids[3], ids[1]]
        );
        assert_eq!(
            f(ListFilter {
                uid: Some(0),
                ..ListFilter::default()
            }),
            vec![ids[5], ids[2]]
        );
        assert_eq!(
            f(ListFilter {
                denied: true,
                ..ListFilter::default()
            }),
            vec![ids[2]]
        );
        assert_eq!(
            f(ListFilter {
                since_us: Some(5_000_000_000),
                ..ListFilter::default()
            }),
            vec![ids[5], ids[4]]
        );
        assert_eq!(
            f(ListFilter {
                process: Some("psql".into()),
                ..ListFilter::default()
            })
            .len(),
            6
        );
        assert_eq!(
            f(ListFilter {
                process: Some("/usr/bin/psql".into()),
                ..ListFilter::default()
            })
            .len(),
            6
        );
        assert!(f(ListFilter {
            process: Some("curl".into()),
            ..ListFilter::default()
        })
        .is_empty());
        assert!(f(ListFilter {
            protocol: Some(Protocol::Ssh),
            ..ListFilter::default()
        })
        .is_empty());
    }

    #[test]
    fn reopening_keeps_sessions_and_marks_open_ones_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sled");
        let first;
        let bytes;
        {
            let store = SledStore::open(&path).unwrap();
            first = store.open(start(1)).unwrap();
            store
                .append(first, request(RecordedVerdict::Allow))
                .unwrap();
            store.flush().unwrap();
            bytes = store.stats().unwrap().recorded_bytes;
        }
        let store = SledStore::open_waiting(&path, std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(
            store.stats().unwrap().recorded_bytes,
            bytes,
            "accounting is rebuilt on open"
        );
        assert_eq!(store.mark_interrupted().unwrap(), 1);
        assert_eq!(
            store.get(first).unwrap().unwrap().outcome,
            Outcome::Interrupted
        );
        assert_eq!(
            store.events(first).unwrap().last().unwrap().kind.label(),
            "close"
        );
        let second = store.open(start(2)).unwrap();
        assert!(second > first, "ids keep increasing across reopen");
    }

    #[test]
    fn queued_events_are_read_back_in_order_next_to_values_written_before_chunks() {
        let store = SledStore::temporary().unwrap();
        let a = store.open(start(1)).unwrap();
        let b = store.open(start(2)).unwrap();
        // A value as the store wrote it before chunks: one event, plain JSON.
        let legacy = Event {
            v: EVENT_SCHEMA_VERSION,
            session: a,
            id: store.db.generate_id().unwrap(),
            at_us: 5,
            kind: request(RecordedVerdict::Allow),
        };
        store
            .events
            .insert(
                event_key(a, legacy.id),
                serde_json::to_vec(&legacy).unwrap(),
            )
            .unwrap();
        // A chunk as the store wrote it before compression: CHUNK_MAGIC, length-prefixed JSON.
        let plain_chunk = Event {
            id: store.db.generate_id().unwrap(),
            ..legacy.clone()
        };
        let json = serde_json::to_vec(&plain_chunk).unwrap();
        let mut value = vec![CHUNK_MAGIC];
        value.extend_from_slice(&u32::try_from(json.len()).unwrap().to_le_bytes());
        value.extend_from_slice(&json);
        store
            .events
            .insert(event_key(a, plain_chunk.id), value)
            .unwrap();
        let mut ids = vec![];
        for i in 0..10 {
            let s = if i % 2 == 0 { a } else { b };
            let id = store.append(s, request(RecordedVerdict::Allow)).unwrap();
            if s == a {
                ids.push(id);
            }
        }
        // Read before the writer thread ran: the read writes the queue out first.
        let events = store.events(a).unwrap();
        let got: Vec<u64> = events.iter().map(|e| e.id).collect();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        assert!(got.contains(&legacy.id));
        assert!(got.contains(&plain_chunk.id));
        assert!(ids.iter().all(|id| got.contains(id)));
        assert_eq!(
            store.events(b).unwrap().len(),
            1 + 5,
            "connect + 5 requests"
        );
    }

    #[test]
    fn opening_waits_while_another_handle_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sled");
        let first = SledStore::open(&path).unwrap();
        let id = first.open(start(1)).unwrap();
        // sled reports a held lock as `Other`, wrapping the lock call's `WouldBlock`.
        match SledStore::open(&path) {
            Err(StoreError::Sled(sled::Error::Io(e))) => assert!(lock_busy(&e), "{e}"),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a second handle opened a locked store"),
        }
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let second = SledStore::open_waiting(&path, std::time::Duration::from_secs(10)).unwrap();
        holder.join().unwrap();
        assert!(second.get(id).unwrap().is_some());
    }

    #[test]
    fn a_cut_chunk_is_reported_as_corrupt_not_a_panic() {
        let key = event_key(SessionId(1), 1);
        let mut value = vec![CHUNK_MAGIC, 200, 0, 0, 0];
        value.extend_from_slice(b"{}");
        assert!(matches!(
            chunk_events(&key, &value),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            chunk_events(&key, &[CHUNK_MAGIC, 1, 0]),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(chunk_events(&key, &[CHUNK_MAGIC]).unwrap().len(), 0);
    }

    fn response(request: u64, masked_rows: Option<u64>) -> EventKind {
        EventKind::Response {
            request,
            duration_us: 7,
            summary: Some("SELECT 1".into()),
            error: None,
            masked_rows,
            mask_rules: masked_rows.map(|_| vec!["pii".into()]).unwrap_or_default(),
        }
    }

    #[test]
    fn a_result_goes_into_its_request_only_while_that_waits_unwritten() {
        let store = SledStore::temporary().unwrap();
        let (a, b) = (store.open(start(1)).unwrap(), store.open(start(2)).unwrap());
        // Queued: the result is written into the request.
        let r1 = store.append(a, request(RecordedVerdict::Allow)).unwrap();
        assert_eq!(store.complete(a, response(r1, None)).unwrap(), r1);
        // Rows went out masked: a response of its own (the session's counter needs it).
        let r2 = store.append(a, request(RecordedVerdict::Allow)).unwrap();
        assert_ne!(store.complete(a, response(r2, Some(1))).unwrap(), r2);
        // Another session's request is never completed by this one.
        let r3 = store.append(b, request(RecordedVerdict::Allow)).unwrap();
        assert_ne!(store.complete(a, response(r3, None)).unwrap(), r3);
        // Already written: appended.
        let r4 = store.append(a, request(RecordedVerdict::Allow)).unwrap();
        store.flush().unwrap();
        assert_ne!(store.complete(a, response(r4, None)).unwrap(), r4);
        // Someone tails: appended, as the tail already has the request.
        let r5 = store.append(a, request(RecordedVerdict::Allow)).unwrap();
        let tail = store.subscribe();
        assert_ne!(store.complete(a, response(r5, None)).unwrap(), r5);
        drop(tail);
        // A request that has a result already keeps it.
        let r6 = store.append(a, request(RecordedVerdict::Allow)).unwrap();
        store.complete(a, response(r6, None)).unwrap();
        assert_ne!(store.complete(a, response(r6, None)).unwrap(), r6);

        let events = store.events(a).unwrap();
        let kinds: Vec<(&str, Option<u64>)> = events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Request { duration_us, .. } => ("request", *duration_us),
                EventKind::Response { request, .. } => ("response", Some(*request)),
                other => (other.label(), None),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("connect", None),
                ("request", Some(7)),
                ("request", None),
                ("response", Some(r2)),
                ("response", Some(r3)),
                ("request", None),
                ("response", Some(r4)),
                ("request", None),
                ("response", Some(r5)),
                ("request", Some(7)),
                ("response", Some(r6)),
            ]
        );
        let EventKind::Request { summary, .. } = &events[1].kind else {
            unreachable!()
        };
        assert_eq!(summary.as_deref(), Some("SELECT 1"));
        assert_eq!(store.get(a).unwrap().unwrap().masked, 1);
        assert_eq!(store.stats().unwrap().results_in_requests, 2);
    }

    #[test]
    fn events_are_written_as_serde_writes_them() {
        let kinds = [
            request(RecordedVerdict::Deny),
            EventKind::request(
                "say \"hi\"\n\u{1}é",
                None,
                RecordedVerdict::Allow,
                Vec::new(),
            )
            .observed(true),
            EventKind::Response {
                request: 9,
                duration_us: 120,
                summary: Some("SELECT 1".into()),
                error: None,
                masked_rows: Some(2),
                mask_rules: vec!["emails".into()],
            },
            EventKind::Response {
                request: 9,
                duration_us: 120,
                summary: None,
                error: Some("boom".into()),
                masked_rows: None,
                mask_rules: Vec::new(),
            },
            EventKind::TerminalOutput {
                data: "\u{1b}[0m$ ".into(),
            },
            EventKind::Close {
                outcome: Outcome::Failed {
                    error: "reset".into(),
                },
                bytes_to_target: 1,
                bytes_from_target: u64::MAX,
            },
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            let event = Event {
                v: EVENT_SCHEMA_VERSION,
                session: SessionId(u64::MAX - i as u64),
                id: i as u64,
                at_us: 1_700_000_000_000_000 + i as u64,
                kind,
            };
            let mut ours = Vec::new();
            event_json(&event, &mut ours).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&event).unwrap()
            );
        }
    }

    #[test]
    fn a_compressed_chunk_reads_back_and_counts_without_decompressing() {
        let events: Vec<Event> = (0..50u64)
            .map(|i| Event {
                v: EVENT_SCHEMA_VERSION,
                session: SessionId(7),
                id: 100 + i,
                at_us: i,
                kind: request(RecordedVerdict::Allow),
            })
            .collect();
        let key = event_key(SessionId(7), 100);
        let mut buffers = ChunkBuffers::default();
        let refs: Vec<&Event> = events.iter().collect();
        let (value, taken) = encode_chunk(&refs, &mut buffers).unwrap();
        let value = value.to_vec();
        assert_eq!(taken, 50);
        assert_eq!(value[0], CHUNK_LZ4);
        assert!(
            value.len() * 3 < buffers.body.len(),
            "similar events compress: {} of {} bytes",
            value.len(),
            buffers.body.len()
        );
        assert_eq!(event_count(&key, &value).unwrap(), 50);
        let plain = chunk_plain(&key, &value).unwrap();
        let back: Vec<Event> = chunk_events(&key, &plain)
            .unwrap()
            .into_iter()
            .map(|j| serde_json::from_slice(j).unwrap())
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn a_long_run_of_one_session_is_split_into_chunks_a_reader_accepts() {
        let store = SledStore::temporary().unwrap();
        let s = store.open(start(1)).unwrap();
        // Incompressible text near the bound, enough for several chunks in one batch.
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut noise = || {
            (0..MAX_EVENT_TEXT / 2)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b'a' + (seed % 26) as u8)
                })
                .collect::<String>()
        };
        let n = 3 * CHUNK_TARGET / (MAX_EVENT_TEXT / 2) + 1;
        for _ in 0..n {
            store
                .append(s, EventKind::Error { message: noise() })
                .unwrap();
        }
        store.flush().unwrap();
        let values: Vec<_> = store
            .events
            .scan_prefix(s.0.to_be_bytes())
            .map(Result::unwrap)
            .collect();
        assert!(values.len() >= 3, "{} chunks", values.len());
        for (k, v) in &values {
            let plain = chunk_plain(k, v).unwrap();
            assert!(
                plain.len() <= CHUNK_TARGET + 2 * MAX_EVENT_TEXT,
                "{}",
                plain.len()
            );
        }
        let events = store.events(s).unwrap();
        assert_eq!(events.len(), 1 + n, "connect + every error");
        assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    }

    #[test]
    fn a_damaged_compressed_chunk_is_reported_as_corrupt_not_a_panic() {
        let key = event_key(SessionId(1), 1);
        let events = [Event {
            v: EVENT_SCHEMA_VERSION,
            session: SessionId(1),
            id: 1,
            at_us: 1,
            kind: request(RecordedVerdict::Deny),
        }];
        let mut buffers = ChunkBuffers::default();
        let (good, _) = encode_chunk(&[&events[0]], &mut buffers).unwrap();
        let good = good.to_vec();
        let mut huge = good.clone();
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut longer = good.clone();
        let len = u32::from_le_bytes([good[5], good[6], good[7], good[8]]);
        longer[5..9].copy_from_slice(&(len + 10).to_le_bytes());
        let mut flipped = good.clone();
        for b in &mut flipped[9..] {
            *b ^= 0x5A;
        }
        let cases = [
            &good[..3],
            &good[..good.len() - 3],
            &huge[..],
            &longer[..],
            &flipped[..],
        ];
        for (i, value) in cases.into_iter().enumerate() {
            let read = chunk_plain(&key, value).and_then(|p| {
                chunk_events(&key, &p)?
                    .into_iter()
                    .map(|j| serde_json::from_slice::<Event>(j).map_err(|e| corrupt(&key, e)))
                    .collect::<Result<Vec<_>, _>>()
            });
            assert!(
                matches!(read, Err(StoreError::Corrupt { .. })),
                "case {i}: {read:?}"
            );
        }
        assert!(matches!(
            event_count(&key, &[CHUNK_LZ4, 1]),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_store_with_100k_events_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sled");
        let n = 25_000u16;
        let last;
        {
            let store = SledStore::open(&path).unwrap();
            let mut id = SessionId(0);
            for i in 0..n {
                id = store.open(start(i % 1000)).unwrap();
                store.append(id, request(RecordedVerdict::Allow)).unwrap();
                store.append(id, request(RecordedVerdict::Allow)).unwrap();
                if i + 1 < n {
                    store.close(id, end(Outcome::Closed)).unwrap();
                }
            }
            last = id;
            store.flush().unwrap();
        }
        let store = SledStore::open_waiting(&path, std::time::Duration::from_secs(5)).unwrap();
        let stats = store.stats().unwrap();
        assert_eq!(
            (stats.sessions, stats.events, stats.open_sessions),
            (25_000, 99_999, 1)
        );
        let newest = store.list(&ListFilter::default(), 50).unwrap();
        assert_eq!(newest.len(), 50);
        assert_eq!(newest[0].id, last);
        assert!(newest.windows(2).all(|w| w[0].id > w[1].id));
        assert_eq!(store.mark_interrupted().unwrap(), 1);
        assert_eq!(
            store.counts().unwrap(),
            SessionCounts {
                total: 25_000,
                open: 0
            }
        );
    }

    #[test]
    fn a_closed_session_keeps_its_counters_across_a_reopen() {
        // Closing and counting work on the process's copy of a live session: what reaches the
        // tree must be the whole session, counters and end together.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sled");
        let id = {
            let store = SledStore::open(&path).unwrap();
            let id = store.open(start(7)).unwrap();
            store.append(id, request(RecordedVerdict::Deny)).unwrap();
            store.append(id, request(RecordedVerdict::Deny)).unwrap();
            let live = store.get(id).unwrap().unwrap();
            assert_eq!((live.denied, live.outcome.clone()), (2, Outcome::Open));
            store.close(id, end(Outcome::Closed)).unwrap();
            // Closed: the next count reads the tree (nothing live is left to update).
            store.append(id, request(RecordedVerdict::Deny)).unwrap();
            store.flush().unwrap();
            id
        };
        let store = SledStore::open_waiting(&path, std::time::Duration::from_secs(5)).unwrap();
        let s = store.get(id).unwrap().unwrap();
        assert_eq!(
            (
                s.denied,
                s.outcome,
                s.bytes_to_target,
                s.bytes_from_target,
                s.ended_at_us
            ),
            (3, Outcome::Closed, 10, 20, Some(99))
        );
        assert_eq!(s.start, start(7));
        assert_eq!(store.stats().unwrap().open_sessions, 0);
    }

    #[test]
    fn prunes_oldest_closed_sessions_by_age_and_by_size() {
        let store = SledStore::temporary().unwrap();
        let ids: Vec<_> = (1..=10).map(|n| store.open(start(n)).unwrap()).collect();
        for (i, id) in ids.iter().enumerate() {
            store.append(*id, request(RecordedVerdict::Allow)).unwrap();
            if i != 0 {
                store.close(*id, end(Outcome::Closed)).unwrap(); // the oldest stays open
            }
        }
        // By age: sessions started before t=4s are older than 6s at t=10s.
        let report = store
            .prune(
                &Retention {
                    max_age_us: Some(6_000_000_000),
                    max_bytes: None,
                },
                10_000_000_000,
            )
            .unwrap();
        assert_eq!(report.sessions, 2, "sessions 2 and 3 (1 is still open)");
        assert!(
            store.get(ids[0]).unwrap().is_some(),
            "an open session is never pruned"
        );
        assert!(store.get(ids[1]).unwrap().is_none() && store.events(ids[1]).unwrap().is_empty());
        assert!(store.get(ids[3]).unwrap().is_some());

        // By size: down to half of what is left, oldest first.
        let before = store.stats().unwrap();
        let report = store
            .prune(
                &Retention {
                    max_age_us: None,
                    max_bytes: Some(before.recorded_bytes / 2),
                },
                10_000_000_000,
            )
            .unwrap();
        let after = store.stats().unwrap();
        assert!(
            after.recorded_bytes <= before.recorded_bytes / 2,
            "{after:?}"
        );
        assert_eq!(after.recorded_bytes, before.recorded_bytes - report.bytes);
        assert_eq!(after.sessions, before.sessions - report.sessions);
        let left: Vec<SessionId> = store
            .list(&ListFilter::default(), 100)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        assert!(
            left.contains(&ids[9]) && left.contains(&ids[0]),
            "newest and open sessions stay: {left:?}"
        );
        assert!(
            !left.contains(&ids[3]),
            "oldest closed went first: {left:?}"
        );
    }
}
