//! PostgreSQL gateway benchmark: pgbench through the gateway (policy and recording on) against
//! pgbench straight to the server, through pgbouncer (session pooling) and through a bare
//! relay, all in one run on the same server, in alternating rounds (`BENCH_PG_ROUNDS`, 3),
//! printed as ratios of the direct figure with the medians of the rounds.
//!
//! Run with `cargo xtask bench` (root; release build).

use std::{fs, process::Command, time::Duration};

use bulkhead_tests::{missing_privileges, system_user, Side, Topology, TARGET_V4};

const SECONDS: &str = "10";

/// `BENCH_PG_ONLY=direct|gateway|pgbouncer|relay` runs only that leg, for `BENCH_PG_SECONDS`
/// per mode (for profiling it from outside).
fn only() -> Option<String> {
    std::env::var("BENCH_PG_ONLY").ok()
}

fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-postgres: {why}");
        std::process::exit(2);
    }
    let topo = Topology::new("");
    let (pg, daemon) = topo.postgres_target_with(
        "scram-sha-256",
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
        // pgbouncer listens on the governed side's loopback: not captured, like a peer
        // installed next to the tool.
        "[capture]\nloopback = false\n",
    );

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
    let mut cmd = Command::new(topo.probe());
    cmd.args(["relay", "127.0.0.1:6433", &format!("{TARGET_V4}:5432")]);
    let mut relay_proc = topo.spawn(Side::Host, "relay", cmd);
    assert_eq!(
        relay_proc.line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "relay did not start: {}",
        relay_proc.stderr()
    );

    println!("pgbench -S, 8 clients, 2 threads, {SECONDS} s per run, scale 10; PostgreSQL 15 on the target host");
    println!("ratios are of the direct figure; cpu/tx is each proxy's CPU (user + system) per transaction, in us");
    println!();
    println!(
        "{:<11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7}",
        "mode round",
        "direct",
        "gateway",
        "pgbouncr",
        "relay",
        "gateway",
        "pgbouncr",
        "relay",
        "gw cpu",
        "pgb cpu",
        "rly cpu"
    );
    let seconds = std::env::var("BENCH_PG_SECONDS").unwrap_or_else(|_| SECONDS.into());
    // Each leg: where pgbench runs, where it connects, the password it gives, the proxy's pid.
    let legs = [
        (
            "direct",
            Side::Host,
            TARGET_V4,
            "5432",
            pg.password.as_str(),
            None,
        ),
        (
            "gateway",
            Side::Governed,
            TARGET_V4,
            "5432",
            "",
            Some(daemon.child.id()),
        ),
        (
            "pgbouncer",
            Side::Host,
            "127.0.0.1",
            "6432",
            pg.password.as_str(),
            Some(bouncer_proc.child.id()),
        ),
        (
            "relay",
            Side::Host,
            "127.0.0.1",
            "6433",
            pg.password.as_str(),
            Some(relay_proc.child.id()),
        ),
    ];
    // Transactions per second and the proxy's CPU per transaction.
    let run = |leg: &(&str, Side, &str, &str, &str, Option<u32>), mode: &str, seconds: &str| {
        let (_, side, host, port, password, pid) = *leg;
        let args = ["-S", "-M", mode, "-c", "8", "-j", "2", "-T", seconds];
        let before = pid.map(cpu_us);
        let out = pgbench(&topo, side, host, port, password, &args);
        let cpu = pid
            .zip(before)
            .map(|(p, b)| (cpu_us(p) - b) / transactions(&out));
        (tps(&out), cpu.unwrap_or(0.0))
    };
    if let Some(name) = only() {
        let leg = legs
            .iter()
            .find(|l| l.0 == name)
            .expect("BENCH_PG_ONLY names a leg");
        for mode in ["simple", "prepared"] {
            let (tps, cpu) = run(leg, mode, &seconds);
            println!("{mode:<9} {name} {tps:.0} tps, proxy CPU {cpu:.1} us per transaction");
        }
        return;
    }
    // The machine's run-to-run noise is larger than the differences measured, so the legs are
    // run in rounds, alternating, and the medians of the same-round figures are reported.
    let rounds: usize = std::env::var("BENCH_PG_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let latency_args = ["-S", "-M", "prepared", "-c", "1", "-j", "1", "-T", SECONDS];
    // Per mode: per round, [tps per leg, ratio per proxy leg, cpu per proxy leg].
    let mut table: [Vec<[f64; 10]>; 2] = [Vec::new(), Vec::new()];
    // Per round: single-client latency per leg.
    let mut latencies: Vec<[f64; 4]> = Vec::new();
    for round in 1..=rounds {
        for (m, mode) in ["simple", "prepared"].into_iter().enumerate() {
            let [direct, gateway, bouncer, relay] =
                legs.each_ref().map(|leg| run(leg, mode, SECONDS));
            let row = [
                direct.0,
                gateway.0,
                bouncer.0,
                relay.0,
                gateway.0 / direct.0,
                bouncer.0 / direct.0,
                relay.0 / direct.0,
                gateway.1,
                bouncer.1,
                relay.1,
            ];
            print_row(&format!("{mode} {round}"), &row);
            table[m].push(row);
        }
        let lat = legs.each_ref().map(|&(_, side, host, port, password, _)| {
            latency(&pgbench(&topo, side, host, port, password, &latency_args))
        });
        println!(
            "latency {round}: direct {:.1} us; gateway {:+.1} us, pgbouncer {:+.1} us, relay {:+.1} us",
            lat[0],
            lat[1] - lat[0],
            lat[2] - lat[0],
            lat[3] - lat[0]
        );
        latencies.push(lat);
    }
    println!();
    println!("median of {rounds} rounds:");
    for (m, mode) in ["simple", "prepared"].into_iter().enumerate() {
        let row: [f64; 10] =
            std::array::from_fn(|i| median(table[m].iter().map(|r| r[i]).collect()));
        print_row(mode, &row);
    }
    let over = |leg: usize| median(latencies.iter().map(|l| l[leg] - l[0]).collect());
    println!(
        "single client latency (-S -M prepared -c 1) over direct ({:.1} us): gateway {:+.1} us (target <= +25 us), pgbouncer {:+.1} us, relay {:+.1} us",
        median(latencies.iter().map(|l| l[0]).collect()),
        over(1),
        over(2),
        over(3)
    );
}

fn print_row(label: &str, r: &[f64; 10]) {
    println!(
        "{label:<11} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7.2}x {:>7.2}x {:>7.2}x {:>7.1} {:>7.1} {:>7.1}",
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]
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
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon's /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("stat has a command") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
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
