//! One daemon per governed cgroup and pin directory: an exclusive `flock(2)` on each directory,
//! held for the daemon's life. A second daemon with the same cgroup or pins refuses to start
//! and names the holder, instead of adopting the pinned programs and taking the governed
//! traffic away from the first.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{} is held by another bulkhead daemon{}: one daemon per governed cgroup and pin directory",
        path.display(),
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock on a directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Takes the exclusive lock on `dir` without waiting.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    let io = |source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let file = File::open(dir).map_err(io)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(DirLock { _dir: file });
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(io(err));
    }
    let holder = file.metadata().ok().and_then(|m| {
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        holder_of(&locks, m.dev(), m.ino())
    });
    Err(LockError::Held {
        path: dir.to_path_buf(),
        holder,
    })
}

/// The pid holding a `FLOCK` on the file with device `dev` and inode `ino`, from the text of
/// `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 16884 00:26:4547 0 EOF`; the device as hex
/// major:minor).
fn holder_of(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with "->" and shifts the fields; skip those.
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == want => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_dir(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in this process
        // conflicts like another process would.
        match lock_dir(dir.path()) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        lock_dir(dir.path()).unwrap();
    }

    #[test]
    fn proc_locks_lines_are_read_by_device_and_inode() {
        let text = "1: FLOCK  ADVISORY  WRITE 16884 00:26:4547 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 999 00:26:4547 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 13208 fe:00:5776128 0 EOF\n";
        let dev = libc::makedev(0, 0x26);
        assert_eq!(holder_of(text, dev, 4547), Some(16884));
        assert_eq!(holder_of(text, dev, 4548), None);
        assert_eq!(
            holder_of(text, libc::makedev(0xfe, 0), 5_776_128),
            None,
            "POSIX, not FLOCK"
        );
    }
}
