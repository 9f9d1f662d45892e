//! `cgroup/connect_unix` and `cgroup/sendmsg_unix` (Linux 6.7+): which unix socket addresses a
//! governed process may connect or send to.
//!
//! aya 0.14 cannot load these program types (its section parser does not know them), and the
//! socket path is only readable through the `bpf_cast_to_kern_ctx` kfunc, which aya-ebpf cannot
//! call. So the program is assembled here, a few dozen instructions, and loaded and attached
//! with `bpf()` directly. It uses the maps of the main object (aya created and pinned them):
//!
//! 1. the capture configuration not ready: refuse; a uid filter that does not name the caller's
//!    uid: allow;
//! 2. read the address: a pathname up to its first NUL, an abstract name (leading 0) as its
//!    bytes, into a zeroed 112-byte key;
//! 3. the key in `UNIX_ALLOW`: allow; else report a [`UnixRefusal`] through `REFUSALS` and
//!    refuse (`EPERM`).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use aya::{maps::Map, Btf, Ebpf};
use bulkhead_common::{maps, FLAG_UID_FILTER, REFUSED_UNIX, UNIX_KEY_BYTES};

use super::EbpfError;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_CGROUP_UNIX_CONNECT`, `BPF_CGROUP_UNIX_SENDMSG`.
pub const ATTACH_TYPES: [(u32, &str); 2] =
    [(49, "bulkhead_connect_unix"), (50, "bulkhead_sendmsg_unix")];

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

fn mov(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
fn rsh_imm(dst: u8, imm: i32) -> Insn {
    insn(0x77, dst, 0, 0, imm)
}
fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
fn ldx_b(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x71, dst, src, off, 0)
}
fn ldx_dw(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x79, dst, src, off, 0)
}
fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm)
}
fn st_dw(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x7a, dst, 0, off, imm)
}
fn stx_w(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x63, dst, src, off, 0)
}
fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// `r = map` (two instructions, `BPF_PSEUDO_MAP_FD`).
fn ld_map(dst: u8, fd: RawFd) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
}

/// Jumps whose target is a label, resolved once the program is laid out.
#[derive(Clone, Copy)]
enum Jump {
    /// `if dst OP imm goto label` (`code` is the BPF_JMP opcode with BPF_K).
    Imm {
        code: u8,
        dst: u8,
        imm: i32,
    },
    Always,
}

#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }
    fn extend(&mut self, is: impl IntoIterator<Item = Insn>) {
        self.insns.extend(is);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }
    fn jump(&mut self, j: Jump, to: &'static str) {
        self.fixups.push((self.insns.len(), to));
        self.insns.push(match j {
            Jump::Imm { code, dst, imm } => insn(code, dst, 0, 0, imm),
            Jump::Always => insn(0x05, 0, 0, 0, 0),
        });
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == to)
                .map(|(_, i)| *i)
                .expect("every label is defined");
            let off =
                i64::try_from(target).unwrap_or(i64::MAX) - i64::try_from(*at).unwrap_or(0) - 1;
            let off = i16::try_from(off).expect("short program");
            self.insns[*at].off = off;
        }
        self.insns
    }
}

const JEQ: u8 = 0x15;
const JNE: u8 = 0x55;
const JGT: u8 = 0x25;
const JLT: u8 = 0xa5;
const JSLT: u8 = 0xc5;

const MAP_LOOKUP_ELEM: i32 = 1;
const GET_CURRENT_PID_TGID: i32 = 14;
const GET_CURRENT_UID_GID: i32 = 15;
const GET_CURRENT_COMM: i32 = 16;
const PROBE_READ_KERNEL: i32 = 113;
const PROBE_READ_KERNEL_STR: i32 = 115;
const RINGBUF_OUTPUT: i32 = 130;

/// Offsets in `struct bpf_sock_addr_kern` (`sk`, `uaddr`, `tmp_reg`, `t_ctx`, `uaddrlen`):
/// stable since 6.7, where `uaddrlen` came with unix socket hooks. A kernel that moved them
/// makes the verifier refuse the program, and the daemon says so.
const KERN_UADDR: i16 = 8;
const KERN_UADDRLEN: i16 = 32;
/// `CaptureConfig.flags`: after `listener_v6` (16 bytes) and `listener_v4` (4).
const CONFIG_FLAGS: i16 = 20;

/// The stack: the key at `KEY` (112 bytes), the refusal's header just below it, so header and
/// key make one 144-byte `UnixRefusal`.
const KEY: i16 = -128;
const HEADER: i16 = KEY - 32;
const SCRATCH: i16 = HEADER - 8;

struct Fds {
    config: RawFd,
    uids: RawFd,
    allow: RawFd,
    refusals: RawFd,
}

#[expect(
    clippy::too_many_lines,
    reason = "one straight-line program, read in order against the module docs"
)]
fn program(fds: &Fds, cast_to_kern_ctx: i32) -> Vec<Insn> {
    let key_bytes = i32::try_from(UNIX_KEY_BYTES).expect("small");
    let mut a = Asm::default();
    a.push(mov(R6, R1));
    // The configuration: ready, and the caller governed under a uid filter.
    a.extend(ld_map(R1, fds.config));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, i32::from(SCRATCH)));
    a.push(st_w(FP, SCRATCH, 0));
    a.push(call(MAP_LOOKUP_ELEM));
    a.jump(
        Jump::Imm {
            code: JEQ,
            dst: R0,
            imm: 0,
        },
        "refuse",
    );
    a.push(ldx_w(R7, R0, CONFIG_FLAGS));
    a.push(mov(R1, R7));
    a.push(rsh_imm(R1, 31));
    a.jump(
        Jump::Imm {
            code: JEQ,
            dst: R1,
            imm: 0,
        },
        "refuse",
    );
    a.push(mov(R1, R7));
    a.push(and_imm(
        R1,
        i32::try_from(FLAG_UID_FILTER).expect("small flag"),
    ));
    a.jump(
        Jump::Imm {
            code: JEQ,
            dst: R1,
            imm: 0,
        },
        "path",
    );
    a.push(call(GET_CURRENT_UID_GID));
    a.push(stx_w(FP, R0, SCRATCH));
    a.extend(ld_map(R1, fds.uids));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, i32::from(SCRATCH)));
    a.push(call(MAP_LOOKUP_ELEM));
    a.jump(
        Jump::Imm {
            code: JEQ,
            dst: R0,
            imm: 0,
        },
        "allow",
    );

    // The address, into a zeroed key.
    a.label("path");
    for i in 0..(UNIX_KEY_BYTES / 8) {
        a.push(st_dw(FP, KEY + i16::try_from(i * 8).expect("small"), 0));
    }
    a.push(mov(R1, R6));
    a.push(insn(0x85, 0, 2, 0, cast_to_kern_ctx));
    a.push(ldx_dw(R8, R0, KERN_UADDR));
    a.push(ldx_w(R9, R0, KERN_UADDRLEN));
    a.jump(
        Jump::Imm {
            code: JLT,
            dst: R9,
            imm: 3,
        },
        "deny",
    );
    a.jump(
        Jump::Imm {
            code: JGT,
            dst: R9,
            imm: key_bytes - 2,
        },
        "deny",
    );
    a.push(add_imm(R9, -2));
    // Its first byte: 0 for an abstract name.
    a.push(mov(R1, FP));
    a.push(add_imm(R1, i32::from(KEY)));
    a.push(mov_imm(R2, 1));
    a.push(mov(R3, R8));
    a.push(add_imm(R3, 2));
    a.push(call(PROBE_READ_KERNEL));
    a.jump(
        Jump::Imm {
            code: JNE,
            dst: R0,
            imm: 0,
        },
        "deny",
    );
    a.push(ldx_b(R1, FP, KEY));
    a.jump(
        Jump::Imm {
            code: JEQ,
            dst: R1,
            imm: 0,
        },
        "abstract",
    );
    // A pathname: up to its first NUL, within the address's length.
    a.push(mov(R1, FP));
    a.push(add_imm(R1, i32::from(KEY)));
    a.push(mov(R2, R9));
    a.push(add_imm(R2, 1));
    a.push(mov(R3, R8));
    a.push(add_imm(R3, 2));
    a.push(call(PROBE_READ_KERNEL_STR));
    a.jump(
        Jump::Imm {
            code: JSLT,
            dst: R0,
            imm: 0,
        },
        "deny",
    );
    a.jump(Jump::Always, "lookup");
    a.label("abstract");
    a.push(mov(R1, FP));
    a.push(add_imm(R1, i32::from(KEY)));
    a.push(mov(R2, R9));
    a.push(mov(R3, R8));
    a.push(add_imm(R3, 2));
    a.push(call(PROBE_READ_KERNEL));
    a.jump(
        Jump::Imm {
            code: JNE,
            dst: R0,
            imm: 0,
        },
        "deny",
    );
    a.label("lookup");
    a.extend(ld_map(R1, fds.allow));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, i32::from(KEY)));
    a.push(call(MAP_LOOKUP_ELEM));
    a.jump(
        Jump::Imm {
            code: JNE,
            dst: R0,
            imm: 0,
        },
        "allow",
    );

    // Refused: tell the daemon who and where, then EPERM.
    a.label("deny");
    a.push(st_w(
        FP,
        HEADER,
        i32::try_from(REFUSED_UNIX).expect("small"),
    ));
    a.push(call(GET_CURRENT_PID_TGID));
    a.push(rsh_imm(R0, 32));
    a.push(stx_w(FP, R0, HEADER + 4));
    a.push(call(GET_CURRENT_UID_GID));
    a.push(stx_w(FP, R0, HEADER + 8));
    a.push(st_w(FP, HEADER + 12, 0));
    a.push(mov(R1, FP));
    a.push(add_imm(R1, i32::from(HEADER + 16)));
    a.push(mov_imm(R2, 16));
    a.push(call(GET_CURRENT_COMM));
    a.extend(ld_map(R1, fds.refusals));
    a.push(mov(R2, FP));
    a.push(add_imm(R2, i32::from(HEADER)));
    a.push(mov_imm(R3, 32 + key_bytes));
    a.push(mov_imm(R4, 0));
    a.push(call(RINGBUF_OUTPUT));
    a.label("refuse");
    a.push(mov_imm(R0, 0));
    a.push(exit());
    a.label("allow");
    a.push(mov_imm(R0, 1));
    a.push(exit());
    a.finish()
}

fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<RawFd, EbpfError> {
    let (Map::Array(data) | Map::HashMap(data) | Map::RingBuf(data)) =
        ebpf.map(name).ok_or(EbpfError::Missing(name))?
    else {
        return Err(EbpfError::Missing(name));
    };
    Ok(data.fd().as_fd().as_raw_fd())
}

use std::os::fd::AsFd as _;

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<RawFd> {
    // SAFETY: `attr` is a `union bpf_attr` prefix of the size passed; the kernel reads (and
    // for PROG_LOAD writes the log buffer it points at) only within what the fields describe.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(RawFd::try_from(rc).unwrap_or(-1))
    }
}

fn put(attr: &mut [u8], at: usize, bytes: &[u8]) {
    attr[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Loads the program for `attach_type`; the verifier's log in the error when refused.
fn load(insns: &[Insn], attach_type: u32, name: &str) -> Result<OwnedFd, String> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
    put(
        &mut attr,
        4,
        &u32::try_from(insns.len()).unwrap_or(0).to_ne_bytes(),
    );
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, &1u32.to_ne_bytes()); // log_level
    put(
        &mut attr,
        28,
        &u32::try_from(log.len()).unwrap_or(0).to_ne_bytes(),
    );
    put(&mut attr, 32, &(log.as_mut_ptr() as u64).to_ne_bytes());
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    put(&mut attr, 48, &prog_name);
    put(&mut attr, 68, &attach_type.to_ne_bytes()); // expected_attach_type
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a new descriptor the kernel just gave us.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            let tail: String = text.lines().rev().take(6).collect::<Vec<_>>().join(" | ");
            Err(format!(
                "{e}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ))
        }
    }
}

fn link_create(prog: &OwnedFd, cgroup: &std::fs::File, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 64];
    put(&mut attr, 0, &prog.as_raw_fd().to_ne_bytes());
    put(&mut attr, 4, &cgroup.as_raw_fd().to_ne_bytes());
    put(&mut attr, 8, &attach_type.to_ne_bytes());
    // SAFETY: a new descriptor the kernel just gave us.
    bpf(BPF_LINK_CREATE, &mut attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins `link` at `path` (bpffs).
pub fn pin(link: &OwnedFd, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u8; 16];
    put(&mut attr, 0, &(c.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 8, &link.as_raw_fd().to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Loads and attaches both programs to `cgroup`; their links (to pin or hold), with names.
/// `Err` says why unix sockets cannot be governed here (an old kernel, a refused program).
pub fn attach(ebpf: &Ebpf, cgroup: &std::fs::File) -> Result<Vec<(&'static str, OwnedFd)>, String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    let cast = btf
        .id_by_type_name_kind("bpf_cast_to_kern_ctx", aya_obj::btf::BtfKind::Func)
        .map_err(|e| format!("kfunc bpf_cast_to_kern_ctx: {e}"))?;
    let fd = |name| map_fd(ebpf, name).map_err(|e| e.to_string());
    let fds = Fds {
        config: fd(maps::CAPTURE_CONFIG)?,
        uids: fd(maps::GOVERNED_UIDS)?,
        allow: fd(maps::UNIX_ALLOW)?,
        refusals: fd(maps::REFUSALS)?,
    };
    let insns = program(&fds, i32::try_from(cast).map_err(|e| e.to_string())?);
    let mut links = Vec::new();
    for (attach_type, name) in ATTACH_TYPES {
        let prog = load(&insns, attach_type, name).map_err(|e| format!("loading {name}: {e}"))?;
        let link = link_create(&prog, cgroup, attach_type)
            .map_err(|e| format!("attaching {name}: {e}"))?;
        links.push((name, link));
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let fds = Fds {
            config: 3,
            uids: 4,
            allow: 5,
            refusals: 6,
        };
        let p = program(&fds, 1234);
        for (i, ins) in p.iter().enumerate() {
            let class = ins.code & 0x07;
            if class == 0x05 && ins.code != 0x85 && ins.code != 0x95 {
                let to = i64::try_from(i).unwrap() + 1 + i64::from(ins.off);
                assert!(
                    usize::try_from(to).is_ok_and(|t| t < p.len()),
                    "jump at {i} to {to}"
                );
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(0x95));
    }
}
