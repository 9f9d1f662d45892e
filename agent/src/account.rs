//! Local accounts, as the C library's user database (NSS) knows them: a leaf, for the
//! configuration (`governed.users`), `bulkhead run` and the admin-group checks.

use std::ffi::{CStr, CString};

/// A local account, as the C library's user database (NSS) knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

impl Account {
    /// By name, or by uid when `who` is a number.
    pub fn lookup(who: &str) -> Option<Self> {
        if let Ok(uid) = who.parse::<u32>() {
            return Self::by_uid(uid);
        }
        let name = CString::new(who).ok()?;
        // SAFETY: getpwnam_r with a valid NUL-terminated name and buffers we own.
        with_passwd(|pwd, buf, out| unsafe {
            libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), out)
        })
    }

    pub fn by_uid(uid: u32) -> Option<Self> {
        // SAFETY: getpwuid_r with buffers we own.
        with_passwd(|pwd, buf, out| unsafe {
            libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), out)
        })
    }
}

/// Calls a `getpw*_r` function with a buffer that grows on ERANGE.
fn with_passwd(
    call: impl Fn(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> libc::c_int,
) -> Option<Account> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero passwd is a valid value for the call to fill in.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        match call(&raw mut pwd, &mut buf, &raw mut out) {
            0 if out.is_null() => return None,
            0 => {
                let text = |p: *const libc::c_char| {
                    // SAFETY: the call filled these with NUL-terminated strings in `buf`.
                    (!p.is_null())
                        .then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                };
                return Some(Account {
                    name: text(pwd.pw_name)?,
                    uid: pwd.pw_uid,
                    gid: pwd.pw_gid,
                    home: text(pwd.pw_dir).unwrap_or_else(|| "/".into()),
                    shell: text(pwd.pw_shell).unwrap_or_else(|| "/bin/sh".into()),
                });
            }
            libc::ERANGE if size < 1 << 20 => size *= 4,
            _ => return None,
        }
    }
}
