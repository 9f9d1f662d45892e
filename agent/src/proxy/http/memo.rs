//! The decisions already made in an HTTP session, so a repeated request is not judged again.
//!
//! A decision depends on the policy snapshot, the target, the process's identity and the
//! request as the policy reads it ([`super::judge`]). The target and identity are the
//! session's, and what the policy reads of a request is a function of its normalised method,
//! host, path and query (and why it cannot be judged, when it cannot): an entry is keyed by
//! exactly those and by the policy snapshot, compared by address (the entry holds it, so the
//! address cannot be reused while it is kept). Nothing else of the request reaches the
//! policy, so two requests that meet here get the same verdict. A new snapshot empties it.

use hyper::Method;

use super::request::Normalised;
use crate::proxy::session;

/// Request shapes remembered per session; past it the oldest is replaced.
pub const CAPACITY: usize = 16;

/// A session's memo of HTTP decisions.
pub type DecisionMemo = session::DecisionMemo<Shape>;

/// What the policy reads of a request.
pub struct Shape {
    method: Method,
    host: String,
    path_and_query: String,
    unknown: Option<&'static str>,
}

impl Shape {
    pub fn of(req: &Normalised) -> Self {
        Self {
            method: req.method.clone(),
            host: req.host.clone(),
            path_and_query: req.path_and_query.clone(),
            unknown: req.unknown,
        }
    }

    /// Whether `req` reads as this shape.
    pub fn is(&self, req: &Normalised) -> bool {
        self.path_and_query == req.path_and_query
            && self.method == req.method
            && self.host == req.host
            && self.unknown == req.unknown
    }
}
