//! The broker with a real (temporary) store and tokio's paused clock: each test drives one
//! path of a held request and checks both what the handler gets and what the record says.

use std::{sync::Arc, time::Duration};

use tokio::{sync::broadcast, task::JoinHandle};

use super::*;
use crate::{
    identity::ProcessIdentity,
    net::{ClientAddr, OrigDstAddr},
    protocol::Protocol,
    record::{Event, NewSession, SessionId, SledStore},
};

const FIVE_MIN: Duration = Duration::from_mins(5);

struct Fixture {
    broker: Arc<ApprovalBroker>,
    store: Arc<SledStore>,
    session: SessionId,
    notices: broadcast::Receiver<Notice>,
}

fn fixture_with(per_identity: usize, total: usize) -> Fixture {
    let store = Arc::new(SledStore::temporary().unwrap());
    let session = store
        .open(NewSession {
            started_at_us: now_micros(),
            client: ClientAddr("127.0.0.1:40000".parse().unwrap()),
            destination: OrigDstAddr("10.0.0.5:5432".parse().unwrap()),
            target: Some("orders-db".into()),
            protocol: Protocol::Postgres,
            identity: ProcessIdentity::default(),
        })
        .unwrap();
    let shared: Arc<dyn SessionStore> = store.clone();
    let broker = Arc::new(ApprovalBroker::new(
        shared,
        ApprovalsConfig {
            default_timeout: FIVE_MIN,
            max_pending_per_identity: per_identity,
            max_pending: total,
        },
    ));
    let notices = broker.subscribe();
    Fixture {
        broker,
        store,
        session,
        notices,
    }
}

fn fixture() -> Fixture {
    fixture_with(5, 100)
}

fn alice() -> Approver {
    Approver {
        uid: 1000,
        user: Some("alice".into()),
    }
}

impl Fixture {
    fn request(&self, rule: &str, target: &str) -> ApprovalRequest {
        ApprovalRequest {
            session: self.session,
            identity: ApprovalIdentity {
                uid: 2000,
                user: Some("agent".into()),
                exe: Some("/usr/bin/python3".into()),
                comm: "python3".into(),
            },
            target: target.into(),
            protocol: Protocol::Postgres,
            text: "DELETE FROM orders WHERE created < now() - interval '1 year'".into(),
            rule: rule.into(),
            what: crate::approval::RequestDetails::default(),
            timeout: FIVE_MIN,
        }
    }

    /// Starts `req` waiting in its own task, as a protocol handler would, and returns its
    /// approval id once it is pending.
    async fn held(&mut self, req: ApprovalRequest) -> (u64, JoinHandle<ApprovalOutcome>) {
        // Earlier steps' notices are not about this request.
        while self.notices.try_recv().is_ok() {}
        let broker = Arc::clone(&self.broker);
        let task = tokio::spawn(async move { broker.request(req).await });
        match self.notices.recv().await.unwrap() {
            Notice::Requested { approval } => (approval.id, task),
            other => panic!("expected a pending request, got {other:?}"),
        }
    }

    /// The session's approval events, in order.
    fn approvals(&self) -> Vec<Event> {
        self.store
            .events(self.session)
            .unwrap()
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::Approval { .. }))
            .collect()
    }

    fn states(&self) -> Vec<String> {
        self.approvals()
            .into_iter()
            .map(|e| match e.kind {
                EventKind::Approval { state, .. } => state,
                _ => unreachable!(),
            })
            .collect()
    }
}

/// state, approval, `by_uid`, `by_user`, reason, grant.
type Fields<'a> = (
    &'a str,
    Option<u64>,
    Option<u32>,
    Option<&'a str>,
    Option<&'a str>,
    Option<u64>,
);

/// The fields of an approval event, for assertions.
fn fields(e: &Event) -> Fields<'_> {
    let EventKind::Approval {
        state,
        approval,
        by_uid,
        by_user,
        reason,
        grant,
        ..
    } = &e.kind
    else {
        panic!("not an approval event: {e:?}");
    };
    (
        state,
        *approval,
        *by_uid,
        by_user.as_deref(),
        reason.as_deref(),
        *grant,
    )
}

#[tokio::test(start_paused = true)]
async fn approve_releases_the_waiting_request_and_both_steps_are_recorded() {
    let mut f = fixture();
    let req = f.request("deletes-need-approval", "orders-db");
    let (id, task) = f.held(req.clone()).await;

    let pending = f.broker.list_pending();
    assert_eq!(pending.len(), 1);
    let p = &pending[0];
    assert_eq!((p.id, p.session), (id, f.session));
    assert_eq!(p.identity.exe.as_deref(), Some("/usr/bin/python3"));
    assert_eq!(
        (p.target.as_str(), p.rule.as_str(), p.text.as_str()),
        ("orders-db", "deletes-need-approval", req.text.as_str())
    );
    assert_eq!(p.expires_at_us - p.requested_at_us, 300_000_000);
    assert!(!task.is_finished(), "the request waits for a human");

    let decision = f
        .broker
        .approve(id, alice(), Some("  yearly cleanup  ".into()), None)
        .unwrap();
    assert_eq!(decision.state, ApprovalState::Approved);
    assert!(decision.grant.is_none());
    let outcome = task.await.unwrap();
    assert_eq!(
        outcome,
        ApprovalOutcome::Approved {
            by: alice(),
            reason: Some("yearly cleanup".into()),
            grant: None
        }
    );
    assert!(outcome.is_approved() && outcome.denial_message().is_none());
    assert!(f.broker.list_pending().is_empty());

    let events = f.approvals();
    assert_eq!(events.len(), 2);
    let EventKind::Approval {
        request,
        target,
        rule,
        until_us,
        ..
    } = &events[0].kind
    else {
        unreachable!()
    };
    assert_eq!(fields(&events[0]).0, "requested");
    assert_eq!(
        events[0].id, id,
        "the approval id is the requested event's id"
    );
    assert_eq!(request, &req.text);
    assert_eq!(target.as_deref(), Some("orders-db"));
    assert_eq!(rule.as_deref(), Some("deletes-need-approval"));
    assert!(until_us.is_some());
    assert_eq!(
        fields(&events[1]),
        (
            "approved",
            Some(id),
            Some(1000),
            Some("alice"),
            Some("yearly cleanup"),
            None
        )
    );
    let EventKind::Approval { waited_us, .. } = &events[1].kind else {
        unreachable!()
    };
    assert!(waited_us.is_some());
    assert!(matches!(
        f.broker.approve(id, alice(), None, None),
        Err(ApprovalError::UnknownApproval(i)) if i == id
    ));
}

#[tokio::test(start_paused = true)]
async fn deny_returns_the_reason_to_the_handler() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    f.broker
        .deny(id, alice(), Some("not during business hours".into()))
        .unwrap();
    let outcome = task.await.unwrap();
    assert_eq!(
        outcome,
        ApprovalOutcome::Denied {
            by: alice(),
            reason: Some("not during business hours".into())
        }
    );
    assert_eq!(
        outcome.denial_message().as_deref(),
        Some("denied by alice (uid 1000): not during business hours")
    );
    let events = f.approvals();
    assert_eq!(
        fields(&events[1]),
        (
            "denied",
            Some(id),
            Some(1000),
            Some("alice"),
            Some("not during business hours"),
            None
        )
    );
}

#[tokio::test(start_paused = true)]
async fn an_undecided_request_expires_as_a_deny() {
    let mut f = fixture();
    let mut req = f.request("r", "orders-db");
    req.timeout = Duration::from_secs(90);
    let start = Instant::now();
    let (id, task) = f.held(req).await;
    let outcome = task.await.unwrap();
    assert_eq!(
        outcome,
        ApprovalOutcome::Expired {
            after: Duration::from_secs(90)
        }
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(90),
        "waited exactly the timeout"
    );
    let message = outcome.denial_message().unwrap();
    assert!(message.contains("expired after 1m 30s"), "{message}");
    assert!(f.broker.list_pending().is_empty());
    assert!(matches!(
        f.broker.approve(id, alice(), None, None),
        Err(ApprovalError::UnknownApproval(_))
    ));
    let events = f.approvals();
    let (state, approval, by_uid, _, reason, _) = fields(&events[1]);
    assert_eq!((state, approval, by_uid), ("expired", Some(id), None));
    assert!(reason.unwrap().contains("1m 30s"));
}

#[tokio::test(start_paused = true)]
async fn a_grant_window_approves_the_same_request_without_asking_and_nothing_else() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("deletes", "orders-db")).await;
    let decision = f
        .broker
        .approve(
            id,
            alice(),
            Some("migration".into()),
            Some(Duration::from_mins(15)),
        )
        .unwrap();
    let grant = decision.grant.expect("a window was asked for");
    assert_eq!(grant.id, id);
    assert_eq!(grant.until_us - grant.granted_at_us, 900_000_000);
    assert_eq!(
        task.await.unwrap(),
        ApprovalOutcome::Approved {
            by: alice(),
            reason: Some("migration".into()),
            grant: Some(id)
        }
    );

    // Same identity, target and rule, other text: approved at once, by the grant.
    let mut again = f.request("deletes", "orders-db");
    again.text = "DELETE FROM orders WHERE id = 7".into();
    let outcome = f.broker.request(again).await;
    assert_eq!(
        outcome,
        ApprovalOutcome::Approved {
            by: alice(),
            reason: Some("migration".into()),
            grant: Some(id)
        }
    );
    assert_eq!(f.broker.grants()[0].uses, 1);
    assert!(f.broker.list_pending().is_empty());

    // Another rule or another target asks a human again.
    let (other_rule, t1) = f.held(f.request("drops", "orders-db")).await;
    let (other_target, t2) = f.held(f.request("deletes", "billing-db")).await;
    assert_eq!(f.broker.list_pending().len(), 2);
    f.broker.deny(other_rule, alice(), None).unwrap();
    f.broker.deny(other_target, alice(), None).unwrap();
    assert!(matches!(t1.await.unwrap(), ApprovalOutcome::Denied { .. }));
    assert!(matches!(t2.await.unwrap(), ApprovalOutcome::Denied { .. }));

    let events = f.approvals();
    assert_eq!(
        fields(&events[1]),
        (
            "approved",
            Some(id),
            Some(1000),
            Some("alice"),
            Some("migration"),
            Some(id)
        )
    );
    assert_eq!(
        fields(&events[2]),
        (
            "covered_by_grant",
            None,
            Some(1000),
            Some("alice"),
            Some("migration"),
            Some(id)
        )
    );
    let EventKind::Approval { request, .. } = &events[2].kind else {
        unreachable!()
    };
    assert_eq!(request, "DELETE FROM orders WHERE id = 7");
}

#[tokio::test(start_paused = true)]
async fn a_grant_window_ends_on_time() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    f.broker
        .approve(id, alice(), None, Some(Duration::from_mins(1)))
        .unwrap();
    task.await.unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(f.broker.grants().is_empty());
    let (again, task) = f.held(f.request("r", "orders-db")).await;
    f.broker.deny(again, alice(), None).unwrap();
    assert!(matches!(
        task.await.unwrap(),
        ApprovalOutcome::Denied { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn revoke_ends_a_grant_early_and_is_recorded() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    f.broker
        .approve(id, alice(), None, Some(Duration::from_hours(1)))
        .unwrap();
    task.await.unwrap();
    assert_eq!(f.broker.grants().len(), 1);

    let bob = Approver {
        uid: 1001,
        user: Some("bob".into()),
    };
    let revoked = f.broker.revoke(id, bob.clone()).unwrap();
    assert_eq!(revoked.id, id);
    assert!(f.broker.grants().is_empty());
    assert!(matches!(
        f.broker.revoke(id, bob.clone()),
        Err(ApprovalError::UnknownGrant(i)) if i == id
    ));

    let (again, task) = f.held(f.request("r", "orders-db")).await;
    assert_ne!(again, id);
    f.broker.deny(again, bob, None).unwrap();
    task.await.unwrap();

    let events = f.approvals();
    assert_eq!(
        fields(&events[2]),
        ("revoked", Some(id), Some(1001), Some("bob"), None, Some(id))
    );
}

#[tokio::test(start_paused = true)]
async fn limits_refuse_requests_past_the_maximum() {
    let mut f = fixture_with(2, 3);
    let (a, ta) = f.held(f.request("r", "orders-db")).await;
    let (_b, tb) = f.held(f.request("r", "orders-db")).await;
    let third = f.broker.request(f.request("r", "orders-db")).await;
    let ApprovalOutcome::Refused { reason } = &third else {
        panic!("expected a refusal, got {third:?}");
    };
    assert!(reason.contains("max_pending_per_identity"), "{reason}");
    assert!(third.denial_message().unwrap().contains(reason.as_str()));

    let mut other = f.request("r", "orders-db");
    other.identity.exe = Some("/usr/bin/node".into());
    let (_c, tc) = f.held(other.clone()).await;
    let fourth = f.broker.request(other).await;
    assert!(
        matches!(&fourth, ApprovalOutcome::Refused { reason } if reason.contains("approvals.max_pending =")),
        "{fourth:?}"
    );
    assert_eq!(f.broker.list_pending().len(), 3);

    f.broker.approve(a, alice(), None, None).unwrap();
    ta.await.unwrap();
    assert_eq!(f.broker.list_pending().len(), 2);
    let states = f.states();
    assert_eq!(
        states.iter().filter(|s| *s == "refused").count(),
        2,
        "{states:?}"
    );
    tb.abort();
    tc.abort();
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_client_went_away_is_withdrawn_and_recorded() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(f.broker.list_pending().is_empty());
    assert!(matches!(
        f.broker.approve(id, alice(), None, None),
        Err(ApprovalError::UnknownApproval(_))
    ));
    let events = f.approvals();
    let (state, approval, by_uid, _, reason, _) = fields(&events[1]);
    assert_eq!((state, approval, by_uid), ("withdrawn", Some(id), None));
    assert!(reason.unwrap().contains("went away"));
    loop {
        if let Notice::Decided { state, .. } = f.notices.recv().await.unwrap() {
            assert_eq!(state, ApprovalState::Withdrawn);
            break;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn watchers_see_requests_and_decisions() {
    let mut f = fixture();
    let mut watcher = f.broker.subscribe();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    f.broker.approve(id, alice(), None, None).unwrap();
    task.await.unwrap();
    assert!(
        matches!(watcher.recv().await.unwrap(), Notice::Requested { approval } if approval.id == id)
    );
    let Notice::Decided {
        approval,
        state,
        by,
        ..
    } = watcher.recv().await.unwrap()
    else {
        panic!("expected a decision");
    };
    assert_eq!(
        (approval, state, by),
        (Some(id), ApprovalState::Approved, Some(alice()))
    );
}

#[tokio::test(start_paused = true)]
async fn a_bad_window_leaves_the_request_pending() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    for w in [Duration::ZERO, Duration::from_hours(48)] {
        assert!(matches!(
            f.broker.approve(id, alice(), None, Some(w)),
            Err(ApprovalError::Window(_))
        ));
    }
    assert_eq!(f.broker.list_pending().len(), 1);
    f.broker.deny(id, alice(), None).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn no_window_is_opened_for_a_process_whose_executable_is_unknown() {
    let mut f = fixture();
    let mut req = f.request("r", "orders-db");
    req.identity.exe = None;
    let (id, task) = f.held(req.clone()).await;
    let d = f
        .broker
        .approve(id, alice(), None, Some(Duration::from_mins(10)))
        .unwrap();
    assert!(d.grant.is_none());
    assert!(d.note.unwrap().contains("executable is unknown"));
    assert!(
        task.await.unwrap().is_approved(),
        "this request is approved"
    );
    assert!(f.broker.grants().is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_refuses_what_waits_and_what_comes() {
    let mut f = fixture();
    let (id, task) = f.held(f.request("r", "orders-db")).await;
    f.broker.shutdown();
    let outcome = task.await.unwrap();
    assert!(
        matches!(&outcome, ApprovalOutcome::Refused { reason } if reason.contains("stopping")),
        "{outcome:?}"
    );
    assert!(matches!(
        f.broker.request(f.request("r", "orders-db")).await,
        ApprovalOutcome::Refused { .. }
    ));
    let events = f.approvals();
    assert_eq!(fields(&events[1]).0, "refused");
    assert_eq!(fields(&events[1]).1, Some(id));
}

#[tokio::test(start_paused = true)]
async fn long_text_is_held_and_recorded_bounded() {
    let mut f = fixture();
    let mut req = f.request("r", "orders-db");
    req.text = "x".repeat(crate::record::MAX_EVENT_TEXT * 2);
    let (id, task) = f.held(req).await;
    let pending = f.broker.list_pending();
    assert!(pending[0].text.len() < crate::record::MAX_EVENT_TEXT + 64);
    assert!(pending[0].text.ends_with("bytes cut]"));
    f.broker.deny(id, alice(), None).unwrap();
    task.await.unwrap();
}

#[test]
fn approval_events_recorded_before_the_added_fields_still_read() {
    let old = r#"{"v":1,"session":4,"id":9,"at_us":1,"type":"approval","request":"DROP TABLE t","state":"approved","by_uid":0,"by_user":"root","reason":null}"#;
    let e: Event = serde_json::from_str(old).unwrap();
    assert_eq!(
        fields(&e),
        ("approved", None, Some(0), Some("root"), None, None)
    );
}

/// The governed user may reach the CLI from a process outside the cgroup: its own request is
/// still not approved by it. The attempt is recorded, the request keeps waiting, and another
/// admin can approve it; a self-deny is allowed (it only fails closed).
#[tokio::test(start_paused = true)]
async fn nobody_approves_a_request_of_their_own_uid() {
    let mut f = fixture();
    let req = f.request("deletes-need-approval", "orders-db");
    let agent = Approver {
        uid: req.identity.uid,
        user: Some("agent".into()),
    };
    let (id, task) = f.held(req.clone()).await;
    let mut watcher = f.broker.subscribe();
    let err = f
        .broker
        .approve(id, agent.clone(), Some("mine".into()), Some(FIVE_MIN))
        .unwrap_err();
    assert!(matches!(
        watcher.try_recv(),
        Ok(Notice::ApproverRefused { approval, ref by, .. }) if approval == id && *by == agent
    ));
    assert!(matches!(err, ApprovalError::SelfApproval { id: i, .. } if i == id));
    let text = err.to_string();
    assert!(text.contains("whose process made this request"), "{text}");
    assert!(!task.is_finished(), "still waiting");
    assert_eq!(f.broker.list_pending().len(), 1);
    assert!(f.broker.grants().is_empty(), "no window opened");
    assert_eq!(
        f.approvals().iter().map(fields).next_back(),
        Some((
            "approver_refused",
            Some(id),
            Some(2000),
            Some("agent"),
            Some("the approver is the user whose process made the request"),
            None
        ))
    );
    f.broker.approve(id, alice(), None, None).unwrap();
    assert!(task.await.unwrap().is_approved());
    assert_eq!(f.states(), ["requested", "approver_refused", "approved"]);

    let (id, task) = f.held(req.clone()).await;
    f.broker.deny(id, agent, None).unwrap();
    assert!(!task.await.unwrap().is_approved());

    // A root requester is not contained anyway: root may approve it.
    let mut as_root = req;
    as_root.identity.uid = 0;
    let (id, task) = f.held(as_root).await;
    let root = Approver { uid: 0, user: None };
    f.broker.approve(id, root, None, None).unwrap();
    assert!(task.await.unwrap().is_approved());
}
