//! SSH gateway benchmarks (#14), each against a baseline measured in the same run on the same
//! topology (sshd of the test's own on the target host):
//!
//! 1. `scp` upload of a file (256 MiB; `BENCH_SSH_MIB` to change) through the gateway (governed,
//!    no key, judged per file) vs direct (outside the cgroup, with the key the gateway holds);
//! 2. `ssh target true`, connection + exec + exit, through the gateway vs direct.
//!
//! Both legs use the same key exchange: OpenSSH 9.2's default, `sntrup761x25519-sha512`, is not
//! in russh, so the gateway's two legs negotiate `curve25519-sha256`; the direct leg is given
//! it too (its default is also reported, for what the post-quantum exchange costs).
//! Beside each gateway figure, the daemon's CPU time (`/proc/PID/stat` utime + stime) per MiB
//! or per connection.
//!
//! Rounds alternate baseline and subject; the median round is reported.
//! Run with `cargo xtask bench` (root; builds in release mode). `BENCH_SSH_ONLY=exec` runs only
//! the `ssh target true` part; `BENCH_SSH_POOL=N` sets the target's `ssh.pool` (warm upstream
//! connections; unset: the daemon's default), so a run can compare the gateway with and
//! without them. `BULKHEAD_BIN` runs another daemon binary (an older build, for before/after).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use bulkhead_tests::{missing_privileges, ssh::SSHD_PORT, Side, Topology, TARGET_V4};

const ROUNDS: usize = 3;
const EXECS: u32 = 10;

fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-ssh: {why}");
        std::process::exit(2);
    }
    let mib: u32 = std::env::var("BENCH_SSH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let topo = Topology::new("");
    let dir = topo.dir.display().to_string();
    let policy = format!(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\ndefault = \"deny\"\n\
         [[rule]]\nid = \"bench\"\nverdict = \"allow\"\ntarget = {{ name = [\"box\"] }}\n\
         ssh = {{ command = [\"true\", \"dd **\"], sftp = {{ read = [\"{dir}/**\"], write = [\"{dir}/**\"] }} }}\n"
    );
    let pool = std::env::var("BENCH_SSH_POOL").ok();
    let target_toml = pool
        .as_ref()
        .map(|n| format!("pool = {n}\n"))
        .unwrap_or_default();
    let exec_only = std::env::var("BENCH_SSH_ONLY").is_ok_and(|v| v == "exec");
    let (sshd, daemon) = topo.ssh_target(&policy, &target_toml);
    let daemon_pid = daemon.pid();
    let file = topo.dir.join("payload");
    let out = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", &format!("count={mib}")])
        .arg(format!("of={}", file.display()))
        .output()
        .expect("dd");
    assert!(out.status.success(), "dd: {out:?}");

    // Direct: outside the cgroup, with the held key and the target's real host key, and the
    // key exchange the gateway's legs use.
    let direct_default_kex = |cmd: &mut Command| {
        cmd.args(["-F", "/dev/null", "-i"])
            .arg(&sshd.held_key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]);
    };
    let direct_options = |cmd: &mut Command| {
        direct_default_kex(cmd);
        cmd.args(["-o", &format!("KexAlgorithms={GATEWAY_KEX}")]);
    };
    let timed = |side: Side, cmd: Command| {
        let start = Instant::now();
        let out = topo.output(side, cmd);
        assert!(out.status.success(), "{out:?}");
        start.elapsed().as_secs_f64()
    };
    // The gateway's CPU time over a measurement, beside its wall time.
    let with_cpu = |f: &dyn Fn() -> f64| {
        let cpu = cpu_seconds(daemon_pid);
        let t = f();
        (t, cpu_seconds(daemon_pid) - cpu)
    };

    // What each leg negotiated (OpenSSH's `-v` says), so the comparison is like for like.
    let kex_of = |side: Side, cmd: Command| {
        let out = topo.output(side, cmd);
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find_map(|l| l.split("kex: algorithm: ").nth(1).map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    };
    let mut probe = Command::new("ssh");
    probe.args(["-v", "-p", &SSHD_PORT.to_string()]);
    direct_options(&mut probe);
    probe.arg(format!("root@{TARGET_V4}")).arg("true");
    let direct_kex = kex_of(Side::Host, probe);
    let gateway_kex = kex_of(Side::Governed, topo.ssh_command(&["-v"], Some("true")));
    println!("key exchange: direct {direct_kex}; client to gateway {gateway_kex}; gateway to target {GATEWAY_KEX} (russh's first in common with OpenSSH 9.2)");
    println!("load average at start: {}", load_average());
    println!();
    println!(
        "bulkhead SSH gateway benchmarks ({ROUNDS} rounds; median); target ssh.pool = {}",
        pool.as_deref().unwrap_or("default")
    );
    println!();
    if !exec_only {
        transfers(&topo, mib, &file, &dir, &direct_options, &timed, &with_cpu);
    }
    exec_rounds(
        &topo,
        &direct_options,
        &direct_default_kex,
        &direct_kex,
        &timed,
        &with_cpu,
    );
    println!("load average at end: {}", load_average());
    std::thread::sleep(Duration::from_millis(10));
}

/// Runs a measurement, returning its time and the gateway's CPU time over it.
type WithCpu<'a> = &'a dyn Fn(&dyn Fn() -> f64) -> (f64, f64);

/// scp and an exec channel's stdin, `mib` MiB each.
fn transfers(
    topo: &Topology,
    mib: u32,
    file: &std::path::Path,
    dir: &str,
    direct_options: &dyn Fn(&mut Command),
    timed: &dyn Fn(Side, Command) -> f64,
    with_cpu: WithCpu<'_>,
) {
    let scp_direct = || {
        let mut cmd = Command::new("scp");
        cmd.args(["-q", "-P", &SSHD_PORT.to_string()]);
        direct_options(&mut cmd);
        cmd.arg(file)
            .arg(format!("root@{TARGET_V4}:{dir}/direct.out"));
        timed(Side::Host, cmd)
    };
    let scp_gateway = || {
        let mut cmd = Command::new("scp");
        cmd.args(["-q", "-P", &SSHD_PORT.to_string()])
            .args(topo.ssh_options())
            .arg(file)
            .arg(format!("agent@{TARGET_V4}:{dir}/gateway.out"));
        with_cpu(&|| timed(Side::Governed, cmd_clone(&cmd)))
    };
    let (base, (subject, cpu)) = alternate(ROUNDS, scp_direct, scp_gateway);
    let rate = |s: f64| f64::from(mib) / s;
    println!("scp upload of {mib} MiB (sftp protocol)");
    println!("  direct            {:>8.1} MiB/s", rate(base));
    println!("  through gateway   {:>8.1} MiB/s", rate(subject));
    println!(
        "  ratio             {:>8.2}x (target >= 0.7x)",
        base / subject
    );
    println!(
        "  gateway CPU       {:>8.2} ms per MiB",
        cpu * 1e3 / f64::from(mib)
    );
    println!();

    // The same bytes as an exec channel's stdin (no sftp parsing): the relay alone.
    let quote = |w: &str| format!("'{}'", w.replace('\'', "'\\''"));
    let payload = quote(&file.display().to_string());
    let rate = |s: f64| f64::from(mib) / s;
    let dd_direct = || {
        let mut ssh = Command::new("ssh");
        ssh.args(["-p", &SSHD_PORT.to_string()]);
        direct_options(&mut ssh);
        ssh.arg(format!("root@{TARGET_V4}"))
            .arg(format!("dd of={dir}/direct.dd bs=64k status=none"));
        let line: Vec<String> = std::iter::once(ssh.get_program())
            .chain(ssh.get_args())
            .map(|w| quote(&w.to_string_lossy()))
            .collect();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("{} < {payload}", line.join(" "))]);
        timed(Side::Host, cmd)
    };
    let dd_gateway = || {
        let line = topo.ssh_line(
            &[],
            Some(&format!("dd of={dir}/gateway.dd bs=64k status=none")),
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("{line} < {payload}")]);
        with_cpu(&|| timed(Side::Governed, cmd_clone(&cmd)))
    };
    let (base, (subject, cpu)) = alternate(ROUNDS, dd_direct, dd_gateway);
    println!("ssh target dd < {mib} MiB (an exec channel's stdin, no sftp)");
    println!("  direct            {:>8.1} MiB/s", rate(base));
    println!("  through gateway   {:>8.1} MiB/s", rate(subject));
    println!("  ratio             {:>8.2}x", base / subject);
    println!(
        "  gateway CPU       {:>8.2} ms per MiB",
        cpu * 1e3 / f64::from(mib)
    );
    println!();
}

/// `ssh target true`, `EXECS` per round, with how many gateway logins took a warm connection.
fn exec_rounds(
    topo: &Topology,
    direct_options: &dyn Fn(&mut Command),
    direct_default_kex: &dyn Fn(&mut Command),
    direct_kex: &str,
    timed: &dyn Fn(Side, Command) -> f64,
    with_cpu: WithCpu<'_>,
) {
    let exec_direct_with = |options: &dyn Fn(&mut Command)| {
        let mut total = 0.0;
        for _ in 0..EXECS {
            let mut cmd = Command::new("ssh");
            cmd.args(["-p", &SSHD_PORT.to_string()]);
            options(&mut cmd);
            cmd.arg(format!("root@{TARGET_V4}")).arg("true");
            total += timed(Side::Host, cmd);
        }
        total / f64::from(EXECS)
    };
    let exec_gateway = || {
        with_cpu(&|| {
            let mut total = 0.0;
            for _ in 0..EXECS {
                total += timed(Side::Governed, topo.ssh_command(&[], Some("true")));
            }
            total / f64::from(EXECS)
        })
    };
    let (base, (subject, cpu)) =
        alternate(ROUNDS, || exec_direct_with(direct_options), exec_gateway);
    let (default_kex, _) = alternate(
        ROUNDS,
        || exec_direct_with(direct_default_kex),
        || (0.0, 0.0),
    );
    let (pooled, logins) = pooled_logins(topo);
    println!("ssh target true (connect, key exchange, login, exec, exit; {EXECS} per round)");
    println!("  direct            {:>8.1} ms ({direct_kex})", base * 1e3);
    println!("  through gateway   {:>8.1} ms", subject * 1e3);
    println!(
        "  added             {:>+8.1} ms (target <= +5 ms)",
        (subject - base) * 1e3
    );
    println!(
        "  gateway CPU       {:>8.2} ms per connection",
        cpu * 1e3 / f64::from(EXECS)
    );
    println!(
        "  direct, OpenSSH's default key exchange: {:.1} ms",
        default_kex * 1e3
    );
    println!("  gateway logins on a warm pooled connection: {pooled} of {logins} (all legs)");
}

/// Of all recorded upstream logins, how many took a warm connection.
fn pooled_logins(topo: &Topology) -> (usize, usize) {
    let mut pooled = 0;
    let mut logins = 0;
    for s in topo.sessions() {
        for e in topo.events(&s["id"]) {
            if e["type"] == "auth" && e["side"] == "target" && e["ok"] == true {
                if let Some(m) = e["method"].as_str() {
                    if !m.starts_with("host key") {
                        logins += 1;
                        pooled += usize::from(m.contains("warm pooled connection"));
                    }
                }
            }
        }
    }
    (pooled, logins)
}

/// The key exchange the gateway's legs negotiate with OpenSSH 9.2 (russh has no sntrup761).
const GATEWAY_KEX: &str = "curve25519-sha256";

#[expect(
    clippy::cast_precision_loss,
    reason = "clock ticks of one benchmark run, far below 2^52"
)]
/// A process's user + system CPU time so far, in seconds (`/proc/PID/stat` fields 14 and 15).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `Command` is not `Clone`: the same program and arguments again.
fn cmd_clone(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    c
}

/// Medians of the baseline's time, and of the subject's (time, CPU) taken from its median
/// round by time.
fn alternate(
    rounds: usize,
    mut base: impl FnMut() -> f64,
    mut subject: impl FnMut() -> (f64, f64),
) -> (f64, (f64, f64)) {
    let mut b = Vec::with_capacity(rounds);
    let mut s = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        b.push(base());
        s.push(subject());
    }
    s.sort_by(|x, y| x.0.total_cmp(&y.0));
    (median(b), s[s.len() / 2])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
