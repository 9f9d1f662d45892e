//! The gateway's model of one session: which requests are waiting for the target's answers,
//! and what each answer completes. Plain code, no I/O: the relay loops ([`super::relay`]) read
//! frames, decide what needs deciding, and tell the [`State`] what went by in each direction.
//!
//! - Requests wait in the order the client sent them: a simple Query completes at its
//!   ReadyForQuery (it may run several statements); an Execute at its CommandComplete,
//!   ErrorResponse, PortalSuspended or EmptyQueryResponse; a Sync at its ReadyForQuery.
//! - After an error in the extended protocol the target skips everything up to the next Sync:
//!   Executes still waiting when that Sync's ReadyForQuery arrives are recorded as not
//!   executed.
//! - A denied statement is forwarded as a stand-in that cannot parse and carries a nonce
//!   (`BULKHEAD_DENIED_<n>`); the target's parse error for it is swapped for SQLSTATE 42501
//!   and the policy's message on the way back, in the denied statement's place.
//! - Each Execute is attributed to the Parse that prepared its portal's statement: its
//!   request event and the masks for its rows.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;

use super::{codec, SessionError};
use crate::{
    policy,
    record::{now_micros, EventKind},
};

/// The prefix of the statement that stands in for a denied one.
const DENIED_MARK: &str = "BULKHEAD_DENIED_";

/// The mask rules that apply to a statement's results (empty: none).
pub type Masks = Arc<[Arc<policy::MaskRule>]>;

/// A frontend message, read as far as the session's model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Query {
        sql: &'a str,
    },
    Parse {
        name: &'a str,
        sql: &'a str,
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    Sync,
    Close {
        statement: bool,
        name: &'a str,
    },
    /// A fastpath function call: it names a function by OID, with nothing to judge it by.
    FunctionCall,
    Terminate,
    /// Describe, Flush and COPY data, done or fail: forwarded as they are.
    Other,
}

impl<'a> Request<'a> {
    /// Reads a frontend message; an unknown tag or a malformed body is the client's error.
    pub fn read(tag: u8, body: &'a [u8]) -> Result<Self, SessionError> {
        let client = SessionError::Client;
        Ok(match tag {
            b'Q' => Request::Query {
                sql: codec::query_text(body).map_err(client)?,
            },
            b'P' => {
                let (name, sql) = codec::parse_message(body).map_err(client)?;
                Request::Parse { name, sql }
            }
            b'B' => {
                let (portal, statement) = codec::bind_names(body).map_err(client)?;
                Request::Bind { portal, statement }
            }
            b'E' => Request::Execute {
                portal: codec::execute_portal(body).map_err(client)?,
            },
            b'S' => Request::Sync,
            b'C' => {
                let (kind, name) = codec::close_target(body).map_err(client)?;
                Request::Close {
                    statement: kind == b'S',
                    name,
                }
            }
            b'F' => Request::FunctionCall,
            b'X' => Request::Terminate,
            b'D' | b'H' | b'd' | b'c' | b'f' => Request::Other,
            other => return Err(SessionError::UnexpectedFrontend(char::from(other))),
        })
    }
}

/// The decision on a statement, as the model applies it.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The recorded request event, for the response event of its result.
    pub request: u64,
    /// `Some(message)`: refused; a stand-in carrying `message` is forwarded in its place.
    pub refusal: Option<String>,
    /// Masks for its results (ignored when refused: nothing of it runs).
    pub masks: Masks,
}

impl Judged {
    /// A statement that reached the model without a decision: refused (fail closed).
    fn undecided() -> Self {
        Self {
            request: 0,
            refusal: Some("the gateway did not decide this statement".into()),
            masks: Arc::from([]),
        }
    }
}

/// Whose rows are arriving: the request at the front of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Query,
    Execute,
}

/// An answer the target owes, in the order the client asked.
#[derive(Debug)]
enum Pending {
    /// A simple Query: completes at ReadyForQuery.
    Query {
        request: u64,
        started: Instant,
        tags: Vec<String>,
        error: Option<String>,
        masks: Masks,
        /// Rows (or COPY lines) sent with masked values.
        masked_rows: u64,
    },
    /// An Execute: completes at CommandComplete / ErrorResponse / PortalSuspended / EmptyQuery.
    Execute {
        request: u64,
        started: Instant,
        masks: Masks,
        masked_rows: u64,
    },
    /// A Sync: Executes still waiting at its ReadyForQuery were skipped after an error.
    Sync,
}

/// Which request a statement or portal runs, and the masks for its rows.
#[derive(Debug, Clone)]
struct Attribution {
    request: u64,
    masks: Masks,
}

impl Attribution {
    /// A statement the gateway did not see prepared: no request, no masks.
    fn unknown() -> Self {
        Self {
            request: 0,
            masks: Arc::from([]),
        }
    }
}

/// One session's requests in flight and the statements and portals they name.
#[derive(Debug, Default)]
pub struct State {
    pending: VecDeque<Pending>,
    /// Nonce → the policy's message, for denied statements in flight.
    denied: HashMap<u64, String>,
    /// Prepared statement name → what its Parse was decided as.
    statements: HashMap<String, Attribution>,
    /// Portal → its statement's attribution.
    portals: HashMap<String, Attribution>,
    /// Results complete but not yet recorded (`Response` events): recorded after the answers
    /// are flushed to the client, off the statement's latency.
    finished: Vec<EventKind>,
    /// Extended-protocol messages sent since the last Sync. After an error the server
    /// discards everything up to the Sync, a simple Query included, and the gateway could not
    /// tell whose answers follow: such a Query is not let in ([`State::mid_batch`]).
    unsynced: bool,
}

impl State {
    /// A frontend message on its way to the target, with the decision on it when it needs one
    /// (Query, Parse and FunctionCall; without one it is refused: fail closed). Returns
    /// the frame to forward in its place (a denied statement's stand-in), or `None` to
    /// forward it as it came.
    pub fn on_frontend(&mut self, request: &Request<'_>, judged: Option<Judged>) -> Option<Bytes> {
        match request {
            Request::Parse { .. }
            | Request::Bind { .. }
            | Request::Execute { .. }
            | Request::Close { .. } => self.unsynced = true,
            Request::Sync => self.unsynced = false,
            _ => {}
        }
        match *request {
            Request::Query { .. } | Request::FunctionCall => {
                let (Attribution { request, masks }, replacement) =
                    self.apply(judged, codec::query);
                self.pending.push_back(Pending::Query {
                    request,
                    started: Instant::now(),
                    tags: Vec::new(),
                    error: None,
                    masks,
                    masked_rows: 0,
                });
                replacement
            }
            Request::Parse { name, .. } => {
                let (attribution, replacement) =
                    self.apply(judged, |stand_in| codec::parse(name, stand_in));
                self.statements.insert(name.to_string(), attribution);
                replacement
            }
            Request::Bind { portal, statement } => {
                let attribution = self
                    .statements
                    .get(statement)
                    .cloned()
                    .unwrap_or_else(Attribution::unknown);
                self.portals.insert(portal.to_string(), attribution);
                None
            }
            Request::Execute { portal } => {
                let Attribution { request, masks } = self
                    .portals
                    .get(portal)
                    .cloned()
                    .unwrap_or_else(Attribution::unknown);
                self.pending.push_back(Pending::Execute {
                    request,
                    started: Instant::now(),
                    masks,
                    masked_rows: 0,
                });
                None
            }
            Request::Sync => {
                self.pending.push_back(Pending::Sync);
                None
            }
            Request::Close { statement, name } => {
                if statement {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
                None
            }
            Request::Terminate | Request::Other => None,
        }
    }

    /// A backend message (other than rows) on its way to the client: completes what it
    /// answers. Returns the frame to send in its place (the policy's error for a denied
    /// statement's stand-in), or `None` to send it as it came.
    pub fn on_backend(&mut self, tag: u8, body: &[u8]) -> Option<Bytes> {
        match tag {
            b'E' => {
                let fields = codec::error_fields(body);
                let message = fields
                    .iter()
                    .find(|(c, _)| *c == b'M')
                    .map_or("", |(_, m)| m.as_str());
                let (replacement, error) = match self.take_denied(message) {
                    Some(policy_message) => {
                        let error = format!("denied: {policy_message}");
                        (Some(codec::error_response("42501", &policy_message)), error)
                    }
                    None => (None, message.to_string()),
                };
                self.complete_one(None, Some(error));
                return replacement;
            }
            b'C' => self.complete_one(Some(codec::command_tag(body).to_string()), None),
            b's' => self.complete_one(Some("portal suspended".into()), None),
            b'I' => self.complete_one(Some("empty query".into()), None),
            b'Z' => self.complete_sync(),
            _ => {}
        }
        None
    }

    /// Whether extended-protocol messages were sent since the last Sync: a simple Query or a
    /// function call now could be discarded by the server (after an error) or answered in an
    /// order the gateway cannot follow, so the relay refuses it and ends the session.
    pub fn mid_batch(&self) -> bool {
        self.unsynced
    }

    /// The masks of the request whose answers are arriving, if it has any.
    pub fn front_masks(&self) -> Option<(Front, Masks)> {
        match self.pending.front() {
            Some(Pending::Query { masks, .. }) if !masks.is_empty() => {
                Some((Front::Query, Arc::clone(masks)))
            }
            Some(Pending::Execute { masks, .. }) if !masks.is_empty() => {
                Some((Front::Execute, Arc::clone(masks)))
            }
            _ => None,
        }
    }

    /// The results completed since the last call, as `Response` events to record.
    pub fn take_finished(&mut self) -> Vec<EventKind> {
        std::mem::take(&mut self.finished)
    }

    /// A decided statement's attribution, and the frame to forward in its place when it was
    /// refused: `frame` around the text of a stand-in (nothing of a refused statement runs, so
    /// it has no masks).
    fn apply(
        &mut self,
        judged: Option<Judged>,
        frame: impl FnOnce(&str) -> Bytes,
    ) -> (Attribution, Option<Bytes>) {
        let Judged {
            request,
            refusal,
            masks,
        } = judged.unwrap_or_else(Judged::undecided);
        match refusal {
            None => (Attribution { request, masks }, None),
            Some(message) => {
                let stand_in = self.stand_in(message);
                (
                    Attribution {
                        request,
                        masks: Arc::from([]),
                    },
                    Some(frame(&stand_in)),
                )
            }
        }
    }

    /// A stand-in that the target rejects at parse time, remembered with `message`.
    fn stand_in(&mut self, message: String) -> String {
        // Every message the client sees from the gateway says it came from the gateway.
        let message = if message.starts_with("bulkhead:") {
            message
        } else {
            format!("bulkhead: {message}")
        };
        let nonce = getrandom::u64().unwrap_or_else(|_| now_micros());
        self.denied.insert(nonce, message);
        format!("{DENIED_MARK}{nonce}")
    }

    /// The policy message for a stand-in's parse error, if `message` is one.
    fn take_denied(&mut self, message: &str) -> Option<String> {
        let at = message.find(DENIED_MARK)?;
        let digits: String = message[at + DENIED_MARK.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let nonce: u64 = digits.parse().ok()?;
        self.denied.remove(&nonce)
    }

    /// A CommandComplete / ErrorResponse / PortalSuspended / EmptyQuery answer.
    fn complete_one(&mut self, tag: Option<String>, error: Option<String>) {
        match self.pending.front_mut() {
            Some(Pending::Query { tags, error: e, .. }) => {
                tags.extend(tag);
                if error.is_some() {
                    *e = error;
                }
            }
            Some(Pending::Execute { .. }) => {
                if let Some(Pending::Execute {
                    request,
                    started,
                    masks,
                    masked_rows,
                }) = self.pending.pop_front()
                {
                    self.finish(
                        request,
                        started,
                        tag.as_slice(),
                        error,
                        (&masks, masked_rows),
                    );
                }
            }
            // Answers to Parse/Bind errors before any Execute, or outside any tracked request.
            Some(Pending::Sync) | None => {}
        }
    }

    /// ReadyForQuery: the front Query is done, or everything up to the Sync is.
    fn complete_sync(&mut self) {
        if matches!(self.pending.front(), Some(Pending::Query { .. })) {
            if let Some(Pending::Query {
                request,
                started,
                tags,
                error,
                masks,
                masked_rows,
            }) = self.pending.pop_front()
            {
                self.finish(request, started, &tags, error, (&masks, masked_rows));
            }
            return;
        }
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Sync => break,
                Pending::Execute {
                    request, started, ..
                } => self.finish(
                    request,
                    started,
                    &[],
                    Some("not executed: an earlier message failed".into()),
                    (&Arc::from([]), 0),
                ),
                // A Query sent after Executes without a Sync between them.
                Pending::Query {
                    request,
                    started,
                    tags,
                    error,
                    masks,
                    masked_rows,
                } => self.finish(request, started, &tags, error, (&masks, masked_rows)),
            }
        }
    }

    /// The statement whose answers are arriving sent a row (or COPY line) with masked values.
    pub fn masked_a_row(&mut self) {
        if let Some(Pending::Query { masked_rows, .. } | Pending::Execute { masked_rows, .. }) =
            self.pending.front_mut()
        {
            *masked_rows += 1;
        }
    }

    /// A request's result, to be recorded once its answers are on their way to the client.
    /// `masked`: the statement's mask rules and how many rows went out masked.
    fn finish(
        &mut self,
        request: u64,
        started: Instant,
        tags: &[String],
        error: Option<String>,
        (masks, masked): (&Masks, u64),
    ) {
        let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let rows: u64 = tags
            .iter()
            .filter_map(|t| t.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        let summary = match tags {
            [] => None,
            [one] => Some(format!("{one} ({rows} rows)")),
            many => Some(format!("{} ({rows} rows)", many.join("; "))),
        };
        self.finished.push(EventKind::Response {
            request,
            duration_us,
            summary,
            error,
            masked_rows: (masked > 0).then_some(masked),
            mask_rules: if masked > 0 {
                let mut rules: Vec<String> = masks.iter().map(|m| m.rule.clone()).collect();
                rules.sort();
                rules.dedup();
                rules
            } else {
                Vec::new()
            },
        });
    }
}

#[cfg(test)]
mod tests;
