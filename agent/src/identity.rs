//! Who made a connection: the kernel's record enriched from `/proc`.
//!
//! The kernel's record (pid, uid, comm, cgroup id) is authoritative and captured at `connect()`;
//! `/proc` adds the executable, command line, systemd unit and the parent chain, best effort,
//! since the process may already have exited. Parsing takes a root directory so tests run on
//! fixtures.

use std::{
    fs,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use bulkhead_common::ConnectRecord;
use serde::{Deserialize, Serialize};

use crate::cgroup;

/// How far up the parent chain we look before giving up.
const MAX_ANCESTORS: usize = 32;
/// Longest command line kept, in bytes.
const MAX_CMDLINE: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread that called `connect()`.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    /// The thread's name at `connect()`, from the kernel.
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub cgroup_id: u64,
    /// cgroup path relative to the cgroup2 mount.
    pub cgroup: Option<String>,
    /// systemd unit (service or scope) the process runs in, if any.
    pub unit: Option<String>,
    /// Parents, nearest first, up to and including the first one outside the governed cgroup.
    pub ancestors: Vec<Ancestor>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub governed: bool,
}

/// The fields of `/proc/PID/status` we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
}

pub fn parse_status(text: &str) -> Option<Status> {
    let mut name = None;
    let mut ppid = None;
    let mut uid = None;
    let mut gid = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let first = || value.split_whitespace().next()?.parse::<u32>().ok();
        match key {
            "Name" => name = Some(value.to_string()),
            "PPid" => ppid = first(),
            "Uid" => uid = first(),
            "Gid" => gid = first(),
            _ => {}
        }
    }
    Some(Status {
        name: name?,
        ppid: ppid?,
        uid: uid?,
        gid: gid?,
    })
}

/// `/proc/PID/cmdline`: NUL-separated arguments, bounded.
pub fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = &bytes[..bytes.len().min(MAX_CMDLINE)];
    bytes
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The innermost systemd unit in a cgroup path (`/system.slice/ssh.service` → `ssh.service`).
pub fn unit_from_cgroup_path(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_string)
}

/// The user name for `uid` from `/etc/passwd` text.
pub fn user_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// The kernel's NUL-padded comm as a string.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// The start time of a process (clock ticks after boot) from `/proc/PID/stat` text: with the
/// pid, it names one process for the life of the system, even when pids are reused.
pub fn start_time_from_stat(stat: &str) -> Option<u64> {
    parse_stat(stat).map(|s| s.start_time)
}

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat<'a> {
    pub comm: &'a str,
    pub ppid: u32,
    pub start_time: u64,
}

/// `/proc/PID/stat`: "pid (comm) state ppid ... starttime ...". The comm may hold spaces and
/// parentheses, so the fields resume after the last ')'; ppid is field 4, starttime field 22.
pub fn parse_stat(stat: &str) -> Option<Stat<'_>> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut rest = stat[close + 1..].split_whitespace();
    let ppid = rest.nth(1)?.parse().ok()?;
    let start_time = rest.nth(17)?.parse().ok()?;
    Some(Stat {
        comm,
        ppid,
        start_time,
    })
}

/// How many processes' identities are kept between connections.
const CACHE_CAPACITY: usize = 4096;

/// What `/proc` said about a process, valid while its start time, uid, gid, cgroup, executable
/// and name stay, and while its parent chain is the one it was read with ([`ProcReader::
/// chain_unchanged`]).
#[derive(Debug)]
struct Cached {
    start_time: u64,
    uid: u32,
    gid: u32,
    cgroup: Option<String>,
    identity: ProcessIdentity,
    /// Each ancestor's start time, in `identity.ancestors` order; `None` when one could not be
    /// read, and then the chain is read afresh every time.
    ancestor_starts: Option<Vec<u64>>,
}

/// A small file's text, read with one `read(2)` where it fits in 4 KiB. procfs makes a file
/// such as `/proc/PID/stat` whole at its first read, so a read that leaves room in the buffer
/// has all of it; `fs::read_to_string` probes with small reads first, five or six system calls
/// per file where this makes three (open, read, close). A longer file is read on to its end.
fn read_small(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut buf = [0u8; 4096];
    let n = loop {
        match file.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => break r?,
        }
    };
    let mut bytes = buf[..n].to_vec();
    if n == buf.len() {
        file.read_to_end(&mut bytes)?;
    }
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads `/proc` (or a fixture tree) for identity, and remembers what it read: a process that
/// opens many connections (a pool, a benchmark) is looked up in full once.
#[derive(Debug)]
pub struct ProcReader {
    root: PathBuf,
    /// The governed cgroup relative to the cgroup2 mount (`/bulkhead.governed`).
    governed: String,
    /// Only these uids are governed in it (empty: every process).
    uids: Vec<u32>,
    cache: std::sync::Mutex<std::collections::HashMap<u32, Cached>>,
}

impl ProcReader {
    /// `root` holds `proc/` and `etc/passwd` (`/` on a real host).
    pub fn new(root: impl Into<PathBuf>, governed_relative: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            governed: governed_relative.into(),
            uids: Vec::new(),
            cache: std::sync::Mutex::default(),
        }
    }

    /// Only processes of these uids in the governed cgroup are governed (`governed.users`).
    #[must_use]
    pub fn governing_uids(mut self, uids: Vec<u32>) -> Self {
        self.uids = uids;
        self
    }

    fn proc(&self, pid: u32) -> PathBuf {
        self.root.join("proc").join(pid.to_string())
    }

    /// `/proc/PID/NAME` as text ([`read_small`]).
    fn proc_text(&self, pid: u32, name: &str) -> io::Result<String> {
        read_small(&self.proc(pid).join(name))
    }

    fn exe(&self, pid: u32) -> Option<String> {
        let link = fs::read_link(self.proc(pid).join("exe")).ok()?;
        Some(link.to_string_lossy().into_owned())
    }

    fn cgroup(&self, pid: u32) -> Option<String> {
        let text = self.proc_text(pid, "cgroup").ok()?;
        cgroup::path_from_proc_cgroup(&text).map(str::to_string)
    }

    fn status(&self, pid: u32) -> Option<Status> {
        parse_status(&self.proc_text(pid, "status").ok()?)
    }

    /// Identity for a kernel record. Never fails: what `/proc` cannot tell stays empty.
    pub fn identify(&self, rec: &ConnectRecord) -> ProcessIdentity {
        let pid = rec.tgid;
        let stat_text = self.proc_text(pid, "stat").unwrap_or_default();
        let stat = parse_stat(&stat_text);
        let cgroup = self.cgroup(pid);
        let Some(Stat {
            start_time, ppid, ..
        }) = stat
        else {
            // Gone already: nothing to cache, the kernel's record is what there is.
            return self.read_identity(rec, cgroup).0;
        };
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // `execve` keeps the pid and its start time: the executable (one readlink) and the
        // kernel's comm tell a process that became another program, which is read afresh.
        let exe = self.exe(pid);
        let comm = comm_str(&rec.comm);
        if let Some(c) = cache.get(&pid) {
            if c.start_time == start_time
                && c.uid == rec.uid
                && c.gid == rec.gid
                && c.cgroup == cgroup
                && c.identity.exe == exe
                && c.identity.comm == comm
                && c.ancestor_starts
                    .as_deref()
                    .is_some_and(|starts| self.chain_unchanged(ppid, &c.identity.ancestors, starts))
            {
                return ProcessIdentity {
                    tid: rec.pid,
                    comm,
                    cgroup_id: rec.cgroup_id,
                    ..c.identity.clone()
                };
            }
        }
        drop(cache);
        let (identity, ancestor_starts) = self.read_identity(rec, cgroup.clone());
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(
            pid,
            Cached {
                start_time,
                uid: rec.uid,
                gid: rec.gid,
                cgroup,
                identity: identity.clone(),
                ancestor_starts,
            },
        );
        identity
    }

    /// Whether a cached parent chain still holds: the process's parent is the first ancestor,
    /// and each ancestor is the same process (start time), still runs the same program (name,
    /// executable) and still has the next one as its parent. An ancestor that exec'd another
    /// program, or died and left the process to a new parent, makes the chain be read afresh:
    /// an `ancestors` rule must judge the chain as it is at this connect. A chain that ended
    /// inside the governed cgroup (its top could not be read) is never reused.
    fn chain_unchanged(&self, ppid: u32, ancestors: &[Ancestor], starts: &[u64]) -> bool {
        if ancestors.len() != starts.len()
            || !ancestors
                .last()
                .is_some_and(|a| !a.governed || ancestors.len() == MAX_ANCESTORS)
        {
            return false;
        }
        let mut parent = ppid;
        for (a, &start) in ancestors.iter().zip(starts) {
            if a.pid != parent {
                return false;
            }
            let Ok(text) = self.proc_text(a.pid, "stat") else {
                return false;
            };
            match parse_stat(&text) {
                Some(s) if s.start_time == start && s.comm == a.comm => parent = s.ppid,
                _ => return false,
            }
            if self.exe(a.pid) != a.exe {
                return false;
            }
        }
        true
    }

    /// The identity read from `/proc`, and its ancestors' start times (see [`Cached`]).
    fn read_identity(
        &self,
        rec: &ConnectRecord,
        cgroup: Option<String>,
    ) -> (ProcessIdentity, Option<Vec<u64>>) {
        let pid = rec.tgid;
        let cmdline = fs::read(self.proc(pid).join("cmdline"))
            .map(|b| parse_cmdline(&b))
            .unwrap_or_default();
        let unit = cgroup.as_deref().and_then(unit_from_cgroup_path);
        let user = fs::read_to_string(self.root.join("etc/passwd"))
            .ok()
            .and_then(|p| user_from_passwd(&p, rec.uid));
        let (ancestors, ancestor_starts) = self.ancestors_with_starts(pid);
        let identity = ProcessIdentity {
            pid,
            tid: rec.pid,
            uid: rec.uid,
            gid: rec.gid,
            user,
            comm: comm_str(&rec.comm),
            exe: self.exe(pid),
            cmdline,
            cgroup_id: rec.cgroup_id,
            cgroup,
            unit,
            ancestors,
        };
        (identity, ancestor_starts)
    }

    /// Parents of `pid`, nearest first, through the governed ones and the first one outside.
    pub fn ancestors(&self, pid: u32) -> Vec<Ancestor> {
        self.ancestors_with_starts(pid).0
    }

    /// [`ProcReader::ancestors`], with each one's start time, read before the rest of what is
    /// known of it (so an exec in between shows as a changed executable or name later, never as
    /// an old start time); `None` if any start time could not be read.
    fn ancestors_with_starts(&self, pid: u32) -> (Vec<Ancestor>, Option<Vec<u64>>) {
        let mut out = Vec::new();
        let mut starts = Some(Vec::new());
        let mut parent = match self.status(pid) {
            Some(s) => s.ppid,
            None => return (out, None),
        };
        while parent > 0 && out.len() < MAX_ANCESTORS {
            let start = self
                .proc_text(parent, "stat")
                .ok()
                .and_then(|s| start_time_from_stat(&s));
            let Some(status) = self.status(parent) else {
                break;
            };
            match (&mut starts, start) {
                (Some(list), Some(start)) => list.push(start),
                _ => starts = None,
            }
            let governed = self
                .cgroup(parent)
                .is_some_and(|c| cgroup::is_within(&c, &self.governed))
                && (self.uids.is_empty() || self.uids.contains(&status.uid));
            out.push(Ancestor {
                pid: parent,
                comm: status.name,
                exe: self.exe(parent),
                governed,
            });
            if !governed {
                break;
            }
            parent = status.ppid;
        }
        (out, starts)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
    /// the buffer, exactly as long, longer; and this process's own `/proc` stat, which procfs
    /// makes whole at the first read.
    #[test]
    fn small_files_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, 4095, 4096, 4097, 10_000] {
            let text: String = b"abcdefghijklmnopqrstuvwxyz"
                .iter()
                .cycle()
                .take(len)
                .map(|&b| char::from(b))
                .collect();
            let path = dir.path().join(format!("f{len}"));
            fs::write(&path, &text).unwrap();
            assert_eq!(read_small(&path).unwrap(), text, "{len} bytes");
        }
        let own = read_small(Path::new("/proc/self/stat")).unwrap();
        assert!(start_time_from_stat(&own).is_some(), "{own}");
        assert!(read_small(&dir.path().join("absent")).is_err());
        fs::write(dir.path().join("binary"), [0xff, 0xfe]).unwrap();
        assert!(read_small(&dir.path().join("binary")).is_err());
    }

    #[test]
    fn parses_the_start_time_even_with_odd_names() {
        let stat = "4242 (my (odd) name) S 4200 4242 4200 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time_from_stat(stat), Some(987_654));
        assert_eq!(start_time_from_stat("4242 (x) S 1"), None);
        assert_eq!(start_time_from_stat("garbage"), None);
    }

    #[test]
    fn a_cached_identity_is_reused_only_for_the_same_process() {
        let root = fixture();
        let reader = ProcReader::new(root.path(), "/bulkhead.governed");
        let p = root.path().join("proc/4242");
        let stat = |start: u64| {
            format!("4242 (psql) S 4200 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 {start} 0 0")
        };
        fs::write(p.join("stat"), stat(100)).unwrap();
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
        // A new process with the reused pid is read afresh.
        fs::write(p.join("stat"), stat(200)).unwrap();
        assert_eq!(reader.identify(&rec).cmdline, vec!["changed"]);
        // So is the same process after a setuid.
        fs::write(p.join("cmdline"), "after-setuid\0").unwrap();
        rec.uid = 0;
        assert_eq!(reader.identify(&rec).cmdline, vec!["after-setuid"]);
        // And after an execve (same pid and start time): another executable, or another comm.
        fs::remove_file(p.join("exe")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/curl", p.join("exe")).unwrap();
        fs::write(p.join("cmdline"), "curl\0").unwrap();
        let execed = reader.identify(&rec);
        assert_eq!(execed.exe.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(execed.cmdline, vec!["curl"]);
        fs::write(p.join("cmdline"), "python3\0").unwrap();
        rec.comm = *b"python3\0\0\0\0\0\0\0\0\0";
        assert_eq!(reader.identify(&rec).cmdline, vec!["python3"]);
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
        // The same exec keeping the executable's path but not its name is seen too.
        write_proc(&procs, 4200, "renamed", 4100, 42_000);
        assert_eq!(parents(&reader.identify(&rec))[0].1, "renamed");

        // A grandparent replaced by a new process under the same pid (a new start time).
        write_proc(&procs, 4100, "claude", 4000, 99_999);
        fs::write(proc(4242).join("cmdline"), "reread\0").unwrap();
        assert_eq!(reader.identify(&rec).cmdline, vec!["reread"]);

        // The parent dies and the process is reparented to sshd: the chain is now sshd alone.
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
            (
                4100,
                "claude",
                4000,
                "/bulkhead.governed/claude.scope",
                "/opt/claude/bin/claude",
                "claude\0",
            ),
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
        for (pid, name, ppid, cg, exe, cmd) in procs {
            let p = dir.path().join(format!("proc/{pid}"));
            fs::create_dir_all(&p).unwrap();
            write_proc(
                &dir.path().join("proc"),
                pid,
                name,
                ppid,
                u64::from(pid) * 10,
            );
            fs::write(p.join("cgroup"), format!("0::{cg}\n")).unwrap();
            fs::write(p.join("cmdline"), cmd).unwrap();
            std::os::unix::fs::symlink(exe, p.join("exe")).unwrap();
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
}
