//! The sftp protocol (draft-ietf-secsh-filexfer-02, version 3 as OpenSSH speaks it), as far as
//! the gateway judges and records it: the client's requests (which file operation on which
//! path) and the server's answers that name handles and carry data. Pure and bounded: a packet
//! longer than [`MAX_PACKET`] or cut short is an error that ends the session.

/// The longest sftp packet accepted (OpenSSH's own limit, `SFTP_MAX_MSG_LENGTH`).
pub const MAX_PACKET: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SftpError {
    #[error("sftp packet of {0} bytes, over the {MAX_PACKET} byte limit")]
    TooLong(usize),
    #[error("sftp packet cut short or malformed")]
    Malformed,
}

/// Splits a byte stream into sftp packets (each with its 4-byte length).
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Adds `data`; the complete packets now buffered, in order.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, SftpError> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(len) = self.buf.get(..4) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if len > MAX_PACKET {
                return Err(SftpError::TooLong(len));
            }
            if len == 0 {
                return Err(SftpError::Malformed);
            }
            if self.buf.len() < 4 + len {
                break;
            }
            let rest = self.buf.split_off(4 + len);
            out.push(std::mem::replace(&mut self.buf, rest));
        }
        Ok(out)
    }
}

/// What happens to an open handle's file in a handle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleOp {
    Read,
    Write(u64),
    Close,
    /// fstat, fsetstat, readdir, fsync, fstatvfs, copy-data: judged when the handle was opened.
    Other,
}

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Init,
    /// `open` (a file) or `opendir`: judged, and the handle answered is followed.
    Open {
        id: u32,
        path: String,
        write: bool,
        dir: bool,
    },
    /// An operation on paths (stat, remove, mkdir, rename, symlink, setstat, ...): judged.
    Paths {
        id: u32,
        op: &'static str,
        write: bool,
        paths: Vec<String>,
    },
    /// An operation on a handle.
    Handle {
        id: u32,
        handle: Vec<u8>,
        op: HandleOp,
    },
    /// Reveals nothing of the files and changes nothing (realpath, limits, home-directory).
    Harmless {
        id: u32,
        op: &'static str,
    },
    /// A request the gateway cannot judge (an unknown type or extension, a path not UTF-8):
    /// refused.
    Unjudgeable {
        id: u32,
        why: String,
    },
}

/// A server answer the gateway follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Handle {
        id: u32,
        handle: Vec<u8>,
    },
    Data {
        id: u32,
        len: u64,
    },
    /// Anything else (status, name, attrs, version, extended reply): its id when it has one.
    Other {
        id: Option<u32>,
    },
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, SftpError> {
        let (&b, rest) = self.0.split_first().ok_or(SftpError::Malformed)?;
        self.0 = rest;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, SftpError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SftpError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], SftpError> {
        if self.0.len() < n {
            return Err(SftpError::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn string(&mut self) -> Result<&'a [u8], SftpError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

pub const FXP_INIT: u8 = 1;
pub const FXP_STATUS: u8 = 101;
pub const FX_PERMISSION_DENIED: u32 = 3;

/// Parses one client packet (with its length prefix).
#[expect(
    clippy::too_many_lines,
    reason = "one arm per sftp request type, read in one place"
)]
pub fn parse_request(packet: &[u8]) -> Result<Request, SftpError> {
    let mut r = Reader(packet.get(4..).ok_or(SftpError::Malformed)?);
    let kind = r.u8()?;
    if kind == FXP_INIT {
        r.u32()?;
        return Ok(Request::Init);
    }
    let id = r.u32()?;
    let path = |r: &mut Reader<'_>| -> Result<Result<String, String>, SftpError> {
        Ok(String::from_utf8(r.string()?.to_vec()).map_err(|_| "a path that is not UTF-8".into()))
    };
    let paths = |op: &'static str, write: bool, n: usize, r: &mut Reader<'_>| {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            match path(r)? {
                Ok(p) => out.push(p),
                Err(why) => return Ok(Request::Unjudgeable { id, why }),
            }
        }
        Ok(Request::Paths {
            id,
            op,
            write,
            paths: out,
        })
    };
    let handle = |op: HandleOp, r: &mut Reader<'_>| -> Result<Request, SftpError> {
        Ok(Request::Handle {
            id,
            handle: r.string()?.to_vec(),
            op,
        })
    };
    match kind {
        3 | 11 => {
            let p = path(&mut r)?;
            let write = if kind == 3 {
                // READ 0x1; WRITE, APPEND, CREAT, TRUNC (and anything unknown) change the file.
                r.u32()? & !0x1 != 0
            } else {
                false
            };
            Ok(match p {
                Ok(path) => Request::Open {
                    id,
                    path,
                    write,
                    dir: kind == 11,
                },
                Err(why) => Request::Unjudgeable { id, why },
            })
        }
        4 => handle(HandleOp::Close, &mut r),
        5 => handle(HandleOp::Read, &mut r),
        6 => {
            let h = r.string()?.to_vec();
            r.u64()?;
            let data = r.string()?;
            Ok(Request::Handle {
                id,
                handle: h,
                op: HandleOp::Write(data.len() as u64),
            })
        }
        8 | 10 | 12 => handle(HandleOp::Other, &mut r),
        7 => paths("lstat", false, 1, &mut r),
        17 => paths("stat", false, 1, &mut r),
        19 => paths("readlink", false, 1, &mut r),
        9 => paths("setstat", true, 1, &mut r),
        13 => paths("remove", true, 1, &mut r),
        14 => paths("mkdir", true, 1, &mut r),
        15 => paths("rmdir", true, 1, &mut r),
        18 => paths("rename", true, 2, &mut r),
        20 => paths("symlink", true, 2, &mut r),
        16 => Ok(Request::Harmless { id, op: "realpath" }),
        200 => {
            let name = r.string()?;
            match name {
                b"posix-rename@openssh.com" => paths("posix-rename", true, 2, &mut r),
                b"hardlink@openssh.com" => paths("hardlink", true, 2, &mut r),
                b"lsetstat@openssh.com" => paths("lsetstat", true, 1, &mut r),
                b"statvfs@openssh.com" => paths("statvfs", false, 1, &mut r),
                b"expand-path@openssh.com" => paths("expand-path", false, 1, &mut r),
                b"fstatvfs@openssh.com" | b"fsync@openssh.com" | b"copy-data" => {
                    handle(HandleOp::Other, &mut r)
                }
                b"limits@openssh.com" => Ok(Request::Harmless { id, op: "limits" }),
                b"home-directory" => Ok(Request::Harmless {
                    id,
                    op: "home-directory",
                }),
                other => Ok(Request::Unjudgeable {
                    id,
                    why: format!(
                        "sftp extension {:?} is not known to the gateway",
                        crate::text::terminal_safe(&String::from_utf8_lossy(other))
                    ),
                }),
            }
        }
        other => Ok(Request::Unjudgeable {
            id,
            why: format!("sftp request type {other} is not known to the gateway"),
        }),
    }
}

/// Parses one server packet (with its length prefix).
pub fn parse_answer(packet: &[u8]) -> Result<Answer, SftpError> {
    let mut r = Reader(packet.get(4..).ok_or(SftpError::Malformed)?);
    let kind = r.u8()?;
    if kind == 2 {
        return Ok(Answer::Other { id: None });
    }
    let id = r.u32()?;
    Ok(match kind {
        102 => Answer::Handle {
            id,
            handle: r.string()?.to_vec(),
        },
        103 => Answer::Data {
            id,
            len: r.string()?.len() as u64,
        },
        _ => Answer::Other { id: Some(id) },
    })
}

/// `SSH_FXP_STATUS` for request `id`: permission denied, with `message`.
pub fn permission_denied(id: u32, message: &str) -> Vec<u8> {
    let message = message.as_bytes();
    let body_len = 1 + 4 + 4 + 4 + message.len() + 4;
    let mut out = Vec::with_capacity(4 + body_len);
    out.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_be_bytes());
    out.push(FXP_STATUS);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&FX_PERMISSION_DENIED.to_be_bytes());
    out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(message);
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// For the fuzz target `sftp_packets` (`agent/fuzz`): frames `data` in chunks and parses every
/// packet both ways; must never panic.
#[cfg(feature = "fuzzing")]
pub fn fuzz(data: &[u8]) {
    let mut framer = Framer::default();
    for chunk in data.chunks(7) {
        match framer.push(chunk) {
            Ok(packets) => {
                for p in packets {
                    let _ = parse_request(&p);
                    let _ = parse_answer(&p);
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = u32::try_from(body.len() + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        p.push(kind);
        p.extend_from_slice(body);
        p
    }

    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(b.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn requests_are_framed_across_chunks_and_read() {
        let mut open = 7u32.to_be_bytes().to_vec();
        open.extend(s(b"/srv/a.txt"));
        open.extend(0x1a_u32.to_be_bytes()); // WRITE | CREAT | TRUNC
        open.extend(0u32.to_be_bytes());
        let mut rename = 8u32.to_be_bytes().to_vec();
        rename.extend(s(b"/a"));
        rename.extend(s(b"/b"));
        let mut stream = packet(3, &open);
        stream.extend(packet(18, &rename));
        let mut f = Framer::default();
        let mut got = Vec::new();
        for b in &stream {
            got.extend(f.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got.len(), 2);
        assert_eq!(
            parse_request(&got[0]).unwrap(),
            Request::Open {
                id: 7,
                path: "/srv/a.txt".into(),
                write: true,
                dir: false
            }
        );
        assert_eq!(
            parse_request(&got[1]).unwrap(),
            Request::Paths {
                id: 8,
                op: "rename",
                write: true,
                paths: vec!["/a".into(), "/b".into()]
            }
        );
        let mut read_only = 9u32.to_be_bytes().to_vec();
        read_only.extend(s(b"x"));
        read_only.extend(1u32.to_be_bytes());
        read_only.extend(0u32.to_be_bytes());
        assert!(matches!(
            parse_request(&packet(3, &read_only)).unwrap(),
            Request::Open { write: false, .. }
        ));
        let mut ext = 3u32.to_be_bytes().to_vec();
        ext.extend(s(b"evil@example.com"));
        assert!(matches!(
            parse_request(&packet(200, &ext)).unwrap(),
            Request::Unjudgeable { id: 3, .. }
        ));
        assert!(matches!(
            parse_request(&packet(99, &5u32.to_be_bytes())).unwrap(),
            Request::Unjudgeable { id: 5, .. }
        ));
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let mut f = Framer::default();
        assert_eq!(
            f.push(&u32::MAX.to_be_bytes()),
            Err(SftpError::TooLong(u32::MAX as usize))
        );
        assert_eq!(
            Framer::default().push(&[0, 0, 0, 0]),
            Err(SftpError::Malformed)
        );
        assert_eq!(
            parse_request(&packet(3, &[0, 0, 0, 1, 0, 0, 0, 9, b'x'])),
            Err(SftpError::Malformed)
        );
        assert_eq!(parse_request(&[0, 0]), Err(SftpError::Malformed));
        assert_eq!(
            parse_answer(&packet(102, &[0, 0])),
            Err(SftpError::Malformed)
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // What the fuzz target does, over pseudo-random streams with valid-looking lengths.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 64).unwrap();
            let mut p = u32::try_from(len).unwrap().to_be_bytes().to_vec();
            p.extend((0..len).map(|_| u8::try_from(next() % 256).unwrap()));
            if len > 0 {
                p[4] =
                    [1, 3, 4, 5, 6, 11, 18, 200, 102, 103][usize::try_from(next() % 10).unwrap()];
            }
            let _ = parse_request(&p);
            let _ = parse_answer(&p);
            let _ = Framer::default().push(&p);
        }
    }

    #[test]
    fn permission_denied_is_a_status_packet() {
        let p = permission_denied(42, "no");
        let mut f = Framer::default();
        let got = f.push(&p).unwrap();
        assert_eq!(got, vec![p.clone()]);
        assert_eq!(p[4], FXP_STATUS);
        assert_eq!(&p[5..9], &42u32.to_be_bytes());
        assert_eq!(&p[9..13], &FX_PERMISSION_DENIED.to_be_bytes());
        assert_eq!(parse_answer(&p).unwrap(), Answer::Other { id: Some(42) });
    }
}
