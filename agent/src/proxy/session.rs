//! The per-connection context every protocol is served with, and its one way to decide.
//!
//! The accept loop ([`super::handle`]) builds a [`Conn`] once the connection is identified and
//! its target resolved, decides the connection itself ([`Conn::decide_connect`]), opens the
//! session, and hands the `Conn` to the protocol's `serve`. From then on every request a
//! protocol judges goes through [`Conn::decide`]: evaluate the policy, record the decision
//! before acting on it, hold it for an admin when the verdict is `approve`, and let observe mode
//! record without blocking. A protocol never builds a request event or talks to the approval
//! broker itself.

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use crate::conn_log::warn;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    approval::{ApprovalBroker, ApprovalIdentity, ApprovalRequest, Notice, RequestDetails},
    config::{unmatched_name, Config, ResolvedTarget},
    ebpf::OrigDst,
    identity::{ProcReader, ProcessIdentity},
    net::{ClientAddr, OrigDstAddr},
    policy::{self, Action, Basis, Classification, Decision, PolicySet, Verdict},
    protocol::Protocol,
    record::{EventKind, RecordedVerdict, SessionId, SessionStore},
};

/// The class recorded for a connection's own decision.
pub const CONNECT_CLASS: &str = "connect";

/// How long the gateway waits for a target to accept.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters shown by `bulkhead status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub refused: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// The configuration connections start under. A reload (`SIGHUP`, [`Config::with_targets_of`])
/// replaces it whole; a connection reads it once, when it is accepted, and keeps that copy to
/// its end, so a session is never judged under two target tables.
#[derive(Clone)]
pub struct LiveConfig(Arc<arc_swap::ArcSwap<Config>>);

impl LiveConfig {
    /// The configuration in force now.
    pub fn current(&self) -> Arc<Config> {
        self.0.load_full()
    }

    /// Puts `config` in force for connections accepted from now on.
    pub fn replace(&self, config: Arc<Config>) {
        self.0.store(config);
    }
}

impl From<Arc<Config>> for LiveConfig {
    fn from(config: Arc<Config>) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::new(config)))
    }
}

/// The services every connection shares.
pub struct Gateway {
    pub config: LiveConfig,
    pub orig_dst: Arc<dyn OrigDst>,
    pub store: Arc<dyn SessionStore>,
    pub proc: ProcReader,
    pub stats: Arc<Stats>,
    /// The policy in force; a decision takes a snapshot.
    pub policy: crate::policy::PolicyHandle,
    /// The local CA for TLS toward clients; `None` declines client TLS.
    pub tls: Option<Arc<crate::tls::LocalCa>>,
    /// Where a request whose verdict is `approve` is held ([`Conn::decide`]).
    pub approvals: Arc<ApprovalBroker>,
}

/// One identified connection with its session open: everything a protocol needs.
pub struct Conn<'g> {
    pub gw: &'g Gateway,
    pub client: ClientAddr,
    /// Where the governed process was connecting; the gateway connects here upstream.
    pub destination: OrigDstAddr,
    pub identity: ProcessIdentity,
    pub session: SessionId,
    pub target: ResolvedTarget<'g>,
    /// Decisions on statements already judged in this session ([`Conn::decide_sql`]).
    pub memo: DecisionMemo,
}

/// The decisions already made in a session, so a repeated request's decision is served
/// without evaluating the policy or allocating. A decision depends only on the policy, the
/// target, the identity and the request as the policy reads it; the target and identity are
/// the session's, so an entry is keyed by the policy snapshot (by address) and `K`, what the
/// protocol's policy reads (HTTP: `proxy/http/memo.rs`). For SQL, the default, `K` is the
/// classification, compared by address. The entry holds both, so neither address can be reused by another
/// value while it is kept. The SQL classification cache hands out one `Arc` per statement
/// shape, which makes repeated statements (and statements differing only in folded literals)
/// meet here; any other classification misses and is evaluated. A new policy snapshot
/// empties the memo.
pub struct DecisionMemo<K = Arc<Classification>> {
    entries: Mutex<Vec<Memo<K>>>,
    capacity: usize,
}

struct Memo<K> {
    policy: Arc<PolicySet>,
    key: K,
    decision: Arc<Decision>,
    /// `decision.rules` as the request event shares them.
    rules: Arc<[String]>,
}

impl Default for DecisionMemo {
    fn default() -> Self {
        Self::new(Self::CAPACITY)
    }
}

impl DecisionMemo {
    /// Statement shapes remembered per session; past it the oldest is replaced.
    pub const CAPACITY: usize = 32;
}

impl<K> DecisionMemo<K> {
    /// A memo of at most `capacity` decisions, keyed by `K` (what a protocol's decision depends
    /// on besides the policy snapshot, the target and the identity).
    /// Allocates nothing until the first decision: a connection may never make one.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            capacity,
        }
    }

    /// The decision made under `policy` (compared by address) on a key `is` accepts.
    pub fn get(
        &self,
        policy: &Arc<PolicySet>,
        is: impl Fn(&K) -> bool,
    ) -> Option<(Arc<Decision>, Arc<[String]>)> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .find(|m| Arc::ptr_eq(&m.policy, policy) && is(&m.key))
            .map(|m| (Arc::clone(&m.decision), Arc::clone(&m.rules)))
    }

    /// Remembers `decision` on `key` under `policy`; a new policy snapshot empties the memo.
    pub fn put(
        &self,
        policy: &Arc<PolicySet>,
        key: K,
        decision: &Arc<Decision>,
        rules: &Arc<[String]>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries
            .first()
            .is_some_and(|m| !Arc::ptr_eq(&m.policy, policy))
        {
            entries.clear();
        }
        if entries.len() >= self.capacity {
            entries.remove(0);
        }
        entries.push(Memo {
            policy: Arc::clone(policy),
            key,
            decision: Arc::clone(decision),
            rules: Arc::clone(rules),
        });
    }
}

/// A decided statement ([`Conn::decide_sql`]): the decision shared with the session's memo.
#[derive(Debug)]
pub struct DecidedSql {
    /// The id of the recorded request event (0 when none was recorded), for its response.
    pub request: u64,
    /// `None`: forward it. `Some(message)`: refuse it, telling the client `message`.
    pub refusal: Option<String>,
    pub decision: Arc<Decision>,
}

/// What a protocol is to do with a decided request.
#[derive(Debug)]
pub struct Decided {
    /// The id of the recorded request event (0 when none was recorded), for its response.
    pub request: u64,
    /// `None`: forward it. `Some(message)`: refuse it, telling the client `message`.
    pub refusal: Option<String>,
    /// The policy's decision, for what a protocol applies beyond the verdict (masks).
    pub decision: Decision,
}

impl Decided {
    pub fn forward(&self) -> bool {
        self.refusal.is_none()
    }
}

/// A request to decide: the policy's view of it, and how the record shows it.
pub struct Ask<'a> {
    pub action: Action<'a>,
    /// What the client asked for, as recorded and shown to an approver.
    pub text: &'a str,
    /// Its class as recorded (`read`, `connect`, ...).
    pub class: Option<Cow<'static, str>>,
    /// Told the approval's id as soon as the request waits for an admin, so the protocol can
    /// say so to a client that would otherwise just hang (a PostgreSQL NOTICE).
    pub on_hold: Option<&'a (dyn Fn(u64) + Send + Sync)>,
    /// Values bound to the request's parameters (a PostgreSQL Execute), shown to an approver.
    pub params: &'a [Option<String>],
}

impl Conn<'_> {
    /// Appends an event to this session; a failure is logged and yields id 0. For events that
    /// must be recorded before something happens, use [`Conn::decide`].
    pub fn record(&self, kind: EventKind) -> u64 {
        match self.gw.store.append(self.session, kind) {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "cannot record an event");
                0
            }
        }
    }

    /// Records a request's result (a `Response` event), in the request event itself while
    /// that still waits to be written ([`SessionStore::complete`]); a failure is logged.
    pub fn complete(&self, result: EventKind) {
        if let Err(e) = self.gw.store.complete(self.session, result) {
            warn!(error = %e, "cannot record an event");
        }
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.gw.policy.current()
    }

    /// Evaluates `ask` under `policy` and applies the decision ([`Conn::apply`]).
    pub async fn decide(&self, policy: &PolicySet, ask: Ask<'_>) -> Decided {
        let decision = policy.evaluate(&policy::Request {
            target: self.target.policy_ref(),
            identity: &self.identity,
            action: ask.action,
        });
        self.apply_telling(decision, ask.text, ask.class, ask.on_hold, ask.params)
            .await
    }

    /// [`Conn::decide`] for a classified SQL statement, served from the session's memo when
    /// the same policy snapshot judged the same classification before ([`DecisionMemo`]). The
    /// recorded class is the classification's headline. Recorded and enforced exactly as
    /// [`Conn::decide`] does.
    pub async fn decide_sql(
        &self,
        policy: &Arc<PolicySet>,
        what: &Arc<Classification>,
        text: &str,
        on_hold: Option<&(dyn Fn(u64) + Send + Sync)>,
        params: &[Option<String>],
    ) -> DecidedSql {
        let (decision, rules) =
            if let Some(hit) = self.memo.get(policy, |known| Arc::ptr_eq(known, what)) {
                hit
            } else {
                let decision = Arc::new(policy.evaluate(&policy::Request {
                    target: self.target.policy_ref(),
                    identity: &self.identity,
                    action: Action::SqlClassified(what),
                }));
                let rules: Arc<[String]> = Arc::from(decision.rules.as_slice());
                self.memo.put(policy, Arc::clone(what), &decision, &rules);
                (decision, rules)
            };
        let class = what.headline().map(|c| Cow::Borrowed(c.name()));
        let (request, refusal) = self
            .enforce(&decision, rules, text, class, on_hold, params)
            .await;
        DecidedSql {
            request,
            refusal,
            decision,
        }
    }

    /// Records and enforces `decision`, made by this session under the policy in force for a
    /// request that read the same as `text`'s (a protocol's own memo of its decisions; `rules`
    /// are the decision's, shared with the event). Recorded and enforced exactly as
    /// [`Conn::decide`] does.
    pub async fn decide_remembered(
        &self,
        decision: Arc<Decision>,
        rules: Arc<[String]>,
        text: &str,
        class: Option<Cow<'static, str>>,
    ) -> DecidedSql {
        let (request, refusal) = self.enforce(&decision, rules, text, class, None, &[]).await;
        DecidedSql {
            request,
            refusal,
            decision,
        }
    }

    /// Like [`Conn::decide`] where no one can wait (during a protocol's login): a request that
    /// needs approval is refused, and recorded as denied.
    pub async fn decide_at_once(&self, policy: &PolicySet, ask: Ask<'_>) -> Decided {
        let mut decision = policy.evaluate(&policy::Request {
            target: self.target.policy_ref(),
            identity: &self.identity,
            action: ask.action,
        });
        if decision.verdict == Verdict::Approve {
            decision.verdict = Verdict::Deny;
            decision.decided = Verdict::Deny;
            decision.message = Some("it needs approval, which cannot be waited for here".into());
        }
        self.apply(decision, ask.text, ask.class).await
    }

    /// Decides the connection itself, before the protocol reads a byte. On a protocol target a
    /// connection grants nothing by itself (each request is judged), so a pass by default is
    /// not recorded as a request; every other decision is.
    pub async fn decide_connect(&self) -> Decided {
        let policy = self.policy();
        let decision = policy.evaluate(&policy::Request {
            target: self.target.policy_ref(),
            identity: &self.identity,
            action: Action::Connect,
        });
        if self.target.protocol != Protocol::Tcp
            && decision.basis == Basis::Default
            && decision.decided == Verdict::Allow
        {
            return Decided {
                request: 0,
                refusal: None,
                decision,
            };
        }
        let text = format!("connect {}", unmatched_name(self.destination));
        self.apply(decision, &text, Some(CONNECT_CLASS.into()))
            .await
    }

    /// Records `decision` (before anything is forwarded: a decision that cannot be recorded
    /// refuses), then enforces it: allow forwards, deny refuses with the policy's message,
    /// approve holds until an admin decides or the approval expires. In observe mode the record
    /// says what would have been enforced, marked observed, and the request is forwarded.
    pub async fn apply(
        &self,
        decision: Decision,
        text: &str,
        class: Option<Cow<'static, str>>,
    ) -> Decided {
        self.apply_telling(decision, text, class, None, &[]).await
    }

    /// [`Conn::apply`], telling `on_hold` the approval's id once the request waits.
    async fn apply_telling(
        &self,
        decision: Decision,
        text: &str,
        class: Option<Cow<'static, str>>,
        on_hold: Option<&(dyn Fn(u64) + Send + Sync)>,
        params: &[Option<String>],
    ) -> Decided {
        let rules = Arc::from(decision.rules.as_slice());
        let (request, refusal) = self
            .enforce(&decision, rules, text, class, on_hold, params)
            .await;
        Decided {
            request,
            refusal,
            decision,
        }
    }

    /// Records `decision` (`rules` are its rule ids, shared with the event) and enforces it:
    /// the request event's id and the refusal, if refused.
    async fn enforce(
        &self,
        decision: &Decision,
        rules: Arc<[String]>,
        text: &str,
        class: Option<Cow<'static, str>>,
        on_hold: Option<&(dyn Fn(u64) + Send + Sync)>,
        params: &[Option<String>],
    ) -> (u64, Option<String>) {
        // The class is needed again only when the request is held.
        let held_class = (decision.verdict == Verdict::Approve).then(|| class.clone());
        let event = EventKind::request(text, class, recorded(decision.decided), rules)
            .observed(decision.observe_only);
        let request = match self.gw.store.append(self.session, event) {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "cannot record a decision; the request is refused");
                return (
                    0,
                    Some(
                        "bulkhead: the gateway cannot record this request, so it is not run".into(),
                    ),
                );
            }
        };
        let refusal = match decision.verdict {
            Verdict::Allow => None,
            Verdict::Deny => Some(decision.message.clone().unwrap_or_else(|| {
                format!("bulkhead: denied by policy ({})", decision.rules.join(", "))
            })),
            Verdict::Approve => {
                self.hold(decision, text, held_class.flatten(), on_hold, params)
                    .await
            }
        };
        (request, refusal)
    }

    /// Holds a request until an admin decides (or it expires); the refusal message unless
    /// approved. The caller reads nothing more from the client meanwhile, so the client simply
    /// waits and later requests keep their order.
    async fn hold(
        &self,
        decision: &Decision,
        text: &str,
        class: Option<Cow<'static, str>>,
        on_hold: Option<&(dyn Fn(u64) + Send + Sync)>,
        params: &[Option<String>],
    ) -> Option<String> {
        let timeout = decision
            .approval_timeout
            .unwrap_or_else(|| self.gw.approvals.default_timeout());
        // Subscribed before asking, so the notice that it waits cannot be missed.
        let mut notices = on_hold.map(|_| self.gw.approvals.subscribe());
        let request = self.gw.approvals.request(ApprovalRequest {
            session: self.session,
            identity: ApprovalIdentity::from(&self.identity),
            target: self.target.name.to_string(),
            protocol: self.target.protocol,
            text: text.to_string(),
            rule: decision.rules.first().cloned().unwrap_or_default(),
            what: decision
                .sql
                .as_deref()
                .map(|c| RequestDetails {
                    classes: c.classes.iter().map(|k| k.name().to_string()).collect(),
                    objects: c.objects.iter().cloned().collect(),
                    functions: c.functions.iter().cloned().collect(),
                    unknown: c.unknown_reasons.clone(),
                    params: params.to_vec(),
                })
                .unwrap_or_else(|| RequestDetails {
                    params: params.to_vec(),
                    ..RequestDetails::default()
                }),
            timeout,
        });
        tokio::pin!(request);
        let outcome = loop {
            let Some(rx) = notices.as_mut() else {
                break request.await;
            };
            tokio::select! {
                outcome = &mut request => break outcome,
                notice = rx.recv() => match notice {
                    Ok(Notice::Requested { approval }) if approval.session == self.session => {
                        if let Some(tell) = on_hold {
                            tell(approval.id);
                        }
                        notices = None;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => notices = None,
                },
            }
        };
        let message = outcome.denial_message()?;
        // The final verdict is a denial: that is what counts the session as denied.
        self.record(
            EventKind::request(
                text,
                class,
                RecordedVerdict::Deny,
                decision.rules.as_slice(),
            )
            .with_error(message.clone()),
        );
        Some(message)
    }
}

/// A decision's verdict as the record spells it.
pub fn recorded(verdict: Verdict) -> RecordedVerdict {
    match verdict {
        Verdict::Allow => RecordedVerdict::Allow,
        Verdict::Deny => RecordedVerdict::Deny,
        Verdict::Approve => RecordedVerdict::Approve,
    }
}
