//! The decisions already made in an HTTP session, so a repeated request is not judged again.
//!
//! A decision depends on the policy snapshot, the target, the process's identity and the
//! request as the policy reads it ([`super::judge`]). The target and identity are the
//! session's, and what the policy reads of a request is a function of its normalised method,
//! host, path and query (and why it cannot be judged, when it cannot): an entry is keyed by
//! exactly those and by the policy snapshot, compared by address (the entry holds it, so the
//! address cannot be reused while it is kept). Nothing else of the request reaches the
//! policy, so two requests that meet here get the same verdict. A new snapshot empties it.

use std::sync::{Arc, Mutex, PoisonError};

use hyper::Method;

use super::request::Normalised;
use crate::policy::{Decision, PolicySet};

/// Request shapes remembered per session; past it the oldest is replaced.
const CAPACITY: usize = 16;

#[derive(Default)]
pub struct DecisionMemo {
    entries: Mutex<Vec<Memo>>,
}

struct Memo {
    policy: Arc<PolicySet>,
    method: Method,
    host: String,
    path_and_query: String,
    unknown: Option<&'static str>,
    decision: Arc<Decision>,
    /// `decision.rules` as the request event shares them.
    rules: Arc<[String]>,
}

impl Memo {
    fn is_for(&self, policy: &Arc<PolicySet>, req: &Normalised) -> bool {
        Arc::ptr_eq(&self.policy, policy)
            && self.path_and_query == req.path_and_query
            && self.method == req.method
            && self.host == req.host
            && self.unknown == req.unknown
    }
}

impl DecisionMemo {
    /// The decision on a request that read as `req` under `policy`, if one was made here.
    pub fn get(
        &self,
        policy: &Arc<PolicySet>,
        req: &Normalised,
    ) -> Option<(Arc<Decision>, Arc<[String]>)> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .find(|m| m.is_for(policy, req))
            .map(|m| (Arc::clone(&m.decision), Arc::clone(&m.rules)))
    }

    /// Remembers `decision` on `req` under `policy`.
    pub fn put(
        &self,
        policy: &Arc<PolicySet>,
        req: &Normalised,
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
        if entries.len() >= CAPACITY {
            entries.remove(0);
        }
        entries.push(Memo {
            policy: Arc::clone(policy),
            method: req.method.clone(),
            host: req.host.clone(),
            path_and_query: req.path_and_query.clone(),
            unknown: req.unknown,
            decision: Arc::clone(decision),
            rules: Arc::clone(rules),
        });
    }
}
