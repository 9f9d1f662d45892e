//! PostgreSQL gateway benchmark: pgbench through the gateway (policy and recording on) against
//! pgbench straight to the server and through pgbouncer (session pooling), all in one run on
//! the same server, printed as ratios of the direct figure.
//!
//! Run with `cargo xtask bench` (root; release build).

use std::{fs, process::Command, time::Duration};

use bulkhead_tests::{missing_privileges, system_user, Side, Topology, TARGET_V4};

const SECONDS: &str = "10";

/// `BENCH_PG_ONLY=gateway` runs only the gateway legs, for `BENCH_PG_SECONDS` each (profiling).
fn only_gateway() -> bool {
    std::env::var("BENCH_PG_ONLY").is_ok_and(|v| v == "gateway")
}

fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-postgres: {why}");
        std::process::exit(2);
    }
    let topo = Topology::new("");
    let (pg, daemon) = topo.postgres_target(
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

    println!("pgbench -S, 8 clients, 2 threads, {SECONDS} s per run, scale 10; PostgreSQL 15 on the target host");
    println!();
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>10} {:>12} {:>12} {:>12}",
        "mode",
        "direct tps",
        "gateway tps",
        "pgbouncer tps",
        "gateway",
        "pgbouncer",
        "gw cpu/tx",
        "pgb cpu/tx"
    );
    let seconds = std::env::var("BENCH_PG_SECONDS").unwrap_or_else(|_| SECONDS.into());
    let daemon_pid = daemon.child.id();
    if only_gateway() {
        for mode in ["simple", "prepared"] {
            let args = ["-S", "-M", mode, "-c", "8", "-j", "2", "-T", &seconds];
            let before = cpu_us(daemon_pid);
            let out = pgbench(&topo, Side::Governed, TARGET_V4, "5432", "", &args);
            let per_tx = (cpu_us(daemon_pid) - before) / transactions(&out);
            println!(
                "{mode:<10} gateway {:.0} tps, daemon CPU {per_tx:.1} us per transaction",
                tps(&out)
            );
        }
        return;
    }
    for mode in ["simple", "prepared"] {
        let args = ["-S", "-M", mode, "-c", "8", "-j", "2", "-T", SECONDS];
        let direct = tps(&pgbench(
            &topo,
            Side::Host,
            TARGET_V4,
            "5432",
            &pg.password,
            &args,
        ));
        let before = cpu_us(daemon_pid);
        let out = pgbench(&topo, Side::Governed, TARGET_V4, "5432", "", &args);
        let gateway_cpu = (cpu_us(daemon_pid) - before) / transactions(&out);
        let gateway = tps(&out);
        let before = cpu_us(bouncer_proc.child.id());
        let out = pgbench(&topo, Side::Host, "127.0.0.1", "6432", &pg.password, &args);
        let bouncer_cpu = (cpu_us(bouncer_proc.child.id()) - before) / transactions(&out);
        let bouncer = tps(&out);
        println!(
            "{mode:<10} {direct:>14.0} {gateway:>14.0} {bouncer:>14.0} {:>9.2}x {:>11.2}x {gateway_cpu:>12.1} {bouncer_cpu:>12.1}",
            gateway / direct,
            bouncer / direct
        );
    }
    println!();
    let args = ["-S", "-M", "prepared", "-c", "1", "-j", "1", "-T", SECONDS];
    let direct = latency(&pgbench(
        &topo,
        Side::Host,
        TARGET_V4,
        "5432",
        &pg.password,
        &args,
    ));
    let gateway = latency(&pgbench(
        &topo,
        Side::Governed,
        TARGET_V4,
        "5432",
        "",
        &args,
    ));
    let bouncer = latency(&pgbench(
        &topo,
        Side::Host,
        "127.0.0.1",
        "6432",
        &pg.password,
        &args,
    ));
    println!(
        "single client latency (-S -M prepared -c 1): direct {direct:.1} us, gateway {gateway:.1} us, {:+.1} us (target <= +25 us); pgbouncer {bouncer:.1} us, {:+.1} us",
        gateway - direct,
        bouncer - direct
    );
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
