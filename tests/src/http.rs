//! HTTP test pieces: nginx from Debian on the target host (its own prefix, pid and logs in the
//! topology's directory; the access log shows each request's Authorization header and
//! protocol), a test CA and server certificate made with openssl, and governed clients started
//! through `bulkhead run`, as a user would.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{Proc, Side, Topology, TARGET_V4};

/// The name the test server's certificate is for (clients reach it with `curl --resolve`).
pub const SERVER_NAME: &str = "api.test";

/// nginx on `TARGET_V4`: port 80 plain, 443 TLS with HTTP/2; port 81 plain too, for a
/// destination no HTTP target names (opaque TCP: the benchmark's ceiling).
pub struct Nginx {
    pub proc: Proc,
    pub dir: PathBuf,
    /// The CA that signed the server's certificate (the gateway's `ca` for the target).
    pub ca: PathBuf,
}

impl Nginx {
    /// The access log so far: `METHOD URI auth="..." proto=...` per request.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Waits until the access log has `n` lines.
    pub fn wait_requests(&self, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.access_log();
            if log.lines().count() >= n || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA (`ca.pem`) and a server certificate signed by it (`server.pem`, `server.key`) for
/// [`SERVER_NAME`] and `TARGET_V4`, in `dir`.
fn test_certificates(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bulkhead test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=api.test",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:{SERVER_NAME},IP:{TARGET_V4}\n"),
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
}

impl Topology {
    /// Starts nginx on the target host with a test CA and a certificate for [`SERVER_NAME`]
    /// and `TARGET_V4`.
    pub fn nginx(&self) -> Nginx {
        let dir = self.dir.join("nginx");
        fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        test_certificates(&dir);
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               log_format hdr '$request_method $request_uri auth=\"$http_authorization\" proto=$server_protocol';\n\
               access_log {d}/access.log hdr;\n\
               client_body_temp_path {d}/tmp;\nproxy_temp_path {d}/tmp;\nfastcgi_temp_path {d}/tmp;\n\
               uwsgi_temp_path {d}/tmp;\nscgi_temp_path {d}/tmp;\n\
               server {{\n\
                 listen {TARGET_V4}:80;\n\
                 listen {TARGET_V4}:81;\n\
                 listen {TARGET_V4}:443 ssl http2;\n\
                 ssl_certificate {d}/server.pem;\nssl_certificate_key {d}/server.key;\n\
                 location / {{ return 200 \"nginx says hello $request_method $uri\\n\"; }}\n\
                 location /files/ {{ alias {d}/www/; }}\n\
               }}\n\
             }}\n"
        );
        fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
        // A 1 MiB file, `/files/big`: bulk responses (`BENCH_HTTP_PATH` in bench-http).
        fs::create_dir_all(dir.join("www")).expect("nginx www");
        let big: Vec<u8> = (0..1u32 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        fs::write(dir.join("www/big"), big).expect("www/big");
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"));
        let mut proc = self.spawn(Side::Target, "nginx", cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("nginx.pid").exists() {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {} {}",
                    proc.stderr(),
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx {
            proc,
            ca: dir.join("ca.pem"),
            dir,
        }
    }

    /// Runs `program args` governed through `bulkhead run`, as `nobody` (as under sudo), to
    /// completion; `bulkhead run` sets the CA bundle variables.
    pub fn run_governed(&self, program: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = self.bulkhead(&["run", "--"]);
        cmd.arg(program)
            .args(args)
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .env("SUDO_USER", "nobody")
            .current_dir(&self.dir);
        for var in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "CURL_CA_BUNDLE",
        ] {
            cmd.env_remove(var);
        }
        self.output(Side::Host, cmd)
    }
}
