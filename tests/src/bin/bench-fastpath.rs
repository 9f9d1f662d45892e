//! The kernel fast path for the loopback hop (`capture.fast_path`), against the ordinary path
//! and a direct connection, in the same run: two topologies (namespaces, cgroup, daemon each),
//! one daemon with the fast path off and one with it on, and rounds that alternate direct /
//! off / on so drift affects all three. Opaque TCP targets (`tcp`): with the fast path off the
//! gateway relays with splice(2), with it on by copy (splice cannot read what the fast path
//! delivers).
//!
//! 1. bulk: BULK MiB from the governed side to a sink on the target host;
//! 2. request/response: 64-byte ping-pong on one connection, the client writing as soon as it
//!    is connected (its direction then usually stays on TCP: it spoke before the gateway put
//!    its end in the map);
//! 3. the same, the client waiting 20 ms after connecting (both directions on the fast path).
//!
//! Prints medians, ratios, the load average before and after, and the fast path's counters.

use std::{process::Command, time::Duration};

use bulkhead_tests::{missing_privileges, Proc, Side, Topology, TARGET_V4};

const BULK_BYTES: u64 = 256 << 20;
const ROUNDS: usize = 5;
const EXCHANGES: u32 = 20_000;
const SINK: &str = "9000";
const ECHO: &str = "9002";

fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-fastpath: {why}");
        std::process::exit(2);
    }
    let load_before = load();
    let off = World::new(false);
    let on = World::new(true);
    let sink = format!("{TARGET_V4}:{SINK}");
    let echo = format!("{TARGET_V4}:{ECHO}");

    println!(
        "bulkhead kernel fast path ({ROUNDS} rounds, median; load average before: {load_before})"
    );
    println!();
    let bulk = three(
        |w, side| w.probe(side, &["bench-send", &sink, &BULK_BYTES.to_string()]),
        &off,
        &on,
    );
    let mib = |ns: f64| (BULK_BYTES as f64 / f64::from(1 << 20)) / (ns / 1e9);
    println!(
        "bulk, {} MiB governed -> target (opaque TCP)",
        BULK_BYTES >> 20
    );
    println!("  direct:                {:>9.0} MiB/s", mib(bulk[0]));
    println!(
        "  gateway, fast path off:{:>9.0} MiB/s  {:.2}x of direct",
        mib(bulk[1]),
        bulk[0] / bulk[1]
    );
    println!(
        "  gateway, fast path on: {:>9.0} MiB/s  {:.2}x of direct, {:.2}x of off",
        mib(bulk[2]),
        bulk[0] / bulk[2],
        bulk[1] / bulk[2]
    );
    println!();

    for (title, wait) in [
        ("the client writes at once", "0"),
        ("the client waits 20 ms after connecting", "20"),
    ] {
        let rr = three(
            |w, side| {
                w.probe(
                    side,
                    &["bench-rr", &echo, &EXCHANGES.to_string(), "64", wait],
                )
            },
            &off,
            &on,
        );
        let us = |ns: f64| ns / f64::from(EXCHANGES) / 1000.0;
        println!("request/response, 64 bytes, {title} ({EXCHANGES} exchanges)");
        println!("  direct:                {:>8.2} us/exchange", us(rr[0]));
        println!(
            "  gateway, fast path off:{:>8.2} us/exchange  (+{:.2} us)",
            us(rr[1]),
            us(rr[1]) - us(rr[0])
        );
        println!(
            "  gateway, fast path on: {:>8.2} us/exchange  (+{:.2} us; {:.2}x of off)",
            us(rr[2]),
            us(rr[2]) - us(rr[0]),
            rr[2] / rr[1]
        );
        println!();
    }
    let (_, report) = on.topo.status();
    println!(
        "fast path counters (daemon with it on): {}",
        report["daemon"]["containment"]["fast_path_counters"]
    );
    println!("load average after: {}", load());
}

struct World {
    topo: Topology,
    _servers: Vec<Proc>,
}

impl World {
    fn new(fast_path: bool) -> Self {
        let topo = Topology::new(&format!("[capture]\nfast_path = {fast_path}\n"));
        topo.allow_opaque_tcp();
        let sink = topo.echo_server_sink(Side::Target, &format!("{TARGET_V4}:{SINK}"));
        let mut cmd = Command::new(topo.probe());
        cmd.args(["echo", &format!("{TARGET_V4}:{ECHO}")]);
        let mut echo = topo.spawn(Side::Target, "echo", cmd);
        assert_eq!(echo.line(Duration::from_secs(10)).as_deref(), Some("ready"));
        let daemon = topo.start_daemon(&[]);
        Self {
            topo,
            _servers: vec![sink, echo, daemon],
        }
    }

    /// Runs the probe with `args` on `side`; its printed nanoseconds.
    fn probe(&self, side: Side, args: &[&str]) -> f64 {
        let mut cmd = Command::new(self.topo.probe());
        cmd.args(args);
        let out = self.topo.output(side, cmd);
        assert!(
            out.status.success(),
            "probe {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("probe printed {text:?}: {e}"))
    }
}

/// Medians of direct (ungoverned, from `off`'s host side), through `off`'s gateway and through
/// `on`'s, over alternating rounds.
fn three(run: impl Fn(&World, Side) -> f64, off: &World, on: &World) -> [f64; 3] {
    let mut r: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        r[0].push(run(off, Side::Host));
        r[1].push(run(off, Side::Governed));
        r[2].push(run(on, Side::Governed));
    }
    r.map(median)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
