//! The approvals' vocabulary: who asks ([`ApprovalIdentity`], [`ApprovalRequest`]), who decides
//! ([`Approver`]), what comes of it ([`ApprovalOutcome`], [`Decision`]), what admins list
//! ([`PendingApproval`], [`GrantInfo`]) and are told ([`Notice`]), and what can go wrong
//! ([`ApprovalError`]). The broker that holds requests is the parent module.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    identity::ProcessIdentity,
    protocol::Protocol,
    record::{SessionId, StoreError},
};

/// Who is asking: the governed process behind the request, as the gateway identified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalIdentity {
    pub uid: u32,
    pub user: Option<String>,
    /// The executable's path. Grant windows are tied to it, so one whose executable is unknown
    /// is never covered by a window.
    pub exe: Option<String>,
    pub comm: String,
}

impl From<&ProcessIdentity> for ApprovalIdentity {
    fn from(p: &ProcessIdentity) -> Self {
        Self {
            uid: p.uid,
            user: p.user.clone(),
            exe: p.exe.clone(),
            comm: p.comm.clone(),
        }
    }
}

/// A request held for a human, as a protocol handler hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub session: SessionId,
    pub identity: ApprovalIdentity,
    /// The target's configured name; a grant window matches it exactly.
    pub target: String,
    pub protocol: Protocol,
    /// What the client asked for, in full (bounded to `MAX_EVENT_TEXT` when held and recorded).
    pub text: String,
    /// The id of the rule whose verdict was `approve`; a grant window matches it exactly.
    pub rule: String,
    /// What the gateway found the request does, for the approver.
    pub what: RequestDetails,
    /// How long to wait for a decision, usually [`ApprovalBroker::default_timeout`]; capped at
    /// `MAX_APPROVAL_WAIT`.
    pub timeout: Duration,
}

/// An admin who decided, as the control socket's peer credentials name them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approver {
    pub uid: u32,
    pub user: Option<String>,
}

impl Approver {
    /// The approver for a peer uid, named from `/etc/passwd` (unnamed if it is not there).
    pub fn from_uid(uid: u32) -> Self {
        let user = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|text| crate::identity::user_from_passwd(&text, uid));
        Self { uid, user }
    }
}

impl fmt::Display for Approver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.user {
            Some(user) => write!(f, "{user} (uid {})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// How a held request ended, for the protocol handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Forward the request. `grant` names the window that approved it without asking, or the
    /// one this approval opened.
    Approved {
        by: Approver,
        reason: Option<String>,
        grant: Option<u64>,
    },
    Denied {
        by: Approver,
        reason: Option<String>,
    },
    /// Nobody decided in time: a deny.
    Expired { after: Duration },
    /// The request could not be held (a limit, the daemon stopping, the record failing): a deny.
    Refused { reason: String },
}

impl ApprovalOutcome {
    pub fn is_approved(&self) -> bool {
        matches!(self, ApprovalOutcome::Approved { .. })
    }

    /// What the client is told when its request is not forwarded; `None` when approved.
    pub fn denial_message(&self) -> Option<String> {
        match self {
            ApprovalOutcome::Approved { .. } => None,
            ApprovalOutcome::Denied { by, reason } => Some(match reason {
                Some(r) => format!("denied by {by}: {r}"),
                None => format!("denied by {by}"),
            }),
            ApprovalOutcome::Expired { after } => Some(format!(
                "the approval request expired after {} without a decision; denied",
                humantime::format_duration(*after)
            )),
            ApprovalOutcome::Refused { reason } => {
                Some(format!("cannot hold the request for approval: {reason}"))
            }
        }
    }
}

/// The `state` of an `approval` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Requested,
    Approved,
    Denied,
    Expired,
    /// The client went away while its request waited.
    Withdrawn,
    /// Not held: a limit, the daemon stopping, or the record failing.
    Refused,
    /// Approved without asking, by an open grant window.
    CoveredByGrant,
    /// A grant window was ended early.
    Revoked,
    /// Someone who may not decide this request tried to: its own process's user, or a caller
    /// descended from a governed process. The request still waits.
    ApproverRefused,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Requested => "requested",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Withdrawn => "withdrawn",
            ApprovalState::Refused => "refused",
            ApprovalState::CoveredByGrant => "covered_by_grant",
            ApprovalState::Revoked => "revoked",
            ApprovalState::ApproverRefused => "approver_refused",
        }
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the classifier found a held request does (SQL: its classes, the relations and functions
/// it names), so an approver sees more than the text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDetails {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// Why the request could not be classified, when it could not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
    /// Values bound to its parameters, in order (`None`: NULL), bounded: a PostgreSQL Execute
    /// held for approval shows what it would run with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Option<String>>,
}

/// A request waiting for a decision, as `approvals list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApproval {
    /// The id to approve or deny; also the event id of its `requested` event.
    pub id: u64,
    pub session: SessionId,
    pub identity: ApprovalIdentity,
    pub target: String,
    pub protocol: Protocol,
    pub text: String,
    pub rule: String,
    #[serde(default)]
    pub what: RequestDetails,
    pub requested_at_us: u64,
    pub expires_at_us: u64,
    pub age_ms: u64,
    pub expires_in_ms: u64,
}

/// An open grant window, as `approvals grants` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    /// The id of the approval that opened it.
    pub id: u64,
    /// The session the approval was given in.
    pub session: SessionId,
    pub identity: ApprovalIdentity,
    pub target: String,
    pub protocol: Protocol,
    pub rule: String,
    /// The request that was approved.
    pub text: String,
    pub by: Approver,
    pub reason: Option<String>,
    pub granted_at_us: u64,
    pub until_us: u64,
    pub remaining_ms: u64,
    /// Requests approved by the window so far.
    pub uses: u64,
}

/// What an admin's approve or deny did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub approval: PendingApproval,
    pub state: ApprovalState,
    pub by: Approver,
    pub reason: Option<String>,
    pub grant: Option<GrantInfo>,
    /// Something the admin should know (a window that could not be opened).
    pub note: Option<String>,
}

/// What `approvals watch` streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A request started waiting.
    Requested { approval: PendingApproval },
    /// A request was decided, expired, withdrawn, refused or covered by a grant.
    Decided {
        /// `None` for requests that never waited (refused, covered by a grant).
        approval: Option<u64>,
        session: SessionId,
        state: ApprovalState,
        target: String,
        rule: String,
        by: Option<Approver>,
        reason: Option<String>,
        grant: Option<u64>,
    },
    /// A grant window was ended early.
    Revoked { grant: GrantInfo, by: Approver },
    /// Someone who may not decide a pending request tried to; it keeps waiting.
    ApproverRefused {
        approval: u64,
        session: SessionId,
        target: String,
        rule: String,
        by: Approver,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no pending approval with id {0} (see `bulkhead approvals list`)")]
    UnknownApproval(u64),
    #[error("approval {0} has expired; it is denied")]
    AlreadyExpired(u64),
    #[error(
        "approval {id}: refused: {approver} is the user whose process made this request, and \
         nobody approves their own request (another admin must decide it); the attempt is \
         recorded"
    )]
    SelfApproval { id: u64, approver: Approver },
    #[error("no open grant with id {0} (see `bulkhead approvals grants`)")]
    UnknownGrant(u64),
    #[error("grant window: {0}")]
    Window(String),
    // `error`, not `source`: the message carries the store's error, so it must not also be
    // the error's source (a caller printing the chain would say it twice).
    #[error("approval {id}: the decision could not be recorded ({error}); the request was refused instead")]
    Unrecorded { id: u64, error: StoreError },
    #[error("grant {grant} is revoked, but the revocation could not be recorded: {error}")]
    RevokeUnrecorded { grant: u64, error: StoreError },
}
