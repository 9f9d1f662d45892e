//! The Kubernetes request reader never panics on any method, path or query; what it reads is
//! complete (a verb and a resource, or a non-resource path), never holds an encoded slash or a
//! dot segment, and is judged by the example policies without panicking.
#![no_main]

use std::sync::OnceLock;

use bulkhead::{
    identity::ProcessIdentity,
    kube::{self, RequestInfo},
    policy::{load_dir, PolicySet, Request, TargetRef},
    protocol::Protocol,
};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"];

fn policies() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        load_dir(&dir).unwrap_or_else(|_| panic!("example policies load from {}", dir.display()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Ok(info) = kube::parse(method, path, query) else {
        return;
    };
    if let RequestInfo::Resource(r) = &info {
        for part in [Some(&r.resource), r.namespace.as_ref(), r.subresource.as_ref()]
            .into_iter()
            .flatten()
        {
            assert!(!part.is_empty() && !part.contains('/') && part != "." && part != "..");
        }
    }
    let action = info.action();
    assert!(!action.verb.is_empty() && !action.resource.is_empty());
    let id = ProcessIdentity::default();
    let d = policies().evaluate(&Request {
        target: TargetRef {
            name: "prod-cluster",
            protocol: Protocol::Kubernetes,
        },
        identity: &id,
        action: action.to_policy(),
    });
    let _ = serde_json::to_string(&d);
});
