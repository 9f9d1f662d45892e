//! Foundation benchmarks, each printed as a ratio against a baseline measured in the same run,
//! on the same topology (namespaces and veth of its own, see `bulkhead_tests::Topology`):
//!
//! 1. connect()+close() of a governed process vs an ungoverned one to the same listener when
//!    the destination is not captured (the cost of the cgroup hook itself);
//! 2. connect()+close() of a governed process whose connect is captured and redirected to the
//!    gateway vs an ungoverned process connecting directly to the same target (the clock stops
//!    when connect() returns, before the gateway has accepted: the hook and redirect alone);
//! 3. connect(), one byte sent and its echo read back from the target, close(): what a tool
//!    feels before its first answer, through the gateway (accept, identify, record, dial the
//!    target) vs direct;
//! 4. the UDP sendmsg hook's cost per datagram;
//! 5. a bulk transfer through the gateway's relay vs direct.
//!
//! Rounds alternate baseline and subject so drift affects both; the median round is reported.
//! Run with `cargo xtask bench` (root; builds in release mode).

use std::{process::Command, time::Duration};

use bulkhead_tests::{missing_privileges, Side, Topology, TARGET_V4};

const CONNECTS: u32 = 2_000;
const ROUNDS: usize = 5;
const BULK_BYTES: u64 = 1 << 30;
const BULK_ROUNDS: usize = 3;
const DATAGRAMS: u32 = 200_000;
const UDP_PORT: u16 = 9001;
const ECHO_PORT: u16 = 9002;
/// Connects per round of the connect-and-echo measurement (each one a gateway session).
const ECHO_CONNECTS: u32 = 1_000;

fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-foundation: {why}");
        std::process::exit(2);
    }
    // With loopback not captured, port 9000 on the governed side's loopback is the "same
    // listener, not captured" case.
    let topo = Topology::new(&format!(
        "[capture]\nloopback = false\nudp_allow = [\"{TARGET_V4}:{UDP_PORT}\"]\n"
    ));
    // The relay's cost, not the policy's refusal: let opaque TCP through.
    topo.allow_opaque_tcp();
    let _local_sink = topo.echo_server_sink(Side::Host, "127.0.0.1:9000");
    let _target_sink = topo.echo_server_sink(Side::Target, &format!("{TARGET_V4}:9000"));
    let _target_echo = echo_server(&topo, &format!("{TARGET_V4}:{ECHO_PORT}"));
    let _daemon = topo.start_daemon(&[]);

    println!("bulkhead foundation benchmarks ({ROUNDS} rounds of {CONNECTS} connects, {BULK_ROUNDS} rounds of {} MiB; median)", BULK_BYTES >> 20);
    println!();

    let (base, subject) = alternate(
        ROUNDS,
        || connect_loop(&topo, Side::Host, "127.0.0.1:9000"),
        || connect_loop(&topo, Side::Governed, "127.0.0.1:9000"),
    );
    report_connect(
        "hook only (not captured)",
        "ungoverned",
        base,
        "governed",
        subject,
    );

    let target = format!("{TARGET_V4}:9000");
    let (base, subject) = alternate(
        ROUNDS,
        || connect_loop(&topo, Side::Host, &target),
        || connect_loop(&topo, Side::Governed, &target),
    );
    report_connect(
        "captured, redirected to the gateway",
        "direct",
        base,
        "governed",
        subject,
    );

    connect_and_echo(&topo);

    // UDP: the sendmsg hook's cost per datagram to an allowed destination, hooked (governed)
    // against unhooked (outside the cgroup), same socket work otherwise.
    let udp_target = format!("{TARGET_V4}:{UDP_PORT}");
    let (mut cpu_b, mut cpu_s) = (Vec::new(), Vec::new());
    let (base, subject) = alternate(
        ROUNDS,
        || {
            let (wall, c) = udp_loop(&topo, Side::Host, &udp_target);
            cpu_b.push(c);
            wall
        },
        || {
            let (wall, c) = udp_loop(&topo, Side::Governed, &udp_target);
            cpu_s.push(c);
            wall
        },
    );
    let per = |ns: f64| ns / f64::from(DATAGRAMS) / 1000.0;
    let (cpu_base, cpu_subject) = (median(cpu_b), median(cpu_s));
    println!("sendto() of a 64-byte datagram to an allowed destination ({DATAGRAMS} per round)");
    println!(
        "  unhooked:         {:>8.3} us/datagram, CPU {:>6.3} us",
        per(base),
        per(cpu_base)
    );
    println!(
        "  governed:         {:>8.3} us/datagram, CPU {:>6.3} us",
        per(subject),
        per(cpu_subject)
    );
    println!(
        "  overhead:         {:>+8.3} us/datagram, CPU {:>+6.3} us, ratio {:.2}x (target <= +2 us)",
        per(subject) - per(base),
        per(cpu_subject) - per(cpu_base),
        subject / base
    );
    println!();

    let (base, subject) = alternate(
        BULK_ROUNDS,
        || bulk(&topo, Side::Host, &target),
        || bulk(&topo, Side::Governed, &target),
    );
    let mib = |ns: f64| (BULK_BYTES as f64 / (1 << 20) as f64) / (ns / 1e9);
    println!("bulk transfer, {} MiB", BULK_BYTES >> 20);
    println!("  direct:           {:>9.0} MiB/s", mib(base));
    println!("  through gateway:  {:>9.0} MiB/s", mib(subject));
    println!(
        "  ratio:            {:>9.2}x of direct (target >= 0.80x)",
        base / subject
    );
}

/// What a tool feels: connect, one byte echoed back by the target, close; through the gateway
/// against direct.
fn connect_and_echo(topo: &Topology) {
    let echo_target = format!("{TARGET_V4}:{ECHO_PORT}");
    let (base, subject) = alternate(
        ROUNDS,
        || echo_loop(topo, Side::Host, &echo_target),
        || echo_loop(topo, Side::Governed, &echo_target),
    );
    let per = |ns: f64| ns / f64::from(ECHO_CONNECTS) / 1000.0;
    println!(
        "connect() + first byte echoed back by the target + close() ({ECHO_CONNECTS} per round)"
    );
    println!("  direct            {:>8.2} us/connect", per(base));
    println!("  through gateway   {:>8.2} us/connect", per(subject));
    println!(
        "  overhead:         {:>+8.2} us/connect, ratio {:.2}x (target <= +50 us)",
        per(subject) - per(base),
        subject / base
    );
    println!();
}

/// Runs baseline and subject `rounds` times, alternating; returns their medians.
fn alternate(
    rounds: usize,
    mut base: impl FnMut() -> f64,
    mut subject: impl FnMut() -> f64,
) -> (f64, f64) {
    let mut b = Vec::with_capacity(rounds);
    let mut s = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        b.push(base());
        s.push(subject());
    }
    (median(b), median(s))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report_connect(what: &str, base_name: &str, base_ns: f64, subject_name: &str, subject_ns: f64) {
    let per = |ns: f64| ns / f64::from(CONNECTS) / 1000.0;
    println!("connect()+close(), {what}");
    println!("  {base_name:<16}  {:>8.2} us/connect", per(base_ns));
    println!("  {subject_name:<16}  {:>8.2} us/connect", per(subject_ns));
    println!(
        "  overhead:         {:>+8.2} us/connect, ratio {:.2}x (target <= +5 us)",
        per(subject_ns) - per(base_ns),
        subject_ns / base_ns
    );
    println!();
}

/// Nanoseconds for `CONNECTS` connect()+close() from `side`.
fn connect_loop(topo: &Topology, side: Side, addr: &str) -> f64 {
    let mut cmd = Command::new(topo.probe());
    cmd.args(["bench-connect", addr, &CONNECTS.to_string()]);
    let out = topo.output(side, cmd);
    assert!(
        out.status.success(),
        "bench-connect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drained(topo);
    parse_ns(&out.stdout)
}

/// Nanoseconds for `ECHO_CONNECTS` connects from `side`, each with one byte echoed back.
fn echo_loop(topo: &Topology, side: Side, addr: &str) -> f64 {
    let mut cmd = Command::new(topo.probe());
    cmd.args(["bench-echo", addr, &ECHO_CONNECTS.to_string()]);
    let out = topo.output(side, cmd);
    assert!(
        out.status.success(),
        "bench-echo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drained(topo);
    parse_ns(&out.stdout)
}

/// Waits until the gateway has finished every session (recorded and closed), so one round's
/// work does not run into the next one's clock.
fn drained(topo: &Topology) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, report) = topo.status();
        if report["daemon"]["connections"]["active"].as_u64() == Some(0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway sessions still open 30 s after the round: {report}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `bh-probe echo` on the target host.
fn echo_server(topo: &Topology, addr: &str) -> bulkhead_tests::Proc {
    let mut cmd = Command::new(topo.probe());
    cmd.args(["echo", addr]);
    let mut p = topo.spawn(Side::Target, "echo", cmd);
    assert_eq!(
        p.line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "echo did not start: {}",
        p.stderr()
    );
    p
}

/// Wall and CPU nanoseconds for `DATAGRAMS` sendto() from `side`.
fn udp_loop(topo: &Topology, side: Side, addr: &str) -> (f64, f64) {
    let mut cmd = Command::new(topo.probe());
    cmd.args(["bench-udp", addr, &DATAGRAMS.to_string()]);
    let out = topo.output(side, cmd);
    assert!(
        out.status.success(),
        "bench-udp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<f64>().expect("ns"));
    (
        fields.next().expect("wall ns"),
        fields.next().expect("cpu ns"),
    )
}

/// Nanoseconds to send `BULK_BYTES` from `side` and get the sink's count back.
fn bulk(topo: &Topology, side: Side, addr: &str) -> f64 {
    let mut cmd = Command::new(topo.probe());
    cmd.args(["bench-send", addr, &BULK_BYTES.to_string()]);
    let out = topo.output(side, cmd);
    assert!(
        out.status.success(),
        "bench-send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_ns(&out.stdout)
}

fn parse_ns(stdout: &[u8]) -> f64 {
    let text = String::from_utf8_lossy(stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("probe printed {text:?}: {e}"))
}
