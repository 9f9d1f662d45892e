//! HTTP gateway benchmark: wrk (Debian) against nginx on the target host, straight, through
//! the gateway (policy, credential injection and recording on) and through nginx as a reverse
//! proxy on the governed side's loopback, in alternating rounds of the same run
//! (`BENCH_HTTP_ROUNDS`, 3; `BENCH_HTTP_SECONDS`, 10), printed as ratios of the direct figure
//! with the medians. The ceiling beside them: the same wrk through the gateway to a port no
//! HTTP target names (nginx's port 81), relayed as opaque TCP: what the gateway's capture,
//! accept and byte copy cost with no HTTP at all. And hyper's own ceiling: `bh-probe
//! hyper-proxy`, hyper's server and client on the daemon's runtime with nothing of the
//! gateway's (no capture, policy or record), what any gateway that re-serialises requests with
//! hyper pays at least. Then HTTPS: the gateway terminating TLS (and
//! verifying nginx over TLS) beside nginx doing the same.
//!
//! Every request through the gateway must be recorded: after each gateway leg the store must
//! hold one `request` and one `response` event per request wrk completed (plus those cut off
//! when wrk stopped) and a `connect` and `close` per connection; anything less fails the run.
//! The daemon's CPU time per request (user + system, from `/proc`) is printed beside.
//!
//! `BENCH_HTTP_ONLY=direct|gateway|proxy|relay|hyper|gateway-tls|proxy-tls` runs only that leg (for
//! profiling and quick A/B pairs: the daemon's pid is printed first, then the leg's requests/s
//! and, but for `direct`, the CPU per request and the load average).
//!
//! Run with `cargo xtask bench` (root; release build).

use std::{fs, process::Command, time::Duration};

/// Where `bh-probe hyper-proxy` listens, on the governed side's loopback.
const HYPER_PROXY: &str = "127.0.0.1:8081";

use bulkhead_tests::{missing_privileges, Proc, Side, Topology, TARGET_V4};

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one wrk run measured.
struct Run {
    rps: f64,
    /// Requests completed.
    requests: u64,
}

/// `wrk` on `side` against `url`.
fn wrk(topo: &Topology, side: Side, url: &str, seconds: u32) -> Run {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{seconds}s"), url]);
    let out = topo.output(side, cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let fail = || -> ! { panic!("wrk {url}: {text} {}", String::from_utf8_lossy(&out.stderr)) };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| fail());
    let requests = text
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in")
                .then(|| n.parse::<u64>().ok())?
        })
        .unwrap_or_else(|| fail());
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        panic!("bench-http: {url}: {e}: every request must succeed\n{text}");
    }
    Run { rps, requests }
}

/// The store's (events, sessions) once every session is closed.
fn settled_store(topo: &Topology) -> (u64, u64) {
    for _ in 0..400 {
        let (_, report) = topo.status();
        let store = &report["store"];
        if store["open_sessions"].as_u64() == Some(0) {
            // A result written into its request counts as the response event it replaced.
            let events = store["events"].as_u64().expect("status: store.events")
                + store["results_in_requests"]
                    .as_u64()
                    .expect("status: store.results_in_requests");
            return (
                events,
                store["sessions"].as_u64().expect("status: store.sessions"),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the gateway's sessions did not close after wrk stopped");
}

/// Runs wrk through the gateway and checks every request was recorded: a `request` event and
/// its result, a `response` event or written into the request (those wrk completed, and at most one in flight per connection
/// when it stopped), a `connect` and a `close` per connection. Also the daemon's CPU per
/// request, in microseconds.
fn gateway_leg(topo: &Topology, daemon: u32, url: &str, seconds: u32) -> (Run, f64) {
    let (events_before, sessions_before) = settled_store(topo);
    let cpu = cpu_us(daemon);
    let run = wrk(topo, Side::Governed, url, seconds);
    let cpu = cpu_us(daemon) - cpu;
    let (events, sessions) = settled_store(topo);
    let recorded = events - events_before;
    let connections = sessions - sessions_before;
    let exchanges = recorded.checked_sub(2 * connections).map(|n| n / 2);
    let ok = recorded % 2 == 0
        && exchanges.is_some_and(|n| n >= run.requests && n <= run.requests + connections);
    assert!(
        ok,
        "bench-http: {url}: {recorded} events recorded for {} requests on {connections} \
         connections: an event was dropped",
        run.requests
    );
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let per_request = cpu / run.requests.max(1) as f64;
    (run, per_request)
}

/// Runs wrk through the gateway to a destination it relays as opaque TCP (no HTTP read):
/// the ceiling for the HTTP legs. The daemon's CPU per request, in microseconds.
fn relay_leg(topo: &Topology, daemon: u32, url: &str, seconds: u32) -> (Run, f64) {
    settled_store(topo);
    let cpu = cpu_us(daemon);
    let run = wrk(topo, Side::Governed, url, seconds);
    let cpu = cpu_us(daemon) - cpu;
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let per_request = cpu / run.requests.max(1) as f64;
    (run, per_request)
}

/// wrk through nginx as a reverse proxy; its CPU per request, in microseconds.
fn proxy_leg(topo: &Topology, nginx: u32, url: &str, seconds: u32) -> (f64, f64) {
    let cpu = cpu_us(nginx);
    let run = wrk(topo, Side::Host, url, seconds);
    let cpu = cpu_us(nginx) - cpu;
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let per_request = cpu / run.requests.max(1) as f64;
    (run.rps, per_request)
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
    #[expect(clippy::cast_precision_loss, reason = "clock ticks per second")]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

/// The load average over the last minute, as `/proc/loadavg` says.
fn load() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// nginx as a reverse proxy on the governed side's loopback (outside the governed cgroup):
/// `127.0.0.1:8080` plain to the target's port 80, `127.0.0.1:8443` TLS (with the target's
/// certificate) to its port 443 with TLS verified; kept-alive upstream connections.
fn reverse_proxy(topo: &Topology, nginx_dir: &std::path::Path) -> Proc {
    let dir = topo.dir.join("nginx-proxy");
    fs::create_dir_all(dir.join("tmp")).unwrap();
    let d = dir.display();
    let n = nginx_dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/tmp;\nproxy_temp_path {d}/tmp;\n\
         fastcgi_temp_path {d}/tmp;\nuwsgi_temp_path {d}/tmp;\nscgi_temp_path {d}/tmp;\n\
         upstream plain {{ server {TARGET_V4}:80; keepalive 32; }}\n\
         upstream tls {{ server {TARGET_V4}:443; keepalive 32; }}\n\
         server {{ listen 127.0.0.1:8080;\n\
           location / {{ proxy_pass http://plain; proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\"; proxy_set_header Authorization \"Bearer bench\"; }} }}\n\
         server {{ listen 127.0.0.1:8443 ssl;\n\
           ssl_certificate {n}/server.pem;\nssl_certificate_key {n}/server.key;\n\
           location / {{ proxy_pass https://tls; proxy_http_version 1.1;\n\
             proxy_ssl_verify on; proxy_ssl_trusted_certificate {n}/ca.pem; proxy_ssl_name api.test;\n\
             proxy_ssl_session_reuse on;\n\
             proxy_set_header Connection \"\"; proxy_set_header Authorization \"Bearer bench\"; }} }}\n}}\n"
    );
    fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    let proc = topo.spawn(Side::Host, "nginx-proxy", cmd);
    for _ in 0..200 {
        if dir.join("nginx.pid").exists() {
            return proc;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the reverse proxy did not start");
}

#[expect(clippy::too_many_lines, reason = "the legs in order, then the report")]
fn main() {
    if let Some(why) = missing_privileges() {
        eprintln!("bench-http: {why}");
        std::process::exit(2);
    }
    let rounds = env_or("BENCH_HTTP_ROUNDS", 3);
    let seconds = env_or("BENCH_HTTP_SECONDS", 10);
    let topo = Topology::new("");
    let nginx = topo.nginx();
    let secret = topo.credential_file("api", "bench-token");
    topo.write_config(&format!(
        "[capture]\nloopback = false\n\
         [[target]]\nname = \"api\"\nprotocol = \"http\"\n\
         addresses = [\"{TARGET_V4}:80\", \"{TARGET_V4}:443\"]\n\
         [target.http]\nca = \"{}\"\n\
         [[target.http.inject]]\nheader = \"authorization\"\nprefix = \"Bearer \"\n\
         credentials = {{ file = \"{}\" }}\n",
        nginx.ca.display(),
        secret.display()
    ));
    topo.policy(
        "api.toml",
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\ndefault = \"deny\"\n\n\
         [[rule]]\nid = \"bench\"\nverdict = \"allow\"\ntarget = { name = [\"api\"] }\n\
         http = { method = [\"GET\"] }\n",
    );
    // The ceiling leg's destination (nginx's port 81) is no target's: opaque TCP.
    topo.allow_opaque_tcp();
    let daemon = topo.start_daemon(&[]);
    let pid = daemon.pid();
    println!("daemon pid {pid}");
    let proxy_proc = reverse_proxy(&topo, &nginx.dir);
    let proxy_pid = proxy_proc.child.id();
    // The access log would measure the disk: nginx keeps writing it, the same for every leg.

    // `BENCH_HTTP_PATH`: what wrk asks for; `/files/big` is a 1 MiB file (bulk responses).
    let path = std::env::var("BENCH_HTTP_PATH").unwrap_or_else(|_| "/bench".into());
    let url = format!("http://{TARGET_V4}{path}");
    let tls_url = format!("https://{TARGET_V4}{path}");
    let relay_url = format!("http://{TARGET_V4}:81{path}");
    let hyper_proc = topo.probe_server(
        Side::Host,
        "hyper-proxy",
        &["hyper-proxy", HYPER_PROXY, &format!("{TARGET_V4}:80")],
    );
    let hyper_pid = hyper_proc.child.id();
    let hyper_url = format!("http://{HYPER_PROXY}{path}");
    if let Ok(leg) = std::env::var("BENCH_HTTP_ONLY") {
        let of_run = |(run, cpu): (Run, f64)| (run.rps, Some(cpu));
        let (rps, cpu) = match leg.as_str() {
            "direct" => (wrk(&topo, Side::Host, &url, seconds).rps, None),
            "gateway" => of_run(gateway_leg(&topo, pid, &url, seconds)),
            "proxy" => {
                let (rps, cpu) = proxy_leg(
                    &topo,
                    proxy_pid,
                    &format!("http://127.0.0.1:8080{path}"),
                    seconds,
                );
                (rps, Some(cpu))
            }
            "relay" => of_run(relay_leg(&topo, pid, &relay_url, seconds)),
            "hyper" => {
                let (rps, cpu) = proxy_leg(&topo, hyper_pid, &hyper_url, seconds);
                (rps, Some(cpu))
            }
            "gateway-tls" => of_run(gateway_leg(&topo, pid, &tls_url, seconds)),
            "proxy-tls" => {
                let (rps, cpu) = proxy_leg(
                    &topo,
                    proxy_pid,
                    &format!("https://127.0.0.1:8443{path}"),
                    seconds,
                );
                (rps, Some(cpu))
            }
            other => panic!("BENCH_HTTP_ONLY={other}: not a leg"),
        };
        // The CPU per request is the daemon's (nginx's for the proxy legs, the hyper proxy's
        // for its own), as in the table.
        match cpu {
            Some(us) => println!(
                "{leg}: {rps:.0} requests/s, {us:.1} us CPU per request, load {}",
                load()
            ),
            None => println!("{leg}: {rps:.0} requests/s"),
        }
        return;
    }

    println!(
        "HTTP/1.1, wrk -t1 -c16, {rounds} rounds of {seconds}s (requests/s; daemon CPU per request)"
    );
    println!(
        "round    direct   gateway     proxy     relay     hyper  gateway   proxy   relay   hyper  gw cpu  proxy cpu  relay cpu  hyper cpu  load"
    );
    let (mut direct, mut gateway, mut proxy, mut relay, mut hyper) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ratios, mut proxy_ratios, mut relay_ratios, mut hyper_ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cpus, mut proxy_cpus, mut relay_cpus, mut hyper_cpus) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let d = wrk(&topo, Side::Host, &url, seconds).rps;
        let (g, cpu) = gateway_leg(&topo, pid, &url, seconds);
        let (p, proxy_cpu) = proxy_leg(
            &topo,
            proxy_pid,
            &format!("http://127.0.0.1:8080{path}"),
            seconds,
        );
        let (r, relay_cpu) = relay_leg(&topo, pid, &relay_url, seconds);
        let (bare, hyper_cpu) = proxy_leg(&topo, hyper_pid, &hyper_url, seconds);
        println!(
            "{round:<5} {d:>9.0} {:>9.0} {p:>9.0} {:>9.0} {bare:>9.0}  {:>6.2}x {:>6.2}x {:>6.2}x {:>6.2}x {cpu:>5.1}us  {proxy_cpu:>7.1}us  {relay_cpu:>7.1}us  {hyper_cpu:>7.1}us  {}",
            g.rps,
            r.rps,
            g.rps / d,
            p / d,
            r.rps / d,
            bare / d,
            load()
        );
        hyper.push(bare);
        hyper_ratios.push(bare / d);
        hyper_cpus.push(hyper_cpu);
        direct.push(d);
        gateway.push(g.rps);
        proxy.push(p);
        relay.push(r.rps);
        ratios.push(g.rps / d);
        proxy_ratios.push(p / d);
        relay_ratios.push(r.rps / d);
        cpus.push(cpu);
        proxy_cpus.push(proxy_cpu);
        relay_cpus.push(relay_cpu);
    }
    let d = median(direct);
    let g = median(gateway);
    let p = median(proxy);
    let r = median(relay);
    let hy = median(hyper);
    println!("medians (ratios: medians of the same-round ratios):");
    println!("  direct to nginx        {d:>10.0}  1.00");
    println!(
        "  through the gateway    {g:>10.0}  {:.2}  ({:.1} us daemon CPU per request)",
        median(ratios),
        median(cpus)
    );
    println!(
        "  through nginx (proxy)  {p:>10.0}  {:.2}  ({:.1} us nginx CPU per request)",
        median(proxy_ratios),
        median(proxy_cpus)
    );
    println!(
        "  gateway, opaque TCP    {r:>10.0}  {:.2}  ({:.1} us daemon CPU per request; the ceiling)",
        median(relay_ratios),
        median(relay_cpus)
    );
    println!(
        "  bare hyper proxy       {hy:>10.0}  {:.2}  ({:.1} us CPU per request; hyper's own ceiling)",
        median(hyper_ratios),
        median(hyper_cpus)
    );

    // TLS on both legs: terminated for the client, verified toward nginx.
    let (mut gateway_tls, mut proxy_tls, mut tls_cpus) = (Vec::new(), Vec::new(), Vec::new());
    let mut proxy_tls_cpus = Vec::new();
    for _ in 0..rounds {
        let (g, cpu) = gateway_leg(&topo, pid, &tls_url, seconds);
        gateway_tls.push(g.rps);
        tls_cpus.push(cpu);
        let (p, cpu) = proxy_leg(
            &topo,
            proxy_pid,
            &format!("https://127.0.0.1:8443{path}"),
            seconds,
        );
        proxy_tls.push(p);
        proxy_tls_cpus.push(cpu);
    }
    let gt = median(gateway_tls);
    let pt = median(proxy_tls);
    println!("HTTPS (TLS terminated, then TLS to nginx), medians (requests/s):");
    println!(
        "  gateway terminating    {gt:>10.0}  {:.2} of direct plain  ({:.1} us CPU per request)",
        gt / d,
        median(tls_cpus)
    );
    println!(
        "  nginx terminating      {pt:>10.0}  {:.2} of direct plain  ({:.1} us nginx CPU per request)",
        pt / d,
        median(proxy_tls_cpus)
    );
}
