//! Just-in-time approvals: a request whose verdict is `approve` is held in flight until an
//! admin approves or denies it, it expires, or its client goes away.
//!
//! One [`ApprovalBroker`] is shared by every protocol handler and by the control socket. A
//! handler awaits [`ApprovalBroker::request`]; it reads nothing more from its client meanwhile,
//! so the client simply waits. Every step is an `approval` event in the request's session,
//! written *before* it takes effect (`docs/EVENTS.md`): a handler is released only after its
//! decision is in the store, and a decision that cannot be recorded is a refusal.
//!
//! [`book`] holds the bookkeeping (what waits, which grant windows hold, the limits) as pure
//! code tested without a runtime; this module adds the waiting, the recording and the notices
//! that `approvals watch` streams.

mod book;
mod types;

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use crate::conn_log::{error, info, warn};
use tokio::{
    sync::{broadcast, oneshot},
    time::Instant,
};

use self::book::{Admission, Book, Grant, Held};
pub use self::types::{
    ApprovalError, ApprovalIdentity, ApprovalOutcome, ApprovalRequest, ApprovalState, Approver,
    Decision, GrantInfo, Notice, PendingApproval, RequestDetails,
};
use crate::{
    config::{ApprovalsConfig, MAX_APPROVAL_WAIT},
    record::{bounded, now_micros, EventKind, SessionStore, StoreError},
};

/// Notices buffered for slow `approvals watch` readers before they miss some.
const NOTICE_BUFFER: usize = 256;

/// The facts of one `approval` event besides the request it is about.
#[derive(Debug, Default)]
struct Facts<'a> {
    approval: Option<u64>,
    by: Option<&'a Approver>,
    reason: Option<&'a str>,
    grant: Option<u64>,
    until_us: Option<u64>,
    waited: Option<Duration>,
}

/// What `hold` did with a new request.
enum Hold {
    Waiting {
        id: u64,
        deadline: Instant,
        decided: oneshot::Receiver<ApprovalOutcome>,
    },
    Done(ApprovalOutcome),
}

/// Holds requests for approval, takes admins' decisions, and keeps grant windows.
pub struct ApprovalBroker {
    store: Arc<dyn SessionStore>,
    config: ApprovalsConfig,
    book: Mutex<Book>,
    notices: broadcast::Sender<Notice>,
}

impl ApprovalBroker {
    pub fn new(store: Arc<dyn SessionStore>, config: ApprovalsConfig) -> Self {
        let (notices, _) = broadcast::channel(NOTICE_BUFFER);
        Self {
            store,
            book: Mutex::new(Book::new(&config)),
            config,
            notices,
        }
    }

    /// `[approvals] default_timeout`: for requests whose rule sets no timeout of its own.
    pub fn default_timeout(&self) -> Duration {
        self.config.default_timeout
    }

    /// Holds `req` until it is decided, expires, or is refused, and returns how it ended.
    ///
    /// `requested` is recorded before waiting and the decision before returning. Dropping the
    /// future (the client went away) withdraws the request and records that. When the outcome
    /// is not `Approved`, the handler denies the request with
    /// [`ApprovalOutcome::denial_message`] and records its `request` event as denied.
    pub async fn request(&self, req: ApprovalRequest) -> ApprovalOutcome {
        let (id, deadline, mut decided) = match self.hold(req) {
            Hold::Waiting {
                id,
                deadline,
                decided,
            } => (id, deadline, decided),
            Hold::Done(outcome) => return outcome,
        };
        let mut withdraw = WithdrawOnDrop {
            broker: self,
            id: Some(id),
        };
        let waited = tokio::time::timeout_at(deadline, &mut decided).await;
        withdraw.id = None;
        match waited {
            Ok(Ok(outcome)) => outcome,
            // Every path that removes a request sends on its channel first; this is defensive.
            Ok(Err(_)) => ApprovalOutcome::Refused {
                reason: "the approval was discarded without a decision".into(),
            },
            Err(_) => self.expire(id, &mut decided),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an `approval` event about `req` to its session.
    fn record(
        &self,
        req: &ApprovalRequest,
        state: ApprovalState,
        facts: &Facts<'_>,
    ) -> Result<u64, StoreError> {
        self.store.append(
            req.session,
            EventKind::Approval {
                request: req.text.clone(),
                state: state.as_str().into(),
                by_uid: facts.by.map(|b| b.uid),
                by_user: facts.by.and_then(|b| b.user.clone()),
                reason: facts.reason.map(str::to_string),
                approval: facts.approval,
                target: Some(req.target.clone()),
                rule: Some(req.rule.clone()),
                grant: facts.grant,
                until_us: facts.until_us,
                waited_us: facts.waited.map(micros),
            },
        )
    }

    fn notify(&self, notice: Notice) {
        // Nobody watching is fine.
        let _ = self.notices.send(notice);
    }

    fn notify_decided(
        &self,
        approval: Option<u64>,
        req: &ApprovalRequest,
        state: ApprovalState,
        by: Option<&Approver>,
        reason: Option<&str>,
        grant: Option<u64>,
    ) {
        self.notify(Notice::Decided {
            approval,
            session: req.session,
            state,
            target: req.target.clone(),
            rule: req.rule.clone(),
            by: by.cloned(),
            reason: reason.map(str::to_string),
            grant,
        });
    }

    /// Records a refusal (best effort: the request is refused either way) and says why.
    fn refuse(&self, req: &ApprovalRequest, reason: String) -> Hold {
        warn!(session = req.session.0, rule = %req.rule, "approval refused: {reason}");
        let facts = Facts {
            reason: Some(&reason),
            ..Facts::default()
        };
        if let Err(e) = self.record(req, ApprovalState::Refused, &facts) {
            error!(session = req.session.0, error = %e, "cannot record a refused approval");
        }
        self.notify_decided(None, req, ApprovalState::Refused, None, Some(&reason), None);
        Hold::Done(ApprovalOutcome::Refused { reason })
    }

    /// Admits, records and registers a new request; synchronous, so nothing can interleave.
    fn hold(&self, mut req: ApprovalRequest) -> Hold {
        req.text = bounded(&req.text);
        let timeout = req.timeout.min(MAX_APPROVAL_WAIT);
        let now = Instant::now();
        let now_us = now_micros();
        let mut book = self.book();
        match book.admit(&req, now) {
            Admission::Hold => {}
            Admission::Refused(reason) => return self.refuse(&req, reason),
            Admission::Covered(id) => {
                let Some(grant) = book.grant(id).cloned() else {
                    return self.refuse(&req, format!("grant {id} vanished"));
                };
                let facts = Facts {
                    by: Some(&grant.by),
                    reason: grant.reason.as_deref(),
                    grant: Some(grant.id),
                    until_us: Some(grant.until_us),
                    ..Facts::default()
                };
                if let Err(e) = self.record(&req, ApprovalState::CoveredByGrant, &facts) {
                    return self.refuse(
                        &req,
                        format!("the grant's approval could not be recorded ({e})"),
                    );
                }
                book.use_grant(id);
                drop(book);
                info!(session = req.session.0, grant = id, rule = %req.rule, "approved by a grant window");
                self.notify_decided(
                    None,
                    &req,
                    ApprovalState::CoveredByGrant,
                    Some(&grant.by),
                    grant.reason.as_deref(),
                    Some(id),
                );
                return Hold::Done(ApprovalOutcome::Approved {
                    by: grant.by,
                    reason: grant.reason,
                    grant: Some(id),
                });
            }
        }
        let until_us = now_us.saturating_add(micros(timeout));
        let facts = Facts {
            until_us: Some(until_us),
            ..Facts::default()
        };
        // The approval's id is its `requested` event's id: unique across restarts, so an id
        // seen before a restart can never approve a different request after it.
        let id = match self.record(&req, ApprovalState::Requested, &facts) {
            Ok(id) => id,
            Err(e) => {
                drop(book);
                return self.refuse(&req, format!("the request could not be recorded ({e})"));
            }
        };
        let (decide, decided) = oneshot::channel();
        let deadline = now + timeout;
        let held = Held {
            request: req,
            requested_at: now,
            requested_at_us: now_us,
            deadline,
            decide,
        };
        let view = held.view(id, now);
        book.hold(id, held);
        drop(book);
        info!(
            approval = id,
            session = view.session.0,
            target = %view.target,
            rule = %view.rule,
            "request held for approval"
        );
        self.notify(Notice::Requested { approval: view });
        Hold::Waiting {
            id,
            deadline,
            decided,
        }
    }

    /// The waiter's deadline passed: expire the request, unless an admin decided it first.
    fn expire(&self, id: u64, decided: &mut oneshot::Receiver<ApprovalOutcome>) -> ApprovalOutcome {
        let mut book = self.book();
        let Some(held) = book.withdraw(id) else {
            // Decided under the lock before we took it: the outcome is in the channel.
            drop(book);
            return decided
                .try_recv()
                .unwrap_or_else(|_| ApprovalOutcome::Refused {
                    reason: "the approval was discarded without a decision".into(),
                });
        };
        let after = held.deadline.saturating_duration_since(held.requested_at);
        let reason = format!("no decision within {}", humantime::format_duration(after));
        let facts = Facts {
            approval: Some(id),
            reason: Some(&reason),
            waited: Some(after),
            ..Facts::default()
        };
        if let Err(e) = self.record(&held.request, ApprovalState::Expired, &facts) {
            error!(approval = id, error = %e, "cannot record an expired approval");
        }
        drop(book);
        info!(approval = id, "approval expired; denied");
        self.notify_decided(
            Some(id),
            &held.request,
            ApprovalState::Expired,
            None,
            Some(&reason),
            None,
        );
        ApprovalOutcome::Expired { after }
    }

    /// The waiting future was dropped: its client went away.
    fn withdraw(&self, id: u64) {
        let mut book = self.book();
        let Some(held) = book.withdraw(id) else {
            return; // decided meanwhile; that decision is recorded
        };
        let reason = "the client went away while the request waited";
        let facts = Facts {
            approval: Some(id),
            reason: Some(reason),
            waited: Some(held.requested_at.elapsed()),
            ..Facts::default()
        };
        if let Err(e) = self.record(&held.request, ApprovalState::Withdrawn, &facts) {
            error!(approval = id, error = %e, "cannot record a withdrawn approval");
        }
        drop(book);
        info!(approval = id, "approval withdrawn: the client went away");
        self.notify_decided(
            Some(id),
            &held.request,
            ApprovalState::Withdrawn,
            None,
            Some(reason),
            None,
        );
    }

    /// Records, in the session of pending request `id` (if it is pending), that `approver` tried
    /// to decide it and was refused, and why. The request keeps waiting.
    pub fn refuse_approver(&self, id: u64, approver: &Approver, why: &str) {
        let book = self.book();
        let Some(req) = book.pending_request(id) else {
            return;
        };
        warn!(approval = id, by = %approver, "approver refused: {why}");
        let facts = Facts {
            approval: Some(id),
            by: Some(approver),
            reason: Some(why),
            ..Facts::default()
        };
        if let Err(e) = self.record(req, ApprovalState::ApproverRefused, &facts) {
            error!(approval = id, error = %e, "cannot record a refused approver");
        }
        let notice = Notice::ApproverRefused {
            approval: id,
            session: req.session,
            target: req.target.clone(),
            rule: req.rule.clone(),
            by: approver.clone(),
            reason: why.into(),
        };
        drop(book);
        self.notify(notice);
    }

    /// Requests waiting for a decision, oldest first.
    pub fn list_pending(&self) -> Vec<PendingApproval> {
        self.book().pending(Instant::now())
    }

    /// Approves pending request `id`; with `window`, also approves requests like it (same
    /// uid and executable, target and rule) until the window ends.
    pub fn approve(
        &self,
        id: u64,
        approver: Approver,
        reason: Option<String>,
        window: Option<Duration>,
    ) -> Result<Decision, ApprovalError> {
        if let Some(w) = window {
            check_window(w)?;
        }
        let reason = clean_reason(reason);
        let now = Instant::now();
        let now_us = now_micros();
        let mut book = self.book();
        // The governed user could run the CLI from a process outside the cgroup (a service of
        // its own, a second login): a request is never approved by its own process's user.
        // Root is the exception: a governed root process (`bulkhead run --allow-root`) is not
        // contained anyway (it can leave the cgroup, stop the daemon, rewrite the store), so
        // refusing root approvers would stop only the admins, not it.
        if book
            .pending_request(id)
            .is_some_and(|r| r.identity.uid == approver.uid && r.identity.uid != 0)
        {
            drop(book);
            self.refuse_approver(
                id,
                &approver,
                "the approver is the user whose process made the request",
            );
            return Err(ApprovalError::SelfApproval { id, approver });
        }
        let held = book.take(id, now)?;
        let view = held.view(id, now);
        let (grant, note) = match window {
            Some(w) if held.request.identity.exe.is_some() => (
                Some(Grant {
                    id,
                    request: held.request.clone(),
                    by: approver.clone(),
                    reason: reason.clone(),
                    granted_at_us: now_us,
                    until: now + w,
                    until_us: now_us.saturating_add(micros(w)),
                    uses: 0,
                }),
                None,
            ),
            Some(_) => (
                None,
                Some(
                    "no grant window opened: the process's executable is unknown, so a window \
                     could not be tied to it; only this request is approved"
                        .to_string(),
                ),
            ),
            None => (None, None),
        };
        let facts = Facts {
            approval: Some(id),
            by: Some(&approver),
            reason: reason.as_deref(),
            grant: grant.as_ref().map(|g| g.id),
            until_us: grant.as_ref().map(|g| g.until_us),
            waited: Some(now.saturating_duration_since(held.requested_at)),
        };
        if let Err(source) = self.record(&held.request, ApprovalState::Approved, &facts) {
            error!(approval = id, error = %source, "cannot record an approval; refusing the request");
            let _ = held.decide.send(ApprovalOutcome::Refused {
                reason: "approved, but the approval could not be recorded".into(),
            });
            return Err(ApprovalError::Unrecorded { id, error: source });
        }
        let grant = grant.map(|g| {
            let info = g.info(now);
            book.add_grant(g);
            info
        });
        // The waiter may have gone; its request is approved in the record either way.
        let _ = held.decide.send(ApprovalOutcome::Approved {
            by: approver.clone(),
            reason: reason.clone(),
            grant: grant.as_ref().map(|g| g.id),
        });
        drop(book);
        info!(approval = id, by = %approver, window = ?window, "approved");
        self.notify_decided(
            Some(id),
            &held.request,
            ApprovalState::Approved,
            Some(&approver),
            reason.as_deref(),
            grant.as_ref().map(|g| g.id),
        );
        Ok(Decision {
            approval: view,
            state: ApprovalState::Approved,
            by: approver,
            reason,
            grant,
            note,
        })
    }

    /// Denies pending request `id`; `reason` is recorded and shown to the client.
    pub fn deny(
        &self,
        id: u64,
        approver: Approver,
        reason: Option<String>,
    ) -> Result<Decision, ApprovalError> {
        let reason = clean_reason(reason);
        let now = Instant::now();
        let mut book = self.book();
        let held = book.take(id, now)?;
        let view = held.view(id, now);
        let facts = Facts {
            approval: Some(id),
            by: Some(&approver),
            reason: reason.as_deref(),
            waited: Some(now.saturating_duration_since(held.requested_at)),
            ..Facts::default()
        };
        let recorded = self.record(&held.request, ApprovalState::Denied, &facts);
        let outcome = ApprovalOutcome::Denied {
            by: approver.clone(),
            reason: reason.clone(),
        };
        // Denied either way; only the admin's answer differs.
        let _ = held.decide.send(outcome);
        drop(book);
        if let Err(source) = recorded {
            error!(approval = id, error = %source, "cannot record a denial");
            return Err(ApprovalError::Unrecorded { id, error: source });
        }
        info!(approval = id, by = %approver, "denied");
        self.notify_decided(
            Some(id),
            &held.request,
            ApprovalState::Denied,
            Some(&approver),
            reason.as_deref(),
            None,
        );
        Ok(Decision {
            approval: view,
            state: ApprovalState::Denied,
            by: approver,
            reason,
            grant: None,
            note: None,
        })
    }

    /// Grant windows still open, oldest first.
    pub fn grants(&self) -> Vec<GrantInfo> {
        self.book().grants(Instant::now())
    }

    /// Ends grant window `grant` now; recorded in the session it was approved in.
    pub fn revoke(&self, grant: u64, approver: Approver) -> Result<GrantInfo, ApprovalError> {
        let now = Instant::now();
        let mut book = self.book();
        let g = book.revoke(grant, now)?;
        let facts = Facts {
            approval: Some(g.id),
            by: Some(&approver),
            grant: Some(g.id),
            until_us: Some(g.until_us),
            ..Facts::default()
        };
        let recorded = self.record(&g.request, ApprovalState::Revoked, &facts);
        drop(book);
        let info = g.info(now);
        // Revoked either way: failing to record must not keep a window open.
        if let Err(source) = recorded {
            error!(grant, error = %source, "cannot record a revoked grant");
            return Err(ApprovalError::RevokeUnrecorded {
                grant,
                error: source,
            });
        }
        info!(grant, by = %approver, "grant revoked");
        self.notify(Notice::Revoked {
            grant: info.clone(),
            by: approver,
        });
        Ok(info)
    }

    /// New pending requests and decisions, for `approvals watch`.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Refuses everything that waits and everything new: the daemon is stopping, and nobody
    /// could approve afterwards. Called before the drain so held sessions can end in it.
    pub fn shutdown(&self) {
        let reason = "the daemon is stopping; nobody can approve this request now";
        let waiting = self.book().close(reason);
        for (id, held) in waiting {
            let facts = Facts {
                approval: Some(id),
                reason: Some(reason),
                waited: Some(held.requested_at.elapsed()),
                ..Facts::default()
            };
            if let Err(e) = self.record(&held.request, ApprovalState::Refused, &facts) {
                error!(approval = id, error = %e, "cannot record a refused approval");
            }
            self.notify_decided(
                Some(id),
                &held.request,
                ApprovalState::Refused,
                None,
                Some(reason),
                None,
            );
            let _ = held.decide.send(ApprovalOutcome::Refused {
                reason: reason.into(),
            });
        }
    }
}

/// Withdraws a held request when the future waiting for it is dropped mid-wait.
struct WithdrawOnDrop<'a> {
    broker: &'a ApprovalBroker,
    id: Option<u64>,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.broker.withdraw(id);
        }
    }
}

fn check_window(w: Duration) -> Result<(), ApprovalError> {
    if w.is_zero() {
        return Err(ApprovalError::Window("must be longer than zero".into()));
    }
    if w > MAX_APPROVAL_WAIT {
        return Err(ApprovalError::Window(format!(
            "{} is longer than the most allowed, {}",
            humantime::format_duration(w),
            humantime::format_duration(MAX_APPROVAL_WAIT)
        )));
    }
    Ok(())
}

/// A reason as recorded: bounded, and none rather than blank.
fn clean_reason(reason: Option<String>) -> Option<String> {
    reason
        .filter(|r| !r.trim().is_empty())
        .map(|r| bounded(r.trim()))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
