//! Who is calling: a peer may use the control socket only as root or a member of the admin
//! group, and never from inside the governed cgroup or below a governed ancestor.

use std::{io, path::Path};

use crate::cgroup;

/// How far up the process tree [`refusal`] looks for a governed ancestor; a deeper tree is
/// refused (it cannot be told apart from one that hides a governed ancestor).
const MAX_ANCESTRY: usize = 256;

/// Why a peer may not use the socket, or `None` when it may.
///
/// A peer whose process, or any of its ancestors, runs in the governed cgroup is refused, even
/// as root: a governed process must not reach the control socket through a child it moved out
/// of the cgroup (as root) or through anything it started on the way.
pub fn refusal(
    uid: u32,
    gid: u32,
    pid: Option<u32>,
    admin: Option<(&str, u32)>,
    mount: &Path,
    governed: &Path,
    governed_uids: &[u32],
) -> Option<String> {
    let Some(pid) = pid else {
        return Some("permission denied: the caller's process is unknown".into());
    };
    match governed_in_ancestry(pid, mount, governed, governed_uids) {
        Ok(None) => {}
        Ok(Some(p)) if p == pid => {
            return Some("permission denied: the caller runs in the governed cgroup".into())
        }
        Ok(Some(p)) => {
            return Some(format!(
                "permission denied: the caller descends from process {p} ({}), which runs in \
                 the governed cgroup",
                process_name(p)
            ))
        }
        Err(e) => {
            return Some(format!(
                "permission denied: cannot tell whether the caller or one of its ancestors runs \
                 in the governed cgroup ({e})"
            ))
        }
    }
    if uid == 0 {
        return None;
    }
    match admin {
        Some((_, g)) if g == gid || supplementary_groups(pid).contains(&g) => None,
        Some((name, _)) => Some(format!(
            "permission denied: root or members of the `{name}` group only"
        )),
        None => Some("permission denied: root only (the admin group does not exist)".into()),
    }
}

/// The first of `pid` and its ancestors that runs in the governed cgroup, if any.
fn governed_in_ancestry(
    pid: u32,
    mount: &Path,
    governed: &Path,
    uids: &[u32],
) -> io::Result<Option<u32>> {
    first_governed(
        pid,
        |p| cgroup::pid_is_governed(p, mount, governed, uids),
        parent_pid,
    )
}

fn first_governed(
    pid: u32,
    is_governed: impl Fn(u32) -> io::Result<bool>,
    parent_of: impl Fn(u32) -> io::Result<u32>,
) -> io::Result<Option<u32>> {
    let mut p = pid;
    for _ in 0..MAX_ANCESTRY {
        if is_governed(p)? {
            return Ok(Some(p));
        }
        match parent_of(p)? {
            // The top of this pid namespace's tree (init, or kthreadd's children).
            0 | 1 => return Ok(None),
            parent => p = parent,
        }
    }
    Err(io::Error::other(format!(
        "more than {MAX_ANCESTRY} ancestors"
    )))
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the state, which follows the
/// last `)`: the name in parentheses may itself contain `)` and spaces).
fn parent_pid(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parent_from_stat(&stat).ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/stat")))
}

fn parent_from_stat(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or_else(|_| "gone".into(), |c| c.trim_end().to_string())
}

/// The supplementary groups of a process, from `/proc/PID/status`.
fn supplementary_groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The gid of `name` from `/etc/group` text.
pub fn gid_from_group_file(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

pub fn group_gid(name: &str) -> Option<u32> {
    gid_from_group_file(&std::fs::read_to_string("/etc/group").ok()?, name)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn finds_the_admin_group() {
        let groups = "root:x:0:\nbulkhead:x:998:alice,bob\nstaff:x:50:\n";
        assert_eq!(gid_from_group_file(groups, "bulkhead"), Some(998));
        assert_eq!(gid_from_group_file(groups, "nobody"), None);
        assert_eq!(gid_from_group_file("bulkhead:x\n", "bulkhead"), None);
    }

    #[test]
    fn the_parent_is_read_past_a_name_with_parentheses_and_spaces() {
        assert_eq!(parent_from_stat("42 (bash) S 7 42 42 0"), Some(7));
        assert_eq!(parent_from_stat("42 (a) b) (c) S 9 42 42"), Some(9));
        assert_eq!(parent_from_stat("42 (x"), None);
        assert_eq!(
            parent_pid(std::process::id()).ok(),
            Some(std::os::unix::process::parent_id())
        );
    }

    /// A process outside the governed cgroup whose parent (or any ancestor) is in it is
    /// found; a process that cannot be read, or a loop, is an error (refused).
    #[test]
    fn a_governed_ancestor_is_found_and_unreadable_ancestry_is_an_error() {
        // 40 -> 30 -> 20 -> 10 -> 1; 20 is governed.
        let parent = |p: u32| match p {
            40 => Ok(30),
            30 => Ok(20),
            20 => Ok(10),
            10 => Ok(1),
            _ => Err(io::Error::other("gone")),
        };
        let governed = |set: &'static [u32]| move |p: u32| Ok(set.contains(&p));
        assert_eq!(
            first_governed(40, governed(&[20]), parent).unwrap(),
            Some(20)
        );
        assert_eq!(
            first_governed(40, governed(&[40]), parent).unwrap(),
            Some(40)
        );
        assert_eq!(first_governed(40, governed(&[]), parent).unwrap(), None);
        assert!(first_governed(50, governed(&[]), parent).is_err());
        let looping = |p: u32| Ok(if p == 7 { 8 } else { 7 });
        assert!(first_governed(7, governed(&[]), looping).is_err());
        let unreadable = |_: u32| Err(io::Error::other("no /proc"));
        assert!(first_governed(40, unreadable, parent).is_err());
    }

    #[test]
    fn the_peer_without_a_pid_is_refused() {
        let r = refusal(
            0,
            0,
            None,
            None,
            Path::new("/sys/fs/cgroup"),
            Path::new("/sys/fs/cgroup/x"),
            &[],
        );
        assert!(r.is_some());
    }

    /// The approvals requests rest on this: a governed process, even root, never reaches the
    /// broker, so it can never approve (or list, or deny) its own held request.
    #[test]
    fn a_governed_process_is_refused_even_as_root() {
        let me = std::process::id();
        let mount =
            crate::cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let own = std::fs::read_to_string(format!("/proc/{me}/cgroup")).unwrap();
        let own = crate::cgroup::path_from_proc_cgroup(&own)
            .expect("this process has a cgroup2 path")
            .trim_start_matches('/')
            .to_string();
        // Treat the test's own cgroup as the governed one: it is now a governed process.
        let governed = mount.join(own);
        let refused = refusal(
            0,
            0,
            Some(me),
            Some(("bulkhead", 0)),
            &mount,
            &governed,
            &[],
        )
        .expect("a governed root process must be refused");
        // Governed users only: this process (root) is in the cgroup but not governed.
        assert!(
            refusal(
                0,
                0,
                Some(me),
                Some(("bulkhead", 0)),
                &mount,
                &governed,
                &[65534]
            )
            .is_none(),
            "a process of an ungoverned uid below the cgroup is not governed"
        );
        assert!(refused.contains("governed cgroup"), "{refused}");
        let refused = refusal(
            1000,
            998,
            Some(me),
            Some(("bulkhead", 998)),
            &mount,
            &governed,
            &[],
        )
        .expect("a governed admin must be refused");
        assert!(refused.contains("governed cgroup"), "{refused}");
    }

    #[test]
    fn root_outside_the_governed_cgroup_is_allowed_and_others_are_not() {
        let me = std::process::id();
        let mount =
            crate::cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let governed = mount.join("bulkhead-unit-test-never-created");
        assert_eq!(refusal(0, 0, Some(me), None, &mount, &governed, &[]), None);
        let denied = refusal(
            1000,
            1000,
            Some(me),
            Some(("bulkhead", 998)),
            &mount,
            &governed,
            &[],
        )
        .unwrap();
        assert!(denied.contains("`bulkhead` group"), "{denied}");
        assert_eq!(
            refusal(
                1000,
                998,
                Some(me),
                Some(("bulkhead", 998)),
                &mount,
                &governed,
                &[]
            ),
            None
        );
        let no_group = refusal(1000, 998, Some(me), None, &mount, &governed, &[]).unwrap();
        assert!(no_group.contains("root only"), "{no_group}");
    }
}
