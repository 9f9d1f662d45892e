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
//!    target) vs direct, beside the floor for any proxy on the gateway's runtime: `bh-probe
//!    relay-async` (accept, dial, copy; nothing else);
//! 4. the UDP sendmsg hook's cost per datagram;
//! 5. a bulk transfer through the gateway's relay vs direct, beside the ceiling: the same
//!    transfer through `bh-probe relay` (a thread copying with blocking reads and writes, no
//!    event loop, nothing recorded) on the same path (loopback, then the veth).
//!
//! Rounds alternate baseline and subject so drift affects both; the median round is reported.
//! Run with `cargo xtask bench` (root; builds in release mode). `BENCH_FOUNDATION_ONLY=echo`
//! runs only the connect-and-echo measurement (`BENCH_ECHO_ROUNDS` rounds, default 5), for
//! profiling: the daemon's pid is printed first. `BENCH_FOUNDATION_ONLY=bulk` runs only the bulk
//! transfer (`BENCH_BULK_ROUNDS` rounds, default 3), with the daemon's CPU per MiB relayed.

use std::{process::Command, time::Duration};

use bulkhead_tests::{cpu_us, missing_privileges, Side, Topology, TARGET_V4};

const CONNECTS: u32 = 2_000;
const ROUNDS: usize = 5;
const BULK_BYTES: u64 = 1 << 30;
const BULK_ROUNDS: usize = 3;
const DATAGRAMS: u32 = 200_000;
const UDP_PORT: u16 = 9001;
const ECHO_PORT: u16 = 9002;
/// Connects per round of the connect-and-echo measurement (each one a gateway session).
const ECHO_CONNECTS: u32 = 1_000;
/// Where the bulk transfer's bare relay listens (on the host side's loopback).
const BULK_RELAY: &str = "127.0.0.1:9100";
/// The connect-and-echo measurement's bare relay (`bh-probe relay-async`, on the host side's
/// loopback) and the echo server of its own it dials: a port of its own, so its TIME_WAITs do
/// not crowd the ephemeral ports toward the other legs' echo server.
const ECHO_RELAY: &str = "127.0.0.1:9103";
const ECHO_RELAY_PORT: u16 = 9003;

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
    let daemon = topo.start_daemon(&[]);
    let target = format!("{TARGET_V4}:9000");
    if only_one(&topo, daemon.pid(), &target) {
        return;
    }

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

    connect_and_echo(&topo, daemon.pid(), ROUNDS);

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

    bulk_rounds(&topo, daemon.pid(), &target, BULK_ROUNDS);
}

/// What a tool feels: connect, one byte echoed back by the target, close; through the gateway
/// against direct, with the daemon's CPU time per gateway connection (everything it does for
/// one: accept, identify, record, decide, dial, relay, close; plus answering the `status`
/// polls of the wait for the round to drain) and the load average per round.
fn connect_and_echo(topo: &Topology, daemon: u32, rounds: usize) {
    let echo_target = format!("{TARGET_V4}:{ECHO_PORT}");
    let _relay_echo = echo_server(topo, &format!("{TARGET_V4}:{ECHO_RELAY_PORT}"));
    let relay = topo.probe_server(
        Side::Host,
        "echo-relay",
        &[
            "relay-async",
            ECHO_RELAY,
            &format!("{TARGET_V4}:{ECHO_RELAY_PORT}"),
        ],
    );
    let per = |ns: f64| ns / f64::from(ECHO_CONNECTS) / 1000.0;
    println!(
        "connect() + first byte echoed back by the target + close() ({ECHO_CONNECTS} per round; relay: bh-probe relay-async, the floor)"
    );
    println!(
        "round    direct  gateway    relay    added  relay added  gw cpu/conn  relay cpu/conn  load"
    );
    let (mut base, mut subject, mut added, mut cpu) = (vec![], vec![], vec![], vec![]);
    let (mut relayed, mut relay_added, mut relay_cpu) = (vec![], vec![], vec![]);
    for round in 1..=rounds {
        let b = per(echo_loop(topo, Side::Host, &echo_target));
        let cpu_before = cpu_us(daemon);
        let s = per(echo_loop(topo, Side::Governed, &echo_target));
        // Drained: every session of the round closed and recorded.
        let c = (cpu_us(daemon) - cpu_before) / f64::from(ECHO_CONNECTS);
        let relay_before = cpu_us(relay.pid());
        let r = per(echo_loop(topo, Side::Host, ECHO_RELAY));
        let rc = (cpu_us(relay.pid()) - relay_before) / f64::from(ECHO_CONNECTS);
        println!(
            "{round:<5} {b:>9.1} {s:>8.1} {r:>8.1} {:>+8.1} {:>+12.1} {c:>9.1} us  {rc:>11.1} us  {}",
            s - b,
            r - b,
            load()
        );
        relay_cpu.push(rc);
        base.push(b);
        subject.push(s);
        added.push(s - b);
        relayed.push(r);
        relay_added.push(r - b);
        cpu.push(c);
    }
    let (b, s) = (median(base), median(subject));
    println!("  direct            {b:>8.2} us/connect");
    println!("  through gateway   {s:>8.2} us/connect");
    println!("  through the relay {:>8.2} us/connect", median(relayed));
    println!(
        "  overhead:         {:>+8.2} us/connect (median of the same-round differences), ratio {:.2}x (target <= +50 us); the bare relay {:>+.2} us",
        median(added),
        s / b,
        median(relay_added)
    );
    println!(
        "  gateway CPU:      {:>8.1} us per connection (median); the bare relay {:.1} us",
        median(cpu),
        median(relay_cpu)
    );
    println!();
}

/// The one-minute load average, to print beside a round's figures.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
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
    topo.probe_server(Side::Target, "echo", &["echo", addr])
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

/// `BENCH_FOUNDATION_ONLY=echo|bulk`: runs that measurement alone (`BENCH_ECHO_ROUNDS` or
/// `BENCH_BULK_ROUNDS` rounds); whether it did.
fn only_one(topo: &Topology, daemon: u32, target: &str) -> bool {
    let rounds = |var: &str, default: usize| {
        std::env::var(var).map_or(default, |r| {
            r.parse().unwrap_or_else(|_| panic!("{var} is a number"))
        })
    };
    match std::env::var("BENCH_FOUNDATION_ONLY").as_deref() {
        Ok("echo") => {
            println!("daemon pid {daemon}");
            connect_and_echo(topo, daemon, rounds("BENCH_ECHO_ROUNDS", ROUNDS));
        }
        Ok("bulk") => bulk_rounds(
            topo,
            daemon,
            target,
            rounds("BENCH_BULK_ROUNDS", BULK_ROUNDS),
        ),
        _ => return false,
    }
    true
}

/// The bulk transfer alone: direct and through the gateway alternating, each round's
/// throughput, ratio and the daemon's CPU per MiB it relayed (steadier than throughput on a
/// shared machine), then the medians.
#[expect(clippy::cast_precision_loss, reason = "1 GiB is far below 2^52")]
fn bulk_rounds(topo: &Topology, daemon: u32, target: &str, rounds: usize) {
    let _relay = topo.probe_server(Side::Host, "bulk-relay", &["relay", BULK_RELAY, target]);
    let mib = |ns: f64| (BULK_BYTES as f64 / f64::from(1 << 20)) / (ns / 1e9);
    println!("daemon pid {daemon}");
    println!(
        "bulk transfer, {} MiB per round (relay: bh-probe relay, the ceiling)",
        BULK_BYTES >> 20
    );
    println!("round    direct   gateway     relay  gateway   relay  gw cpu/MiB  load");
    let (mut direct, mut gateway, mut relayed) = (vec![], vec![], vec![]);
    let (mut ratio, mut relay_ratio, mut cpu) = (vec![], vec![], vec![]);
    for round in 1..=rounds {
        let d = bulk(topo, Side::Host, target);
        let before = cpu_us(daemon);
        let g = bulk(topo, Side::Governed, target);
        let c =
            (cpu_us(daemon) - before) / f64::from(u32::try_from(BULK_BYTES >> 20).expect("MiB"));
        let r = bulk(topo, Side::Host, BULK_RELAY);
        println!(
            "{round:<5} {:>9.0} {:>9.0} {:>9.0}  {:>6.2}x {:>6.2}x {:>8.1} us  {}",
            mib(d),
            mib(g),
            mib(r),
            d / g,
            d / r,
            c,
            load()
        );
        direct.push(mib(d));
        gateway.push(mib(g));
        relayed.push(mib(r));
        ratio.push(d / g);
        relay_ratio.push(d / r);
        cpu.push(c);
    }
    println!(
        "median: direct {:.0} MiB/s, through the gateway {:.0} MiB/s, {:.2}x of direct (target >= 0.90x), {:.1} us daemon CPU per MiB; through the bare relay {:.0} MiB/s, {:.2}x (the ceiling); ratios are medians of the same-round ratios",
        median(direct),
        median(gateway),
        median(ratio),
        median(cpu),
        median(relayed),
        median(relay_ratio)
    );
}
