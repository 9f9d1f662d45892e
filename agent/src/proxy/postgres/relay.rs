//! The two relay loops of a logged-in session, client → target and target → client, run
//! together in the session's task. The client side decides each statement through the
//! session pipeline ([`Conn::decide`]) before it is forwarded; the target side masks result
//! data. Both tell the session's [`State`] what went by, and do what it says: forward a
//! stand-in for a denied statement, swap the policy's error in for the stand-in's.
//!
//! Frames are written to buffered writers and flushed whenever no further frame is already
//! buffered on the reading side, so a pipeline is forwarded in one write; results are
//! recorded after each flush, off the statements' latency.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use crate::conn_log::debug;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufWriter};

use super::{
    catalog, codec,
    codec::{CodecError, FrameReader},
    columns, ended, send_fatal,
    state::{no_masks, Depends, Judged, Masks, Request, State, ToJudge},
    Catalogs, SessionError,
};
use crate::{
    policy::{Classification, NameEffect, PolicySet, SqlClass, Verdict},
    proxy::session::Conn,
    record::{EventKind, Outcome, RecordedVerdict, SessionEnd},
};

/// How long the target's last answers are waited for once the client has gone.
const LAST_ANSWERS: Duration = Duration::from_secs(5);
/// Each writer's buffer.
pub const WRITE_BUFFER: usize = 64 * 1024;

/// One direction of a session: frames read from one side, written to the other.
pub struct Leg<R, W> {
    pub from: FrameReader<R>,
    pub to: BufWriter<W>,
}

impl<R, W: AsyncWrite> Leg<R, W> {
    pub fn new(from: FrameReader<R>, to: W) -> Self {
        Self {
            from,
            to: BufWriter::with_capacity(WRITE_BUFFER, to),
        }
    }
}

/// One logged-in session's relay.
pub struct Relay<'a> {
    conn: &'a Conn<'a>,
    /// Column identities of the targets' catalogs (the PostgreSQL gateway's shared cache).
    catalogs: &'a Catalogs,
    state: Mutex<State>,
    /// Which result columns are which, for column mask rules.
    columns: columns::Tracker,
    /// Messages for the client from the gateway itself (a NOTICE that a statement waits for
    /// approval), written by the target-to-client loop between the target's messages. Only
    /// the client-to-target loop adds to them, and [`Relay::run`] polls it first: the
    /// target-to-client loop, polled after it in the same pass, finds them without a waker
    /// of its own ([`Relay::notice_queued`]).
    notices: Mutex<Vec<Bytes>>,
    notice_queued: AtomicBool,
    /// Told at each ReadyForQuery, for a message that waits for earlier answers
    /// ([`State::must_settle`]).
    answered: tokio::sync::Notify,
    /// The Bind each portal name was last bound by, for approvers ([`Relay::keep_binds`]).
    bound: Mutex<std::collections::HashMap<String, Bytes>>,
    /// The policy at login can hold a request for approval: keep Binds for approvers.
    keep_binds: bool,
}

/// A notification's payload under a column mask rule ([`Relay::withheld_notification`]).
const NOTIFICATION_WITHHELD: &str = "[bulkhead: payload withheld under a column mask rule]";

/// Portal names whose bound values are kept for approvers (unnamed and named alike).
const BOUND_PORTALS: usize = 64;

impl<'a> Relay<'a> {
    /// `login` is how the session logged in upstream: the catalog's side connections log in
    /// the same way.
    pub fn new(conn: &'a Conn<'a>, catalogs: &'a Catalogs, login: catalog::Login) -> Self {
        Self {
            conn,
            catalogs,
            notices: Mutex::default(),
            notice_queued: AtomicBool::new(false),
            answered: tokio::sync::Notify::new(),
            bound: Mutex::default(),
            keep_binds: conn.policy().can_hold(),
            state: Mutex::new(State::default()),
            columns: columns::Tracker::new(columns::policy_has_column_rules(&conn.policy()), login),
        }
    }

    /// Relays until either side ends, then records what finished. `greeted`: bytes already
    /// sent to the client.
    pub async fn run<CR, UW, UR, CW>(
        &self,
        mut to_target: Leg<CR, UW>,
        mut to_client: Leg<UR, CW>,
        greeted: u64,
    ) -> SessionEnd
    where
        CR: AsyncRead + Unpin,
        UW: AsyncWrite + Unpin,
        UR: AsyncRead + Unpin,
        CW: AsyncWrite + Unpin,
    {
        let up_count = AtomicU64::new(0);
        let down_count = AtomicU64::new(greeted);
        let result = {
            let client_side = self.client_to_target(&mut to_target, &up_count);
            let target_side = self.target_to_client(&mut to_client, &down_count);
            tokio::pin!(client_side, target_side);
            tokio::select! {
                // The client side first: the notices it queues are found by the target side
                // in the same pass (`notices`).
                biased;
                r = &mut client_side => {
                    // The client is done and the target was told (Terminate): let its last
                    // answers through.
                    match tokio::time::timeout(LAST_ANSWERS, &mut target_side).await {
                        Ok(t) => r.and(t),
                        Err(_) => r,
                    }
                }
                r = &mut target_side => r,
            }
        };
        self.record_finished(&mut Vec::new());
        match &result {
            Err(
                e @ (SessionError::Client(_)
                | SessionError::UnexpectedFrontend(_)
                | SessionError::Unsupported(_)
                | SessionError::OutOfStep(_)),
            ) => {
                // A malformed message ends this session only, with a protocol error the client
                // can read.
                send_fatal(&mut to_client.to, "08P01", &format!("bulkhead: {e}")).await;
            }
            Err(e @ SessionError::Limit(_)) => {
                send_fatal(&mut to_client.to, "54000", &format!("bulkhead: {e}")).await;
            }
            _ => {}
        }
        let outcome = match result {
            Ok(()) => Outcome::Closed,
            Err(e) => {
                debug!(error = %e, "postgres session ended with an error");
                Outcome::Failed {
                    error: e.to_string(),
                }
            }
        };
        ended(
            up_count.load(Ordering::Relaxed),
            down_count.load(Ordering::Relaxed),
            outcome,
        )
    }

    /// Tells the client that its statement waits for approval `id`, and how an admin decides.
    fn tell_held(&self, id: u64) {
        let message = format!(
            "bulkhead: this statement waits for an admin's approval (id {id}): \
             `bulkhead approvals approve {id}` or `bulkhead approvals deny {id}`"
        );
        self.notices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(codec::notice_response(&message));
        self.notice_queued.store(true, Ordering::Release);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Classifies `sql` against the session's statement names (`EXECUTE name`, and `FETCH`
    /// by what its cursor holds), then decides it ([`Relay::decide_classified`]). Waits first
    /// when an earlier unit of work still in flight makes names it may read.
    async fn decide<W: AsyncWrite + Unpin>(
        &self,
        to: &mut BufWriter<W>,
        sql: &str,
    ) -> Result<Judged, SessionError> {
        let policy = self.conn.policy();
        let mut waited = false;
        let classification = loop {
            let classification = {
                let state = self.state();
                state.resolve(&policy.cache().classify(sql, Some(state.prepared())))
            };
            if waited || !reads_names(&classification) {
                break classification;
            }
            waited = self.settle(to, Depends::Any).await?;
            if !waited {
                break classification;
            }
        };
        self.columns.decided(self.catalogs, &classification);
        Ok(self
            .decide_classified(&policy, classification, sql, &[])
            .await)
    }

    /// Decides a classified statement through the session pipeline (recorded before anything
    /// is forwarded; held for approval; observe mode), a repeated one from the session's memo
    /// ([`Conn::decide_sql`]).
    async fn decide_classified(
        &self,
        policy: &Arc<PolicySet>,
        classification: Arc<Classification>,
        text: &str,
        params: &[Option<String>],
    ) -> Judged {
        let classification = self.with_kin(policy, classification).await;
        let decided = self
            .conn
            .decide_sql(
                policy,
                &classification,
                text,
                Some(&|id| self.tell_held(id)),
                params,
            )
            .await;
        let decision = &decided.decision;
        // Observe mode never changes what flows: its masks are recorded, not applied. Nothing
        // of a refused statement runs.
        let masks: Masks =
            if decision.observe_only || decision.masks.is_empty() || decided.refusal.is_some() {
                no_masks()
            } else {
                decision.masks.iter().cloned().collect()
            };
        let approved_once = decision.decided == Verdict::Approve
            && !decision.observe_only
            && decided.refusal.is_none();
        Judged {
            request: decided.request,
            refusal: decided.refusal,
            masks,
            what: Some(classification),
            approved_once,
        }
    }

    /// `what` with the kin of the tables it touches ([`Classification::kin`]: a deny rule on
    /// a table covers reading its partitions), when a rule that restricts names objects; the
    /// target's catalog is asked (cached, [`catalog`]). When it cannot answer, the statement
    /// is unknown (fail closed).
    async fn with_kin(&self, policy: &PolicySet, what: Arc<Classification>) -> Arc<Classification> {
        if what.objects.is_empty() || !policy.restricts_sql_objects() {
            return what;
        }
        let kin = self.columns.kin(self.catalogs, &what.objects).await;
        if kin.as_ref().is_ok_and(std::collections::BTreeSet::is_empty) {
            return what;
        }
        let mut with = (*what).clone();
        match kin {
            Ok(kin) => with.kin = kin,
            Err(e) => {
                with.classes.insert(SqlClass::Unknown);
                with.unknown_reasons.push(format!(
                    "{e}: which tables share rows with the ones it touches is not known"
                ));
            }
        }
        Arc::new(with)
    }

    /// Waits, if `name` is made by an earlier unit of work still in flight, until the target
    /// has answered it (what is buffered for the target is sent first). Whether it waited.
    async fn settle<W: AsyncWrite + Unpin>(
        &self,
        to: &mut BufWriter<W>,
        name: Depends<'_>,
    ) -> Result<bool, SessionError> {
        if !self.state().must_settle(name) {
            return Ok(false);
        }
        to.flush()
            .await
            .map_err(|e| SessionError::Target(e.into()))?;
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if !self.state().must_settle(name) {
                return Ok(true);
            }
            answered.await;
        }
    }

    /// Keeps the client's latest Bind of `portal`, for an approver to read its values if an
    /// Execute of it is held: in client order the latest Bind of a name is the one the server
    /// will have applied when that Execute runs (a Bind the server refuses skips the Execute).
    /// Display only, and only in sessions whose policy can hold a request (no copy per Bind
    /// otherwise); at most [`BOUND_PORTALS`] names are kept.
    fn remember_parameters(&self, portal: &str, body: &[u8]) {
        if !self.keep_binds {
            return;
        }
        let mut bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        if bound.len() >= BOUND_PORTALS && !bound.contains_key(portal) {
            bound.clear();
        }
        bound.insert(portal.to_string(), Bytes::copy_from_slice(body));
    }

    /// The values `portal` was last bound with, read for an approver.
    fn bound_parameters(&self, portal: &str) -> Vec<Option<String>> {
        let body = self
            .bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(portal)
            .cloned();
        body.and_then(|b| codec::bind_parameters(&b).ok())
            .unwrap_or_default()
    }

    /// A fastpath function call, refused: it names a function by OID, with nothing to judge.
    fn refuse_function_call(&self) -> Judged {
        let request = self.conn.record(EventKind::request(
            "fastpath function call",
            Some("unknown".into()),
            RecordedVerdict::Deny,
            Vec::new(),
        ));
        Judged {
            request,
            refusal: Some("fastpath function calls are not allowed through the gateway".into()),
            masks: no_masks(),
            what: None,
            approved_once: false,
        }
    }

    async fn client_to_target<R, W>(
        &self,
        leg: &mut Leg<R, W>,
        count: &AtomicU64,
    ) -> Result<(), SessionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let gw = self.conn.gw;
        let target_error = |e: std::io::Error| SessionError::Target(e.into());
        loop {
            if !leg.from.has_frame() {
                leg.to.flush().await.map_err(target_error)?;
            }
            let Some(frame) = leg.from.next().await.map_err(SessionError::Client)? else {
                // The client went away without saying goodbye: end the target's session too.
                leg.to
                    .write_all(&codec::terminate())
                    .await
                    .map_err(target_error)?;
                leg.to.flush().await.map_err(target_error)?;
                return Ok(());
            };
            let request = Request::read(frame.tag, &frame.body)?;
            if matches!(request, Request::Query { .. } | Request::FunctionCall)
                && self.state().mid_batch()
            {
                // Nothing of it reaches the target; the target is told the session ends.
                leg.to
                    .write_all(&codec::terminate())
                    .await
                    .map_err(target_error)?;
                leg.to.flush().await.map_err(target_error)?;
                return Err(SessionError::Unsupported(
                    "a simple Query or function call inside an unfinished extended-protocol \
                     batch is not let through (send Sync first): after an error the server \
                     discards it, and the gateway could not tell whose answers follow",
                ));
            }
            let judged = match request {
                Request::Query { sql } => {
                    let judged = self.decide(&mut leg.to, sql).await?;
                    self.columns.query(gw, sql, &judged.masks);
                    Some(judged)
                }
                Request::Parse { name, sql } => {
                    let judged = self.decide(&mut leg.to, sql).await?;
                    self.columns.parse(gw, name, sql, &judged.masks);
                    Some(judged)
                }
                Request::FunctionCall => {
                    self.columns.query(gw, "", &no_masks());
                    Some(self.refuse_function_call())
                }
                Request::Bind { statement, portal } => {
                    self.settle(&mut leg.to, Depends::Statement(statement))
                        .await?;
                    self.remember_parameters(portal, &frame.body);
                    None
                }
                Request::Execute { portal } => {
                    self.settle(&mut leg.to, Depends::Portal(portal)).await?;
                    let mut to_judge = self.state().to_judge(portal);
                    if to_judge.as_ref().is_some_and(|j| reads_names(&j.what))
                        && self.settle(&mut leg.to, Depends::Any).await?
                    {
                        to_judge = self.state().to_judge(portal);
                    }
                    match to_judge {
                        Some(ToJudge { what, sql, text }) => {
                            let policy = self.conn.policy();
                            let what = {
                                let state = self.state();
                                let what = if what.uses_prepared {
                                    policy.cache().classify(&sql, Some(state.prepared()))
                                } else {
                                    what
                                };
                                state.resolve(&what)
                            };
                            let params = self.bound_parameters(portal);
                            Some(self.decide_classified(&policy, what, &text, &params).await)
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            let out = match self.frontend(&request, judged) {
                Ok(replaced) => replaced.unwrap_or_else(|| frame.raw.clone()),
                Err(e) => {
                    // Nothing of it reaches the target; the target is told the session ends.
                    leg.to
                        .write_all(&codec::terminate())
                        .await
                        .map_err(target_error)?;
                    leg.to.flush().await.map_err(target_error)?;
                    return Err(e);
                }
            };
            self.columns.frontend(frame.tag, &frame.body);
            count.fetch_add(out.len() as u64, Ordering::Relaxed);
            leg.to.write_all(&out).await.map_err(target_error)?;
            if request == Request::Terminate {
                leg.to.flush().await.map_err(target_error)?;
                return Ok(());
            }
        }
    }

    fn frontend(
        &self,
        request: &Request<'_>,
        judged: Option<Judged>,
    ) -> Result<Option<Bytes>, SessionError> {
        self.state().on_frontend(request, judged)
    }

    async fn target_to_client<R, W>(
        &self,
        leg: &mut Leg<R, W>,
        count: &AtomicU64,
    ) -> Result<(), SessionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let gw = self.conn.gw;
        let mut results = columns::Results::new(
            &self.columns,
            self.catalogs,
            gw.store.as_ref(),
            self.conn.session,
        );
        // Kept across flushes: the events to record move through it without a new list each.
        let mut finished = Vec::new();
        loop {
            if !leg.from.has_frame() {
                leg.to
                    .flush()
                    .await
                    .map_err(|e| SessionError::Client(e.into()))?;
                self.record_finished(&mut finished);
            }
            // Only when the next read would wait anyway is a gateway notice let in (between
            // whole frames; the reader keeps a partly read frame across the select).
            let next = if leg.from.has_frame() {
                leg.from.next().await
            } else {
                tokio::select! {
                    biased;
                    frame = leg.from.next() => frame,
                    () = self.notice_queued() => {
                        let notices = std::mem::take(
                            &mut *self.notices.lock().unwrap_or_else(PoisonError::into_inner),
                        );
                        for notice in notices {
                            count.fetch_add(notice.len() as u64, Ordering::Relaxed);
                            leg.to
                                .write_all(&notice)
                                .await
                                .map_err(|e| SessionError::Client(e.into()))?;
                        }
                        continue;
                    }
                }
            };
            let Some(frame) = next.map_err(SessionError::Target)? else {
                return Ok(());
            };
            results.observe(frame.tag, &frame.body, || self.front_masks().is_some());
            let replaced = match frame.tag {
                b'D' | b'd' => {
                    let masked = self
                        .mask(&mut results, frame.tag, &frame.body)
                        .await
                        .map_err(SessionError::Target)?;
                    if masked.is_some() {
                        self.state().masked_a_row();
                    }
                    masked
                }
                tag => {
                    // The state sees the server's error (and records it); the client gets it
                    // without a message that could quote a masked value.
                    // (Only an error is looked at: the state's lock once per frame, not twice.)
                    let withheld = match tag {
                        b'E' => self
                            .front_masks()
                            .and_then(|(_, masks)| columns::withheld_error(&masks, &frame.body)),
                        b'A' => self.withheld_notification(&frame.body)?,
                        _ => None,
                    };
                    let replaced = self.backend(tag, &frame.body)?;
                    if tag == b'Z' {
                        self.answered.notify_one();
                    }
                    replaced.or(withheld)
                }
            };
            let out = replaced.unwrap_or(frame.raw);
            count.fetch_add(out.len() as u64, Ordering::Relaxed);
            leg.to
                .write_all(&out)
                .await
                .map_err(|e| SessionError::Client(e.into()))?;
        }
    }

    /// Ready once a notice is queued (and the flag taken down). Registers no waker: a notice
    /// is queued only while the client side is polled, and the target side is polled right
    /// after it ([`Relay::run`]); cheaper than a channel's receiver, registered at every wait.
    fn notice_queued(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|_| {
            if self.notice_queued.swap(false, Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// A notification with its payload withheld, under a policy with column mask rules:
    /// whichever statement sent it, in this session or another, may have put a masked value
    /// in it (`SELECT pg_notify('c', ssn) FROM users`), and nothing says which. It can arrive
    /// between statements, so the policy's rules are asked, not a statement's. The channel
    /// and the process id pass.
    fn withheld_notification(&self, body: &[u8]) -> Result<Option<Bytes>, SessionError> {
        if !columns::policy_has_column_rules(&self.conn.policy()) {
            return Ok(None);
        }
        codec::notification_with_payload(body, NOTIFICATION_WITHHELD)
            .map(Some)
            .map_err(SessionError::Target)
    }

    fn backend(&self, tag: u8, body: &[u8]) -> Result<Option<Bytes>, SessionError> {
        self.state().on_backend(tag, body)
    }

    fn front_masks(&self) -> Option<(super::state::Front, Masks)> {
        self.state().front_masks()
    }

    /// A DataRow or COPY OUT line with masked values, if the current statement has masks and
    /// anything matched: by column rule for the fields whose real column a rule names, by
    /// the value detectors for every other field, whatever its alias (`columns.rs`).
    async fn mask(
        &self,
        results: &mut columns::Results<'_>,
        tag: u8,
        body: &[u8],
    ) -> Result<Option<Bytes>, CodecError> {
        let Some((front, masks)) = self.front_masks() else {
            return Ok(None);
        };
        results.mask(front, &masks, tag, body).await
    }

    /// Records the results completed so far, moved through `scratch` (left empty).
    fn record_finished(&self, scratch: &mut Vec<EventKind>) {
        self.state().move_finished_into(scratch);
        for kind in scratch.drain(..) {
            self.conn.complete(kind);
        }
    }
}

/// Whether what a statement does depends on the names it reads when it runs (`EXECUTE name`,
/// `FETCH ... name`).
fn reads_names(what: &Classification) -> bool {
    what.uses_prepared || what.names.iter().any(|e| matches!(e, NameEffect::Fetch(_)))
}

#[cfg(test)]
mod tests;
