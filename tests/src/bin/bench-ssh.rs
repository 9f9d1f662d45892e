//! SSH gateway benchmarks (#14), each against a baseline measured in the same run on the same
//! topology (sshd of the test's own on the target host):
//!
//! 1. `scp` upload of a file (256 MiB; `BENCH_SSH_MIB` to change) through the gateway (governed,
//!    no key, judged per file) vs direct (outside the cgroup, with the key the gateway holds);
//! 2. `ssh target true`, connection + exec + exit, through the gateway vs direct.
//!
//! Rounds alternate baseline and subject; the median round is reported.
//! Run with `cargo xtask bench` (root; builds in release mode).

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
    let mib: u64 = std::env::var("BENCH_SSH_MIB")
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
    let (sshd, _daemon) = topo.ssh_target(&policy, "");
    let file = topo.dir.join("payload");
    let out = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", &format!("count={mib}")])
        .arg(format!("of={}", file.display()))
        .output()
        .expect("dd");
    assert!(out.status.success(), "dd: {out:?}");

    // Direct: outside the cgroup, with the held key and the target's real host key.
    let direct_options = |cmd: &mut Command| {
        cmd.args(["-F", "/dev/null", "-i"])
            .arg(&sshd.held_key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]);
    };
    let timed = |side: Side, cmd: Command| {
        let start = Instant::now();
        let out = topo.output(side, cmd);
        assert!(out.status.success(), "{out:?}");
        start.elapsed().as_secs_f64()
    };
    let scp_direct = || {
        let mut cmd = Command::new("scp");
        cmd.args(["-q", "-P", &SSHD_PORT.to_string()]);
        direct_options(&mut cmd);
        cmd.arg(&file)
            .arg(format!("root@{TARGET_V4}:{dir}/direct.out"));
        timed(Side::Host, cmd)
    };
    let scp_gateway = || {
        let mut cmd = Command::new("scp");
        cmd.args(["-q", "-P", &SSHD_PORT.to_string()])
            .args(topo.ssh_options())
            .arg(&file)
            .arg(format!("agent@{TARGET_V4}:{dir}/gateway.out"));
        timed(Side::Governed, cmd)
    };
    println!("bulkhead SSH gateway benchmarks ({ROUNDS} rounds; median)");
    println!();
    let (base, subject) = alternate(ROUNDS, scp_direct, scp_gateway);
    let rate = |s: f64| mib as f64 / s;
    println!("scp upload of {mib} MiB (sftp protocol)");
    println!("  direct            {:>8.1} MiB/s", rate(base));
    println!("  through gateway   {:>8.1} MiB/s", rate(subject));
    println!(
        "  ratio             {:>8.2}x (target >= 0.7x)",
        base / subject
    );
    println!();

    // The same bytes as an exec channel's stdin (no sftp parsing): the relay alone.
    let quote = |w: &str| format!("'{}'", w.replace('\'', "'\\''"));
    let payload = quote(&file.display().to_string());
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
        timed(Side::Governed, cmd)
    };
    let (base, subject) = alternate(ROUNDS, dd_direct, dd_gateway);
    println!("ssh target dd < {mib} MiB (an exec channel's stdin, no sftp)");
    println!("  direct            {:>8.1} MiB/s", rate(base));
    println!("  through gateway   {:>8.1} MiB/s", rate(subject));
    println!("  ratio             {:>8.2}x", base / subject);
    println!();

    let exec_direct = || {
        let mut total = 0.0;
        for _ in 0..EXECS {
            let mut cmd = Command::new("ssh");
            cmd.args(["-p", &SSHD_PORT.to_string()]);
            direct_options(&mut cmd);
            cmd.arg(format!("root@{TARGET_V4}")).arg("true");
            total += timed(Side::Host, cmd);
        }
        total / f64::from(EXECS)
    };
    let exec_gateway = || {
        let mut total = 0.0;
        for _ in 0..EXECS {
            total += timed(Side::Governed, topo.ssh_command(&[], Some("true")));
        }
        total / f64::from(EXECS)
    };
    let (base, subject) = alternate(ROUNDS, exec_direct, exec_gateway);
    println!("ssh target true (connect, key exchange, login, exec, exit; {EXECS} per round)");
    println!("  direct            {:>8.1} ms", base * 1e3);
    println!("  through gateway   {:>8.1} ms", subject * 1e3);
    println!(
        "  added             {:>+8.1} ms (target <= +5 ms)",
        (subject - base) * 1e3
    );
    std::thread::sleep(Duration::from_millis(10));
}

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
