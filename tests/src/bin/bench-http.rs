//! HTTP gateway benchmark: wrk (Debian) against nginx on the target host, straight, through
//! the gateway (policy, credential injection and recording on) and through nginx as a reverse
//! proxy on the governed side's loopback, in alternating rounds of the same run
//! (`BENCH_HTTP_ROUNDS`, 3; `BENCH_HTTP_SECONDS`, 10), printed as ratios of the direct figure
//! with the medians. Then HTTPS: the gateway terminating TLS (and verifying nginx over TLS)
//! beside nginx doing the same.
//!
//! Run with `cargo xtask bench` (root; release build).

use std::{fs, process::Command};

use bulkhead_tests::{missing_privileges, Proc, Side, Topology, TARGET_V4};

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `wrk` on `side` against `url`; requests per second.
fn wrk(topo: &Topology, side: Side, url: &str, seconds: u32) -> f64 {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{seconds}s"), url]);
    let out = topo.output(side, cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("wrk {url}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("bench-http: {url}: {e}");
    }
    rps
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
    let _daemon = topo.start_daemon(&[]);
    let _proxy = reverse_proxy(&topo, &nginx.dir);
    // The access log would measure the disk: nginx keeps writing it, the same for every leg.

    let url = format!("http://{TARGET_V4}/bench");
    let (mut direct, mut gateway, mut proxy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct.push(wrk(&topo, Side::Host, &url, seconds));
        gateway.push(wrk(&topo, Side::Governed, &url, seconds));
        proxy.push(wrk(
            &topo,
            Side::Host,
            "http://127.0.0.1:8080/bench",
            seconds,
        ));
    }
    let d = median(direct);
    let g = median(gateway);
    let p = median(proxy);
    println!("HTTP/1.1, wrk -t1 -c16, {rounds} rounds of {seconds}s, medians (requests/s):");
    println!("  direct to nginx        {d:>10.0}  1.00");
    println!("  through the gateway    {g:>10.0}  {:.2}", g / d);
    println!("  through nginx (proxy)  {p:>10.0}  {:.2}", p / d);

    // TLS on both legs: terminated for the client, verified toward nginx.
    let (mut gateway_tls, mut proxy_tls) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        gateway_tls.push(wrk(
            &topo,
            Side::Governed,
            &format!("https://{TARGET_V4}/bench"),
            seconds,
        ));
        proxy_tls.push(wrk(
            &topo,
            Side::Host,
            "https://127.0.0.1:8443/bench",
            seconds,
        ));
    }
    let gt = median(gateway_tls);
    let pt = median(proxy_tls);
    println!("HTTPS (TLS terminated, then TLS to nginx), medians (requests/s):");
    println!(
        "  gateway terminating    {gt:>10.0}  {:.2} of direct plain",
        gt / d
    );
    println!(
        "  nginx terminating      {pt:>10.0}  {:.2} of direct plain",
        pt / d
    );
}
