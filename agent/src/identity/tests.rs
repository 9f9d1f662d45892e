use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::*;

const STATUS: &str = "Name:\tpsql\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\n\
Pid:\t4242\nPPid:\t4200\nTracerPid:\t0\nUid:\t1000\t1000\t1000\t1000\nGid:\t1001\t1001\t1001\t1001\n";

#[test]
fn parses_status() {
    let s = parse_status(STATUS).unwrap();
    assert_eq!(
        s,
        Status {
            name: "psql".into(),
            ppid: 4200,
            uid: 1000,
            gid: 1001
        }
    );
    assert_eq!(parse_status("Name:\tx\n"), None);
    assert_eq!(parse_status(""), None);
    assert_eq!(
        parse_status("PPid:\tabc\nName:\tx\nUid:\t1\nGid:\t1\n"),
        None
    );
}

#[test]
fn parses_cmdline_and_bounds_it() {
    assert_eq!(parse_cmdline(b"psql\0-h\0db\0"), vec!["psql", "-h", "db"]);
    assert_eq!(parse_cmdline(b""), Vec::<String>::new());
    let long = vec![b'a'; MAX_CMDLINE * 2];
    assert_eq!(parse_cmdline(&long)[0].len(), MAX_CMDLINE);
}

#[test]
fn finds_units_and_users() {
    assert_eq!(
        unit_from_cgroup_path("/system.slice/ssh.service"),
        Some("ssh.service".into())
    );
    assert_eq!(
        unit_from_cgroup_path("/user.slice/user-1000.slice/session-3.scope/x"),
        Some("session-3.scope".into())
    );
    assert_eq!(unit_from_cgroup_path("/bulkhead.governed"), None);
    let passwd =
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken\n";
    assert_eq!(user_from_passwd(passwd, 1000), Some("alice".into()));
    assert_eq!(user_from_passwd(passwd, 7), None);
    assert_eq!(comm_str(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
    assert_eq!(comm_str(b"0123456789abcdef"), "0123456789abcdef");
}

/// A file read in one call when it fits, and to its end when it does not: shorter than
/// the buffer, exactly as long, longer; this process's own `/proc` stat, which procfs makes
/// whole at the first read; and links, read whole or not at all.
#[test]
fn a_proc_directory_reads_files_and_links_whole() {
    let root = tempfile::tempdir().unwrap();
    let p = root.path().join("proc/7");
    fs::create_dir_all(&p).unwrap();
    let dir = ProcDir::open(root.path(), 7).unwrap();
    for len in [0, 1, 4095, 4096, 4097, 10_000] {
        let text: String = b"abcdefghijklmnopqrstuvwxyz"
            .iter()
            .cycle()
            .take(len)
            .map(|&b| char::from(b))
            .collect();
        let name = format!("f{len}");
        fs::write(p.join(&name), &text).unwrap();
        let name = std::ffi::CString::new(name).unwrap();
        assert_eq!(dir.text(&name).unwrap(), text, "{len} bytes");
    }
    assert!(dir.text(c"absent").is_err());
    fs::write(p.join("binary"), [0xff, 0xfe]).unwrap();
    assert!(dir.text(c"binary").is_err());
    assert_eq!(dir.bytes(c"binary").unwrap(), [0xff, 0xfe]);

    let long = format!("/{}", "x".repeat(4094));
    std::os::unix::fs::symlink("/usr/bin/psql", p.join("exe")).unwrap();
    std::os::unix::fs::symlink(&long, p.join("long")).unwrap();
    assert_eq!(dir.link(c"exe").as_deref(), Some("/usr/bin/psql"));
    assert!(dir.link_is(c"exe", "/usr/bin/psql"));
    assert!(!dir.link_is(c"exe", "/usr/bin/psq"));
    assert_eq!(
        dir.link(c"long"),
        Some(long.clone()),
        "the longest link there is"
    );
    assert!(!dir.link_is(c"long", &long[..4094]));
    assert_eq!(dir.link(c"absent"), None);

    let own = ProcDir::open(Path::new("/"), std::process::id()).unwrap();
    let stat = own.text(c"stat").unwrap();
    assert!(parse_stat(&stat).is_some(), "{stat}");
    assert!(own.link(c"exe").is_some());
    assert!(ProcDir::open(root.path(), 8).is_err());
}

#[test]
fn parses_the_start_time_even_with_odd_names() {
    let stat = "4242 (my (odd) name) S 4200 4242 4200 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
    assert_eq!(parse_stat(stat).map(|s| s.start_time), Some(987_654));
    assert_eq!(parse_stat("4242 (x) S 1").map(|s| s.start_time), None);
    assert_eq!(parse_stat("garbage").map(|s| s.start_time), None);
}

#[test]
fn a_cached_identity_is_reused_only_for_the_same_process() {
    let root = fixture();
    let procs = root.path().join("proc");
    let reader = ProcReader::new(root.path(), "/bulkhead.governed");
    let p = procs.join("4242");
    let mut rec = psql_connect();
    assert_eq!(
        reader.identify(&rec).cmdline,
        vec!["psql", "-h", "10.0.0.5"]
    );
    // Same process: served from the cache, with this connection's thread.
    fs::write(p.join("cmdline"), "changed\0").unwrap();
    rec.pid = 4250;
    let again = reader.identify(&rec);
    assert_eq!((again.tid, again.cmdline[0].as_str()), (4250, "psql"));
    // The process exits and a new one is given its pid, with the same executable: read afresh.
    let psql = (
        4242,
        "psql",
        4200,
        "/bulkhead.governed",
        "/usr/bin/psql",
        "new\0",
    );
    spawn(&procs, psql);
    assert_eq!(reader.identify(&rec).cmdline, vec!["new"]);
    // So is the same process after a setuid.
    fs::write(p.join("cmdline"), "after-setuid\0").unwrap();
    rec.uid = 0;
    assert_eq!(reader.identify(&rec).cmdline, vec!["after-setuid"]);
    // After a move to another cgroup (the kernel's record names another one).
    fs::write(p.join("cgroup"), "0::/bulkhead.governed/moved\n").unwrap();
    fs::write(p.join("cmdline"), "after-move\0").unwrap();
    rec.cgroup_id = 2;
    let moved = reader.identify(&rec);
    assert_eq!(
        (moved.cmdline[0].as_str(), moved.cgroup.as_deref()),
        ("after-move", Some("/bulkhead.governed/moved"))
    );
    // And after an execve (same pid, same process): another executable, or another comm.
    fs::remove_file(p.join("exe")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/curl", p.join("exe")).unwrap();
    fs::write(p.join("cmdline"), "curl\0").unwrap();
    let execed = reader.identify(&rec);
    assert_eq!(execed.exe.as_deref(), Some("/usr/bin/curl"));
    assert_eq!(execed.cmdline, vec!["curl"]);
    fs::write(p.join("cmdline"), "python3\0").unwrap();
    rec.comm = *b"python3\0\0\0\0\0\0\0\0\0";
    assert_eq!(reader.identify(&rec).cmdline, vec!["python3"]);
    // A process whose executable cannot be read is never served from the cache: nothing would
    // prove it the same process.
    fs::remove_file(p.join("exe")).unwrap();
    fs::write(p.join("cmdline"), "no-exe\0").unwrap();
    assert_eq!(reader.identify(&rec).cmdline, vec!["no-exe"]);
    fs::write(p.join("cmdline"), "no-exe-again\0").unwrap();
    assert_eq!(reader.identify(&rec).cmdline, vec!["no-exe-again"]);
}

/// What the per-connect proof cannot see (a cgroup renamed in place, a name set with `prctl`)
/// is read afresh once the cached identity is older than the reader's time to live.
#[test]
fn a_cached_identity_expires() {
    let root = fixture();
    let p = root.path().join("proc/4242");
    let ttl = Duration::from_millis(200);
    let reader = ProcReader::new(root.path(), "/bulkhead.governed").caching_for(ttl);
    let rec = psql_connect();
    assert_eq!(
        reader.identify(&rec).cgroup.as_deref(),
        Some("/bulkhead.governed")
    );
    let renamed = Instant::now();
    fs::write(p.join("cgroup"), "0::/bulkhead.governed/renamed.service\n").unwrap();
    let within = reader.identify(&rec);
    if renamed.elapsed() < ttl {
        assert_eq!(within.cgroup.as_deref(), Some("/bulkhead.governed"));
    }
    std::thread::sleep(ttl);
    let after = reader.identify(&rec);
    assert_eq!(
        (after.cgroup.as_deref(), after.unit.as_deref()),
        (
            Some("/bulkhead.governed/renamed.service"),
            Some("renamed.service")
        )
    );
    // A reader that keeps nothing reads every time.
    let uncached = ProcReader::new(root.path(), "/bulkhead.governed").caching_for(Duration::ZERO);
    uncached.identify(&rec);
    fs::write(p.join("cmdline"), "fresh\0").unwrap();
    assert_eq!(uncached.identify(&rec).cmdline, vec!["fresh"]);
}

/// The fixture's psql (4242, uid 1000) connecting.
fn psql_connect() -> ConnectRecord {
    ConnectRecord {
        cgroup_id: 1,
        dst_addr: [0; 16],
        dst_port: 1,
        family: 2,
        pid: 4242,
        tgid: 4242,
        uid: 1000,
        gid: 1000,
        comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
        reserved: 0,
    }
}

/// Writes a fixture process's `stat` and `status` (uid and gid 1000): what an exec (a new
/// name), a reparenting (a new parent) or a reused pid (a new start time) changes.
fn write_proc(proc_dir: &Path, pid: u32, name: &str, parent: u32, start: u64) {
    let p = proc_dir.join(pid.to_string());
    fs::write(
        p.join("stat"),
        format!("{pid} ({name}) S {parent} 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 {start} 0 0"),
    )
    .unwrap();
    fs::write(
        p.join("status"),
        format!("Name:\t{name}\nPPid:\t{parent}\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n"),
    )
    .unwrap();
}

#[test]
fn a_cached_identity_is_reused_only_while_its_parent_chain_holds() {
    let root = fixture();
    let reader = ProcReader::new(root.path(), "/bulkhead.governed");
    let procs = root.path().join("proc");
    let proc = |pid: u32| procs.join(pid.to_string());
    let rec = psql_connect();
    let parents = |id: &ProcessIdentity| -> Vec<(u32, String, Option<String>)> {
        id.ancestors
            .iter()
            .map(|a| (a.pid, a.comm.clone(), a.exe.clone()))
            .collect()
    };
    let first = reader.identify(&rec);
    assert_eq!(first.ancestors.len(), 3);
    // Unchanged chain: served from the cache (a changed command line shows it was).
    fs::write(proc(4242).join("cmdline"), "cached?\0").unwrap();
    assert_eq!(reader.identify(&rec).cmdline, first.cmdline);

    // The parent shell execs another program: same pid and start time, new executable and
    // name. The chain is read afresh.
    fs::remove_file(proc(4200).join("exe")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/python3", proc(4200).join("exe")).unwrap();
    write_proc(&procs, 4200, "python3", 4100, 42_000);
    let execed = reader.identify(&rec);
    assert_eq!(
        parents(&execed)[0],
        (4200, "python3".into(), Some("/usr/bin/python3".into()))
    );

    // A grandparent that exited, its pid given to a new process with the same executable.
    spawn(&procs, CLAUDE);
    fs::write(proc(4242).join("cmdline"), "reread\0").unwrap();
    assert_eq!(reader.identify(&rec).cmdline, vec!["reread"]);

    // The parent dies and the process is reparented to sshd: the chain is now sshd alone.
    fs::remove_dir_all(proc(4200)).unwrap();
    write_proc(&procs, 4242, "psql", 4000, 42_420);
    let orphan = reader.identify(&rec);
    assert_eq!(
        parents(&orphan),
        vec![(4000, "sshd".into(), Some("/usr/sbin/sshd".into()))]
    );
    // And that chain is reused again while it holds.
    fs::write(proc(4242).join("cmdline"), "cached again?\0").unwrap();
    assert_eq!(reader.identify(&rec).cmdline, vec!["reread"]);
}

#[test]
fn parses_stat_with_odd_names() {
    let s = parse_stat("7 (a) b (c)) S 3 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 55 0 0").unwrap();
    assert_eq!((s.comm, s.ppid, s.start_time), ("a) b (c)", 3, 55));
    assert_eq!(parse_stat("7 (x) S"), None);
    assert_eq!(parse_stat("no parens"), None);
}

/// A fixture process: pid, name, parent, cgroup, executable, command line.
type FixtureProc = (
    u32,
    &'static str,
    u32,
    &'static str,
    &'static str,
    &'static str,
);

/// The fixture's claude (4100), governed, in a scope of its own.
const CLAUDE: FixtureProc = (
    4100,
    "claude",
    4000,
    "/bulkhead.governed/claude.scope",
    "/opt/claude/bin/claude",
    "claude\0",
);

/// A fixture process (pid, name, parent, cgroup, executable, command line) in a new
/// directory: a process that exited and left its pid to this one leaves nothing behind, as in
/// procfs, where the old process's directory then reads nothing.
fn spawn(proc_dir: &Path, (pid, name, ppid, cgroup, exe, cmd): FixtureProc) {
    let p = proc_dir.join(pid.to_string());
    if p.exists() {
        fs::remove_dir_all(&p).unwrap();
    }
    fs::create_dir_all(&p).unwrap();
    write_proc(proc_dir, pid, name, ppid, u64::from(pid) * 10);
    fs::write(p.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
    fs::write(p.join("cmdline"), cmd).unwrap();
    std::os::unix::fs::symlink(exe, p.join("exe")).unwrap();
}

/// A fixture proc tree: agent (4242, governed) ← shell (4200, governed) ← claude (4100,
/// governed) ← sshd (4000, not governed) ← init (1).
fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let procs = [
        (
            4242,
            "psql",
            4200,
            "/bulkhead.governed",
            "/usr/bin/psql",
            "psql\0-h\x0010.0.0.5\0",
        ),
        (
            4200,
            "bash",
            4100,
            "/bulkhead.governed",
            "/usr/bin/bash",
            "bash\0",
        ),
        CLAUDE,
        (
            4000,
            "sshd",
            1,
            "/system.slice/ssh.service",
            "/usr/sbin/sshd",
            "sshd: alice\0",
        ),
        (1, "init", 0, "/", "/sbin/init", "/sbin/init\0"),
    ];
    for p in procs {
        spawn(&dir.path().join("proc"), p);
    }
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    fs::write(
        dir.path().join("etc/passwd"),
        "alice:x:1000:1000::/home/alice:/bin/sh\n",
    )
    .unwrap();
    dir
}

#[test]
fn identifies_a_process_and_its_parent_chain_from_fixtures() {
    let root = fixture();
    let reader = ProcReader::new(root.path(), "/bulkhead.governed");
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"psql");
    let rec = ConnectRecord {
        cgroup_id: 77,
        dst_addr: [0; 16],
        dst_port: 5432,
        family: 2,
        pid: 4243,
        tgid: 4242,
        uid: 1000,
        gid: 1000,
        comm,
        reserved: 0,
    };
    let id = reader.identify(&rec);
    assert_eq!(id.pid, 4242);
    assert_eq!(id.tid, 4243);
    assert_eq!(id.user.as_deref(), Some("alice"));
    assert_eq!(id.comm, "psql");
    assert_eq!(id.exe.as_deref(), Some("/usr/bin/psql"));
    assert_eq!(id.cmdline, vec!["psql", "-h", "10.0.0.5"]);
    assert_eq!(id.cgroup.as_deref(), Some("/bulkhead.governed"));
    assert_eq!(id.unit, None);
    let chain: Vec<(u32, &str, bool)> = id
        .ancestors
        .iter()
        .map(|a| (a.pid, a.comm.as_str(), a.governed))
        .collect();
    assert_eq!(
        chain,
        vec![
            (4200, "bash", true),
            (4100, "claude", true),
            (4000, "sshd", false)
        ],
        "the chain stops at the first process outside the governed cgroup"
    );
    assert_eq!(
        id.ancestors[1].exe.as_deref(),
        Some("/opt/claude/bin/claude")
    );
}

#[test]
fn a_vanished_process_keeps_the_kernel_identity() {
    let root = fixture();
    let reader = ProcReader::new(root.path(), "/bulkhead.governed");
    let rec = ConnectRecord {
        cgroup_id: 1,
        dst_addr: [0; 16],
        dst_port: 1,
        family: 2,
        pid: 9,
        tgid: 9,
        uid: 5,
        gid: 5,
        comm: *b"gone\0\0\0\0\0\0\0\0\0\0\0\0",
        reserved: 0,
    };
    let id = reader.identify(&rec);
    assert_eq!((id.pid, id.uid, id.comm.as_str()), (9, 5, "gone"));
    assert!(id.exe.is_none() && id.cmdline.is_empty() && id.ancestors.is_empty());
}

/// procfs as the cache relies on it, on this kernel: a held `/proc/PID` follows its process
/// through an exec (its `exe` then names the new program) and reads nothing once the process
/// has exited, whatever is later given its pid.
#[test]
fn a_held_proc_directory_follows_its_process_and_no_other() {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sh")
        .args(["-c", "read _; exec sleep 30"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dir = ProcDir::open(Path::new("/"), child.id()).unwrap();
    let shell = dir.link(c"exe").unwrap();
    assert!(dir.link_is(c"exe", &shell));
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.link_is(c"exe", &shell) {
        assert!(Instant::now() < deadline, "the shell never exec'd sleep");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sleep = dir.link(c"exe").unwrap();
    assert!(sleep.ends_with("/sleep"), "{sleep}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(dir.link(c"exe"), None);
    assert!(!dir.link_is(c"exe", &sleep));
    assert!(dir.text(c"stat").is_err());
}
