//! PostgreSQL gateway benchmark: pgbench through the gateway (policy and recording on), with
//! the kernel fast path (`capture.fast_path`) off and on, against pgbench straight to the
//! server, through pgbouncer (session pooling), through a bare threaded relay and through a
//! bare relay on tokio (the daemon's runtime), all in one run on the same server, in
//! alternating rounds (`BENCH_PG_ROUNDS`, 3), printed as ratios of the direct figure with the
//! medians of the rounds, then the figures of issue 17 (the gateway against pgbouncer and the
//! bare relay, as medians of same-round ratios).
//!
//! One daemon serves both gateway legs: it is restarted with the fast path on before the
//! `gateway-fp` leg and with it off before the `gateway` leg (a restart costs about a second
//! and is not timed; each run starts its own pgbench connections anyway).
//!
//! Every gateway run is checked against the store: the events the daemon recorded during it
//! must cover every transaction pgbench completed (a request and a response per simple-mode
//! statement, a response per prepared execution). An event dropped under load fails the run.
//!
//! `BENCH_PG_CAPTURE` adds lines to the daemon's `[capture]` table (see [`daemon_capture`]),
//! for comparing other capture settings; `fast_path` is the legs' to set. `BENCH_PG_POLICY`
//! adds rules to the policy (e.g. a deny rule naming a table, which makes the gateway ask
//! the catalog for the kin of every statement's tables).
//!
//! Run with `cargo xtask bench` (root; release build).

use std::{
    cell::{Cell, RefCell},
    fs,
    process::Command,
    time::Duration,
};

use bulkhead_tests::{missing_privileges, system_user, Proc, Side, Topology, TARGET_V4};

const SECONDS: &str = "10";

/// The daemon's `[capture]` table: loopback not captured (pgbouncer and the relay listen on
/// the governed side's loopback, like peers installed next to the tool), plus `extra` lines.
fn daemon_capture(extra: &str) -> String {
    assert!(
        !extra.contains("fast_path"),
        "BENCH_PG_CAPTURE must not set fast_path: the gateway legs run with it off and on"
    );
    format!("[capture]\nloopback = false\n{extra}\n")
}

/// The line [`Gateway::fast_path`] adds to the `[capture]` table.
const FAST_PATH_ON: &str = "fast_path = true\n";

/// The daemon both gateway legs measure, restarted when a leg needs the other fast-path
/// setting.
struct Gateway<'t> {
    topo: &'t Topology,
    daemon: RefCell<Proc>,
    fast_path: Cell<bool>,
}

impl Gateway<'_> {
    fn pid(&self) -> u32 {
        self.daemon.borrow().pid()
    }

    /// Restarts the daemon with `capture.fast_path` set to `on`, unless it runs so already.
    fn fast_path(&self, on: bool) {
        if self.fast_path.get() == on {
            return;
        }
        let config = fs::read_to_string(&self.topo.config_path).expect("read config");
        let config = if on {
            config.replacen("[capture]\n", &format!("[capture]\n{FAST_PATH_ON}"), 1)
        } else {
            config.replacen(FAST_PATH_ON, "", 1)
        };
        assert_eq!(
            config.contains(FAST_PATH_ON),
            on,
            "no [capture] table to set fast_path in: {config}"
        );
        fs::write(&self.topo.config_path, config).expect("write config");
        self.daemon.borrow_mut().terminate();
        *self.daemon.borrow_mut() = self.topo.start_daemon(&[]);
        self.fast_path.set(on);
    }
}

/// Sends the daemon's kernel fast path has moved so far.
fn redirected(topo: &Topology) -> u64 {
    let (_, report) = topo.status();
    report["daemon"]["containment"]["fast_path_counters"]["redirected"]
        .as_u64()
        .unwrap_or_else(|| panic!("no fast path counters in {report}"))
}

/// Events the daemon has recorded so far, results it wrote into their request events instead
/// of events of their own, the bytes its store holds, and its open connections.
fn recorded(topo: &Topology) -> (u64, u64, u64, u64) {
    let (_, report) = topo.status();
    let number = |v: &serde_json::Value, what: &str| {
        v.as_u64()
            .unwrap_or_else(|| panic!("no {what} in {report}"))
    };
    (
        number(&report["store"]["events"], "store event count"),
        number(
            &report["store"]["results_in_requests"],
            "results written into requests",
        ),
        number(&report["store"]["recorded_bytes"], "recorded bytes"),
        number(
            &report["daemon"]["connections"]["active"],
            "active connection count",
        ),
    )
}

/// The store's event count and recorded bytes once every gateway session has ended (their
/// last results recorded).
fn recorded_when_drained(topo: &Topology) -> (u64, u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (events, merged, bytes, active) = recorded(topo);
        if active == 0 {
            return (events, merged, bytes);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway sessions still open 30 s after pgbench ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `BENCH_PG_ONLY=direct|gateway|gateway-fp|pgbouncer|relay|tokio-relay` runs only that leg, for `BENCH_PG_SECONDS`
/// per mode (for profiling it from outside).
fn only() -> Option<String> {
    std::env::var("BENCH_PG_ONLY").ok()
}

/// The pgbench query modes `BENCH_PG_ONLY` runs: `BENCH_PG_MODES` (comma-separated, e.g.
/// `extended`: an unnamed Parse per statement, as most drivers send), else simple and prepared.
fn only_modes() -> Vec<String> {
    std::env::var("BENCH_PG_MODES").map_or_else(
        |_| vec!["simple".into(), "prepared".into()],
        |m| m.split(',').map(str::to_string).collect(),
    )
}

fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-postgres: {why}");
        std::process::exit(2);
    }
    let topo = Topology::new("");
    let policy = format!(
        "{}\n{}",
        r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"

[[rule]]
id = "bench"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session", "insert", "update", "delete", "ddl", "truncate", "sequence", "maintenance"] }
"#,
        std::env::var("BENCH_PG_POLICY").unwrap_or_default()
    );
    let (pg, daemon) = topo.postgres_target_with(
        "scram-sha-256",
        &policy,
        &daemon_capture(&std::env::var("BENCH_PG_CAPTURE").unwrap_or_default()),
    );
    let gateway = Gateway {
        topo: &topo,
        daemon: RefCell::new(daemon),
        fast_path: Cell::new(false),
    };

    // pgbouncer on the governed side's loopback (not captured), session pooling.
    let (pg_uid, pg_gid) = system_user("postgres");
    let bouncer_dir = topo.dir.join("pgbouncer");
    fs::create_dir_all(&bouncer_dir).unwrap();
    fs::write(
        bouncer_dir.join("userlist.txt"),
        format!("\"{}\" \"{}\"\n", pg.user, pg.password),
    )
    .unwrap();
    fs::write(
        bouncer_dir.join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host={TARGET_V4} port=5432 dbname=postgres\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = 6432\nauth_type = scram-sha-256\nauth_file = {}/userlist.txt\n\
             pool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\nunix_socket_dir =\n\
             logfile = {}/pgbouncer.log\n",
            bouncer_dir.display(),
            bouncer_dir.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&bouncer_dir, Some(pg_uid), Some(pg_gid)).unwrap();
    for f in ["userlist.txt", "pgbouncer.ini"] {
        std::os::unix::fs::chown(bouncer_dir.join(f), Some(pg_uid), Some(pg_gid)).unwrap();
    }
    let mut cmd = Command::new("pgbouncer");
    cmd.arg(bouncer_dir.join("pgbouncer.ini"));
    let bouncer_proc = topo.spawn_as(Side::Host, Some((pg_uid, pg_gid)), "pgbouncer", cmd);
    std::thread::sleep(Duration::from_millis(500));

    // Initialise straight on the server.
    let init = pgbench(
        &topo,
        Side::Host,
        TARGET_V4,
        "5432",
        &pg.password,
        &["-i", "-s", "10", "-q"],
    );
    assert!(init.contains("done"), "{init}");

    // The ceiling for any proxy here: a relay that only copies bytes (`bh-probe relay`).
    let target = format!("{TARGET_V4}:5432");
    let relay_proc = topo.probe_server(Side::Host, "relay", &["relay", "127.0.0.1:6433", &target]);

    // The ceiling for a gateway on tokio: a relay on the daemon's runtime (one current-thread
    // runtime, a task per connection), nothing parsed, decided or recorded.
    let tokio_relay = topo.probe_server(
        Side::Host,
        "tokio-relay",
        &["relay-async", "127.0.0.1:6434", &target],
    );
    println!("pgbench -S, 8 clients, 2 threads, {SECONDS} s per run, scale 10; PostgreSQL 15 on the target host");
    println!("ratios are of the direct figure; cpu/tx is each proxy's CPU (user + system) per transaction, in us");
    println!();
    let seconds = std::env::var("BENCH_PG_SECONDS").unwrap_or_else(|_| SECONDS.into());
    // Each leg: where pgbench runs, where it connects, the password it gives, the proxy's pid.
    let legs = [
        Leg {
            name: "direct",
            side: Side::Host,
            host: TARGET_V4,
            port: "5432",
            password: pg.password.as_str(),
            pid: None,
            fast_path: None,
        },
        Leg {
            name: "gateway",
            side: Side::Governed,
            host: TARGET_V4,
            port: "5432",
            password: "",
            pid: None,
            fast_path: Some(false),
        },
        Leg {
            name: "pgbouncer",
            side: Side::Host,
            host: "127.0.0.1",
            port: "6432",
            password: pg.password.as_str(),
            pid: Some(bouncer_proc.child.id()),
            fast_path: None,
        },
        Leg {
            name: "relay",
            side: Side::Host,
            host: "127.0.0.1",
            port: "6433",
            password: pg.password.as_str(),
            pid: Some(relay_proc.child.id()),
            fast_path: None,
        },
        Leg {
            name: "tokio-relay",
            side: Side::Host,
            host: "127.0.0.1",
            port: "6434",
            password: pg.password.as_str(),
            pid: Some(tokio_relay.child.id()),
            fast_path: None,
        },
        Leg {
            name: "gateway-fp",
            side: Side::Governed,
            host: TARGET_V4,
            port: "5432",
            password: "",
            pid: None,
            fast_path: Some(true),
        },
    ];
    // The proxy whose CPU a leg counts; a gateway leg first gets its fast-path setting.
    let proxy = |leg: &Leg| match leg.fast_path {
        Some(on) => {
            gateway.fast_path(on);
            Some(gateway.pid())
        }
        None => leg.pid,
    };
    // Transactions per second and the proxy's CPU per transaction. A gateway run also checks
    // that the store recorded every statement of it.
    // `BENCH_PG_RATE`: transactions per second pgbench keeps to (`-R`), below what every leg
    // reaches, for comparing two builds' CPU per transaction at the same load: on a saturated
    // machine the figure also moves with how the scheduler happens to share the cores.
    let rate = std::env::var("BENCH_PG_RATE").ok();
    let run = |leg: &Leg, mode: &str, seconds: &str| {
        // `-n`: no vacuum before the run, so every statement of it is one of the transactions.
        let mut args = vec!["-n", "-S", "-M", mode, "-c", "8", "-j", "2", "-T", seconds];
        if let Some(rate) = &rate {
            args.extend(["-R", rate.as_str()]);
        }
        let pid = proxy(leg);
        let events_before = (leg.side == Side::Governed).then(|| recorded_when_drained(&topo));
        let redirected_before = (leg.fast_path == Some(true)).then(|| redirected(&topo));
        let before = pid.map(cpu_us);
        let user_before = pid.map(user_cpu_us);
        let out = pgbench(&topo, leg.side, leg.host, leg.port, leg.password, &args);
        let transactions = transactions(&out);
        if let Some(before) = redirected_before {
            let sends = redirected(&topo) - before;
            assert!(
                sends > 0,
                "bench-postgres: the fast path moved none of the {mode} run's sends: it did not \
                 take effect, so this leg measured the ordinary path"
            );
        }
        let cpu = pid.zip(before).map(|(p, b)| (cpu_us(p) - b) / transactions);
        let user = pid
            .zip(user_before)
            .map(|(p, b)| (user_cpu_us(p) - b) / transactions);
        if let Some(before) = events_before {
            let after = recorded_when_drained(&topo);
            let (events, merged) = (after.0 - before.0, after.1 - before.1);
            check_recorded(mode, transactions, events + merged);
            if only().is_some() {
                #[expect(clippy::cast_precision_loss, reason = "far below 2^52")]
                let per = |n: u64| n as f64 / transactions;
                println!(
                    "{mode:<9} gateway recorded {:.2} events (and {:.2} results in their requests), {:.1} bytes per transaction",
                    per(events),
                    per(merged),
                    per(after.2.saturating_sub(before.2))
                );
            }
        }
        (tps(&out), cpu.unwrap_or(0.0), user.unwrap_or(0.0))
    };
    if let Some(name) = only() {
        let leg = legs
            .iter()
            .find(|l| l.name == name)
            .expect("BENCH_PG_ONLY names a leg");
        for mode in only_modes() {
            let (tps, cpu, user) = run(leg, &mode, &seconds);
            println!(
                "{mode:<9} {name} {tps:.0} tps, proxy CPU {cpu:.1} us per transaction \
                 ({user:.1} us in user space)"
            );
        }
        return;
    }
    println!(
        "{:<11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "mode round",
        "direct",
        "gateway",
        "gw fp",
        "pgbouncr",
        "relay",
        "tokio",
        "gateway",
        "gw fp",
        "pgbouncr",
        "relay",
        "tokio",
        "gw cpu",
        "fp cpu",
        "pgb cpu",
        "rly cpu",
        "tok cpu"
    );
    println!("(gw fp: the gateway with the kernel fast path on)");
    // The machine's run-to-run noise is larger than the differences measured, so the legs are
    // run in rounds, alternating, and the medians of the same-round figures are reported.
    let rounds: usize = std::env::var("BENCH_PG_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let latency_args = [
        "-n", "-S", "-M", "prepared", "-c", "1", "-j", "1", "-T", &seconds,
    ];
    // Per mode, per round.
    let mut table: [Vec<Row>; 2] = [Vec::new(), Vec::new()];
    // Per round: single-client latency per leg.
    let mut latencies: Vec<[f64; 6]> = Vec::new();
    for round in 1..=rounds {
        for (m, mode) in ["simple", "prepared"].into_iter().enumerate() {
            let [direct, gateway, bouncer, relay, tokio, fast] =
                legs.each_ref().map(|leg| run(leg, mode, &seconds));
            let row = Row {
                tps: [direct.0, gateway.0, bouncer.0, relay.0, tokio.0, fast.0],
                cpu: [gateway.1, bouncer.1, relay.1, tokio.1, fast.1],
            };
            print_row(&format!("{mode} {round}"), &row.columns());
            table[m].push(row);
        }
        let lat = legs.each_ref().map(|leg| {
            proxy(leg);
            latency(&pgbench(
                &topo,
                leg.side,
                leg.host,
                leg.port,
                leg.password,
                &latency_args,
            ))
        });
        println!(
            "latency {round}: direct {:.1} us; gateway {:+.1} us (fast path on {:+.1} us), pgbouncer {:+.1} us, relay {:+.1} us, tokio relay {:+.1} us",
            lat[0],
            lat[1] - lat[0],
            lat[5] - lat[0],
            lat[2] - lat[0],
            lat[3] - lat[0],
            lat[4] - lat[0]
        );
        latencies.push(lat);
    }
    println!();
    println!("median of {rounds} rounds:");
    for (m, mode) in ["simple", "prepared"].into_iter().enumerate() {
        let row: [f64; 16] =
            std::array::from_fn(|i| median(table[m].iter().map(|r| r.columns()[i]).collect()));
        print_row(mode, &row);
    }
    let over = |leg: usize| median(latencies.iter().map(|l| l[leg] - l[0]).collect());
    println!(
        "single client latency (-S -M prepared -c 1) over direct ({:.1} us): gateway {:+.1} us (fast path on {:+.1} us), pgbouncer {:+.1} us, relay {:+.1} us, tokio relay {:+.1} us",
        median(latencies.iter().map(|l| l[0]).collect()),
        over(1),
        over(5),
        over(2),
        over(3),
        over(4)
    );

    // The figures of issue 17, each a median of same-round figures.
    let of = |m: usize, f: fn(&Row) -> f64| median(table[m].iter().map(f).collect());
    println!();
    println!("issue 17 figures (median of {rounds} rounds, each a same-round figure):");
    println!("{:<52} {:>20}  target", "figure", "measured");
    for (m, mode) in ["simple", "prepared"].into_iter().enumerate() {
        println!(
            "{:<52} {:>20.2}  >= 1.05",
            format!("gateway TPS / pgbouncer TPS, {mode}"),
            of(m, |r| r.tps[1] / r.tps[2])
        );
    }
    for (m, mode) in ["simple", "prepared"].into_iter().enumerate() {
        println!(
            "{:<52} {:>20}  <= pgbouncer's",
            format!("gateway CPU per transaction vs pgbouncer's, {mode}"),
            format!(
                "{:.1} vs {:.1} us",
                of(m, |r| r.cpu[0]),
                of(m, |r| r.cpu[1])
            ),
        );
    }
    // One figure per line; `ratio` is a TPS ratio's medians, simple / prepared.
    let line = |label: &str, measured: String, target: &str| {
        println!("{label:<52} {measured:>20}  {target}");
    };
    let ratio = |f: fn(&Row) -> f64| format!("{:.2} / {:.2}", of(0, f), of(1, f));
    line(
        "single client, added latency vs pgbouncer's",
        format!("{:+.1} vs {:+.1} us", over(1), over(2)),
        "<= pgbouncer's",
    );
    line(
        "gateway TPS / bare relay TPS, simple / prepared",
        ratio(|r| r.tps[1] / r.tps[3]),
        ">= 1.0",
    );
    println!("with the kernel fast path on (capture.fast_path):");
    line(
        "gateway TPS / bare relay TPS, simple / prepared",
        ratio(|r| r.tps[5] / r.tps[3]),
        ">= 1.0",
    );
    line(
        "gateway TPS / pgbouncer TPS, simple / prepared",
        ratio(|r| r.tps[5] / r.tps[2]),
        ">= 1.05",
    );
    line(
        "gateway CPU per transaction, simple / prepared",
        format!("{:.1} / {:.1} us", of(0, |r| r.cpu[4]), of(1, |r| r.cpu[4])),
        "<= pgbouncer's",
    );
    line(
        "single client, added latency",
        format!("{:+.1} us", over(5)),
        "<= pgbouncer's",
    );
    line(
        "tokio relay CPU per transaction, simple / prepared",
        format!("{:.1} / {:.1} us", of(0, |r| r.cpu[3]), of(1, |r| r.cpu[3])),
        "(context)",
    );
}

/// One way pgbench reaches the server.
struct Leg<'a> {
    name: &'static str,
    side: Side,
    host: &'a str,
    port: &'a str,
    password: &'a str,
    /// The proxy whose CPU is counted (a gateway leg's is the daemon's at the time).
    pid: Option<u32>,
    /// A gateway leg: the daemon's `capture.fast_path`.
    fast_path: Option<bool>,
}

/// One mode's round: TPS of direct, gateway, pgbouncer, relay, tokio relay, gateway with the
/// fast path; CPU per transaction of the five proxies.
struct Row {
    tps: [f64; 6],
    cpu: [f64; 5],
}

impl Row {
    /// As printed: TPS, the proxies' ratios of direct, their CPU.
    fn columns(&self) -> [f64; 16] {
        let [direct, gateway, bouncer, relay, tokio, fast] = self.tps;
        let [gw_cpu, pgb_cpu, rly_cpu, tok_cpu, fast_cpu] = self.cpu;
        [
            direct,
            gateway,
            fast,
            bouncer,
            relay,
            tokio,
            gateway / direct,
            fast / direct,
            bouncer / direct,
            relay / direct,
            tokio / direct,
            gw_cpu,
            fast_cpu,
            pgb_cpu,
            rly_cpu,
            tok_cpu,
        ]
    }
}

/// Fails the run unless the store recorded every statement: a request and a result per
/// simple-mode (or extended-mode) transaction, a result per prepared execution (its Parse was
/// decided once per connection). `records` counts events and the results written into their
/// requests ([`recorded`]). What is recorded beyond that is the sessions' own events
/// (connect, logins, close) and the Parses.
fn check_recorded(mode: &str, transactions: f64, records: u64) {
    let per_statement = if mode == "prepared" { 1.0 } else { 2.0 };
    #[expect(
        clippy::cast_precision_loss,
        reason = "event counts are far below 2^52"
    )]
    let records = records as f64;
    let expected = per_statement * transactions;
    assert!(
        records >= expected,
        "bench-postgres: the gateway recorded {records} events and results for {transactions} \
         transactions in {mode} mode, fewer than the {expected} its statements need: events \
         were dropped, so this run failed"
    );
}

fn print_row(label: &str, r: &[f64; 16]) {
    println!(
        "{label:<11} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

fn pgbench(
    topo: &Topology,
    side: Side,
    host: &str,
    port: &str,
    password: &str,
    args: &[&str],
) -> String {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", host, "-p", port, "-U", "admin"])
        .args(args)
        .arg("postgres");
    // No TLS on any leg: the server and pgbouncer here offer none, so the gateway's (which
    // libpq's default `prefer` would take) would be the only encrypted run.
    cmd.env("PGSSLMODE", "disable");
    if password.is_empty() {
        cmd.env_remove("PGPASSWORD");
    } else {
        cmd.env("PGPASSWORD", password);
    }
    let out = topo.output(side, cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "pgbench {args:?} on {host}:{port}: {text}"
    );
    text
}

fn tps(text: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no tps in {text}"))
}

/// Average latency in microseconds.
fn latency(text: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("latency average = ")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|ms| ms * 1000.0)
        .unwrap_or_else(|| panic!("no latency in {text}"))
}

/// CPU time (user + system) the process has used, in microseconds.
fn cpu_us(pid: u32) -> f64 {
    let (user, system) = cpu_ticks_us(pid);
    user + system
}

/// The user-space part of [`cpu_us`]: what the proxy's own code costs, without the kernel's
/// socket work and wake-ups.
fn user_cpu_us(pid: u32) -> f64 {
    cpu_ticks_us(pid).0
}

/// A process's user and system CPU time so far, in microseconds.
fn cpu_ticks_us(pid: u32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon's /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("stat has a command") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let user: f64 = fields[11].parse().unwrap();
    let system: f64 = fields[12].parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (user * 1e6 / hz, system * 1e6 / hz)
}

/// Transactions pgbench completed.
fn transactions(text: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("number of transactions actually processed: ")?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no transaction count in {text}"))
}
