//! The session record: every governed connection, who made it, where it went, and the ordered
//! events of what happened inside it.
//!
//! [`SessionStore`] is the seam; [`sled::SledStore`] is the implementation the daemon uses.
//! The event schema is documented in `docs/EVENTS.md` and is stable: fields are added, never
//! renamed or removed.

mod chunk;
pub mod sled;
mod writer;

use std::{
    borrow::Cow,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    identity::ProcessIdentity,
    net::{ClientAddr, OrigDstAddr},
    protocol::Protocol,
};

pub use self::sled::SledStore;

/// Longest text kept in one event field (statement text, command line, output chunk).
pub const MAX_EVENT_TEXT: usize = 16 * 1024;

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

/// `text` cut to at most `MAX_EVENT_TEXT` bytes on a character boundary, marked when cut.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_EVENT_TEXT {
        return text.to_string();
    }
    let mut end = MAX_EVENT_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes cut]", &text[..end], text.len() - end)
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
    /// The target refused the connection (nothing listens on its port, or a firewall rejects
    /// it). Labelled `refused` like a refusal by the gateway; not counted as a denial.
    TargetRefused { reason: String },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Open => "open",
            Outcome::Closed => "closed",
            Outcome::Refused { .. } | Outcome::TargetRefused { .. } => "refused",
            Outcome::UpstreamFailed { .. } => "upstream-failed",
            Outcome::Failed { .. } => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// Why the session was refused or failed, when it was.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Refused { reason } | Outcome::TargetRefused { reason } => Some(reason),
            Outcome::UpstreamFailed { error } | Outcome::Failed { error } => Some(error),
            Outcome::Open | Outcome::Closed | Outcome::Interrupted => None,
        }
    }

    /// How a failed connect to the target ends the session: `TargetRefused` when the target
    /// refused it (`ECONNREFUSED`), `UpstreamFailed` otherwise. `target` is the address.
    pub fn upstream_connect_failed(target: impl std::fmt::Display, error: &std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::ConnectionRefused {
            Outcome::TargetRefused {
                reason: format!("{target} refused the connection ({error})"),
            }
        } else {
            Outcome::UpstreamFailed {
                error: error.to_string(),
            }
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
    /// Requests denied (or that would have been, in observe mode) during the session.
    #[serde(default)]
    pub denied: u32,
    /// Requests held for an admin's approval during the session.
    #[serde(default)]
    pub held: u32,
    /// Results sent with masked values during the session.
    #[serde(default)]
    pub masked: u32,
}

impl Session {
    /// Whether anything in this session was refused: the connection or a request.
    pub fn was_denied(&self) -> bool {
        self.denied > 0 || matches!(self.outcome, Outcome::Refused { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnd {
    pub ended_at_us: u64,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub outcome: Outcome,
}

/// A verdict as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedVerdict {
    Allow,
    Deny,
    Approve,
    Mask,
}

/// One thing that happened in a session. `type` names the variant in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The connection was accepted and attributed (written when the session opens).
    Connect {
        client: ClientAddr,
        destination: OrigDstAddr,
        target: Option<String>,
        protocol: Protocol,
        pid: u32,
        uid: u32,
        comm: String,
    },
    /// The client authenticated to the gateway, or the gateway to the target.
    Auth {
        side: String,
        user: Option<String>,
        method: String,
        ok: bool,
    },
    /// A request (statement, command, HTTP request) with its verdict. `class` and `rules` are
    /// shared, not copied, where a protocol serves a repeated request's decision from memory
    /// (the PostgreSQL gateway): they read and write as a string and a list of strings.
    Request {
        text: String,
        class: Option<Cow<'static, str>>,
        verdict: RecordedVerdict,
        rules: Arc<[String]>,
        /// Observe mode: the verdict was recorded, not enforced.
        #[serde(default)]
        observed: bool,
        duration_us: Option<u64>,
        /// Bounded result summary: command tag, row count, status code.
        summary: Option<String>,
        error: Option<String>,
    },
    /// How a request went at the target: written when its answer is complete.
    Response {
        /// The `request` event's id.
        request: u64,
        duration_us: u64,
        /// Command tags and row count (`SELECT 1 (1 rows)`).
        summary: Option<String>,
        error: Option<String>,
        /// Rows (or COPY lines) the client got with masked values; absent when none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        masked_rows: Option<u64>,
        /// The mask rules in force for those rows.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mask_rules: Vec<String>,
    },
    /// An approval was asked for, granted, refused or expired (states in `docs/EVENTS.md`).
    Approval {
        /// The request's text (statement, command line, request line), bounded.
        request: String,
        state: String,
        by_uid: Option<u32>,
        by_user: Option<String>,
        reason: Option<String>,
        /// The approval's id: the `id` of its `requested` event (null on that event itself).
        #[serde(default)]
        approval: Option<u64>,
        /// The target and the rule that asked for approval.
        #[serde(default)]
        target: Option<String>,
        #[serde(default)]
        rule: Option<String>,
        /// The grant window this event opened, used or revoked.
        #[serde(default)]
        grant: Option<u64>,
        /// When a pending request expires, or when a grant window ends.
        #[serde(default)]
        until_us: Option<u64>,
        /// How long the request waited for its decision.
        #[serde(default)]
        waited_us: Option<u64>,
    },
    /// Terminal output from the target (SSH shells), for replay.
    TerminalOutput {
        data: String,
    },
    /// Terminal input from the client.
    TerminalInput {
        data: String,
    },
    /// An HTTP exchange in summary.
    Http {
        method: String,
        host: String,
        path: String,
        status: Option<u16>,
    },
    Error {
        message: String,
    },
    /// The session ended (written when the session closes).
    Close {
        outcome: Outcome,
        bytes_to_target: u64,
        bytes_from_target: u64,
    },
}

impl EventKind {
    /// A request with its verdict, its text bounded: the one place request events are built.
    pub fn request(
        text: &str,
        class: Option<Cow<'static, str>>,
        verdict: RecordedVerdict,
        rules: impl Into<Arc<[String]>>,
    ) -> Self {
        EventKind::Request {
            text: bounded(text),
            class,
            verdict,
            rules: rules.into(),
            observed: false,
            duration_us: None,
            summary: None,
            error: None,
        }
    }

    /// A request event marked as recorded, not enforced (observe mode).
    #[must_use]
    pub fn observed(mut self, yes: bool) -> Self {
        if let EventKind::Request { observed, .. } = &mut self {
            *observed = yes;
        }
        self
    }

    /// A request event with the error that ended it.
    #[must_use]
    pub fn with_error(mut self, message: String) -> Self {
        if let EventKind::Request { error, .. } = &mut self {
            *error = Some(message);
        }
        self
    }

    pub fn label(&self) -> &'static str {
        match self {
            EventKind::Connect { .. } => "connect",
            EventKind::Auth { .. } => "auth",
            EventKind::Request { .. } => "request",
            EventKind::Response { .. } => "response",
            EventKind::Approval { .. } => "approval",
            EventKind::TerminalOutput { .. } => "terminal_output",
            EventKind::TerminalInput { .. } => "terminal_input",
            EventKind::Http { .. } => "http",
            EventKind::Error { .. } => "error",
            EventKind::Close { .. } => "close",
        }
    }
}

/// An event as stored and exported (one JSON line each in `sessions export`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version of the exported line.
    pub v: u32,
    pub session: SessionId,
    /// Increases across the whole store: orders events within and across sessions.
    pub id: u64,
    pub at_us: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// Which sessions `list` returns. Every field narrows; `None` means any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListFilter {
    pub since_us: Option<u64>,
    pub until_us: Option<u64>,
    pub target: Option<String>,
    /// Matches the process name (comm) or the executable's path, exactly or by file name.
    pub process: Option<String>,
    pub uid: Option<u32>,
    pub protocol: Option<Protocol>,
    /// Only sessions in which something was denied.
    pub denied: bool,
    /// Only sessions in which nothing was denied.
    #[serde(default)]
    pub allowed: bool,
    /// Only sessions in which a request was held for approval.
    #[serde(default)]
    pub held: bool,
    /// Only sessions in which result values were masked.
    #[serde(default)]
    pub masked: bool,
}

impl ListFilter {
    pub fn matches(&self, s: &Session) -> bool {
        let who = &s.start.identity;
        self.since_us.is_none_or(|t| s.start.started_at_us >= t)
            && self.until_us.is_none_or(|t| s.start.started_at_us <= t)
            && self
                .target
                .as_ref()
                .is_none_or(|t| s.start.target.as_ref() == Some(t))
            && self.uid.is_none_or(|u| who.uid == u)
            && self.protocol.is_none_or(|p| s.start.protocol == p)
            && (!self.denied || s.was_denied())
            && (!self.allowed || !s.was_denied())
            && (!self.held || s.held > 0)
            && (!self.masked || s.masked > 0)
            && self.process.as_ref().is_none_or(|p| {
                who.comm == *p
                    || who
                        .exe
                        .as_deref()
                        .is_some_and(|e| e == p || e.rsplit('/').next() == Some(p.as_str()))
            })
    }
}

/// How long and how much the store keeps. `None` keeps forever / without bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_age_us: Option<u64>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    pub sessions: u64,
    pub events: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCounts {
    pub total: u64,
    pub open: u64,
}

/// What `bulkhead status` shows about the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub sessions: u64,
    pub open_sessions: u64,
    pub events: u64,
    /// Results written into their request events instead of `response` events of their own,
    /// since the daemon started ([`SessionStore::complete`]).
    #[serde(default)]
    pub results_in_requests: u64,
    /// Keys and values recorded (what retention by size counts).
    pub recorded_bytes: u64,
    /// Files on disk, including sled's own overhead.
    pub disk_bytes: u64,
    pub oldest_session_us: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("session store: corrupt record {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("session store: cannot encode: {0}")]
    Encode(serde_json::Error),
    #[error("no session with id {0}")]
    UnknownSession(SessionId),
    #[error("session store: cannot record: {0}")]
    Unavailable(String),
}

/// Where sessions and their events are recorded. Implementations are synchronous and fast
/// enough to call from async code: an append is an in-memory queue push, and background
/// threads make it durable within a bounded interval (group commit).
pub trait SessionStore: Send + Sync {
    /// Records the start of a session (and its `connect` event) before anything is relayed.
    fn open(&self, start: NewSession) -> Result<SessionId, StoreError>;
    /// Appends an event to a session; returns the event's id.
    fn append(&self, session: SessionId, kind: EventKind) -> Result<u64, StoreError>;
    /// Records a request's result (a `Response` event). A store may write it into the request
    /// event itself (its `duration_us`, `summary` and `error`) while that event still waits to
    /// be written; otherwise it is appended. Returns the id of the event that holds it.
    fn complete(&self, session: SessionId, result: EventKind) -> Result<u64, StoreError> {
        self.append(session, result)
    }
    /// Records the end of a session (and its `close` event).
    fn close(&self, id: SessionId, end: SessionEnd) -> Result<(), StoreError>;
    fn get(&self, id: SessionId) -> Result<Option<Session>, StoreError>;
    /// Newest first, at most `limit`, those matching `filter`.
    fn list(&self, filter: &ListFilter, limit: usize) -> Result<Vec<Session>, StoreError>;
    /// A session's events in order.
    fn events(&self, id: SessionId) -> Result<Vec<Event>, StoreError>;
    fn counts(&self) -> Result<SessionCounts, StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Deletes the oldest closed sessions (with their events) until `retention` holds.
    fn prune(&self, retention: &Retention, now_us: u64) -> Result<PruneReport, StoreError>;
    /// Marks sessions left open by a previous run as interrupted; returns how many.
    fn mark_interrupted(&self) -> Result<u64, StoreError>;
    /// Waits until every write so far is on disk.
    fn flush(&self) -> Result<(), StoreError>;
    /// New events as they are appended, for `sessions tail`.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_EVENT_TEXT);
        let cut = bounded(&long);
        assert!(cut.len() < long.len());
        assert!(
            cut.ends_with(&format!("[{} bytes cut]", long.len() - MAX_EVENT_TEXT)),
            "{}",
            &cut[cut.len() - 30..]
        );
    }

    #[test]
    fn events_serialize_with_a_type_tag_and_round_trip() {
        let e = Event {
            v: EVENT_SCHEMA_VERSION,
            session: SessionId(7),
            id: 9,
            at_us: 1,
            kind: EventKind::Request {
                text: "DELETE FROM t".into(),
                class: Some("delete".into()),
                verdict: RecordedVerdict::Deny,
                rules: vec!["no-writes".into()].into(),
                observed: false,
                duration_us: Some(3),
                summary: None,
                error: None,
            },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(
            line.contains(r#""type":"request""#) && line.contains(r#""verdict":"deny""#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
    }
}
