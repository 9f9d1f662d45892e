//! Evaluation never panics on any request text: SQL, SSH command lines, HTTP paths and hosts.
#![no_main]

use std::sync::OnceLock;

use bulkhead::{
    identity::ProcessIdentity,
    policy::{load_dir, Action, PolicySet, Request, TargetRef},
    protocol::Protocol,
};
use libfuzzer_sys::fuzz_target;

fn policies() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        load_dir(&dir).unwrap_or_else(|_| panic!("example policies load from {}", dir.display()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let id = ProcessIdentity::default();
    let (name, protocol, action) = match kind % 4 {
        0 => (
            "orders-db",
            Protocol::Postgres,
            Action::Sql {
                text,
                prepared: None,
            },
        ),
        1 => (
            "build-hosts",
            Protocol::Ssh,
            Action::SshExec { command: text },
        ),
        2 => {
            let (host, path) = text
                .split_once(' ')
                .unwrap_or(("api.internal.example", text));
            (
                "internal-api",
                Protocol::Http,
                Action::Http {
                    method: "GET",
                    host,
                    path,
                },
            )
        }
        _ => {
            let mut w = text.splitn(3, ' ');
            let verb = w.next().unwrap_or("");
            let resource = w.next().unwrap_or("");
            let namespace = w.next();
            (
                "prod-cluster",
                Protocol::Kubernetes,
                Action::Kube {
                    verb,
                    group: Some(""),
                    resource,
                    subresource: None,
                    namespace,
                    name: None,
                },
            )
        }
    };
    let d = policies().evaluate(&Request {
        target: TargetRef { name, protocol },
        identity: &id,
        action,
    });
    let _ = serde_json::to_string(&d);
});
