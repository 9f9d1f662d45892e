//! Who made a connection: the kernel's record enriched from `/proc`.
//!
//! The kernel's record (pid, uid, comm, cgroup id) is authoritative and captured at `connect()`;
//! `/proc` adds the executable, command line, systemd unit and the parent chain, best effort,
//! since the process may already have exited. Parsing takes a root directory so tests run on
//! fixtures.

mod dir;

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use bulkhead_common::ConnectRecord;
use serde::{Deserialize, Serialize};

use self::dir::ProcDir;
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
const CACHE_CAPACITY: usize = 1024;
/// How many `/proc` directories the kept identities may hold open between them.
const CACHE_DIRS: usize = 4096;
/// The longest a cached identity is served. A name (`prctl(PR_SET_NAME)`, or an exec of the
/// same executable under another name), a cgroup's path (a rename), an ancestor's cgroup and a
/// command line (the process's own memory, which it can rewrite at any time, cached or not)
/// can change without anything [`Cached::holds`] checks changing; they are read afresh at
/// least this often.
pub const CACHE_TTL: Duration = Duration::from_secs(1);

/// What `/proc` said about a process, served while [`Cached::holds`].
#[derive(Debug)]
struct Cached {
    read_at: Instant,
    uid: u32,
    gid: u32,
    /// The process's `/proc` directory, opened before anything was read of it.
    dir: ProcDir,
    /// Read through `dir`; its executable is known (`Some`), or it would not be kept.
    identity: ProcessIdentity,
    /// Each ancestor's directory, in `identity.ancestors` order; `None` when the chain cannot
    /// be proved unchanged (an ancestor's executable unknown, or the chain's top not reached),
    /// and then it is read afresh every time.
    parents: Option<Vec<ProcDir>>,
}

impl Cached {
    /// Directories held open.
    fn dirs(&self) -> usize {
        1 + self.parents.as_ref().map_or(0, Vec::len)
    }

    /// Whether this is still the connecting process's identity, proved with one system call per
    /// process in the chain: the kernel's record names the same uid, gid, cgroup (by id) and
    /// thread name; the process is the one read (its directory still reads) and runs the same
    /// executable; and so does each ancestor. A live ancestor is still its child's parent: a
    /// parent changes only when the old one exits (`PPid` is the thread group of
    /// `real_parent`), and [`ProcReader::ancestors`] proved each one the parent when it opened
    /// it. An exec of another executable, an exit (a reused pid is another process), a setuid or
    /// a move to another cgroup is seen at the next connect; the rest within [`CACHE_TTL`].
    fn holds(&self, rec: &ConnectRecord, comm: &str, now: Instant, ttl: Duration) -> bool {
        now.saturating_duration_since(self.read_at) < ttl
            && self.uid == rec.uid
            && self.gid == rec.gid
            && self.identity.cgroup_id == rec.cgroup_id
            && self.identity.comm == comm
            && self
                .identity
                .exe
                .as_deref()
                .is_some_and(|exe| self.dir.link_is(c"exe", exe))
            && self.parents.as_ref().is_some_and(|dirs| {
                dirs.iter()
                    .zip(&self.identity.ancestors)
                    .all(|(dir, a)| a.exe.as_deref().is_some_and(|exe| dir.link_is(c"exe", exe)))
            })
    }
}

/// Reads `/proc` (or a fixture tree) for identity, and remembers what it read: a process that
/// opens many connections (a pool, a benchmark) is read in full once a [`CACHE_TTL`], and
/// proved unchanged at each connect with a `readlinkat` per process in its chain.
#[derive(Debug)]
pub struct ProcReader {
    root: PathBuf,
    /// The governed cgroup relative to the cgroup2 mount (`/bulkhead.governed`).
    governed: String,
    /// Only these uids are governed in it (empty: every process).
    uids: Vec<u32>,
    ttl: Duration,
    cache: Mutex<HashMap<u32, Cached>>,
}

impl ProcReader {
    /// `root` holds `proc/` and `etc/passwd` (`/` on a real host).
    pub fn new(root: impl Into<PathBuf>, governed_relative: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            governed: governed_relative.into(),
            uids: Vec::new(),
            ttl: CACHE_TTL,
            cache: Mutex::default(),
        }
    }

    /// Only processes of these uids in the governed cgroup are governed (`governed.users`).
    #[must_use]
    pub fn governing_uids(mut self, uids: Vec<u32>) -> Self {
        self.uids = uids;
        self
    }

    /// Serves a cached identity for at most `ttl` (zero: every connect reads `/proc`).
    #[must_use]
    pub fn caching_for(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Cached>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Identity for a kernel record. Never fails: what `/proc` cannot tell stays empty.
    pub fn identify(&self, rec: &ConnectRecord) -> ProcessIdentity {
        let pid = rec.tgid;
        let comm = comm_str(&rec.comm);
        let now = Instant::now();
        if let Some(c) = self
            .cache()
            .get(&pid)
            .filter(|c| c.holds(rec, &comm, now, self.ttl))
        {
            return ProcessIdentity {
                tid: rec.pid,
                comm,
                ..c.identity.clone()
            };
        }
        let Ok(dir) = ProcDir::open(&self.root, pid) else {
            // Gone already: the kernel's record is what there is.
            return self.kernel_identity(rec, comm);
        };
        let (identity, parents) = self.read_identity(rec, comm, &dir);
        if identity.exe.is_some() {
            self.keep(
                pid,
                Cached {
                    read_at: now,
                    uid: rec.uid,
                    gid: rec.gid,
                    dir,
                    identity: identity.clone(),
                    parents,
                },
            );
        }
        identity
    }

    /// Keeps `entry`, within [`CACHE_CAPACITY`] entries and [`CACHE_DIRS`] open directories:
    /// past either, the expired entries go, then all of them.
    fn keep(&self, pid: u32, entry: Cached) {
        let mut cache = self.cache();
        cache.remove(&pid);
        let full = |cache: &HashMap<u32, Cached>| {
            cache.len() >= CACHE_CAPACITY
                || cache.values().map(Cached::dirs).sum::<usize>() + entry.dirs() > CACHE_DIRS
        };
        if full(&cache) {
            cache.retain(|_, c| entry.read_at.saturating_duration_since(c.read_at) < self.ttl);
            if full(&cache) {
                cache.clear();
            }
        }
        cache.insert(pid, entry);
    }

    /// What the kernel's record tells of a process `/proc` no longer shows.
    fn kernel_identity(&self, rec: &ConnectRecord, comm: String) -> ProcessIdentity {
        ProcessIdentity {
            pid: rec.tgid,
            tid: rec.pid,
            uid: rec.uid,
            gid: rec.gid,
            user: self.user(rec.uid),
            comm,
            cgroup_id: rec.cgroup_id,
            ..ProcessIdentity::default()
        }
    }

    fn user(&self, uid: u32) -> Option<String> {
        fs::read_to_string(self.root.join("etc/passwd"))
            .ok()
            .and_then(|p| user_from_passwd(&p, uid))
    }

    fn governed(&self, cgroup: Option<&str>, uid: u32) -> bool {
        cgroup.is_some_and(|c| cgroup::is_within(c, &self.governed))
            && (self.uids.is_empty() || self.uids.contains(&uid))
    }

    /// The identity read through `dir`, and the ancestors' directories (see [`Cached`]).
    fn read_identity(
        &self,
        rec: &ConnectRecord,
        comm: String,
        dir: &ProcDir,
    ) -> (ProcessIdentity, Option<Vec<ProcDir>>) {
        let ppid = dir
            .text(c"stat")
            .ok()
            .and_then(|s| parse_stat(&s).map(|s| s.ppid));
        let cgroup = cgroup_of(dir);
        let (ancestors, parents) = match ppid {
            Some(ppid) => self.ancestors(dir, ppid),
            None => (Vec::new(), None),
        };
        let identity = ProcessIdentity {
            unit: cgroup.as_deref().and_then(unit_from_cgroup_path),
            cgroup,
            exe: dir.link(c"exe"),
            cmdline: dir
                .bytes(c"cmdline")
                .map(|b| parse_cmdline(&b))
                .unwrap_or_default(),
            ancestors,
            ..self.kernel_identity(rec, comm)
        };
        (identity, parents)
    }

    /// The parents of the process whose directory is `child` and whose parent was `ppid`,
    /// nearest first, through the governed ones and the first one outside; with their
    /// directories when each one's executable is known and the chain's top was reached.
    ///
    /// Each parent's directory is opened, then its child is read again: a child that still
    /// names it as its parent proves the directory is that parent, not a newcomer given the
    /// pid of one that exited (the child would have been reparented). A child reparented
    /// meanwhile is followed to its new parent.
    fn ancestors(&self, child: &ProcDir, ppid: u32) -> (Vec<Ancestor>, Option<Vec<ProcDir>>) {
        let mut out = Vec::new();
        let mut dirs: Vec<ProcDir> = Vec::new();
        let mut provable = true;
        let mut parent = ppid;
        let mut reparented = 0;
        while parent > 0 && out.len() < MAX_ANCESTORS {
            let Ok(dir) = ProcDir::open(&self.root, parent) else {
                provable = false;
                break;
            };
            let child_dir = dirs.last().unwrap_or(child);
            let now_parent = child_dir
                .text(c"stat")
                .ok()
                .and_then(|s| parse_stat(&s).map(|s| s.ppid));
            match now_parent {
                Some(p) if p == parent => {}
                Some(p) if reparented < MAX_ANCESTORS => {
                    reparented += 1;
                    parent = p;
                    continue;
                }
                _ => {
                    provable = false;
                    break;
                }
            }
            let Some(status) = dir.text(c"status").ok().and_then(|s| parse_status(&s)) else {
                provable = false;
                break;
            };
            let governed = self.governed(cgroup_of(&dir).as_deref(), status.uid);
            let exe = dir.link(c"exe");
            provable &= exe.is_some();
            out.push(Ancestor {
                pid: parent,
                comm: status.name,
                exe,
                governed,
            });
            dirs.push(dir);
            if !governed {
                break;
            }
            parent = status.ppid;
        }
        let topped = out
            .last()
            .is_some_and(|a| !a.governed || out.len() == MAX_ANCESTORS);
        (out, (provable && topped).then_some(dirs))
    }
}

/// The process's cgroup path, relative to the cgroup2 mount.
fn cgroup_of(dir: &ProcDir) -> Option<String> {
    let text = dir.text(c"cgroup").ok()?;
    cgroup::path_from_proc_cgroup(&text).map(str::to_string)
}

#[cfg(test)]
mod tests;
