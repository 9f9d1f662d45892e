//! cgroup v2: finding the mount, the governed cgroup, and which cgroup a process is in.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (looked in {0})")]
    NoCgroup2(String),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is the root of the cgroup2 hierarchy; refusing to govern every process")]
    Root(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The mount point of the cgroup2 file system, from `/proc/self/mountinfo` text.
///
/// Hybrid hosts mount it at `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`; the
/// first cgroup2 mount wins.
pub fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    cgroup2_mount_from(&text).ok_or_else(|| CgroupError::NoCgroup2(path.display().to_string()))
}

/// The governed cgroup's directory: the hierarchy's root for `/`, `configured` if absolute,
/// else under the cgroup2 mount. The root is refused unless `uid_filtered` (only some uids
/// below it are governed, `governed.users`): otherwise it would govern every process.
pub fn resolve(
    mount: &Path,
    configured: &Path,
    uid_filtered: bool,
) -> Result<PathBuf, CgroupError> {
    let path = if configured == Path::new("/") {
        mount.to_path_buf()
    } else if configured.is_absolute() {
        configured.to_path_buf()
    } else {
        mount.join(configured)
    };
    if path == mount && !uid_filtered {
        return Err(CgroupError::Root(path));
    }
    Ok(path)
}

/// Creates the cgroup if missing (with its parents).
pub fn ensure(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the directory's inode.
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(path).map_err(io_err(path))?.ino())
}

/// Moves process `pid` (0: the caller) into the cgroup.
pub fn enter(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, format!("{pid}\n")).map_err(io_err(&procs))
}

/// The cgroup2 path of a process relative to the mount (`/user.slice/...`), from
/// `/proc/PID/cgroup` text: the line `0::PATH`.
pub fn path_from_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether `member` (relative to the mount) is `governed` (relative) or inside it.
pub fn is_within(member: &str, governed: &str) -> bool {
    let member = member.trim_end_matches('/');
    let governed = governed.trim_end_matches('/');
    member == governed
        || (member.starts_with(governed) && member.as_bytes().get(governed.len()) == Some(&b'/'))
}

/// The governed cgroup relative to the mount, in `/proc/PID/cgroup` form.
pub fn relative(mount: &Path, governed: &Path) -> String {
    let rel = governed.strip_prefix(mount).unwrap_or(governed);
    format!("/{}", rel.display())
}

/// Whether process `pid` is governed: inside the governed cgroup and, when `uids` is not empty,
/// running as one of them (its real uid, which the kernel programs see).
pub fn pid_is_governed(pid: u32, mount: &Path, governed: &Path, uids: &[u32]) -> io::Result<bool> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let gov = relative(mount, governed);
    if !path_from_proc_cgroup(&text).is_some_and(|p| is_within(p, &gov)) {
        return Ok(false);
    }
    if uids.is_empty() {
        return Ok(true);
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    // `Uid:` lists the real, effective, saved and filesystem uids; the first is the real one.
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse::<u32>().ok())
        .ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/status")))?;
    Ok(uids.contains(&uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        assert_eq!(
            cgroup2_mount_from(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_from(UNIFIED),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_from("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
        assert_eq!(cgroup2_mount_from("garbage\n\n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_from(line),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn resolves_relative_and_refuses_the_root_unless_uids_narrow_it() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            resolve(mount, Path::new("bulkhead.governed"), false).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified/bulkhead.governed")
        );
        assert_eq!(
            resolve(mount, Path::new("/x/y"), false).unwrap(),
            PathBuf::from("/x/y")
        );
        assert!(resolve(mount, Path::new("/sys/fs/cgroup/unified"), false).is_err());
        assert!(resolve(mount, Path::new("/"), false).is_err());
        assert_eq!(resolve(mount, Path::new("/"), true).unwrap(), mount);
        assert_eq!(relative(mount, mount), "/");
        assert!(is_within(
            "/user.slice/user-1000.slice/app.scope",
            &relative(mount, mount)
        ));
    }

    #[test]
    fn membership_is_by_path_prefix_on_component_boundaries() {
        assert!(is_within("/bulkhead.governed", "/bulkhead.governed"));
        assert!(is_within("/bulkhead.governed/job1", "/bulkhead.governed"));
        assert!(!is_within("/bulkhead.governed2", "/bulkhead.governed"));
        assert!(!is_within("/", "/bulkhead.governed"));
        let proc_cgroup = "12:pids:/\n1:name=systemd:/\n0::/bulkhead.governed\n";
        assert_eq!(
            path_from_proc_cgroup(proc_cgroup),
            Some("/bulkhead.governed")
        );
        assert_eq!(
            relative(
                Path::new("/sys/fs/cgroup/unified"),
                Path::new("/sys/fs/cgroup/unified/a/b")
            ),
            "/a/b"
        );
    }
}
