//! The broker's bookkeeping: which requests wait, which grant windows hold, and whether a new
//! request may wait at all. No I/O, no clock and no runtime: every function is given `now`, so
//! the decision logic, grant matching and limits are tested with made-up instants.

use std::collections::BTreeMap;

use tokio::{sync::oneshot, time::Instant};

use super::{
    micros, ApprovalError, ApprovalOutcome, ApprovalRequest, Approver, GrantInfo, PendingApproval,
};
use crate::{config::ApprovalsConfig, record::MAX_EVENT_TEXT};

/// A request waiting for a decision.
#[derive(Debug)]
pub(super) struct Held {
    /// Text already bounded for the record.
    pub request: ApprovalRequest,
    pub requested_at: Instant,
    pub requested_at_us: u64,
    pub deadline: Instant,
    /// Wakes the waiting handler with the decision.
    pub decide: oneshot::Sender<ApprovalOutcome>,
}

impl Held {
    pub fn view(&self, id: u64, now: Instant) -> PendingApproval {
        let r = &self.request;
        PendingApproval {
            id,
            session: r.session,
            identity: r.identity.clone(),
            target: r.target.clone(),
            protocol: r.protocol,
            text: r.text.clone(),
            rule: r.rule.clone(),
            what: r.what.clone(),
            requested_at_us: self.requested_at_us,
            expires_at_us: self.requested_at_us.saturating_add(micros(
                self.deadline.saturating_duration_since(self.requested_at),
            )),
            age_ms: millis(now.saturating_duration_since(self.requested_at)),
            expires_in_ms: millis(self.deadline.saturating_duration_since(now)),
        }
    }
}

/// A window in which requests like an approved one are approved without asking.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    /// The id of the approval that opened it.
    pub id: u64,
    /// The approved request: who, where, which rule, and the session it was approved in.
    pub request: ApprovalRequest,
    pub by: Approver,
    pub reason: Option<String>,
    pub granted_at_us: u64,
    pub until: Instant,
    pub until_us: u64,
    pub uses: u64,
}

impl Grant {
    /// Whether `req` is like the approved request: same uid, same known executable, same
    /// target, protocol and rule. A different rule or target always asks a human again, and
    /// a process whose executable is unknown is never covered (a uid alone is too broad).
    pub fn covers(&self, req: &ApprovalRequest, now: Instant) -> bool {
        let mine = &self.request;
        now < self.until
            && req.identity.uid == mine.identity.uid
            && req.identity.exe.is_some()
            && req.identity.exe == mine.identity.exe
            && req.target == mine.target
            && req.protocol == mine.protocol
            && req.rule == mine.rule
    }

    pub fn info(&self, now: Instant) -> GrantInfo {
        let r = &self.request;
        GrantInfo {
            id: self.id,
            session: r.session,
            identity: r.identity.clone(),
            target: r.target.clone(),
            protocol: r.protocol,
            rule: r.rule.clone(),
            text: r.text.clone(),
            by: self.by.clone(),
            reason: self.reason.clone(),
            granted_at_us: self.granted_at_us,
            until_us: self.until_us,
            remaining_ms: millis(self.until.saturating_duration_since(now)),
            uses: self.uses,
        }
    }
}

/// What happens to a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Admission {
    /// A grant window covers it: approved without asking.
    Covered(u64),
    /// It may not wait: a limit is reached, or the broker is closed.
    Refused(String),
    /// It waits for an admin.
    Hold,
}

#[derive(Debug)]
pub(super) struct Book {
    max_per_identity: usize,
    max_total: usize,
    pending: BTreeMap<u64, Held>,
    grants: BTreeMap<u64, Grant>,
    /// Set when the daemon stops: nothing new is held.
    closed: Option<String>,
}

impl Book {
    pub fn new(config: &ApprovalsConfig) -> Self {
        Self {
            max_per_identity: config.max_pending_per_identity,
            max_total: config.max_pending,
            pending: BTreeMap::new(),
            grants: BTreeMap::new(),
            closed: None,
        }
    }

    /// Decides whether `req` is covered by a grant, refused, or held.
    pub fn admit(&mut self, req: &ApprovalRequest, now: Instant) -> Admission {
        if let Some(reason) = &self.closed {
            return Admission::Refused(reason.clone());
        }
        // Matching is exact, so these are refused rather than cut (two cut names could match).
        for (what, value) in [("target name", &req.target), ("rule id", &req.rule)] {
            if value.len() > MAX_EVENT_TEXT {
                return Admission::Refused(format!(
                    "the {what} is longer than {MAX_EVENT_TEXT} bytes"
                ));
            }
        }
        self.prune_grants(now);
        if let Some(g) = self.grants.values().find(|g| g.covers(req, now)) {
            return Admission::Covered(g.id);
        }
        if self.pending.len() >= self.max_total {
            return Admission::Refused(format!(
                "{} approvals are already pending on this host (approvals.max_pending = {}); \
                 an admin must answer some first",
                self.pending.len(),
                self.max_total
            ));
        }
        let who = &req.identity;
        let mine = self
            .pending
            .values()
            .filter(|h| h.request.identity.uid == who.uid && h.request.identity.exe == who.exe)
            .count();
        if mine >= self.max_per_identity {
            return Admission::Refused(format!(
                "uid {} ({}) already has {mine} approvals pending \
                 (approvals.max_pending_per_identity = {})",
                who.uid,
                who.exe.as_deref().unwrap_or(&who.comm),
                self.max_per_identity
            ));
        }
        Admission::Hold
    }

    pub fn hold(&mut self, id: u64, held: Held) {
        self.pending.insert(id, held);
    }

    /// Takes a pending request for an admin's decision. One whose deadline has passed stays:
    /// its waiter records it as expired, and no admin may decide it any more.
    pub fn take(&mut self, id: u64, now: Instant) -> Result<Held, ApprovalError> {
        match self.pending.get(&id) {
            None => Err(ApprovalError::UnknownApproval(id)),
            Some(h) if now >= h.deadline => Err(ApprovalError::AlreadyExpired(id)),
            Some(_) => self
                .pending
                .remove(&id)
                .ok_or(ApprovalError::UnknownApproval(id)),
        }
    }

    /// The pending request `id`, left pending.
    pub fn pending_request(&self, id: u64) -> Option<&ApprovalRequest> {
        self.pending.get(&id).map(|h| &h.request)
    }

    /// Removes a pending request whatever its deadline (expiry, a client gone).
    pub fn withdraw(&mut self, id: u64) -> Option<Held> {
        self.pending.remove(&id)
    }

    pub fn grant(&self, id: u64) -> Option<&Grant> {
        self.grants.get(&id)
    }

    pub fn use_grant(&mut self, id: u64) {
        if let Some(g) = self.grants.get_mut(&id) {
            g.uses += 1;
        }
    }

    pub fn add_grant(&mut self, grant: Grant) {
        self.grants.insert(grant.id, grant);
    }

    /// Ends a grant early. One that already ended is unknown.
    pub fn revoke(&mut self, id: u64, now: Instant) -> Result<Grant, ApprovalError> {
        self.prune_grants(now);
        self.grants
            .remove(&id)
            .ok_or(ApprovalError::UnknownGrant(id))
    }

    fn prune_grants(&mut self, now: Instant) {
        self.grants.retain(|_, g| now < g.until);
    }

    /// Pending requests, oldest first.
    pub fn pending(&self, now: Instant) -> Vec<PendingApproval> {
        self.pending
            .iter()
            .map(|(id, h)| h.view(*id, now))
            .collect()
    }

    #[cfg(test)]
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Grants still open, oldest first.
    pub fn grants(&mut self, now: Instant) -> Vec<GrantInfo> {
        self.prune_grants(now);
        self.grants.values().map(|g| g.info(now)).collect()
    }

    /// Refuses everything new from now on and hands back what was waiting.
    pub fn close(&mut self, reason: &str) -> Vec<(u64, Held)> {
        self.closed = Some(reason.to_string());
        std::mem::take(&mut self.pending).into_iter().collect()
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{approval::ApprovalIdentity, protocol::Protocol, record::SessionId};

    fn config(per_identity: usize, total: usize) -> ApprovalsConfig {
        ApprovalsConfig {
            default_timeout: Duration::from_mins(5),
            max_pending_per_identity: per_identity,
            max_pending: total,
        }
    }

    fn request(uid: u32, exe: Option<&str>, target: &str, rule: &str) -> ApprovalRequest {
        ApprovalRequest {
            session: SessionId(1),
            identity: ApprovalIdentity {
                uid,
                user: None,
                exe: exe.map(str::to_string),
                comm: "tool".into(),
            },
            target: target.into(),
            protocol: Protocol::Postgres,
            text: "DELETE FROM orders".into(),
            rule: rule.into(),
            what: crate::approval::RequestDetails::default(),
            timeout: Duration::from_mins(5),
        }
    }

    fn held(req: ApprovalRequest, now: Instant) -> Held {
        let timeout = req.timeout;
        Held {
            request: req,
            requested_at: now,
            requested_at_us: 1_000_000,
            deadline: now + timeout,
            decide: oneshot::channel().0,
        }
    }

    fn grant(id: u64, req: ApprovalRequest, until: Instant) -> Grant {
        Grant {
            id,
            request: req,
            by: Approver {
                uid: 0,
                user: Some("root".into()),
            },
            reason: None,
            granted_at_us: 0,
            until,
            until_us: 0,
            uses: 0,
        }
    }

    #[test]
    fn a_grant_covers_only_the_same_identity_target_protocol_and_rule() {
        let now = Instant::now();
        let approved = request(1000, Some("/usr/bin/python3"), "orders-db", "deletes");
        let g = grant(1, approved.clone(), now + Duration::from_mins(1));
        assert!(g.covers(&approved, now));
        let mut other_text = approved.clone();
        other_text.text = "DELETE FROM orders WHERE id = 2".into();
        assert!(g.covers(&other_text, now), "the text may differ");
        for (why, req) in [
            (
                "rule",
                request(1000, Some("/usr/bin/python3"), "orders-db", "drops"),
            ),
            (
                "target",
                request(1000, Some("/usr/bin/python3"), "billing-db", "deletes"),
            ),
            (
                "uid",
                request(1001, Some("/usr/bin/python3"), "orders-db", "deletes"),
            ),
            (
                "exe",
                request(1000, Some("/usr/bin/perl"), "orders-db", "deletes"),
            ),
            ("unknown exe", request(1000, None, "orders-db", "deletes")),
        ] {
            assert!(!g.covers(&req, now), "a different {why} is not covered");
        }
        let mut ssh = approved.clone();
        ssh.protocol = Protocol::Ssh;
        assert!(!g.covers(&ssh, now), "a different protocol is not covered");
        assert!(
            !g.covers(&approved, now + Duration::from_mins(1)),
            "the window ends"
        );
    }

    #[test]
    fn a_covered_request_is_admitted_without_a_pending_slot() {
        let now = Instant::now();
        let mut book = Book::new(&config(1, 1));
        let req = request(1000, Some("/bin/tool"), "db", "r");
        book.hold(7, held(req.clone(), now));
        book.add_grant(grant(3, req.clone(), now + Duration::from_mins(1)));
        assert_eq!(book.admit(&req, now), Admission::Covered(3));
        let later = now + Duration::from_secs(61);
        assert!(
            matches!(book.admit(&req, later), Admission::Refused(_)),
            "after the window, the limits apply again"
        );
        assert!(book.grants(later).is_empty(), "ended grants are dropped");
    }

    #[test]
    fn limits_refuse_per_identity_and_in_total() {
        let now = Instant::now();
        let mut book = Book::new(&config(2, 3));
        let a = request(1000, Some("/bin/a"), "db", "r");
        let b = request(1000, Some("/bin/b"), "db", "r");
        assert_eq!(book.admit(&a, now), Admission::Hold);
        book.hold(1, held(a.clone(), now));
        book.hold(2, held(a.clone(), now));
        let Admission::Refused(why) = book.admit(&a, now) else {
            panic!("a third request from the same identity must be refused");
        };
        assert!(
            why.contains("max_pending_per_identity") && why.contains("/bin/a"),
            "{why}"
        );
        assert_eq!(
            book.admit(&b, now),
            Admission::Hold,
            "another exe is another identity"
        );
        book.hold(3, held(b.clone(), now));
        let Admission::Refused(why) = book.admit(&b, now) else {
            panic!("a fourth request on the host must be refused");
        };
        assert!(why.contains("approvals.max_pending ="), "{why}");
        book.withdraw(1);
        assert_eq!(book.admit(&b, now), Admission::Hold);
    }

    #[test]
    fn expired_or_unknown_requests_cannot_be_taken() {
        let now = Instant::now();
        let mut book = Book::new(&config(5, 5));
        book.hold(4, held(request(1, Some("/x"), "db", "r"), now));
        assert!(matches!(
            book.take(5, now),
            Err(ApprovalError::UnknownApproval(5))
        ));
        assert!(matches!(
            book.take(4, now + Duration::from_mins(5)),
            Err(ApprovalError::AlreadyExpired(4))
        ));
        assert_eq!(book.pending_count(), 1, "the waiter records the expiry");
        assert!(book.take(4, now + Duration::from_secs(299)).is_ok());
        assert!(matches!(
            book.take(4, now),
            Err(ApprovalError::UnknownApproval(4))
        ));
    }

    #[test]
    fn the_pending_view_shows_age_and_expiry() {
        let now = Instant::now();
        let mut book = Book::new(&config(5, 5));
        book.hold(9, held(request(1, Some("/x"), "db", "r"), now));
        let view = book.pending(now + Duration::from_mins(1));
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].id, 9);
        assert_eq!(view[0].age_ms, 60_000);
        assert_eq!(view[0].expires_in_ms, 240_000);
        assert_eq!(view[0].expires_at_us, 1_000_000 + 300_000_000);
    }

    #[test]
    fn revoking_removes_the_grant_and_unknown_grants_are_errors() {
        let now = Instant::now();
        let mut book = Book::new(&config(5, 5));
        let req = request(1, Some("/x"), "db", "r");
        book.add_grant(grant(2, req.clone(), now + Duration::from_secs(10)));
        assert!(matches!(
            book.revoke(3, now),
            Err(ApprovalError::UnknownGrant(3))
        ));
        assert_eq!(book.revoke(2, now).map(|g| g.id).ok(), Some(2));
        assert_eq!(book.admit(&req, now), Admission::Hold);
    }

    #[test]
    fn a_closed_book_refuses_everything_and_hands_back_what_waited() {
        let now = Instant::now();
        let mut book = Book::new(&config(5, 5));
        let req = request(1, Some("/x"), "db", "r");
        book.hold(1, held(req.clone(), now));
        let waiting = book.close("stopping");
        assert_eq!(waiting.len(), 1);
        assert_eq!(book.admit(&req, now), Admission::Refused("stopping".into()));
    }

    #[test]
    fn overlong_names_are_refused_not_cut() {
        let now = Instant::now();
        let mut book = Book::new(&config(5, 5));
        let req = request(1, Some("/x"), &"t".repeat(MAX_EVENT_TEXT + 1), "r");
        assert!(matches!(book.admit(&req, now), Admission::Refused(_)));
    }
}
