//! Groups and the admin group: which supplementary groups `bulkhead run` keeps, and which
//! governed users could reach the control socket.
//!
//! Lookups go through the C library's databases (NSS), as `initgroups` does; the decisions
//! ([`plan_groups`], [`admin_members`]) are pure and tested without them.

use std::ffi::{CStr, CString};

use crate::config::Config;

/// The gid of group `name` (or `name` itself when it is a number).
pub fn group_gid(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let name = CString::new(name).ok()?;
    // SAFETY: getgrnam_r with a valid NUL-terminated name and buffers we own.
    with_group(|grp, buf, out| unsafe {
        libc::getgrnam_r(name.as_ptr(), grp, buf.as_mut_ptr(), buf.len(), out)
    })
    .map(|(_, gid)| gid)
}

/// The name of group `gid`, for messages.
pub fn group_name(gid: u32) -> Option<String> {
    // SAFETY: getgrgid_r with buffers we own.
    with_group(|grp, buf, out| unsafe {
        libc::getgrgid_r(gid, grp, buf.as_mut_ptr(), buf.len(), out)
    })
    .map(|(name, _)| name)
}

/// `gid` as people read it: `docker (gid 999)`, or the bare gid when it has no name.
pub fn describe_group(gid: u32) -> String {
    match group_name(gid) {
        Some(name) => format!("{name} (gid {gid})"),
        None => format!("gid {gid}"),
    }
}

/// Calls a `getgr*_r` function with a buffer that grows on ERANGE; the group's name and gid.
fn with_group(
    call: impl Fn(*mut libc::group, &mut [libc::c_char], *mut *mut libc::group) -> libc::c_int,
) -> Option<(String, u32)> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero group is a valid value for the call to fill in.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        match call(&raw mut grp, &mut buf, &raw mut out) {
            0 if out.is_null() || grp.gr_name.is_null() => return None,
            0 => {
                // SAFETY: the call filled gr_name with a NUL-terminated string in `buf`.
                let name = unsafe { CStr::from_ptr(grp.gr_name) }
                    .to_string_lossy()
                    .into_owned();
                return Some((name, grp.gr_gid));
            }
            libc::ERANGE if size < 1 << 20 => size *= 4,
            _ => return None,
        }
    }
}

/// Every group of user `name` whose primary group is `gid`, as `initgroups` would set them
/// (the primary group included).
pub fn user_groups(name: &str, gid: u32) -> std::io::Result<Vec<u32>> {
    let cname =
        CString::new(name).map_err(|_| std::io::Error::other("the user name contains NUL"))?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..8 {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` has room for `n` gids; the call writes at most that many and sets
        // `n` to how many there are.
        let r = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &raw mut n) };
        let count = usize::try_from(n).unwrap_or(0);
        if r >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        groups.resize(count.max(groups.len() * 2), 0);
    }
    Err(std::io::Error::other(format!(
        "cannot list the groups of {name}"
    )))
}

/// The supplementary groups a governed command gets, and what was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// For `setgroups`: the primary group and the user's groups that the configuration keeps.
    pub keep: Vec<u32>,
    /// The user's groups that are dropped.
    pub dropped: Vec<u32>,
    /// The admin group was listed in `run.keep_groups` and the user is in it: dropped anyway.
    pub admin_refused: bool,
}

/// Decides the groups of a governed command: its primary group, plus those of `member_of`
/// (the user's groups) that `keep` lists, never `admin`.
pub fn plan_groups(primary: u32, member_of: &[u32], keep: &[u32], admin: Option<u32>) -> GroupPlan {
    let mut plan = GroupPlan {
        keep: vec![primary],
        dropped: Vec::new(),
        admin_refused: false,
    };
    for &g in member_of {
        if g == primary || plan.keep.contains(&g) || plan.dropped.contains(&g) {
            continue;
        }
        if Some(g) == admin {
            plan.admin_refused |= keep.contains(&g);
            plan.dropped.push(g);
        } else if keep.contains(&g) {
            plan.keep.push(g);
        } else {
            plan.dropped.push(g);
        }
    }
    plan
}

/// `run.keep_groups` as gids; names no group database knows are returned apart.
pub fn keep_gids(config: &Config) -> (Vec<u32>, Vec<String>) {
    let mut gids = Vec::new();
    let mut unknown = Vec::new();
    for name in &config.run.keep_groups {
        match group_gid(name.trim()) {
            Some(g) => gids.push(g),
            None => unknown.push(name.clone()),
        }
    }
    (gids, unknown)
}

/// Which of `governed` (uid, its primary gid, its groups) belong to the admin group.
pub fn admin_members(governed: &[(u32, u32, Vec<u32>)], admin: u32) -> Vec<u32> {
    governed
        .iter()
        .filter(|(_, primary, groups)| *primary == admin || groups.contains(&admin))
        .map(|(uid, _, _)| *uid)
        .collect()
}

/// What is wrong with the configuration's privileges, without being a reason to refuse to
/// start: governed users in the admin group, the admin group in `run.keep_groups`.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let admin_name = &config.daemon.admin_group;
    let Some(admin) = group_gid(admin_name) else {
        return out;
    };
    let governed: Vec<(u32, u32, Vec<u32>)> = config
        .governed
        .uids
        .iter()
        .filter_map(|&uid| {
            let a = crate::account::Account::by_uid(uid)?;
            let groups = user_groups(&a.name, a.gid).unwrap_or_default();
            Some((uid, a.gid, groups))
        })
        .collect();
    for uid in admin_members(&governed, admin) {
        let name = crate::account::Account::by_uid(uid).map_or_else(|| uid.to_string(), |a| a.name);
        out.push(format!(
            "governed user {name} (uid {uid}) is in the admin group `{admin_name}`: from a \
             process outside the governed cgroup it can read every session and decide other \
             users' held requests (its own are refused); remove it: gpasswd -d {name} {admin_name}"
        ));
    }
    if config
        .run
        .keep_groups
        .iter()
        .any(|g| group_gid(g.trim()) == Some(admin))
    {
        out.push(format!(
            "run.keep_groups lists the admin group `{admin_name}`: bulkhead run drops it anyway \
             (a governed command must never reach the control socket)"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kept_groups_stay_and_never_the_admin_group() {
        let plan = plan_groups(1000, &[1000, 27, 999, 50, 27], &[999, 50, 4242], Some(50));
        assert_eq!(plan.keep, vec![1000, 999]);
        assert_eq!(plan.dropped, vec![27, 50]);
        assert!(plan.admin_refused, "the admin group was listed");
        let plan = plan_groups(1000, &[1000, 50], &[], Some(50));
        assert_eq!((plan.keep, plan.dropped), (vec![1000], vec![50]));
        assert!(!plan.admin_refused, "dropped, but nobody asked to keep it");
        let plan = plan_groups(0, &[], &[], None);
        assert_eq!(plan.keep, vec![0]);
    }

    #[test]
    fn governed_users_in_the_admin_group_are_found_by_primary_or_supplementary_group() {
        let governed = vec![
            (1001, 1001, vec![1001, 50]),
            (1002, 50, vec![50]),
            (1003, 1003, vec![1003, 27]),
        ];
        assert_eq!(admin_members(&governed, 50), vec![1001, 1002]);
        assert!(admin_members(&governed, 77).is_empty());
    }

    #[test]
    fn groups_are_looked_up_by_name_or_gid() {
        assert_eq!(group_gid("root"), Some(0));
        assert_eq!(group_gid("4242"), Some(4242));
        assert_eq!(group_gid("no-such-group-bulkhead"), None);
        assert_eq!(group_name(0).as_deref(), Some("root"));
        let root = user_groups("root", 0).unwrap();
        assert!(root.contains(&0), "{root:?}");
    }
}
