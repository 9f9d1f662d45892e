//! The store's writer thread: events appended to an in-memory queue (an id, a lock, a push:
//! nothing on the request path touches the tree) and moved into the events tree every
//! [`WRITE_EVERY_MS`], one LZ4-compressed chunk per session per batch (`record/chunk.rs`).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Condvar, Mutex, PoisonError,
    },
    time::Duration,
};

use super::{
    chunk::{encode_chunk, ChunkBuffers},
    Event, Session, SessionId, StoreError,
};

/// How often the writer thread moves queued events into the tree.
pub const WRITE_EVERY_MS: u64 = 10;
/// Queued events that wake the writer before its interval is up.
pub(super) const WRITE_BATCH: usize = 2048;

/// Events appended but not yet in the tree.
pub(super) struct Queue {
    pub(super) state: Mutex<QueueState>,
    pub(super) wake: Condvar,
    /// Held while a batch moves from the queue into the tree, so a reader that writes the
    /// queue out first cannot overtake a batch the writer thread has already taken. It keeps
    /// the previous batch's allocation, emptied, to swap in for the next: a queue rebuilt from
    /// nothing every batch costs the appending thread a dozen reallocations of up to a few
    /// hundred KiB (fresh pages, faulted in) every 10 ms.
    pub(super) write: Mutex<Spare>,
}

/// What a batch's write keeps for the next: the emptied event list and the encoding buffers.
#[derive(Default)]
pub(super) struct Spare {
    events: Vec<Event>,
    buffers: ChunkBuffers,
}

#[derive(Default)]
pub(super) struct QueueState {
    pub(super) events: Vec<Event>,
    /// Sessions to write as they now are (opened, closed, a counter changed), in the order
    /// they were queued: a later copy of one replaces the earlier in the tree.
    pub(super) sessions: Vec<Session>,
    pub(super) stop: bool,
    /// Why the last write failed; appends fail while it is set.
    pub(super) failed: Option<String>,
}

impl Queue {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where the writer puts a batch.
pub(super) struct Sink {
    pub(super) sessions: sled::Tree,
    pub(super) events: sled::Tree,
    /// Bytes of keys and values in both trees, kept as writes happen.
    pub(super) recorded_bytes: AtomicU64,
    /// Sessions in the tree.
    pub(super) session_count: AtomicU64,
}

impl Sink {
    /// Writes a session's value (its JSON) in the sessions tree, keeping the counts.
    pub(super) fn put_session(&self, session: &Session) -> Result<(), StoreError> {
        let key = session.id.0.to_be_bytes();
        let value = serde_json::to_vec(session).map_err(StoreError::Encode)?;
        let new_len = (key.len() + value.len()) as u64;
        match self.sessions.insert(key, value)? {
            Some(old) => {
                let old_len = (key.len() + old.len()) as u64;
                self.recorded_bytes.fetch_add(new_len, Ordering::Relaxed);
                self.recorded_bytes.fetch_sub(old_len, Ordering::Relaxed);
            }
            None => {
                self.recorded_bytes.fetch_add(new_len, Ordering::Relaxed);
                self.session_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Moves everything queued so far into the trees: the sessions, then the events.
    pub(super) fn write_out(&self, queue: &Queue) -> Result<(), StoreError> {
        let mut spare = queue.write.lock().unwrap_or_else(PoisonError::into_inner);
        let spare = &mut *spare;
        let (mut batch, sessions) = {
            let mut state = queue.lock();
            if state.events.is_empty() && state.sessions.is_empty() {
                return Ok(());
            }
            (
                std::mem::replace(&mut state.events, std::mem::take(&mut spare.events)),
                std::mem::take(&mut state.sessions),
            )
        };
        // A session queued more than once in a batch (a short one, opened and closed within
        // it) is written once, as it was last queued.
        let mut written = HashSet::with_capacity(sessions.len());
        let result = sessions
            .iter()
            .rev()
            .filter(|s| written.insert(s.id))
            .try_for_each(|s| self.put_session(s))
            .map_err(|e| (e, true))
            .and_then(|()| {
                self.write(&batch, &mut spare.buffers)
                    .map_err(|e| (e, false))
            });
        match result {
            Ok(()) => {
                queue.lock().failed = None;
                // Drop the events here, keep the allocation (unless a burst made it huge).
                batch.clear();
                if batch.capacity() > 4 * WRITE_BATCH {
                    batch.shrink_to(WRITE_BATCH);
                }
                spare.events = batch;
                Ok(())
            }
            Err((e, sessions_failed)) => {
                // Nothing accepted is dropped: the batch goes back, first, for the next try
                // (sessions too if they were not all written: writing one again replaces it).
                let mut state = queue.lock();
                state.failed = Some(e.to_string());
                batch.sort_unstable_by_key(|e| e.id);
                state.events.splice(0..0, batch);
                if sessions_failed {
                    state.sessions.splice(0..0, sessions);
                }
                Err(e)
            }
        }
    }

    fn write(&self, batch: &[Event], buffers: &mut ChunkBuffers) -> Result<(), StoreError> {
        // One chunk per session, events in append (id) order. Keys and references are
        // sorted, not the events: an event is a few hundred bytes to move, and a sort that
        // reads its key through a reference misses the cache on most comparisons.
        let mut keyed: Vec<(SessionId, u64, &Event)> =
            batch.iter().map(|e| (e.session, e.id, e)).collect();
        keyed.sort_unstable_by_key(|&(session, id, _)| (session, id));
        let order: Vec<&Event> = keyed.into_iter().map(|(_, _, e)| e).collect();
        // Chunk by chunk, not as one `sled::Batch`: applying a batch takes sled's
        // process-wide concurrency lock for writing, and from the first batch on every
        // read, insert and `generate_id` takes it for reading. The runtime thread that
        // appends events (`generate_id`) then stalled, with every session it serves, while
        // this thread applied a batch: 9-13% of both cores idle under pgbench (see
        // docs/BENCHMARKS.md, issue 17). Chunks are independent of each other, so a batch
        // need not land atomically: what a crash may lose is bounded by the flush interval
        // either way. A chunk written again after a failed batch replaces its earlier copy.
        for run in order.chunk_by(|a, b| a.session == b.session) {
            let mut rest = run;
            while let Some(first) = rest.first() {
                let key = event_key(first.session, first.id);
                let (value, taken) = encode_chunk(rest, buffers)?;
                rest = &rest[taken..];
                let added = (key.len() + value.len()) as u64;
                let replaced = self
                    .events
                    .insert(key, value)?
                    .map_or(0, |old| (key.len() + old.len()) as u64);
                self.recorded_bytes.fetch_add(added, Ordering::Relaxed);
                self.recorded_bytes.fetch_sub(replaced, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub(super) fn run(&self, queue: &Queue) {
        loop {
            let stop = {
                let mut state = queue.lock();
                if !state.stop && state.events.len() < WRITE_BATCH {
                    state = queue
                        .wake
                        .wait_timeout(state, Duration::from_millis(WRITE_EVERY_MS))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                state.stop
            };
            if let Err(e) = self.write_out(queue) {
                tracing::error!(error = %e, "cannot write events to the store; appends fail until a write succeeds");
                std::thread::sleep(Duration::from_millis(100));
            }
            if stop {
                return;
            }
        }
    }
}

pub(super) fn event_key(session: SessionId, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&session.0.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}
