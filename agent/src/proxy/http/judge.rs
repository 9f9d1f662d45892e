//! What the policy judges a request as: the one place where an HTTP target and a Kubernetes
//! target differ. Both are served by the same gateway; only this turns a normalised request
//! into a [`policy::Action`](crate::policy::Action).

use super::request::Normalised;
use crate::policy::Action;

/// How a target's requests are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// By method, host and path (`http` rules).
    Http,
    /// By the apiserver's request-info (`kube` rules): verb, resource, namespace, name.
    Kubernetes,
}

/// A request's reading, owning whatever its [`Action`] borrows.
#[derive(Debug)]
pub enum Judgement<'n> {
    Http,
    /// The apiserver's reading of the normalised path and query (what is forwarded).
    Kube(crate::kube::RequestInfo<'n>),
    /// Cannot be judged: the target's `on_unknown` applies.
    Unknown(String),
}

impl<'n> Judgement<'n> {
    /// Reads `req` as a `flavor` target's request.
    pub fn of(flavor: Flavor, req: &'n Normalised) -> Self {
        if let Some(why) = req.unknown {
            return Judgement::Unknown(format!("HTTP path: {why}"));
        }
        match flavor {
            Flavor::Http => Judgement::Http,
            Flavor::Kubernetes => {
                let (path, query) = match req.path_and_query.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (req.path_and_query.as_str(), None),
                };
                match crate::kube::parse(req.method.as_str(), path, query) {
                    Ok(info) => Judgement::Kube(info),
                    Err(e) => Judgement::Unknown(format!("Kubernetes request: {e}")),
                }
            }
        }
    }

    /// The policy's view of `req`.
    pub fn action<'a>(&'a self, req: &'a Normalised) -> Action<'a> {
        match self {
            Judgement::Http => Action::Http {
                method: req.method.as_str(),
                host: &req.host,
                path: &req.path_and_query,
            },
            Judgement::Kube(info) => info.action().to_policy(),
            Judgement::Unknown(why) => Action::Unknown { why },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::ProcessIdentity,
        policy::{file::parse_file, PolicySet, Request, TargetRef, Verdict},
        protocol::Protocol,
    };

    #[test]
    fn http_requests_are_judged_by_method_host_and_normalised_path() {
        let path = std::path::Path::new("http-get-only.toml");
        let parsed = parse_file(
            path,
            include_str!("../../../../policies/http-get-only.toml"),
        )
        .unwrap();
        let policy = PolicySet::new(parsed.rules, parsed.targets, vec![path.into()]);
        let verdict = |method: &str, path: &str| {
            let uri = path.parse().unwrap();
            let mut headers = hyper::HeaderMap::new();
            headers.insert(
                hyper::header::HOST,
                hyper::header::HeaderValue::from_static("api.internal.example"),
            );
            let req = super::super::request::normalise(
                &method.parse().unwrap(),
                &uri,
                hyper::Version::HTTP_11,
                &headers,
                false,
                None,
            )
            .unwrap();
            let judged = Judgement::of(Flavor::Http, &req);
            policy
                .evaluate(&Request {
                    target: TargetRef {
                        name: "internal-api",
                        protocol: Protocol::Http,
                    },
                    identity: &ProcessIdentity::default(),
                    action: judged.action(&req),
                })
                .verdict
        };
        assert_eq!(verdict("GET", "/v1/users"), Verdict::Allow);
        assert_eq!(verdict("DELETE", "/v1/users"), Verdict::Deny);
        assert_eq!(verdict("GET", "/v1/x/../admin/users"), Verdict::Deny);
        assert_eq!(verdict("GET", "/v1/%61dmin/users"), Verdict::Deny);
        assert_eq!(verdict("GET", "/v1/admin%2Fusers"), Verdict::Deny);
    }
}
