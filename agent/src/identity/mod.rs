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
mod tests;
