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
//! Prints medians, ratios, each daemon's CPU per MiB or per exchange, the load average before
//! and after, and the fast path's counters. `BENCH_FASTPATH_ONLY=rr` runs the two
//! request/response measurements alone.

use std::{process::Command, time::Duration};

use bulkhead_tests::{cpu_us, missing_privileges, Proc, Side, Topology, TARGET_V4};

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
    if std::env::var("BENCH_FASTPATH_ONLY").as_deref() != Ok("rr") {
        bulk(&off, &on, &sink);
    }

    for (title, wait) in [
        ("the client writes at once", "0"),
        ("the client waits 20 ms after connecting", "20"),
    ] {
        let Legs { time: rr, cpu } = three(
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
        let cpu = cpu.map(|c| c / f64::from(EXCHANGES));
        println!(
            "  gateway, fast path off:{:>8.2} us/exchange  (+{:.2} us)  daemon CPU {:.2} us/exchange",
            us(rr[1]),
            us(rr[1]) - us(rr[0]),
            cpu[0]
        );
        println!(
            "  gateway, fast path on: {:>8.2} us/exchange  (+{:.2} us; {:.2}x of off)  daemon CPU {:.2} us/exchange",
            us(rr[2]),
            us(rr[2]) - us(rr[0]),
            rr[2] / rr[1],
            cpu[1]
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

/// Opaque TCP bulk, governed side to the sink: throughput and each daemon's CPU per MiB.
fn bulk(off: &World, on: &World, sink: &str) {
    let Legs { time: bulk, cpu } = three(
        |w, side| w.probe(side, &["bench-send", sink, &BULK_BYTES.to_string()]),
        off,
        on,
    );
    let mibs = BULK_BYTES as f64 / f64::from(1 << 20);
    let mib = |ns: f64| mibs / (ns / 1e9);
    let cpu = cpu.map(|c| c / mibs);
    println!(
        "bulk, {} MiB governed -> target (opaque TCP)",
        BULK_BYTES >> 20
    );
    println!("  direct:                {:>9.0} MiB/s", mib(bulk[0]));
    println!(
        "  gateway, fast path off:{:>9.0} MiB/s  {:.2}x of direct  daemon CPU {:.0} us/MiB",
        mib(bulk[1]),
        bulk[0] / bulk[1],
        cpu[0]
    );
    println!(
        "  gateway, fast path on: {:>9.0} MiB/s  {:.2}x of direct, {:.2}x of off  daemon CPU {:.0} us/MiB",
        mib(bulk[2]),
        bulk[0] / bulk[2],
        bulk[1] / bulk[2],
        cpu[1]
    );
    println!();
}

struct World {
    topo: Topology,
    daemon: u32,
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
            daemon: daemon.pid(),
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

/// Medians over alternating rounds: the run's time direct (ungoverned, from `off`'s host
/// side), through `off`'s gateway and through `on`'s; and the daemon CPU (us) of the two
/// gateway legs.
struct Legs {
    time: [f64; 3],
    cpu: [f64; 2],
}

fn three(run: impl Fn(&World, Side) -> f64, off: &World, on: &World) -> Legs {
    let mut time: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 2] = Default::default();
    let through = |w: &World, cpu: &mut Vec<f64>| {
        let before = cpu_us(w.daemon);
        let t = run(w, Side::Governed);
        cpu.push(cpu_us(w.daemon) - before);
        t
    };
    for _ in 0..ROUNDS {
        time[0].push(run(off, Side::Host));
        let t = through(off, &mut cpu[0]);
        time[1].push(t);
        let t = through(on, &mut cpu[1]);
        time[2].push(t);
    }
    Legs {
        time: time.map(median),
        cpu: cpu.map(median),
    }
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
