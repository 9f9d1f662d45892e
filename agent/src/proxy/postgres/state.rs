//! The gateway's model of one session: which requests are waiting for the target's answers,
//! what each answer completes, and what every statement and portal name stands for on the
//! server. Plain code, no I/O: the relay loops ([`super::relay`]) read frames, decide what
//! needs deciding, and tell the [`State`] what went by in each direction.
//!
//! - Every frontend message the target answers waits in one queue, in the order the client
//!   sent it: a simple Query completes at its ReadyForQuery (it may run several statements);
//!   Parse at ParseComplete, Bind at BindComplete, Close at CloseComplete, Describe at its
//!   RowDescription or NoData, an Execute at its CommandComplete, ErrorResponse,
//!   PortalSuspended or EmptyQueryResponse; a Sync at its ReadyForQuery. An answer that does
//!   not fit the front of the queue ends the session ([`SessionError::OutOfStep`]).
//! - After an error in the extended protocol the target skips everything up to the next Sync:
//!   the failed message and everything after it up to that Sync leave the queue at once, the
//!   Executes among them recorded as not executed, and nothing they would have done to the
//!   names happens.
//! - Names: statements (protocol Parse and SQL `PREPARE` share one namespace on the server)
//!   and portals (protocol Bind and SQL `DECLARE ... CURSOR` too). The model changes only when
//!   the server says it applied the message (ParseComplete, BindComplete, CloseComplete,
//!   CommandComplete, a simple Query's ReadyForQuery without an error; a Query that failed
//!   forgets the names it would have made or dropped; ReadyForQuery outside a transaction
//!   closes the portals not held). Messages still in flight are judged by the model as it will
//!   be if everything before them in their batch succeeds (after an error the server skips
//!   them anyway); across batches the relay waits for earlier answers first
//!   ([`State::must_settle`]).
//! - Each Execute is judged by what its portal runs: the decision on the Parse that prepared
//!   it, or, for a statement prepared by SQL, a cursor, a statement that reads a cursor or a
//!   name the gateway cannot place, a decision of its own ([`State::to_judge`]). A name the
//!   gateway cannot place stands for an unknown statement (fail closed).
//! - A denied statement is forwarded as a stand-in that cannot parse and carries a nonce
//!   (`BULKHEAD_DENIED_<n>`); a denied Execute as an Execute of a portal of that name, which
//!   does not exist. The target's error for it is swapped for SQLSTATE 42501 and the policy's
//!   message on the way back, in the denied statement's place.
//! - Bounded: [`MAX_STATEMENTS`], [`MAX_PORTALS`] and [`MAX_PENDING`]; past a cap the session
//!   ends with FATAL 54000 ([`SessionError::Limit`]).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;

use super::{codec, SessionError};
use crate::{
    policy::{self, Classification, NameEffect, PreparedStatements},
    record::{now_micros, EventKind},
};
use names::{effects_of, record_text, unknown_classification, Attribution, Effect, Named, Names};
pub use request::Request;
use summary::Tags;

/// The prefix of the statement that stands in for a denied one.
const DENIED_MARK: &str = "BULKHEAD_DENIED_";

/// Most named prepared statements a session may hold (protocol and SQL alike).
pub const MAX_STATEMENTS: usize = 1024;
/// Most named portals (cursors) a session may hold.
pub const MAX_PORTALS: usize = 1024;
/// Most messages awaiting the target's answers (which also bounds the denied statements in
/// flight).
pub const MAX_PENDING: usize = 8192;

/// Longest text kept with a statement that runs a prepared statement (`EXECUTE name`), which
/// is classified again at each of its Executes.
pub const MAX_REJUDGED_TEXT: usize = 8 * 1024;
/// Longest text kept with a name for the record of an Execute judged on its own.
const MAX_RECORD_TEXT: usize = 1024;

/// The mask rules that apply to a statement's results (empty: none).
pub type Masks = Arc<[Arc<policy::MaskRule>]>;

/// No masks, shared: an empty `Arc<[_]>` still allocates its counts, once per statement.
pub fn no_masks() -> Masks {
    static NONE: std::sync::LazyLock<Masks> = std::sync::LazyLock::new(|| Arc::from([]));
    Arc::clone(&NONE)
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
    /// What the statement does (`None`: not known; a name it prepares then stands for an
    /// unknown statement).
    pub what: Option<Arc<Classification>>,
    /// An admin approved it (it was held): a prepared statement is approved for one
    /// execution, and its later Executes are decided again (a grant window covers them).
    pub approved_once: bool,
}

impl Judged {
    /// A statement that reached the model without a decision: refused (fail closed).
    fn undecided() -> Self {
        Self {
            request: 0,
            refusal: Some("the gateway did not decide this statement".into()),
            masks: no_masks(),
            what: None,
            approved_once: false,
        }
    }
}

/// Whose rows are arriving: the request at the front of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Query,
    Execute,
}

/// A denied statement's stand-in in flight: its nonce and the policy's message.
#[derive(Debug)]
struct Denied {
    nonce: u64,
    message: String,
}

/// An answer the target owes, in the order the client asked.
#[derive(Debug)]
enum Pending {
    /// A simple Query (or a function call's stand-in): completes at ReadyForQuery.
    Query {
        request: u64,
        started: Instant,
        tags: Tags,
        error: Option<String>,
        masks: Masks,
        /// Rows (or COPY lines) sent with masked values.
        masked_rows: u64,
        denied: Option<Denied>,
        /// What it does to the names if it runs whole.
        effects: Vec<Effect>,
    },
    Parse {
        request: u64,
        started: Instant,
        denied: Option<Denied>,
        effect: Option<Effect>,
    },
    Bind {
        effect: Effect,
    },
    Close {
        effect: Effect,
    },
    Describe,
    /// An Execute: completes at CommandComplete / ErrorResponse / PortalSuspended / EmptyQuery.
    Execute {
        request: u64,
        started: Instant,
        masks: Masks,
        masked_rows: u64,
        denied: Option<Denied>,
        /// What it does to the names when it completes.
        effects: Vec<Effect>,
    },
    Sync,
}

impl Pending {
    /// What this message does to the names if the server applies it.
    fn effects(&self) -> &[Effect] {
        match self {
            Pending::Query { effects, .. } | Pending::Execute { effects, .. } => effects,
            Pending::Parse { effect, .. } => effect.as_slice(),
            Pending::Bind { effect } | Pending::Close { effect } => std::slice::from_ref(effect),
            Pending::Describe | Pending::Sync => &[],
        }
    }

    fn denied(&mut self) -> Option<&mut Option<Denied>> {
        match self {
            Pending::Query { denied, .. }
            | Pending::Parse { denied, .. }
            | Pending::Execute { denied, .. } => Some(denied),
            _ => None,
        }
    }

    /// Ends a unit of work: a Sync, or a simple Query (a unit of its own).
    fn ends_unit(&self) -> bool {
        matches!(self, Pending::Sync | Pending::Query { .. })
    }
}

/// The names a message is judged by, for [`State::must_settle`].
#[derive(Debug, Clone, Copy)]
pub enum Depends<'a> {
    Statement(&'a str),
    Portal(&'a str),
    /// Names the classifier reads (`EXECUTE`, `FETCH`).
    Any,
}

/// What an Execute runs, when it needs a decision of its own.
#[derive(Debug, Clone)]
pub struct ToJudge {
    /// What it was classified as when it was made.
    pub what: Arc<Classification>,
    /// Its text, classified again when it runs a prepared statement (`EXECUTE name` runs
    /// what `name` stands for when it runs).
    pub sql: Arc<str>,
    /// For the record: the portal and the text behind it.
    pub text: String,
}

/// One session's requests in flight and the statements and portals they name.
#[derive(Debug, Default)]
pub struct State {
    pending: VecDeque<Pending>,
    /// The names as the server has them (every answer so far applied).
    confirmed: Names,
    /// The names as they will be once every message in flight succeeds: what messages are
    /// judged by ([`State::must_settle`] keeps that safe).
    expected: Names,
    /// Results complete but not yet recorded (`Response` events): recorded after the answers
    /// are flushed to the client, off the statement's latency.
    finished: Vec<EventKind>,
    /// Extended-protocol messages sent since the last Sync. After an error the server
    /// discards everything up to the Sync, a simple Query included, and the gateway could not
    /// tell whose answers follow: such a Query is not let in ([`State::mid_batch`]).
    unsynced: bool,
    /// The server is skipping to the next Sync (an error came before the client sent it):
    /// what the client sends until then gets no answer and does nothing.
    skipping: bool,
    /// Parses approved for one execution that had it (by request id).
    spent: HashSet<u64>,
}

impl State {
    /// A frontend message on its way to the target, with the decision on it when it needs one
    /// (Query, Parse and FunctionCall, and an Execute that [`State::to_judge`] named; without
    /// one it is refused: fail closed). Returns the frame to forward in its place (a denied
    /// statement's stand-in), or `None` to forward it as it came. Past a cap, an error that
    /// ends the session (nothing of the message is forwarded).
    pub fn on_frontend(
        &mut self,
        request: &Request<'_>,
        judged: Option<Judged>,
    ) -> Result<Option<Bytes>, SessionError> {
        let answered = !matches!(request, Request::Terminate | Request::Other);
        if answered && self.pending.len() >= MAX_PENDING {
            return Err(SessionError::Limit(
                "too many messages awaiting the server's answers",
            ));
        }
        match request {
            Request::Parse { .. }
            | Request::Bind { .. }
            | Request::Describe { .. }
            | Request::Execute { .. }
            | Request::Close { .. } => self.unsynced = true,
            Request::Sync => self.unsynced = false,
            _ => {}
        }
        Ok(match *request {
            Request::Query { sql } => {
                let judged = judged.unwrap_or_else(Judged::undecided);
                // A simple Query drops the unnamed statement and portal, whatever it runs.
                let mut effects = vec![
                    Effect::RemoveStatement(String::new()),
                    Effect::RemovePortal(String::new()),
                ];
                if judged.refusal.is_none() {
                    if let Some(what) = &judged.what {
                        effects.extend(effects_of(what, sql));
                    }
                }
                self.check_caps(&effects)?;
                self.push_query(judged, effects, codec::query)
            }
            Request::FunctionCall => {
                let judged = judged.unwrap_or_else(Judged::undecided);
                self.push_query(judged, Vec::new(), codec::query)
            }
            Request::Parse { name, sql } => self.push_parse(name, sql, judged)?,
            Request::Bind { portal, statement } => {
                let effect = Effect::BindPortal {
                    portal: portal.to_string(),
                    statement: statement.to_string(),
                };
                self.check_caps(std::slice::from_ref(&effect))?;
                self.push(Pending::Bind { effect });
                None
            }
            Request::Describe { .. } => {
                self.push(Pending::Describe);
                None
            }
            Request::Execute { portal } => self.push_execute(portal, judged),
            Request::Sync => {
                self.push(Pending::Sync);
                None
            }
            Request::Close { statement, name } => {
                let effect = if statement {
                    Effect::RemoveStatement(name.to_string())
                } else {
                    Effect::RemovePortal(name.to_string())
                };
                self.push(Pending::Close { effect });
                None
            }
            Request::Terminate | Request::Other => None,
        })
    }

    /// Whether an Execute of `portal` needs a decision of its own, and on what: `None` when
    /// it runs a statement whose Parse was decided (that decision applies).
    pub fn to_judge(&self, portal: &str) -> Option<ToJudge> {
        let Some(named) = self.expected.portal(portal) else {
            return Some(ToJudge {
                what: Arc::new(unknown_classification(format!(
                    "portal {portal:?}, which the gateway did not see made"
                ))),
                sql: Arc::from(""),
                text: format!("Execute of portal {portal:?}"),
            });
        };
        match &named.judged {
            Some(a) if !(a.once && self.spent.contains(&a.request)) => return None,
            _ => {}
        }
        Some(ToJudge {
            what: Arc::clone(&named.what),
            sql: Arc::clone(&named.text),
            text: format!("Execute of portal {portal:?}: {}", named.text),
        })
    }

    /// `what` with every `FETCH` resolved: what the cursor it reads holds (a cursor declared
    /// earlier in the same message included), or unknown when the gateway cannot tell.
    pub fn resolve(&self, what: &Arc<Classification>) -> Arc<Classification> {
        if !what.names.iter().any(|e| matches!(e, NameEffect::Fetch(_))) {
            return Arc::clone(what);
        }
        let mut out = (**what).clone();
        let mut declared: HashMap<&str, Option<&Arc<Classification>>> = HashMap::new();
        for effect in &what.names {
            match effect {
                NameEffect::Declare { name, what, .. } => {
                    declared.insert(name, Some(what));
                }
                NameEffect::Close(Some(name)) => {
                    declared.insert(name, None);
                }
                NameEffect::Fetch(name) => {
                    let cursor = match declared.get(name.as_str()) {
                        Some(in_message) => in_message.map(|c| &**c),
                        None => self.expected.portal(name).map(|n| &*n.what),
                    };
                    match cursor {
                        Some(c) => out.merge(c),
                        None => out.merge(&unknown_classification(format!(
                            "FETCH from cursor {name:?}, which the gateway did not see declared"
                        ))),
                    }
                }
                _ => {}
            }
        }
        Arc::new(out)
    }

    /// The statement names as expected once the messages in flight succeed, for the
    /// classifier's `EXECUTE name`.
    pub fn prepared(&self) -> &PreparedStatements {
        &self.expected.prepared
    }

    /// Whether a message that resolves `name` must first wait for the target's answers to
    /// earlier units of work (a Sync and what it closes, or a simple Query): one of them makes
    /// that name and may fail, which the expected names cannot tell. Within one batch they
    /// can: after an error the server skips the rest of it. A name expected gone that is still
    /// there is judged as unknown (fail closed), so only names being made matter.
    pub fn must_settle(&self, name: Depends<'_>) -> bool {
        let Some(last_unit_end) = self.pending.iter().rposition(Pending::ends_unit) else {
            return false;
        };
        self.pending
            .iter()
            .take(last_unit_end + 1)
            .flat_map(Pending::effects)
            .filter_map(Effect::makes)
            .any(|(statement, made)| match name {
                Depends::Statement(n) => statement && made == n,
                Depends::Portal(n) => !statement && made == n,
                Depends::Any => true,
            })
    }

    /// Whether extended-protocol messages were sent since the last Sync: a simple Query or a
    /// function call now could be discarded by the server (after an error) or answered in an
    /// order the gateway cannot follow, so the relay refuses it and ends the session.
    pub fn mid_batch(&self) -> bool {
        self.unsynced
    }

    /// A backend message (other than rows) on its way to the client: completes what it
    /// answers. Returns the frame to send in its place (the policy's error for a denied
    /// statement's stand-in), or `None` to send it as it came; an answer that does not fit
    /// what was asked is an error that ends the session.
    pub fn on_backend(&mut self, tag: u8, body: &[u8]) -> Result<Option<Bytes>, SessionError> {
        let out_of_step = || SessionError::OutOfStep(char::from(tag));
        // The expected names are kept as the confirmed ones plus every message in flight;
        // rebuilt only when an answer makes the server's differ from what was expected.
        let mut diverged = false;
        match tag {
            b'E' => return Ok(self.on_error(body)),
            b'1' => match self.pending.pop_front() {
                Some(Pending::Parse { effect, .. }) => {
                    if let Some(e) = effect {
                        self.confirmed.apply(&e);
                    }
                }
                _ => return Err(out_of_step()),
            },
            b'2' => match self.pending.pop_front() {
                Some(Pending::Bind { effect }) => self.confirmed.apply(&effect),
                _ => return Err(out_of_step()),
            },
            b'3' => match self.pending.pop_front() {
                Some(Pending::Close { effect }) => self.confirmed.apply(&effect),
                _ => return Err(out_of_step()),
            },
            b'T' | b'n' => {
                if matches!(self.pending.front(), Some(Pending::Describe)) {
                    self.pending.pop_front();
                } else if tag == b'n'
                    || !matches!(self.pending.front(), Some(Pending::Query { .. }))
                {
                    return Err(out_of_step());
                }
            }
            b't' if !matches!(self.pending.front(), Some(Pending::Describe)) => {
                return Err(out_of_step());
            }
            b'C' | b's' | b'I' => {
                let summary = match tag {
                    b'C' => codec::command_tag(body),
                    b's' => "portal suspended",
                    _ => "empty query",
                };
                match self.pending.front_mut() {
                    Some(Pending::Query { tags, .. }) => tags.push(summary),
                    Some(Pending::Execute { .. }) => {
                        if let Some(Pending::Execute {
                            request,
                            started,
                            masks,
                            masked_rows,
                            effects,
                            ..
                        }) = self.pending.pop_front()
                        {
                            if tag == b'C' {
                                for e in &effects {
                                    self.confirmed.apply(e);
                                }
                            } else {
                                diverged = !effects.is_empty();
                            }
                            self.finish(
                                request,
                                started,
                                Tags::one(summary),
                                None,
                                (&masks, masked_rows),
                            );
                        }
                    }
                    _ => return Err(out_of_step()),
                }
            }
            b'Z' => {
                match self.pending.pop_front() {
                    Some(Pending::Query {
                        request,
                        started,
                        tags,
                        error,
                        masks,
                        masked_rows,
                        effects,
                        ..
                    }) => {
                        diverged = self.query_done(&effects, error.is_none());
                        self.finish(request, started, tags, error, (&masks, masked_rows));
                    }
                    Some(Pending::Sync) => {}
                    _ => return Err(out_of_step()),
                }
                if codec::ready_status(body) == b'I' {
                    let open = self.confirmed.portals.len();
                    self.confirmed.apply(&Effect::EndTransaction);
                    diverged |= self.confirmed.portals.len() != open;
                }
            }
            _ => {}
        }
        if diverged {
            self.rebuild_expected();
        }
        Ok(None)
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
    #[cfg(test)]
    pub fn take_finished(&mut self) -> Vec<EventKind> {
        std::mem::take(&mut self.finished)
    }

    /// Moves the results completed since the last call into `out`, as `Response` events to
    /// record; both lists keep their allocations.
    pub fn move_finished_into(&mut self, out: &mut Vec<EventKind>) {
        out.append(&mut self.finished);
    }

    /// Messages awaiting the target's answers.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether the expected names are the confirmed ones with every message in flight applied
    /// (what [`State::on_backend`] keeps without rebuilding them at each answer).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn expected_in_step(&self) -> bool {
        fn same(a: &HashMap<String, Named>, b: &HashMap<String, Named>) -> bool {
            a.len() == b.len()
                && a.iter().all(|(k, x)| {
                    b.get(k).is_some_and(|y| {
                        x.what == y.what
                            && x.hold == y.hold
                            && x.judged.as_ref().map(|j| j.request)
                                == y.judged.as_ref().map(|j| j.request)
                    })
                })
        }
        let mut rebuilt = self.confirmed.clone();
        for p in &self.pending {
            for e in p.effects() {
                rebuilt.apply(e);
            }
        }
        same(&rebuilt.statements, &self.expected.statements)
            && same(&rebuilt.portals, &self.expected.portals)
    }

    /// The answers expected, in order, by their frontend tags.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn expects(&self) -> Vec<u8> {
        self.pending
            .iter()
            .map(|p| match p {
                Pending::Query { .. } => b'Q',
                Pending::Parse { .. } => b'P',
                Pending::Bind { .. } => b'B',
                Pending::Describe => b'D',
                Pending::Execute { .. } => b'E',
                Pending::Close { .. } => b'C',
                Pending::Sync => b'S',
            })
            .collect()
    }

    fn push(&mut self, pending: Pending) {
        match pending {
            Pending::Sync => self.skipping = false,
            // The server skips it: no answer, no effect.
            Pending::Query { .. } => {}
            _ if self.skipping => return,
            _ => {}
        }
        for e in pending.effects() {
            self.expected.apply(e);
        }
        self.pending.push_back(pending);
    }

    /// A Parse: the statement it makes when the server accepts it, or a stand-in when it was
    /// refused.
    fn push_parse(
        &mut self,
        name: &str,
        sql: &str,
        judged: Option<Judged>,
    ) -> Result<Option<Bytes>, SessionError> {
        let judged = judged.unwrap_or_else(Judged::undecided);
        if let Some(message) = judged.refusal {
            // The stand-in fails, and the server skips the rest of the batch: what
            // follows in it is nobody's but the refused statement's.
            let refused = Effect::SetStatement(
                name.to_string(),
                Named {
                    what: Arc::new(unknown_classification("a refused statement".into())),
                    text: record_text(sql),
                    judged: Some(Attribution {
                        request: judged.request,
                        masks: no_masks(),
                        once: false,
                    }),
                    hold: false,
                },
            );
            let (denied, stand_in) = Self::stand_in(message);
            self.push(Pending::Parse {
                request: judged.request,
                started: Instant::now(),
                denied: Some(denied),
                effect: Some(refused),
            });
            return Ok(Some(codec::parse(name, &stand_in)));
        }
        let (what, reusable) = match &judged.what {
            // Runs a prepared statement: classified again at each Execute, from its whole
            // text, which is kept only up to a bound (past it, the statement is unknown).
            Some(what) if what.uses_prepared && sql.len() > MAX_REJUDGED_TEXT => (
                Arc::new(unknown_classification(format!(
                    "an EXECUTE statement longer than {MAX_REJUDGED_TEXT} bytes"
                ))),
                false,
            ),
            // A statement that reads a cursor or runs a prepared statement is judged at each
            // Execute, by what the name stands for then.
            Some(what) => (
                Arc::clone(what),
                !what.uses_prepared
                    && !what.names.iter().any(|e| matches!(e, NameEffect::Fetch(_))),
            ),
            None => (
                Arc::new(unknown_classification(
                    "a statement the gateway did not classify".into(),
                )),
                true,
            ),
        };
        let text = if what.uses_prepared {
            Arc::from(sql)
        } else {
            record_text(sql)
        };
        let effect = Effect::SetStatement(
            name.to_string(),
            Named {
                what,
                text,
                judged: reusable.then_some(Attribution {
                    request: judged.request,
                    masks: judged.masks,
                    once: judged.approved_once,
                }),
                hold: false,
            },
        );
        self.check_caps(std::slice::from_ref(&effect))?;
        self.push(Pending::Parse {
            request: judged.request,
            started: Instant::now(),
            denied: None,
            effect: Some(effect),
        });
        Ok(None)
    }

    fn push_query(
        &mut self,
        judged: Judged,
        effects: Vec<Effect>,
        frame: impl FnOnce(&str) -> Bytes,
    ) -> Option<Bytes> {
        let Judged {
            request,
            refusal,
            masks,
            ..
        } = judged;
        let (denied, replacement, masks) = match refusal {
            None => (None, None, masks),
            Some(message) => {
                let (denied, stand_in) = Self::stand_in(message);
                (Some(denied), Some(frame(&stand_in)), no_masks())
            }
        };
        self.push(Pending::Query {
            request,
            started: Instant::now(),
            tags: Tags::default(),
            error: None,
            masks,
            masked_rows: 0,
            denied,
            effects,
        });
        replacement
    }

    fn push_execute(&mut self, portal: &str, judged: Option<Judged>) -> Option<Bytes> {
        let named = self.expected.portal(portal);
        let reused = named.and_then(|n| n.judged.clone());
        let judged = match (judged, reused) {
            (Some(j), _) => j,
            (None, Some(a)) if !(a.once && self.spent.contains(&a.request)) => {
                if a.once {
                    self.spent.insert(a.request);
                }
                Judged {
                    request: a.request,
                    refusal: None,
                    masks: a.masks,
                    what: None,
                    approved_once: false,
                }
            }
            (None, _) => Judged::undecided(),
        };
        let effects = match named {
            Some(n) if judged.refusal.is_none() => effects_of(&n.what, &n.text),
            _ => Vec::new(),
        };
        let (denied, replacement, masks) = match judged.refusal {
            None => (None, None, judged.masks),
            Some(message) => {
                let (denied, stand_in) = Self::stand_in(message);
                (Some(denied), Some(codec::execute(&stand_in)), no_masks())
            }
        };
        self.push(Pending::Execute {
            request: judged.request,
            started: Instant::now(),
            masks,
            masked_rows: 0,
            denied,
            effects,
        });
        replacement
    }

    /// Refuses a message whose effects would take the names past their caps.
    fn check_caps(&self, effects: &[Effect]) -> Result<(), SessionError> {
        for e in effects {
            match e.makes() {
                Some((true, name))
                    if self.expected.statements.len() >= MAX_STATEMENTS
                        && self.expected.statement(name).is_none() =>
                {
                    return Err(SessionError::Limit(
                        "too many prepared statements in one session",
                    ))
                }
                Some((false, name))
                    if self.expected.portals.len() >= MAX_PORTALS
                        && self.expected.portal(name).is_none() =>
                {
                    return Err(SessionError::Limit("too many open portals or cursors"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A simple Query's answers are in: what it did to the names. Whole when it ran without
    /// an error. Otherwise the gateway cannot tell which of its statements ran: what it drops
    /// is taken as dropped (a name the gateway has not got is judged as unknown), and what it
    /// makes as not made (a name that exists could not have been made again: the server
    /// refuses a duplicate; a new one stays unknown).
    /// Whether the names now differ from what was expected of it.
    fn query_done(&mut self, effects: &[Effect], ok: bool) -> bool {
        let mut diverged = false;
        for e in effects {
            if ok || e.makes().is_none() {
                self.confirmed.apply(e);
            } else {
                diverged = true;
            }
        }
        diverged
    }

    /// The expected names again: the confirmed ones and what every message still in flight
    /// does.
    fn rebuild_expected(&mut self) {
        let mut expected = self.confirmed.clone();
        for p in &self.pending {
            for e in p.effects() {
                expected.apply(e);
            }
        }
        self.expected = expected;
    }

    /// An ErrorResponse: the front request failed. In the extended protocol the target then
    /// skips everything up to the next Sync.
    fn on_error(&mut self, body: &[u8]) -> Option<Bytes> {
        let fields = codec::error_fields(body);
        let message = fields
            .iter()
            .find(|(c, _)| *c == b'M')
            .map_or("", |(_, m)| m.as_str());
        let policy_message = self
            .pending
            .front_mut()
            .and_then(Pending::denied)
            .and_then(|d| take_denied(d, message));
        let (replacement, error) = match policy_message {
            Some(policy_message) => {
                let error = format!("denied: {policy_message}");
                (Some(codec::error_response("42501", &policy_message)), error)
            }
            None => (None, message.to_string()),
        };
        match self.pending.front_mut() {
            Some(Pending::Query { error: e, .. }) => {
                *e = Some(error);
                return replacement;
            }
            // An error outside any request (a commit at Sync that fails, a FATAL).
            Some(Pending::Sync) | None => return replacement,
            Some(_) => {}
        }
        // The failed message, then everything the server skips up to the Sync. A request is
        // recorded once: an Execute of a statement whose Parse failed adds nothing.
        let mut recorded: Vec<u64> = Vec::new();
        let mut first = Some(error);
        while let Some(p) = self.pending.front() {
            if matches!(p, Pending::Sync) {
                break;
            }
            let error = first
                .take()
                .unwrap_or_else(|| "not executed: an earlier message failed".into());
            match self.pending.pop_front() {
                Some(
                    Pending::Execute {
                        request, started, ..
                    }
                    | Pending::Parse {
                        request, started, ..
                    },
                ) if request != 0 && !recorded.contains(&request) => {
                    recorded.push(request);
                    self.finish(
                        request,
                        started,
                        Tags::default(),
                        Some(error),
                        (&no_masks(), 0),
                    );
                }
                _ => {}
            }
        }
        // No Sync sent yet: what comes before it is skipped too.
        self.skipping = self.pending.is_empty();
        self.rebuild_expected();
        replacement
    }

    /// A stand-in that the target rejects, carrying `message`.
    fn stand_in(message: String) -> (Denied, String) {
        // Every message the client sees from the gateway says it came from the gateway.
        let message = if message.starts_with("bulkhead:") {
            message
        } else {
            format!("bulkhead: {message}")
        };
        let nonce = getrandom::u64().unwrap_or_else(|_| now_micros());
        (Denied { nonce, message }, format!("{DENIED_MARK}{nonce}"))
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
        tags: Tags,
        error: Option<String>,
        (masks, masked): (&Masks, u64),
    ) {
        let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.finished.push(EventKind::Response {
            request,
            duration_us,
            summary: tags.summary(),
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

/// The policy message for a stand-in's error, if `message` names this stand-in's nonce.
fn take_denied(denied: &mut Option<Denied>, message: &str) -> Option<String> {
    let at = message.find(DENIED_MARK)?;
    let digits = message[at + DENIED_MARK.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?;
    let nonce: u64 = digits.parse().ok()?;
    if denied.as_ref()?.nonce != nonce {
        return None;
    }
    denied.take().map(|d| d.message)
}

mod names;
mod request;
#[cfg(any(test, feature = "fuzzing"))]
pub mod sim;
mod summary;
#[cfg(test)]
mod tests;
