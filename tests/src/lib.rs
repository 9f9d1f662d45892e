//! Test topology for Bulkhead's integration tests and benchmarks.
//!
//! Every [`Topology`] builds its own world and tears it down in `Drop`:
//! * a network namespace for the governed side (the daemon and its clients run there), and one
//!   for the target host, joined by a veth pair: `10.201.0.1/24` + `fd00:201::1/64` on the
//!   governed side, `10.201.0.2` + `fd00:201::2` on the target;
//! * a cgroup of its own under the cgroup2 mount: the only cgroup the programs attach to;
//! * a bpffs pin directory and a state directory of its own.
//!
//! Processes are started with their network namespace set in `pre_exec` (not `ip netns exec`,
//! which remounts `/sys` and hides the cgroup2 mount), tracked by pid, and killed by pid.
#![expect(
    clippy::missing_panics_doc,
    reason = "test harness: panics are the failure report"
)]

pub mod http;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub mod ssh;

pub const GOVERNED_V4: &str = "10.201.0.1";
pub const TARGET_V4: &str = "10.201.0.2";
pub const GOVERNED_V6: &str = "fd00:201::1";
pub const TARGET_V6: &str = "fd00:201::2";
pub const LISTENER_PORT: u16 = 951;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `BULKHEAD_TEST_FAST_PATH=1`: every daemon the tests start runs with `capture.fast_path`
/// (CI runs the foundation and PostgreSQL tests both ways).
pub fn fast_path_from_env() -> bool {
    std::env::var("BULKHEAD_TEST_FAST_PATH").is_ok_and(|v| v == "1")
}

/// `config` with `capture.fast_path = true` when `on` (added to its `[capture]` table, or in
/// one of its own), unless it sets `fast_path` itself.
pub fn with_fast_path(config: String, on: bool) -> String {
    if !on || config.contains("fast_path") {
        return config;
    }
    match config.find("[capture]\n") {
        Some(at) => {
            let after = at + "[capture]\n".len();
            format!("{}fast_path = true\n{}", &config[..after], &config[after..])
        }
        None => format!("{config}\n[capture]\nfast_path = true\n"),
    }
}

/// `target/<profile>`, from this executable: a test (`target/<profile>/deps/<test>`) or a
/// binary of this package (`target/<profile>/<bin>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("executable's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The `bulkhead` binary: `$BULKHEAD_BIN`, else next to this test binary's target directory.
pub fn bulkhead_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BULKHEAD_BIN") {
        return PathBuf::from(p);
    }
    let bin = profile_dir().join("bulkhead");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p bulkhead), or run `cargo xtask test`",
        bin.display()
    );
    bin
}

/// The probe helper (`src/bin/bh-probe.rs`), built by cargo for this package's tests.
pub fn probe_bin() -> PathBuf {
    let bin = profile_dir().join("bh-probe");
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// Runs a command and panics with its output when it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CPU time the process's threads have used, in microseconds, from each thread's
/// `schedstat` (nanoseconds; `/proc/PID/stat` counts in ticks of 10 ms, too coarse here).
/// A thread that ends between two readings takes its time with it.
pub fn cpu_us(pid: u32) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("daemon's /proc tasks");
    let ns: f64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum();
    ns / 1000.0
}

/// Panics, saying why, when privileged tests cannot run here: a skipped test would pass.
pub fn require_root() {
    if let Some(why) = missing_privileges() {
        panic!("cannot run the integration tests: {why}");
    }
}

/// Says why privileged tests cannot run here, if they cannot.
pub fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("integration tests need root (network namespaces, cgroups, bpf)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}

/// A process we started, killed by pid when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    stdout: Option<mpsc::Receiver<String>>,
    pub stderr_log: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, within `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        self.stdout.as_ref()?.recv_timeout(timeout).ok()
    }

    /// The rest of stdout, read to its end (the process closed it), or until no line comes
    /// within `patience`. Returns at once at the end: the reader's channel closes with it.
    pub fn rest_of_stdout(&mut self, patience: Duration) -> String {
        let mut out = String::new();
        while let Some(line) = self.line(patience) {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Every stdout line available now.
    pub fn drain_lines(&mut self) -> Vec<String> {
        let Some(rx) = self.stdout.as_ref() else {
            return Vec::new();
        };
        rx.try_iter().collect()
    }

    /// Waits for the process to exit and for its stderr to be read to the end.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait");
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        status
    }

    pub fn stderr(&self) -> String {
        self.stderr_log
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        // SAFETY: we signal only our own child, by its pid.
        unsafe {
            libc::kill(i32::try_from(self.pid()).expect("pid"), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        // SAFETY: we signal only our own child, by its pid.
        unsafe {
            libc::kill(i32::try_from(self.pid()).expect("pid"), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Where a started process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The governed side's namespace, outside the governed cgroup.
    Host,
    /// The governed side's namespace, inside the governed cgroup.
    Governed,
    /// The target host's namespace.
    Target,
}

pub struct Topology {
    pub id: String,
    pub gov_ns: String,
    pub tgt_ns: String,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    veth: String,
}

impl Topology {
    /// Builds the namespaces, veth pair, cgroup and directories. `extra_config` is appended
    /// to the generated daemon configuration (TOML).
    pub fn new(extra_config: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let gov_ns = format!("bh-{id}-gov");
        let tgt_ns = format!("bh-{id}-tgt");
        // Interface names are limited to 15 bytes.
        let veth = format!("bh{:x}", std::process::id() * 64 + n);
        let peer = format!("{veth}t");
        let mount = cgroup2_mount();
        let cgroup = mount.join(format!("bulkhead-test-{id}"));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bulkhead-test-{id}"));
        let dir = std::env::temp_dir().join(format!("bulkhead-test-{id}"));
        let topo = Self {
            id,
            gov_ns,
            tgt_ns,
            cgroup,
            pin_dir,
            dir,
            config_path: PathBuf::new(),
            veth,
        };
        // From here on, Drop cleans up whatever was created.
        sh("ip", &["netns", "add", &topo.gov_ns]);
        sh("ip", &["netns", "add", &topo.tgt_ns]);
        sh(
            "ip",
            &[
                "link", "add", &topo.veth, "type", "veth", "peer", "name", &peer,
            ],
        );
        sh("ip", &["link", "set", &topo.veth, "netns", &topo.gov_ns]);
        sh("ip", &["link", "set", &peer, "netns", &topo.tgt_ns]);
        for (ns, dev, v4, v6) in [
            (&topo.gov_ns, &topo.veth, GOVERNED_V4, GOVERNED_V6),
            (&topo.tgt_ns, &peer, TARGET_V4, TARGET_V6),
        ] {
            sh(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev],
            );
            sh(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            );
            sh("ip", &["-n", ns, "link", "set", dev, "up"]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        fs::create_dir_all(&topo.cgroup).expect("create test cgroup");
        fs::create_dir_all(&topo.dir).expect("create test dir");
        fs::set_permissions(
            &topo.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let mut topo = topo;
        topo.config_path = topo.dir.join("bulkhead.toml");
        topo.write_config(extra_config);
        topo
    }

    /// The daemon's policy directory (empty until a test writes files into it).
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// Writes a policy file.
    pub fn policy(&self, name: &str, text: &str) {
        fs::create_dir_all(self.policy_dir()).expect("policy dir");
        fs::write(self.policy_dir().join(name), text).expect("policy file");
    }

    /// A policy that lets every opaque TCP connection through: `tcp` targets and destinations
    /// that match no target. Without a policy, connections are denied.
    pub fn allow_opaque_tcp(&self) {
        self.policy(
            "opaque-tcp.toml",
            "[[target]]\nprotocol = \"tcp\"\ndefault = \"allow\"\n",
        );
    }

    /// Writes the daemon configuration: this topology's cgroup, pins and state, plus `extra`.
    pub fn write_config(&self, extra: &str) {
        let base = format!(
            "[daemon]\nstate_dir = \"{state}\"\nrun_dir = \"{run}\"\nbpf_pin_dir = \"{pins}\"\nlog = \"info\"\npolicy_dir = \"{policies}\"\n\
             {extra_daemon}\n[governed]\ncgroup = \"{cg}\"\n",
            state = self.dir.join("state").display(),
            run = self.dir.join("run").display(),
            pins = self.pin_dir.display(),
            policies = self.policy_dir().display(),
            cg = self.cgroup.display(),
            // Benchmarks compare runtime sizes with this (e.g. `BENCH_DAEMON_WORKERS=2`).
            extra_daemon = std::env::var("BENCH_DAEMON_WORKERS")
                .map(|w| format!("workers = {w}\n"))
                .unwrap_or_default(),
        );
        let text = with_fast_path(format!("{base}{extra}"), fast_path_from_env());
        fs::write(&self.config_path, text).expect("write config");
    }

    fn netns_file(&self, side: Side) -> fs::File {
        let ns = match side {
            Side::Host | Side::Governed => &self.gov_ns,
            Side::Target => &self.tgt_ns,
        };
        fs::File::open(format!("/run/netns/{ns}")).expect("open netns")
    }

    /// Starts `cmd` on `side`; stdout lines are collected, stderr is kept for reports.
    pub fn spawn(&self, side: Side, name: &str, cmd: Command) -> Proc {
        self.spawn_as(side, None, name, cmd)
    }

    /// As [`Topology::spawn`], switching to `user` (uid, gid; no supplementary groups) after
    /// entering the namespace and cgroup, which need root.
    pub fn spawn_as(
        &self,
        side: Side,
        user: Option<(u32, u32)>,
        name: &str,
        mut cmd: Command,
    ) -> Proc {
        let netns = self.netns_file(side);
        let procs = (side == Side::Governed).then(|| self.cgroup.join("cgroup.procs"));
        let fd = netns.as_raw_fd();
        // SAFETY: between fork and exec we only make async-signal-safe calls (setns, open,
        // write, close) on data prepared before the fork.
        let procs_c =
            procs.map(|p| std::ffi::CString::new(p.to_str().expect("utf-8 path")).expect("path"));
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(p) = &procs_c {
                    let f = libc::open(p.as_ptr(), libc::O_WRONLY);
                    if f < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(f, b"0\n".as_ptr().cast(), 2) == 2;
                    libc::close(f);
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid)) = user {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        drop(netns);
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_log = Arc::new(Mutex::new(String::new()));
        let log = Arc::clone(&stderr_log);
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut l) = log.lock() {
                    l.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Proc {
            child,
            name: name.into(),
            stdout: Some(rx),
            stderr_log,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// `bulkhead ARGS` with this topology's configuration, from this topology's directory
    /// (so that tests running as other users can execute it wherever the build lives).
    pub fn bulkhead(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.linked(&bulkhead_bin(), "bulkhead"));
        cmd.arg("--config").arg(&self.config_path).args(args);
        cmd
    }

    /// Starts the daemon and waits until it accepts on its listener.
    pub fn start_daemon(&self, extra_args: &[&str]) -> Proc {
        let mut args = vec!["daemon"];
        args.extend_from_slice(extra_args);
        let mut daemon = self.spawn(Side::Host, "daemon", self.bulkhead(&args));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("daemon exited early ({status}): {}", daemon.stderr());
            }
            if self.daemon_ready() {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready in time: {}",
                daemon.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The control socket answers, so listeners are bound and programs attached. (Only then
    /// ask the CLI: with no daemon it would read the store, holding its lock.)
    fn daemon_ready(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.dir.join("run/control.sock")).is_ok()
            && self.status().1["daemon"].is_object()
    }

    /// Runs a CLI command on the governed side's network namespace, outside the governed
    /// cgroup, and parses its JSON output.
    pub fn run_cli(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = self.output(Side::Host, self.bulkhead(args));
        if !out.status.success() {
            return Err(format!(
                "bulkhead {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "bulkhead {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `bulkhead status --json`: its exit status (0 governing, 1 no daemon, 3 the last policy
    /// reload failed) and the report.
    pub fn status(&self) -> (Option<i32>, serde_json::Value) {
        let out = self.output(Side::Host, self.bulkhead(&["status", "--json"]));
        let report = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status JSON: {e}: {out:?}"));
        (out.status.code(), report)
    }

    /// `bulkhead status --json` with the daemon stopped: exit status 1, and the report.
    pub fn status_while_stopped(&self) -> serde_json::Value {
        let (code, report) = self.status();
        assert_eq!(
            code,
            Some(1),
            "status exits 1 while the daemon is not running: {report}"
        );
        report
    }

    /// Runs `cmd` on `side` to completion.
    pub fn output(&self, side: Side, cmd: Command) -> std::process::Output {
        self.output_as(side, None, cmd)
    }

    /// Runs `cmd` on `side` as `user` to completion.
    pub fn output_as(
        &self,
        side: Side,
        user: Option<(u32, u32)>,
        cmd: Command,
    ) -> std::process::Output {
        let mut p = self.spawn_as(side, user, "cmd", cmd);
        let status = p.wait();
        // Let the reader threads finish.
        let mut stdout = Vec::new();
        while let Some(l) = p.line(Duration::from_millis(500)) {
            stdout.extend_from_slice(l.as_bytes());
            stdout.push(b'\n');
        }
        std::thread::sleep(Duration::from_millis(20));
        std::process::Output {
            status,
            stdout,
            stderr: p.stderr().into_bytes(),
        }
    }

    /// The probe helper in this topology's directory (executable by every user).
    pub fn probe(&self) -> PathBuf {
        self.probe_named("bh-probe")
    }

    /// The probe helper linked under another name: a process of that name (`comm` and the
    /// executable's file name), for identity rules.
    pub fn probe_named(&self, name: &str) -> PathBuf {
        self.linked(&probe_bin(), name)
    }

    /// Runs `bh-probe connect ADDR TEXT` on `side` and parses its JSON line.
    pub fn probe_connect(&self, side: Side, addr: &str, text: &str) -> serde_json::Value {
        self.named_probe_connect("bh-probe", side, addr, text)
    }

    /// [`Self::probe_connect`], run as the probe linked under `name` ([`Self::probe_named`]).
    pub fn named_probe_connect(
        &self,
        name: &str,
        side: Side,
        addr: &str,
        text: &str,
    ) -> serde_json::Value {
        let mut cmd = Command::new(self.probe_named(name));
        cmd.args(["connect", addr, text]);
        parse_probe(&self.output(side, cmd))
    }

    /// `src` hard-linked into this topology's directory. A link, not a copy: a copy's open
    /// write descriptor, inherited by a child another test forks meanwhile, makes exec fail
    /// with ETXTBSY.
    fn linked(&self, src: &Path, name: &str) -> PathBuf {
        let dst = self.dir.join(name);
        if !dst.exists() {
            fs::hard_link(src, &dst)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .unwrap_or_else(|e| {
                    panic!(
                    "link {} into {}: {e} (the test directory must be on the build's file system)",
                    src.display(),
                    self.dir.display()
                )
                });
        }
        dst
    }

    /// `bh-probe ARGS` on `side`, once it has said it is ready (a server, a relay).
    pub fn probe_server(&self, side: Side, name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(self.probe());
        cmd.args(args);
        let mut p = self.spawn(side, name, cmd);
        let ready = p.line(Duration::from_secs(10));
        assert_eq!(
            ready.as_deref(),
            Some("ready"),
            "{name} did not start: {}",
            p.stderr()
        );
        p
    }

    /// An echo server on the target host at `addr` (`bh-probe serve`).
    pub fn echo_server(&self, side: Side, addr: SocketAddr) -> Proc {
        self.probe_server(side, "echo", &["serve", &addr.to_string()])
    }

    /// A server that reads everything and answers with the byte count (`bh-probe sink`).
    pub fn echo_server_sink(&self, side: Side, addr: &str) -> Proc {
        self.probe_server(side, "sink", &["sink", addr])
    }

    /// Sessions the daemon (or the store) reports, newest first.
    pub fn sessions(&self) -> Vec<serde_json::Value> {
        match self.run_cli(&["sessions", "list", "--json", "--limit", "1000"]) {
            Ok(serde_json::Value::Array(a)) => a,
            other => panic!("sessions list: {other:?}"),
        }
    }

    /// The events of session `id`, in order.
    pub fn events(&self, id: &serde_json::Value) -> Vec<serde_json::Value> {
        let shown = self
            .run_cli(&["sessions", "show", &id.to_string(), "--json"])
            .unwrap_or_else(|e| panic!("{e}"));
        match &shown["events"] {
            serde_json::Value::Array(a) => a.clone(),
            other => panic!("no events in {shown}: {other}"),
        }
    }

    /// Waits for the first request pending approval.
    pub fn first_pending(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self
                .run_cli(&["approvals", "list", "--json"])
                .unwrap_or_else(|e| panic!("{e}"));
            if let Some(p) = list.as_array().and_then(|a| a.first()).cloned() {
                return p;
            }
            assert!(Instant::now() < deadline, "no pending approval: {list}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the session of the process `pid` is closed.
    pub fn wait_session_of(&self, pid: &serde_json::Value) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.sessions();
            if let Some(session) = s.iter().find(|s| s["identity"]["pid"] == *pid) {
                if session["outcome"]["kind"] != "open" {
                    return session.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no closed session for pid {pid}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the newest session is closed.
    pub fn wait_session_closed(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.sessions();
            if let Some(first) = s.first() {
                if first["outcome"]["kind"] != "open" {
                    return first.clone();
                }
            }
            assert!(Instant::now() < deadline, "no closed session: {s:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `dir` and every cgroup below it, the deepest first (the order they can be removed in).
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_tree(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Our cgroup and those a test made below it (a "service" of the agent's user), the
        // deepest first: a cgroup with a child cannot be removed.
        for cgroup in cgroup_tree(&self.cgroup) {
            // Processes left in them were started by this test: end them by pid.
            if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill of a process in a cgroup this test created.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            for _ in 0..100 {
                if fs::remove_dir(&cgroup).is_ok() || !cgroup.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.gov_ns])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.tgt_ns])
            .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The JSON line `bh-probe connect` printed last.
pub fn parse_probe(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "probe output {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// What the echo server answered a probe: `{"peer": ..., "data": ...}`.
pub fn reply(probe: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(
        probe["reply"]
            .as_str()
            .unwrap_or_else(|| panic!("no reply in {probe}")),
    )
    .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {probe}"))
}

/// The cgroup2 mount point, found as the daemon finds it.
pub fn cgroup2_mount() -> PathBuf {
    bulkhead::cgroup::cgroup2_mount().expect("a cgroup2 mount")
}

/// PostgreSQL's server binaries (Debian's postgresql-15).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL 15 server of the test's own, on the target host, with an admin role whose
/// password the test generated. Stopped (by pid) when dropped, with the topology's directory.
pub struct PgServer {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    pub data: PathBuf,
}

impl PgServer {
    /// Runs `sql` on the server directly (its unix socket, as the postgres user), bypassing the
    /// gateway: for setting up what the policy under test would not allow.
    pub fn admin_sql(&self, topo: &Topology, sql: &str) {
        let mut psql = Command::new("psql");
        psql.args([
            "-X",
            "-h",
            &self.data.display().to_string(),
            "-U",
            "admin",
            "-d",
            "postgres",
            "-c",
            sql,
        ]);
        let out = topo.output_as(Side::Target, Some(system_user("postgres")), psql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The uid and gid of a system user, from `/etc/passwd`.
pub fn system_user(name: &str) -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .unwrap_or_else(|| panic!("no user {name} (Debian's postgresql package creates it)"))
}

impl Topology {
    /// Starts PostgreSQL on `TARGET_V4:5432`, `auth` being the pg_hba method for TCP clients
    /// (`scram-sha-256`, `md5`, `password`).
    pub fn postgres(&self, auth: &str) -> PgServer {
        let (uid, gid) = system_user("postgres");
        let data = self.dir.join("pgdata");
        fs::create_dir_all(&data).expect("pgdata");
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown pgdata");
        let password = format!(
            "pw-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let pwfile = self.dir.join("pgpass.txt");
        fs::write(&pwfile, &password).expect("pwfile");
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        let encryption = if auth == "md5" {
            "md5"
        } else {
            "scram-sha-256"
        };
        let mut initdb = Command::new(format!("{PG_BIN}/initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "admin",
                "--auth-local=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--auth-host={auth}"))
            .arg(format!("--pwfile={}", pwfile.display()));
        initdb.env("PGPASSWORD_ENCRYPTION", encryption);
        let out = self.output_as(Side::Target, Some((uid, gid)), initdb);
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = format!(
            "listen_addresses = '{TARGET_V4}'\nport = 5432\nunix_socket_directories = '{}'\nfsync = off\n\
             password_encryption = '{encryption}'\nmax_connections = 50\nshared_buffers = 64MB\n",
            data.display()
        );
        let mut text = fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
        text.push_str(&conf);
        fs::write(data.join("postgresql.conf"), text).expect("postgresql.conf");
        fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all all 0.0.0.0/0 {auth}\nhost all all ::/0 {auth}\n"
            ),
        )
        .expect("pg_hba.conf");
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.arg("-D").arg(&data);
        let mut proc = self.spawn_as(Side::Target, Some((uid, gid)), "postgres", cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if proc.stderr().contains("ready to accept connections") {
                break;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("postgres exited ({status}): {}", proc.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let server = PgServer {
            proc,
            addr: format!("{TARGET_V4}:5432").parse().expect("addr"),
            user: "admin".into(),
            password,
            data,
        };
        if encryption == "md5" {
            // initdb stored the password with the default method; store it as md5.
            let p = &server.password;
            server.admin_sql(
                self,
                &format!("SET password_encryption = 'md5'; ALTER ROLE admin PASSWORD '{p}'"),
            );
        }
        server
    }

    /// PostgreSQL (pg_hba `auth`) on the target host, configured as target `db` whose password
    /// the gateway holds, `policy` written as `db.toml`, and the daemon started.
    pub fn postgres_target(&self, auth: &str, policy: &str) -> (PgServer, Proc) {
        self.postgres_target_with(auth, policy, "")
    }

    /// [`Self::postgres_target`], with `target_toml` added to target `db`'s table (its own
    /// keys, or sub-tables such as `[[target.postgres.map]]`).
    pub fn postgres_target_with(
        &self,
        auth: &str,
        policy: &str,
        target_toml: &str,
    ) -> (PgServer, Proc) {
        let pg = self.postgres(auth);
        let daemon = self.held_postgres_target(
            &format!("\"{TARGET_V4}:5432\""),
            &pg.password,
            policy,
            target_toml,
        );
        (pg, daemon)
    }

    /// Configures target `db` (PostgreSQL) at `addresses` (TOML list items) with `password`
    /// held, `target_toml` added to its table, `policy` written as `db.toml`; starts the daemon.
    pub fn held_postgres_target(
        &self,
        addresses: &str,
        password: &str,
        policy: &str,
        target_toml: &str,
    ) -> Proc {
        let secret = self.credential_file("db", password);
        self.write_config(&format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [{addresses}]\n\
             credentials = {{ file = \"{}\" }}\n{target_toml}",
            secret.display()
        ));
        self.policy("db.toml", policy);
        self.start_daemon(&[])
    }

    /// From outside the cgroup, straight to the listener, from the local address `local` a
    /// governed connection used before: the gateway must find no kernel record for it, refuse
    /// it and record the refusal, and nothing may reach the target (`echo`).
    pub fn assert_sneak_refused(&self, local: &str, echo: &mut Proc) {
        let mut cmd = Command::new(self.probe());
        cmd.args([
            "connect",
            &format!("127.0.0.1:{LISTENER_PORT}"),
            "sneak",
            local,
        ]);
        let sneak = parse_probe(&self.output(Side::Host, cmd));
        assert!(
            sneak["reply"] == "" || (sneak["reply"].is_null() && sneak["error"].is_string()),
            "{sneak}"
        );
        let session = self.wait_session_closed();
        assert_eq!(session["outcome"]["kind"], "refused", "{session}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(echo.drain_lines().is_empty(), "nothing reached the target");
    }

    /// psql through the gateway from the governed side, to target `db` at `TARGET_V4`: `script`
    /// run as a file, errors not fatal (`ON_ERROR_STOP=0`), rows unaligned without headers
    /// (`-At`), no password of its own. `PGSSLMODE` is `prefer` unless `env` (added last) says
    /// otherwise. Returns (success, stdout, stderr).
    pub fn psql(
        &self,
        pg: &PgServer,
        script: &str,
        env: &[(&str, &str)],
    ) -> (bool, String, String) {
        let path = self.dir.join(format!(
            "script-{}.sql",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, script).expect("psql script");
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X", "-q", "-h", TARGET_V4, "-U", &pg.user, "-d", "postgres",
        ])
        .args(["-v", "ON_ERROR_STOP=0", "-At", "-f"])
        .arg(&path)
        .env("PGSSLMODE", "prefer")
        .env_remove("PGPASSWORD")
        .envs(env.iter().copied())
        .current_dir(&self.dir);
        let out = self.output(Side::Governed, cmd);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `python3 -c script` on the governed side; its standard output, once it exited 0.
    pub fn python(&self, script: &str) -> String {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script]);
        let out = self.output(Side::Governed, cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `bh-pg-client` (tokio-postgres: Parse and Describe, then Execute with binary results)
    /// through the gateway from the governed side, to `TARGET_V4`, with `args` after the
    /// address (none: its own fixed script); its JSON output, once it exited 0.
    pub fn pg_client(&self, args: &[&str]) -> serde_json::Value {
        let mut cmd = Command::new(probe_bin().with_file_name("bh-pg-client"));
        cmd.arg(TARGET_V4).args(args);
        let out = self.output(Side::Governed, cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).expect("bh-pg-client prints JSON")
    }

    /// Writes the held password where a target's `credentials = { file = ... }` points.
    pub fn credential_file(&self, name: &str, secret: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.secret"));
        fs::write(&path, secret).expect("credential file");
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        path
    }
}

pub mod kube;
