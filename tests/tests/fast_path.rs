//! The kernel fast path for the loopback hop (`capture.fast_path`): with it on, the gateway's
//! sends to a governed client go straight into the client socket's receive queue (the
//! `sk_msg` program's counters show it), and what the client sees is unchanged. The rest of
//! the foundation and PostgreSQL suites run with it on too (`BULKHEAD_TEST_FAST_PATH=1`).

use bulkhead_tests::{require_root, Side, Topology, TARGET_V4};
use serde_json::Value;

const POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"

[[rule]]
id = "db-read"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "session", "transaction"] }
"#;

/// `script` through the gateway (`fast_path` on or off): psql's output lines, and the
/// status report's containment section after the session closed.
fn run(fast_path: bool, script: &str) -> (Vec<String>, Value) {
    require_root();
    let topo = Topology::new("");
    let pg = topo.postgres("scram-sha-256");
    let _daemon = topo.held_postgres_target(
        &format!("\"{TARGET_V4}:5432\""),
        &pg.password,
        POLICY,
        &format!("\n[capture]\nfast_path = {fast_path}\n"),
    );
    // Plain text on the wire, so every byte is the gateway's own read and write.
    let (ok, out, err) = topo.psql(&pg, script, &[("PGSSLMODE", "disable")]);
    assert!(ok, "psql: {err}");
    topo.wait_session_closed();
    let (code, report) = topo.status();
    assert_eq!(code, Some(0), "{report}");
    (
        out.lines().map(str::to_string).collect(),
        report["daemon"]["containment"].clone(),
    )
}

#[test]
fn with_the_fast_path_on_the_gateway_answers_through_the_kernel_and_psql_sees_the_same() {
    // Answers and a query larger than a socket buffer, so a lost or reordered byte would show.
    let big_literal: String = (0..40_000).map(|i| format!("{i:07},")).collect();
    let script = format!(
        "SELECT 40 + 2;\n\
         SELECT repeat('x', 300000);\n\
         SELECT string_agg(i::text, ',') FROM generate_series(1, 60000) i;\n\
         SELECT md5('{big_literal}'), length('{big_literal}');\n\
         SELECT 'done';\n"
    );
    let script = script.as_str();
    let (off_lines, off) = run(false, script);
    let (on_lines, on) = run(true, script);
    assert_eq!(off_lines.len(), 5, "{off_lines:?}");
    assert_eq!(off_lines[0], "42");
    assert_eq!(off_lines[1].len(), 300_000);
    assert!(off_lines[3].ends_with("|320000"), "{}", off_lines[3]);
    assert_eq!(
        on_lines, off_lines,
        "the same answers with the fast path on"
    );

    assert_eq!(off["fast_path"], "off", "{off}");
    assert!(off["fast_path_counters"].is_null(), "{off}");

    assert_eq!(on["fast_path"], "on", "{on}");
    let n = &on["fast_path_counters"];
    println!("fast path counters: {n}");
    assert!(n["governed_sockets"].as_u64() >= Some(1), "{n}");
    assert_eq!(n["governed_failed"], 0, "{n}");
    // The gateway put its end in the map before answering: its answers, which include a
    // 300 kB row, went straight to psql's socket.
    assert!(n["redirected"].as_u64() > Some(0), "{n}");
    assert!(n["redirected_bytes"].as_u64() > Some(300_000), "{n}");
}

/// Blocking clients that read right after they write, many at once, through the fast path:
/// every one must get its answer. On Linux 6.18 some get `EAGAIN` from a blocking read
/// instead (`tcp_bpf_recvmsg` returns it when a wake-up that brought no data ends its wait),
/// which is why `capture.fast_path` is off by default. Run it with `--ignored` on a kernel to
/// be trusted with the fast path.
#[test]
#[ignore = "fails on Linux 6.18: a socket in a sockmap can return EAGAIN from a blocking read"]
fn blocking_clients_through_the_fast_path_all_get_their_answer() {
    require_root();
    let topo = Topology::new("[capture]\nfast_path = true\n");
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);
    let dst = format!("{TARGET_V4}:7000");
    let failed: Vec<Value> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..12)
            .map(|t| {
                let (topo, dst) = (&topo, &dst);
                s.spawn(move || {
                    (0..6)
                        .map(|i| topo.probe_connect(Side::Governed, dst, &format!("t{t}i{i}")))
                        .filter(|r| r["reply"].is_null())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        failed.is_empty(),
        "{} of 72 failed: {failed:?}",
        failed.len()
    );
}
