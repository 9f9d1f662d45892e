//! Every example in `policies/` loads and does what its header comment says; reload keeps the
//! old set when a file breaks.

use std::{path::PathBuf, sync::Arc};

use super::{
    file::parse_file,
    load_dir,
    tests::{agent, sql},
    Action, Basis, Masker, PolicyHandle, PolicySet, Request, TargetRef, Verdict,
};
use crate::{identity::ProcessIdentity, protocol::Protocol};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn example(name: &str) -> PolicySet {
    let path = examples_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.starts_with("# "),
        "{name} starts with a header comment saying what it does"
    );
    match parse_file(&path, &text) {
        Ok(p) => PolicySet::new(p.rules, p.targets, vec![path]),
        Err(e) => panic!(
            "{name}:\n{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

fn outsider() -> ProcessIdentity {
    let mut id = agent();
    id.ancestors.retain(|a| a.comm != "claude");
    id
}

#[test]
fn all_examples_load_together_and_each_is_tested() {
    let set = load_dir(&examples_dir()).unwrap_or_else(|e| {
        panic!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let names: Vec<String> = set
        .files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let tested = [
        "agent-egress.toml",
        "http-get-only.toml",
        "kubernetes-read-only.toml",
        "no-ddl.toml",
        "opaque-tcp.toml",
        "pii-masking.toml",
        "read-only-agent.toml",
        "ssh-safe-commands.toml",
        "writes-need-approval.toml",
    ];
    assert_eq!(names, tested, "a new example needs a test here");
    // `bulkhead policy init` writes exactly these files, as they are.
    for (name, text) in super::cli::EXAMPLES {
        let on_disk = std::fs::read_to_string(examples_dir().join(name)).unwrap();
        assert_eq!(*text, on_disk, "{name}");
    }
    let written: Vec<&str> = super::cli::EXAMPLES.iter().map(|(n, _)| *n).collect();
    assert_eq!(written, tested, "policy init writes every example");
    // Together: no-ddl applies across targets and beats the approval on orders-db.
    let id = agent();
    let d = set.evaluate(&sql(
        "orders-db",
        &id,
        "ALTER TABLE orders ADD COLUMN x int",
    ));
    assert_eq!(
        (d.verdict, d.rules.clone()),
        (Verdict::Deny, vec!["no-ddl".to_string()])
    );
}

#[test]
fn read_only_agent() {
    let set = example("read-only-agent.toml");
    let id = agent();
    let verdict = |target: &str, who: &ProcessIdentity, q: &str| set.evaluate(&sql(target, who, q));
    assert_eq!(
        verdict("prod-orders", &id, "SELECT * FROM orders").verdict,
        Verdict::Allow
    );
    assert_eq!(
        verdict("prod-orders", &id, "BEGIN; SELECT 1; COMMIT").verdict,
        Verdict::Allow
    );
    let d = verdict("prod-orders", &id, "UPDATE orders SET total = 0");
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(
        d.message
            .as_deref()
            .is_some_and(|m| m.contains("read-only")),
        "{d:?}"
    );
    assert_eq!(
        verdict("prod-orders", &id, "SELECT 1; DROP TABLE orders").verdict,
        Verdict::Deny
    );
    assert_eq!(
        verdict("prod-orders", &id, "SET ROLE postgres").verdict,
        Verdict::Deny
    );
    assert_eq!(
        verdict("prod-orders", &id, "select pg_read_file('/etc/passwd')").verdict,
        Verdict::Deny
    );
    let d = verdict("prod-orders", &id, "SELEC * FROM orders");
    assert_eq!((d.verdict, d.basis), (Verdict::Deny, Basis::Unknown));
    let d = verdict("prod-orders", &outsider(), "SELECT 1");
    assert_eq!(
        (d.verdict, d.basis),
        (Verdict::Deny, Basis::Default),
        "not started under an agent"
    );
    let d = verdict("staging-orders", &id, "DELETE FROM orders");
    assert_eq!(
        (d.verdict, d.decided, d.observe_only),
        (Verdict::Allow, Verdict::Deny, true),
        "observe mode"
    );
}

#[test]
fn no_ddl() {
    let set = example("no-ddl.toml");
    let id = agent();
    for q in [
        "CREATE TABLE t (a int)",
        "drop table t",
        "TRUNCATE t",
        "GRANT ALL ON t TO bob",
        "SET ROLE admin",
        "CREATE EXTENSION dblink",
        "ALTER SYSTEM SET fsync = off",
        "SELECT * INTO copy FROM t",
    ] {
        let d = set.evaluate(&sql("any-db", &id, q));
        assert_eq!(
            (d.verdict, d.rules.clone()),
            (Verdict::Deny, vec!["no-ddl".to_string()]),
            "{q}"
        );
        assert!(d
            .message
            .as_deref()
            .is_some_and(|m| m.contains("migration")));
    }
    let d = set.evaluate(&sql("any-db", &id, "SELECT 1"));
    assert_eq!(d.basis, Basis::Default, "reads are left to other rules");
    let ssh = Request {
        target: TargetRef {
            name: "any-host",
            protocol: Protocol::Ssh,
        },
        identity: &id,
        action: Action::SshExec { command: "ls" },
    };
    assert!(
        set.evaluate(&ssh).rules.iter().all(|r| r != "no-ddl"),
        "postgres only"
    );
}

#[test]
fn writes_need_approval() {
    let set = example("writes-need-approval.toml");
    let id = agent();
    let eval = |q: &str| set.evaluate(&sql("orders-db", &id, q));
    assert_eq!(
        eval("SELECT * FROM orders WHERE id = 1").verdict,
        Verdict::Allow
    );
    for q in [
        "INSERT INTO orders VALUES (1)",
        "UPDATE orders SET a = 1",
        "DELETE FROM orders",
        "COPY orders FROM STDIN",
    ] {
        let d = eval(q);
        assert_eq!(d.verdict, Verdict::Approve, "{q}");
        assert_eq!(d.approval_timeout, Some(std::time::Duration::from_mins(10)));
    }
    assert_eq!(
        eval("DO $$ BEGIN DELETE FROM orders; END $$").verdict,
        Verdict::Deny
    );
    assert_eq!(
        eval("COPY orders TO PROGRAM 'curl x'").verdict,
        Verdict::Deny
    );
    assert_eq!(
        eval("SELECT reporting.daily_totals()").verdict,
        Verdict::Allow,
        "vouched for"
    );
    let d = eval("SELECT app.recalculate()");
    assert_eq!(
        (d.verdict, d.basis),
        (Verdict::Approve, Basis::Unknown),
        "unknown function waits"
    );
    assert_eq!(
        set.evaluate(&sql("other-db", &id, "SELECT 1")).verdict,
        Verdict::Deny
    );
}

#[test]
fn pii_masking() {
    let set = example("pii-masking.toml");
    let id = agent();
    let d = set.evaluate(&sql("any-db", &id, "SELECT email AS e, ssn FROM users"));
    assert_eq!(d.masks.len(), 4);
    let masker = Masker::new(d.masks.iter().map(Arc::as_ref));
    let email = masker.mask(Some(("public", "users", "email")), "bob@example.com");
    assert!(email.starts_with("hash:"), "{email}");
    assert_eq!(
        masker.mask(Some(("hr", "people", "ssn")), "123-45-6789"),
        "[redacted]"
    );
    assert_eq!(
        masker.mask(
            Some(("billing", "payments", "card_number")),
            "4111111111111111"
        ),
        "************1111"
    );
    assert_eq!(
        masker.mask(
            Some(("public", "users", "profile")),
            "{\"mail\":\"bob@example.com\",\"iban\":\"DE89370400440532013000\"}"
        ),
        "{\"mail\":\"[redacted]\",\"iban\":\"[redacted]\"}",
        "row_to_json output is scanned"
    );
    assert_eq!(
        masker.mask(None, "order 12345 shipped"),
        "order 12345 shipped"
    );
    let ssh = Request {
        target: TargetRef {
            name: "h",
            protocol: Protocol::Ssh,
        },
        identity: &id,
        action: Action::SshExec { command: "ls" },
    };
    assert!(set.evaluate(&ssh).masks.is_empty(), "postgres targets only");
}

fn ssh<'a>(id: &'a ProcessIdentity, command: &'a str) -> Request<'a> {
    Request {
        target: TargetRef {
            name: "build-hosts",
            protocol: Protocol::Ssh,
        },
        identity: id,
        action: Action::SshExec { command },
    }
}

#[test]
fn ssh_safe_commands() {
    let set = example("ssh-safe-commands.toml");
    let id = agent();
    let v = |c: &str| set.evaluate(&ssh(&id, c)).verdict;
    for ok in [
        "ls -la /srv",
        "cat /var/log/syslog",
        "df -h",
        "uptime",
        "systemctl status nginx",
        "journalctl -u nginx --since today",
        "git log --oneline | head -5",
        "ps aux | head -5",
    ] {
        assert_eq!(v(ok), Verdict::Allow, "{ok}");
    }
    assert_eq!(v("systemctl restart nginx"), Verdict::Approve);
    for no in [
        "rm -rf /",
        "ls; rm -rf /tmp/x",
        "ls && sudo reboot",
        "r'm' -rf /",
        "dd if=/dev/zero of=/dev/sda",
    ] {
        let d = set.evaluate(&ssh(&id, no));
        assert_eq!((d.verdict, d.basis), (Verdict::Deny, Basis::Rules), "{no}");
    }
    for unknown in [
        "cat $HOME/.ssh/id_rsa",
        "ls `id`",
        "ls $(id)",
        "{rm,-rf,/}",
        "ls > /etc/passwd",
        "cat 'x",
    ] {
        let d = set.evaluate(&ssh(&id, unknown));
        assert_eq!(
            (d.verdict, d.basis),
            (Verdict::Deny, Basis::Unknown),
            "{unknown}"
        );
    }
    assert_eq!(
        v("cat /var/log/../../etc/shadow"),
        Verdict::Deny,
        "a glob word never crosses `/`"
    );
    assert_eq!(
        v("python3 -c 'import os'"),
        Verdict::Deny,
        "everything else: default"
    );
}

fn kube<'a>(
    id: &'a ProcessIdentity,
    verb: &'a str,
    resource: &'a str,
    subresource: Option<&'a str>,
    namespace: Option<&'a str>,
) -> Request<'a> {
    Request {
        target: TargetRef {
            name: "prod-cluster",
            protocol: Protocol::Kubernetes,
        },
        identity: id,
        action: Action::Kube {
            verb,
            group: Some(""),
            resource,
            subresource,
            namespace,
            name: None,
        },
    }
}

#[test]
fn kubernetes_read_only() {
    let set = example("kubernetes-read-only.toml");
    let id = agent();
    let v = |verb, res, sub, ns| set.evaluate(&kube(&id, verb, res, sub, ns)).verdict;
    assert_eq!(v("get", "pods", None, Some("web")), Verdict::Allow);
    assert_eq!(
        v("list", "deployments", None, None),
        Verdict::Allow,
        "all namespaces"
    );
    assert_eq!(v("get", "pods", Some("log"), Some("web")), Verdict::Allow);
    assert_eq!(v("get", "secrets", None, Some("web")), Verdict::Deny);
    assert_eq!(v("list", "secrets", None, None), Verdict::Deny);
    assert_eq!(
        v("create", "pods", Some("exec"), Some("web")),
        Verdict::Deny
    );
    assert_eq!(v("delete", "pods", None, Some("web")), Verdict::Deny);
    assert_eq!(v("patch", "deployments", None, Some("web")), Verdict::Deny);
    assert_eq!(v("get", "nodes", Some("proxy"), None), Verdict::Deny);
    assert_eq!(
        v("get", "services", Some("proxy"), Some("web")),
        Verdict::Deny
    );
    assert_eq!(v("proxy", "pods", None, Some("web")), Verdict::Deny);
    assert_eq!(
        v("get", "/version", None, None),
        Verdict::Allow,
        "discovery"
    );
}

fn http<'a>(id: &'a ProcessIdentity, method: &'a str, host: &'a str, path: &'a str) -> Request<'a> {
    Request {
        target: TargetRef {
            name: "internal-api",
            protocol: Protocol::Http,
        },
        identity: id,
        action: Action::Http { method, host, path },
    }
}

#[test]
fn http_get_only() {
    let set = example("http-get-only.toml");
    let id = agent();
    let d = |m, h, p| set.evaluate(&http(&id, m, h, p));
    assert_eq!(
        d("GET", "api.internal.example", "/v1/users?page=2").verdict,
        Verdict::Allow
    );
    assert_eq!(
        d("head", "API.internal.example:443", "/v1/users").verdict,
        Verdict::Allow
    );
    assert_eq!(
        d("POST", "api.internal.example", "/v1/users").verdict,
        Verdict::Deny
    );
    assert_eq!(
        d("DELETE", "api.internal.example", "/v1/users/1").verdict,
        Verdict::Deny
    );
    assert_eq!(d("GET", "evil.example", "/v1/users").verdict, Verdict::Deny);
    let admin = d("GET", "api.internal.example", "/v1/x/../admin/users");
    assert_eq!(
        (admin.verdict, admin.rules.clone()),
        (Verdict::Deny, vec!["api-no-admin".to_string()])
    );
    assert_eq!(
        d("GET", "api.internal.example", "/v1/%61dmin").rules,
        vec!["api-no-admin"]
    );
    let enc = d("GET", "api.internal.example", "/v1/admin%2Fusers");
    assert_eq!((enc.verdict, enc.basis), (Verdict::Deny, Basis::Unknown));
}

#[test]
fn reload_swaps_valid_sets_and_keeps_the_old_one_on_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write(
        "a.toml",
        "[[target]]\nname = \"db\"\n[[rule]]\nid = \"reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"] }\n",
    );
    let handle = PolicyHandle::new(dir.path());
    let id = agent();
    let verdict = |h: &PolicyHandle, q: &str| h.current().evaluate(&sql("db", &id, q)).verdict;
    assert_eq!(
        verdict(&handle, "SELECT 1"),
        Verdict::Deny,
        "deny-all before the first load"
    );
    assert_eq!(handle.status().version, 0);
    assert_eq!(handle.reload(), Ok(1));
    assert_eq!(verdict(&handle, "SELECT 1"), Verdict::Allow);
    assert_eq!(verdict(&handle, "DELETE FROM t"), Verdict::Deny);
    let before = handle.current();

    write(
        "b.toml",
        "[[rule]]\nid = \"deletes\"\nverdict = \"approve\"\nsql = { class = [\"delete\"] }\n",
    );
    assert_eq!(handle.reload(), Ok(2));
    assert_eq!(
        verdict(&handle, "DELETE FROM t"),
        Verdict::Approve,
        "new rule in force"
    );
    assert_eq!(
        before.evaluate(&sql("db", &id, "DELETE FROM t")).verdict,
        Verdict::Deny,
        "old snapshots stay valid"
    );

    write(
        "b.toml",
        "[[rule]]\nid = \"deletes\"\nverdict = \"approve\"\nsql = { clas = [\"delete\"] }\n",
    );
    let err = handle.reload().expect_err("a broken file fails the reload");
    assert!(err.contains("b.toml:4:9:") && err.contains("clas"), "{err}");
    assert_eq!(
        verdict(&handle, "DELETE FROM t"),
        Verdict::Approve,
        "the previous set stays"
    );
    let status = handle.status();
    assert_eq!((status.version, status.rules, status.files), (2, 2, 2));
    assert!(status
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("clas")));
    let lines = status.lines();
    assert!(
        lines[0].starts_with("policy:      version 2 (2 rules, 2 files)"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("last reload failed") && lines[1].contains("clas"),
        "{lines:?}"
    );

    std::fs::remove_file(dir.path().join("b.toml")).expect("remove");
    assert_eq!(handle.reload(), Ok(3));
    assert_eq!(handle.status().last_error, None);
    assert_eq!(verdict(&handle, "DELETE FROM t"), Verdict::Deny);
}

#[tokio::test]
async fn watch_reloads_on_file_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.toml");
    std::fs::write(&path, "[[target]]\nname = \"db\"\n").expect("write");
    let handle = PolicyHandle::open(dir.path()).expect("valid");
    let task = tokio::spawn(super::watch(handle.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    std::fs::write(&path, "[[target]]\nname = \"db\"\ndefault = \"allow\"\n").expect("write");
    let id = agent();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while handle.status().version < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    task.abort();
    assert!(
        handle.status().version >= 2,
        "the change was picked up: {:?}",
        handle.status()
    );
    assert_eq!(
        handle
            .current()
            .evaluate(&sql("db", &id, "SELECT 1"))
            .verdict,
        Verdict::Allow
    );
}

fn connect<'a>(id: &'a ProcessIdentity, name: &'a str) -> Request<'a> {
    Request {
        target: TargetRef {
            name,
            protocol: Protocol::Tcp,
        },
        identity: id,
        action: Action::Connect,
    }
}

#[test]
fn agent_egress() {
    let set = example("agent-egress.toml");
    let id = agent();
    let d = |name| set.evaluate(&connect(&id, name));
    // The API's connection is judged by the server name (TLS pass-through), not by address.
    let tls = |host| {
        set.evaluate(&Request {
            target: TargetRef {
                name: "model-api",
                protocol: Protocol::Http,
            },
            identity: &id,
            action: Action::Http {
                method: "CONNECT",
                host,
                path: "/",
            },
        })
    };
    let api = tls("api.anthropic.com");
    assert_eq!(
        (api.verdict, api.rules.clone()),
        (Verdict::Allow, vec!["model-provider".to_string()])
    );
    assert_eq!(tls("exfil.example.net").verdict, Verdict::Deny);
    let nameless = set.evaluate(&Request {
        target: TargetRef {
            name: "model-api",
            protocol: Protocol::Http,
        },
        identity: &id,
        action: Action::Unknown {
            why: "a TLS ClientHello without a server name",
        },
    });
    assert_eq!(nameless.verdict, Verdict::Deny);
    for other in ["203.0.113.9:443", "10.20.0.5:22", "artifact-cache"] {
        assert_eq!(d(other).verdict, Verdict::Deny, "{other}");
    }
}

#[test]
fn opaque_tcp() {
    let set = example("opaque-tcp.toml");
    let id = agent();
    let d = |name| set.evaluate(&connect(&id, name));
    let cache = d("artifact-cache");
    assert_eq!(
        (cache.verdict, cache.rules.clone()),
        (
            Verdict::Allow,
            vec!["target:artifact-cache:default".to_string()]
        )
    );
    let jump = d("jump-host");
    assert_eq!(
        (jump.verdict, jump.rules.clone()),
        (
            Verdict::Approve,
            vec!["jump-host-needs-approval".to_string()]
        )
    );
    assert_eq!(
        jump.approval_timeout,
        Some(std::time::Duration::from_mins(10))
    );
    // Destinations no target names are judged by their address.
    assert_eq!(d("10.20.0.5:443").rules, vec!["mirrors-https"]);
    assert_eq!(d("10.20.0.5:443").verdict, Verdict::Allow);
    for other in [
        "10.20.0.5:80",
        "10.20.1.5:443",
        "[fd00::5]:443",
        "build-box",
    ] {
        let denied = d(other);
        assert_eq!(
            (denied.verdict, denied.basis),
            (Verdict::Deny, Basis::Default),
            "{other}"
        );
    }
    // A PostgreSQL target is untouched: its connection passes, its statements are judged.
    let pg = set.evaluate(&Request {
        target: TargetRef {
            name: "orders-db",
            protocol: Protocol::Postgres,
        },
        identity: &id,
        action: Action::Connect,
    });
    assert_eq!(pg.verdict, Verdict::Allow);
}

#[test]
fn the_starter_policy_observes_everything_and_a_missing_directory_selects_it() {
    let set = super::reload::starter_policy();
    assert_eq!(set.targets.len(), 1, "it parses");
    let id = agent();
    for (name, protocol, action) in [
        ("10.0.0.5:443", Protocol::Tcp, Action::Connect),
        (
            "orders-db",
            Protocol::Postgres,
            Action::Sql {
                text: "DELETE FROM orders",
                prepared: None,
            },
        ),
    ] {
        let d = set.evaluate(&Request {
            target: TargetRef { name, protocol },
            identity: &id,
            action,
        });
        assert_eq!(
            (d.verdict, d.decided, d.observe_only),
            (Verdict::Allow, Verdict::Deny, true),
            "{name}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("policies");
    let handle = PolicyHandle::new(&missing);
    assert!(handle.start_with_starter_if_missing());
    assert!(handle.status().starter);
    assert!(handle.status().lines()[0].contains("STARTER"));
    // The directory appears: its policies replace the starter.
    super::cli::init(&missing).unwrap();
    handle.reload().unwrap();
    assert!(!handle.status().starter);
    assert_eq!(handle.current().files.len(), super::cli::EXAMPLES.len());
    // An existing directory never selects the starter.
    assert!(!PolicyHandle::new(&missing).start_with_starter_if_missing());
}

#[test]
fn ssh_safe_commands_tunnels_and_variables() {
    use crate::policy::SshForward;
    let set = example("ssh-safe-commands.toml");
    let id = agent();
    let v = |action| {
        set.evaluate(&Request {
            target: TargetRef {
                name: "build-hosts",
                protocol: Protocol::Ssh,
            },
            identity: &id,
            action,
        })
        .verdict
    };
    let forward = |kind, host, port| Action::SshForward { kind, host, port };
    assert_eq!(v(Action::SshEnv { name: "LC_ALL" }), Verdict::Allow);
    assert_eq!(v(Action::SshEnv { name: "LD_PRELOAD" }), Verdict::Deny);
    assert_eq!(
        v(forward(SshForward::Local, "localhost", 9090)),
        Verdict::Allow
    );
    assert_eq!(
        v(forward(SshForward::Local, "10.0.0.5", 5432)),
        Verdict::Deny
    );
    assert_eq!(
        v(forward(SshForward::Remote, "localhost", 9090)),
        Verdict::Deny
    );
    assert_eq!(v(forward(SshForward::Agent, "", 0)), Verdict::Deny);
}
