//! A process's `/proc` directory, held open.
//!
//! procfs binds an open `/proc/PID` to the process itself (the kernel's `struct pid`), not to
//! its number: while the process runs, every lookup through the descriptor reads that process;
//! once it has exited, every lookup fails, even after a new process has been given the same
//! number. So what is read through one [`ProcDir`] is all of one process, and a `readlinkat`
//! of its `exe` later proves in one system call that the process still runs, and runs the same
//! executable, where a path under `/proc/PID` could already name a newcomer.

use std::{
    ffi::{CStr, CString},
    fs::File,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// Longest link target read; longer ones read as unknown.
const MAX_LINK: usize = 4096;

#[derive(Debug)]
pub(super) struct ProcDir(OwnedFd);

impl ProcDir {
    /// `ROOT/proc/PID`, opened as a handle (`O_PATH`): it reads nothing by itself.
    pub(super) fn open(root: &Path, pid: u32) -> io::Result<Self> {
        let path = root.join("proc").join(pid.to_string());
        let path = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `open` succeeded, so `fd` is an open descriptor owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The whole of the file `name` in this directory.
    pub(super) fn bytes(&self, name: &CStr) -> io::Result<Vec<u8>> {
        // SAFETY: the directory descriptor is open while `self` lives; `name` is NUL-terminated.
        let fd = unsafe {
            libc::openat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `openat` succeeded, so `fd` is an open descriptor owned by nobody else.
        read_whole(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// [`ProcDir::bytes`] as text.
    pub(super) fn text(&self, name: &CStr) -> io::Result<String> {
        String::from_utf8(self.bytes(name)?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The target of the link `name` in this directory, as text (`None`: unreadable, or gone).
    pub(super) fn link(&self, name: &CStr) -> Option<String> {
        let mut buf = [0u8; MAX_LINK];
        let target = self.read_link(name, &mut buf)?;
        Some(String::from_utf8_lossy(target).into_owned())
    }

    /// Whether the link `name` still reads `expected` (as [`ProcDir::link`] gave it), without
    /// allocating: one system call.
    pub(super) fn link_is(&self, name: &CStr, expected: &str) -> bool {
        let mut buf = [0u8; MAX_LINK];
        self.read_link(name, &mut buf)
            .is_some_and(|target| target == expected.as_bytes())
    }

    fn read_link<'b>(&self, name: &CStr, buf: &'b mut [u8; MAX_LINK]) -> Option<&'b [u8]> {
        // SAFETY: the directory descriptor is open while `self` lives; `name` is NUL-terminated
        // and `buf` is writable for its whole length.
        let n = unsafe {
            libc::readlinkat(
                self.0.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        // A full buffer may be a cut one: unknown rather than wrong.
        usize::try_from(n)
            .ok()
            .filter(|&n| n < buf.len())
            .map(|n| &buf[..n])
    }
}

/// A file's bytes, read with one `read(2)` where they fit in 4 KiB. procfs makes a file such as
/// `/proc/PID/stat` whole at its first read, so a read that leaves room in the buffer has all
/// of it; `fs::read` probes with small reads first, five or six system calls per file where
/// this makes three (open, read, close). A longer file is read on to its end.
pub(super) fn read_whole(mut file: File) -> io::Result<Vec<u8>> {
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
    Ok(bytes)
}
