//! The session record: every governed connection, who made it, where it went, what happened.
//!
//! [`SessionStore`] is the seam; [`sled::SledStore`] is the implementation the daemon uses.
//! Protocol handlers add per-request events on top of this in later work.

pub mod sled;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{
    config::Protocol,
    identity::ProcessIdentity,
    net::{ClientAddr, OrigDstAddr},
};

pub use self::sled::SledStore;

/// Sessions are numbered in the order they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSession {
    pub started_at_us: u64,
    pub client: ClientAddr,
    pub destination: OrigDstAddr,
    pub target: Option<String>,
    pub protocol: Protocol,
    pub identity: ProcessIdentity,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Still running (or the daemon died while it was; see `Interrupted`).
    Open,
    /// Both sides finished normally.
    Closed,
    /// The gateway refused the connection (no identity record, unmatched destination...).
    Refused { reason: String },
    /// The target could not be reached.
    UpstreamFailed { error: String },
    /// The relay stopped on an I/O error after the connection was established.
    Failed { error: String },
    /// Found open when the daemon started: the previous daemon stopped while it ran.
    Interrupted,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Open => "open",
            Outcome::Closed => "closed",
            Outcome::Refused { .. } => "refused",
            Outcome::UpstreamFailed { .. } => "upstream-failed",
            Outcome::Failed { .. } => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    #[serde(flatten)]
    pub start: NewSession,
    pub ended_at_us: Option<u64>,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnd {
    pub ended_at_us: u64,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCounts {
    pub total: u64,
    pub open: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("session store: corrupt record for session {id}: {source}")]
    Corrupt { id: u64, source: serde_json::Error },
    #[error("session store: cannot encode session: {0}")]
    Encode(serde_json::Error),
    #[error("no session with id {0}")]
    UnknownSession(SessionId),
}

/// Where sessions are recorded. Implementations are synchronous and fast enough to call from
/// async code: a write is an in-memory insert plus a background flush.
pub trait SessionStore: Send + Sync {
    /// Records the start of a session before anything is relayed.
    fn open(&self, start: NewSession) -> Result<SessionId, StoreError>;
    /// Records the end of a session.
    fn close(&self, id: SessionId, end: SessionEnd) -> Result<(), StoreError>;
    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError>;
    /// Newest first.
    fn list(&self, limit: usize) -> Result<Vec<Session>, StoreError>;
    fn counts(&self) -> Result<SessionCounts, StoreError>;
    /// Marks sessions left open by a previous run as interrupted; returns how many.
    fn mark_interrupted(&self) -> Result<u64, StoreError>;
    /// Waits until every write so far is on disk.
    fn flush(&self) -> Result<(), StoreError>;
}
