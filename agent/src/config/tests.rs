use super::*;
use crate::{
    credentials::CredentialRef,
    proxy::postgres::settings::{AuthMethod, PostgresLogin},
};

fn pg_login<'a>(t: &'a Target, user: &str, database: &str) -> Option<PostgresLogin<'a>> {
    match &t.kind {
        TargetKind::Postgres(pg) => pg.login(t.credentials.as_ref(), user, database),
        _ => panic!("{} is not a PostgreSQL target", t.name),
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Source::File("test.toml".into()))
}

fn err(text: &str) -> String {
    parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn governed_users_are_uids_everywhere_and_only_they_allow_the_root_cgroup() {
    let c = parse("[governed]\nusers = [\"nobody\"]\nuids = [4242]\n").unwrap();
    assert_eq!(
        c.governed.cgroup,
        PathBuf::from("/"),
        "users govern everywhere"
    );
    assert_eq!(c.governed.uids, vec![4242, 65534]);
    assert_eq!(c.governed.users, vec!["nobody".to_string()]);
    let c = parse("[governed]\nusers = [\"nobody\"]\ncgroup = \"agents\"\n").unwrap();
    assert_eq!(c.governed.cgroup, PathBuf::from("agents"));
    let c = parse("[governed]\ncgroup = \"/\"\nuids = [1000]\n").unwrap();
    assert_eq!(c.governed.cgroup, PathBuf::from("/"));
    let e = err("[governed]\ncgroup = \"/\"\n");
    assert!(
        e.contains("`governed.cgroup`") && e.contains("governed.users"),
        "{e}"
    );
    let e = err("[governed]\nusers = [\"no-such-user-here\"]\n");
    assert!(
        e.contains("`governed.users[0]`") && e.contains("no-such-user-here"),
        "{e}"
    );
}

#[test]
fn a_value_of_the_wrong_kind_names_its_key_and_what_it_takes() {
    let e = err("[daemon]\nlog = \"info\"\n\n[listener]\nport = 99999\n");
    assert!(
        e.contains("key `listener.port`") && e.contains("from 0 to 65535"),
        "{e}"
    );
    let e = err("[listener]\nport = \"x\"\n");
    assert!(e.contains("`listener.port`") && !e.contains("u16"), "{e}");
    let e = err("[listener]\nport = \"abc\"\n");
    assert!(
        e.ends_with(
            "key `listener.port`: expected a whole number from 0 to 65535, got string \"abc\""
        ),
        "{e}"
    );
    // A value inside a multi-line list: the list's key.
    let e = err("[capture]\nexclude_ports = [\n  22,\n  \"http\",\n]\n");
    assert!(
        e.contains("key `capture.exclude_ports`")
            && e.contains("from 0 to 65535")
            && !e.contains("u16"),
        "{e}"
    );
    let e = err("[daemon]\nworkers = -1\n");
    assert!(
        e.contains("`daemon.workers`: expected a whole number of 0 or more, got integer `-1`"),
        "{e}"
    );
    let e = err("[store]\nmax_age = 90\n");
    assert!(
        e.contains("`store.max_age`: expected a quoted string"),
        "{e}"
    );
    let e = err("[capture]\nloopback = \"yes\"\n");
    assert!(
        e.contains("`capture.loopback`") && e.contains("true or false"),
        "{e}"
    );
    // A syntax error keeps the parser's own report, with its position.
    let e = err("[listener\nport = 1\n");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn empty_file_is_the_embedded_default() {
    let c = parse("").unwrap();
    let d = Config::embedded_default();
    assert_eq!(c.listener_v4(), d.listener_v4());
    assert_eq!(c.listener_v4(), "127.0.0.1:951".parse().unwrap());
    assert_eq!(c.listener_v6(), Some("[::1]:951".parse().unwrap()));
    assert_eq!(c.governed.cgroup, PathBuf::from(DEFAULT_GOVERNED_CGROUP));
    assert!(!c.daemon.fail_open);
    assert!(c.capture.loopback, "loopback is captured by default");
    assert_eq!(c.capture.unmatched, Unmatched::Relay);
    assert!(
        !c.capture.fast_path,
        "the kernel fast path is off by default"
    );
    assert!(
        parse("[capture]\nfast_path = true\n")
            .unwrap()
            .capture
            .fast_path
    );
    assert_eq!(d.source, Source::Embedded);
    assert_eq!(c.daemon.admin_group, "bulkhead");
    assert_eq!(c.store.retention.max_age_us, Some(90 * 86_400 * 1_000_000));
    assert_eq!(c.store.retention.max_bytes, Some(4096 << 20));
}

#[test]
fn the_example_file_in_the_repository_parses() {
    let text = include_str!("../../../bulkhead.example.toml");
    let c = parse(text).unwrap();
    assert!(!c.targets.is_empty());
    let orders = &c.targets[0];
    let login = |u: &str, d: &str| pg_login(orders, u, d).map(|l| (l.user, l.database));
    assert_eq!(
        login("report_daily", "orders"),
        Some(("reporting".into(), "orders".into()))
    );
    assert_eq!(
        login("app", "orders"),
        Some(("app".into(), "orders".into()))
    );
    assert_eq!(login("app", "postgres"), None);
    let TargetKind::Postgres(pg) = &orders.kind else {
        panic!("orders-db is a postgres target")
    };
    assert_eq!(pg.auth, [AuthMethod::ScramSha256]);
    assert!(!pg.login_to_network);
    let cluster = c.targets.iter().find(|t| t.name == "prod-cluster").unwrap();
    let TargetKind::Kubernetes(kube) = &cluster.kind else {
        panic!("prod-cluster is a kubernetes target")
    };
    assert_eq!(kube.inject[0].prefix, "Bearer ");
}

#[test]
fn unknown_keys_are_named() {
    let e = err("[listener]\nprot = 1\n");
    assert!(e.contains("prot"), "{e}");
    assert!(e.contains("line 2"), "{e}");
    let e = err("colour = \"blue\"\n");
    assert!(e.contains("colour"), "{e}");
    let e = err("[[target]]\nname = \"db\"\naddresses = [\"10.0.0.5:5432\"]\npassword = \"x\"\n");
    assert!(e.contains("password"), "{e}");
}

#[test]
fn wrong_types_are_named() {
    let e = err("[listener]\nport = \"fifteen\"\n");
    assert!(e.contains("port"), "{e}");
    let e = err("[listener]\nport = 70000\n");
    assert!(e.contains("port"), "{e}");
}

#[test]
fn bad_values_name_the_key_and_the_problem() {
    let e = err("[listener]\nipv4 = \"10.0.0.1\"\n");
    assert!(
        e.contains("`listener.ipv4`") && e.contains("loopback"),
        "{e}"
    );
    let e = err("[listener]\nport = 0\n");
    assert!(e.contains("`listener.port`"), "{e}");
    let e = err("[capture]\nexclude = [\"10.0.0.0/33\"]\n");
    assert!(e.contains("`capture.exclude[0]`"), "{e}");
    let e = err("[governed]\ncgroup = \"/\"\n");
    assert!(e.contains("`governed.cgroup`") && e.contains("root"), "{e}");
    let e = err("[run]\nkeep_groups = [\"docker\", \" \"]\n");
    assert!(e.contains("`run.keep_groups[1]`"), "{e}");
    let c = Config::from_toml(
        "[run]\nkeep_groups = [\"docker\", \"999\"]\n",
        Source::Embedded,
    )
    .unwrap();
    assert_eq!(c.run.keep_groups, ["docker", "999"]);
    assert!(Config::embedded_default().run.keep_groups.is_empty());
    let e = err("[governed]\ncgroup = \"a/../..\"\n");
    assert!(e.contains("`governed.cgroup`"), "{e}");
    let e = err("[[target]]\nname = \"db\"\naddresses = [\"db.internal:5432\"]\n");
    assert!(e.contains("`target[0].addresses[0]`"), "{e}");
    let e = err("[[target]]\nname = \"db\"\naddresses = []\n");
    assert!(e.contains("`target[0].addresses`"), "{e}");
    let e = err("[[target]]\nname = \"a\"\naddresses = [\"10.0.0.1:1\"]\n[[target]]\nname = \"a\"\naddresses = [\"10.0.0.2:1\"]\n");
    assert!(e.contains("`target[1].name`"), "{e}");
    let e =
        err("[[target]]\nname = \"db\"\naddresses = [\"10.0.0.5:5432\"]\nprotocol = \"gopher\"\n");
    assert!(e.contains("gopher"), "{e}");
}

#[test]
fn store_retention_is_validated() {
    let e = err("[store]\nmax_age = \"forever\"\n");
    assert!(e.contains("`store.max_age`"), "{e}");
    let e = err("[store]\nprune_interval = \"0s\"\n");
    assert!(e.contains("`store.prune_interval`"), "{e}");
    let c = parse("[store]\nmax_age = \"\"\nmax_size = \"\"\n").unwrap();
    assert_eq!(c.store.retention, crate::record::Retention::default());
    let c = parse("[store]\nmax_age = \"12h\"\nmax_size = \"2MiB\"\n").unwrap();
    assert_eq!(c.store.retention.max_age_us, Some(12 * 3600 * 1_000_000));
    assert_eq!(c.store.retention.max_bytes, Some(2 << 20));
    let e = err("[store]\nmax_size = \"2 parsecs\"\n");
    assert!(e.contains("`store.max_size`"), "{e}");
    assert_eq!(parse_size("4KiB"), Ok(4096));
    assert_eq!(parse_size("100"), Ok(100));
    assert!(parse_size("99999999999TiB").is_err());
    assert!(parse_size("MiB").is_err());
}

#[test]
fn approvals_have_defaults_and_are_validated() {
    let c = parse("").unwrap();
    assert_eq!(
        c.approvals,
        ApprovalsConfig {
            default_timeout: std::time::Duration::from_mins(5),
            max_pending_per_identity: 5,
            max_pending: 100,
        }
    );
    let c = parse("[approvals]\ndefault_timeout = \"90s\"\nmax_pending = 7\n").unwrap();
    assert_eq!(c.approvals.default_timeout.as_secs(), 90);
    assert_eq!(c.approvals.max_pending, 7);
    let e = err("[approvals]\ndefault_timeout = \"soon\"\n");
    assert!(e.contains("`approvals.default_timeout`"), "{e}");
    let e = err("[approvals]\ndefault_timeout = \"0s\"\n");
    assert!(e.contains("`approvals.default_timeout`"), "{e}");
    let e = err("[approvals]\ndefault_timeout = \"3days\"\n");
    assert!(e.contains("`approvals.default_timeout`"), "{e}");
    let e = err("[approvals]\nmax_pending = 0\n");
    assert!(e.contains("`approvals.max_pending`"), "{e}");
    let e = err("[approvals]\nmax_pending_per_identity = 0\n");
    assert!(e.contains("`approvals.max_pending_per_identity`"), "{e}");
    let e = err("[approvals]\nmax_pending_per_identity = -1\n");
    assert!(e.contains("max_pending_per_identity"), "{e}");
    let e = err("[approvals]\ntimeout = \"5min\"\n");
    assert!(e.contains("timeout"), "{e}");
}

#[test]
fn targets_match_exact_sockets_before_networks() {
    let c = parse(
        "[[target]]\nname = \"net\"\naddresses = [\"10.0.0.0/24\"]\n\
         [[target]]\nname = \"db\"\naddresses = [\"10.0.0.5:5432\", \"[fd00::5]:5432\"]\n\
         credentials = { env = \"DB_PASSWORD\" }\n",
    )
    .unwrap();
    let at = |s: &str| {
        c.target_for(OrigDstAddr(s.parse().unwrap()))
            .map(|t| t.name.as_str())
    };
    assert_eq!(at("10.0.0.5:5432"), Some("db"));
    assert_eq!(at("10.0.0.5:22"), Some("net"));
    assert_eq!(at("[::ffff:10.0.0.5]:5432"), Some("db"));
    assert_eq!(at("[fd00::5]:5432"), Some("db"));
    assert_eq!(at("10.0.1.5:5432"), None);
    assert_eq!(
        c.targets[1].credentials,
        Some(CredentialRef::Env("DB_PASSWORD".into()))
    );
}

const MAPPED: &str =
    "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n\
    credentials = { file = \"/etc/bulkhead/creds/db\" }\n\
    [target.postgres]\ndatabase = \"main\"\n\
    [[target.postgres.map]]\nclient_user = \"app_ro\"\nclient_database = \"sales\"\n\
    user = \"reporting\"\ndatabase = \"sales_prod\"\n\
    credentials = { file = \"/etc/bulkhead/creds/reporting\" }\n\
    [[target.postgres.map]]\nclient_user = \"etl_*\"\nuser = \"loader\"\n\
    [[target.postgres.map]]\nclient_user = \"app_ro\"\nuser = \"reader\"\n\
    [[target.postgres.map]]\nclient_database = \"scratch\"\n";

#[test]
fn postgres_map_first_match_wins_and_unmatched_clients_are_refused() {
    let c = parse(MAPPED).unwrap();
    let t = &c.targets[0];
    let login = |u: &str, d: &str| pg_login(t, u, d);
    let reporting = CredentialRef::File("/etc/bulkhead/creds/reporting".into());
    let target_creds = CredentialRef::File("/etc/bulkhead/creds/db".into());
    assert_eq!(
        login("app_ro", "sales"),
        Some(PostgresLogin {
            user: "reporting".into(),
            database: "sales_prod".into(),
            credentials: Some(&reporting),
            mapping: Some(0),
        })
    );
    assert_eq!(
        login("app_ro", "hr"),
        Some(PostgresLogin {
            user: "reader".into(),
            database: "main".into(),
            credentials: Some(&target_creds),
            mapping: Some(2),
        }),
        "a later entry, the target's database and credentials"
    );
    assert_eq!(
        login("etl_nightly", "x").map(|l| l.user),
        Some("loader".into())
    );
    assert_eq!(login("etl_", "x").map(|l| l.mapping), Some(Some(1)));
    assert_eq!(
        login("bob", "scratch"),
        Some(PostgresLogin {
            user: "bob".into(),
            database: "main".into(),
            credentials: Some(&target_creds),
            mapping: Some(3),
        }),
        "an entry without user: the client's own (the target sets none)"
    );
    assert_eq!(login("App_ro", "sales"), None, "names are case-sensitive");
    assert_eq!(login("mallory", "sales"), None);
    assert_eq!(login("", ""), None);
}

#[test]
fn without_a_map_the_target_defaults_apply() {
    let c = parse(
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n\
         credentials = { env = \"DB_PW\" }\n[target.postgres]\nuser = \"svc\"\n\
         [[target]]\nname = \"plain\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.6:5432\"]\n\
         postgres = { auth = [\"none\"] }\n",
    )
    .unwrap();
    let env = CredentialRef::Env("DB_PW".into());
    assert_eq!(
        pg_login(&c.targets[0], "alice", "sales"),
        Some(PostgresLogin {
            user: "svc".into(),
            database: "sales".into(),
            credentials: Some(&env),
            mapping: None,
        })
    );
    assert_eq!(
        pg_login(&c.targets[1], "alice", "sales"),
        Some(PostgresLogin {
            user: "alice".into(),
            database: "sales".into(),
            credentials: None,
            mapping: None,
        })
    );
}

#[test]
fn a_map_entry_takes_what_it_leaves_out_from_the_target() {
    let c = parse(
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n\
         [target.postgres]\nuser = \"svc\"\nauth = [\"none\"]\n\
         [[target.postgres.map]]\nclient_user = \"claude\"\n",
    )
    .unwrap();
    let t = &c.targets[0];
    assert_eq!(
        pg_login(t, "claude", "orders"),
        Some(PostgresLogin {
            user: "svc".into(),
            database: "orders".into(),
            credentials: None,
            mapping: Some(0),
        })
    );
    assert_eq!(pg_login(t, "cursor", "orders"), None);
}

#[test]
fn postgres_map_errors_name_the_entry() {
    let head =
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n";
    let e = err(&format!(
        "{head}[[target.postgres.map]]\nclient_usr = \"a\"\nuser = \"b\"\n"
    ));
    assert!(e.contains("client_usr") && e.contains("client_user"), "{e}");
    let e = err(&format!(
        "{head}[[target.postgres.map]]\nclient_user = \"\"\nuser = \"b\"\n"
    ));
    assert!(e.contains("empty pattern") && e.contains("line"), "{e}");
    let e = err(&format!(
        "{head}[[target.postgres.map]]\nclient_database = \"a\\\\\"\nuser = \"b\"\n"
    ));
    assert!(e.contains("backslash"), "{e}");
    let e = err(&format!("{head}[[target.postgres.map]]\nuser = \"\"\n"));
    assert!(e.contains("`target[0].postgres.map[0].user`"), "{e}");
    let e = err(&format!(
        "{head}[[target.postgres.map]]\nuser = \"a\"\n[[target.postgres.map]]\nuser = \"b\"\ndatabase = \"\"\n"
    ));
    assert!(e.contains("`target[0].postgres.map[1].database`"), "{e}");
    let e = err(&format!(
        "{head}[[target.postgres.map]]\nuser = \"a\"\ncredentials = {{ env = \"\" }}\n"
    ));
    assert!(
        e.contains("`target[0].postgres.map[0].credentials.env`"),
        "{e}"
    );
    let e = err(&format!(
        "{head}[[target.postgres.map]]\nuser = \"a\"\ncredentials = {{ password = \"x\" }}\n"
    ));
    assert!(e.contains("password"), "{e}");
}

#[test]
fn http_and_kubernetes_targets_take_their_settings() {
    let c = parse(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddresses = [\"10.0.0.7:443\"]\n\
         [target.http]\ntls = \"passthrough\"\n",
    )
    .unwrap();
    assert_eq!(c.targets[0].protocol(), Protocol::Http);
    assert!(matches!(&c.targets[0].kind, TargetKind::Http(h)
        if h.tls == crate::proxy::http::settings::ClientTls::Passthrough));
    let e = parse(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddresses = [\"10.0.0.7:443\"]\n\
         [[target.http.inject]]\nheader = \"host\"\ncredentials = { env = \"T\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`target[0].http.inject[0].header`"), "{e}");
    let e = parse(
        "[[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddresses = [\"10.0.0.7:5432\"]\n\
         [target.http]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`target[0].http`"), "{e}");
    let c = parse(
        "[[target]]\nname = \"k\"\nprotocol = \"kubernetes\"\naddresses = [\"10.0.0.7:6443\"]\n\
         [target.kubernetes]\nca = \"/etc/k.pem\"\n",
    )
    .unwrap();
    assert!(matches!(&c.targets[0].kind, TargetKind::Kubernetes(k)
        if k.ca.as_deref() == Some(std::path::Path::new("/etc/k.pem"))));
    for (bad, key) in [
        (
            "protocol = \"http\"\n[target.kubernetes]\n",
            "`target[0].kubernetes`",
        ),
        (
            "protocol = \"kubernetes\"\n[[target.kubernetes.inject]]\nheader = \"host\"\n\
             credentials = { env = \"T\" }\n",
            "`target[0].kubernetes.inject[0].header`",
        ),
    ] {
        let e = parse(&format!(
            "[[target]]\nname = \"k\"\naddresses = [\"10.0.0.7:6443\"]\n{bad}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(key), "{e}");
    }
}

#[test]
fn postgres_auth_methods_are_named_and_validated() {
    let head = "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\n\
                addresses = [\"10.0.0.5:5432\"]\ncredentials = { env = \"DB_PW\" }\n";
    let pg = |c: &Config| match &c.targets[0].kind {
        TargetKind::Postgres(pg) => pg.clone(),
        _ => panic!("a postgres target"),
    };
    let c = parse(head).unwrap();
    assert_eq!(pg(&c).auth, [AuthMethod::ScramSha256], "the default");
    let c = parse(&format!(
        "{head}postgres = {{ auth = [\"md5\", \"password\", \"none\", \"scram-sha-256\"] }}\n"
    ))
    .unwrap();
    assert_eq!(
        pg(&c).auth,
        [
            AuthMethod::Md5,
            AuthMethod::Password,
            AuthMethod::None,
            AuthMethod::ScramSha256
        ]
    );
    let e = err(&format!("{head}postgres = {{ auth = [\"md4\"] }}\n"));
    assert!(
        e.contains("postgres.auth") && e.contains("\"md4\"") && e.contains("line 6"),
        "{e}"
    );
    let e = err(&format!("{head}[target.postgres]\nauth = [\"trust\"]\n"));
    assert!(
        e.contains("postgres.auth") && e.contains("\"none\"") && e.contains("line 7"),
        "{e}"
    );
    let e = err(&format!("{head}postgres = {{ auth = [] }}\n"));
    assert!(e.contains("`target[0].postgres.auth`"), "{e}");
}

#[test]
fn a_postgres_target_without_a_password_must_allow_none() {
    let head =
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n";
    let e = err(head);
    assert!(
        e.contains("`target[0].postgres.auth`") && e.contains("\"none\""),
        "{e}"
    );
    parse(&format!("{head}postgres = {{ auth = [\"none\"] }}\n")).unwrap();
    // Every mapped login holds its own password: the default holds.
    let mapped = "[[target.postgres.map]]\nuser = \"a\"\ncredentials = { env = \"A_PW\" }\n";
    parse(&format!("{head}{mapped}")).unwrap();
    let e = err(&format!(
        "{head}{mapped}[[target.postgres.map]]\nuser = \"b\"\n"
    ));
    assert!(e.contains("`target[0].postgres.auth`"), "{e}");
}

#[test]
fn a_postgres_target_of_networks_alone_must_opt_in_to_log_in_there() {
    let target = |addresses: &str, extra: &str| {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [{addresses}]\n\
             credentials = {{ env = \"DB_PW\" }}\n{extra}"
        )
    };
    let e = err(&target("\"10.30.0.0/24\"", ""));
    assert!(
        e.contains("`target[0].addresses`") && e.contains("postgres.login_to_network = true"),
        "{e}"
    );
    let c = parse(&target(
        "\"10.30.0.0/24\"",
        "postgres = { login_to_network = true }\n",
    ))
    .unwrap();
    assert!(matches!(&c.targets[0].kind, TargetKind::Postgres(pg) if pg.login_to_network));
    // A named server beside the network: logged in to there, refused elsewhere
    // (proxy::postgres::upstream::network_refusal).
    parse(&target("\"10.30.0.5:5432\", \"10.30.0.0/24\"", "")).unwrap();
    // Opaque TCP holds no credentials: networks alone are fine.
    parse("[[target]]\nname = \"net\"\naddresses = [\"10.30.0.0/24\"]\n").unwrap();
}

#[test]
fn a_reload_takes_the_targets_and_names_the_sections_that_wait_for_a_restart() {
    let running = parse(
        "[daemon]\nfail_open = true\n[[target]]\nname = \"a\"\naddresses = [\"10.0.0.1:5432\"]\n",
    )
    .unwrap();
    let newer =
        parse("[listener]\nport = 952\n[[target]]\nname = \"b\"\naddresses = [\"10.0.0.2:80\"]\n")
            .unwrap();
    let applied = running.with_targets_of(&newer);
    assert_eq!(applied.targets.len(), 1);
    assert_eq!(applied.targets[0].name, "b");
    assert_eq!(applied.listener, running.listener, "the listener waits");
    // The listener differs; `daemon` does not count the file's fail_open = false against a
    // daemon running fail-open (it may be the command line's `--fail-open`).
    assert_eq!(running.restart_needed(&newer), vec!["listener"]);
    let closed = parse("").unwrap();
    let opened = parse("[daemon]\nfail_open = true\n").unwrap();
    assert_eq!(closed.restart_needed(&opened), vec!["daemon"]);
    assert!(closed.restart_needed(&parse("").unwrap()).is_empty());
}
