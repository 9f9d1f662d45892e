//! The cookie of the UDP socket that sent a datagram, asked of the kernel with `sock_diag`
//! (an exact lookup by its address and its peer's, as the kernel delivers a datagram): the
//! forwarder only sees the sender's address, the kernel's record is keyed by socket cookie.

use std::{io, mem::size_of, net::SocketAddr};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`, as far as the fields read here.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    req: ReqV2,
}

fn addr_bytes(addr: &SocketAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        SocketAddr::V4(a) => out[..4].copy_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => out = a.ip().octets(),
    }
    out
}

/// The cookie of the UDP socket bound to `socket` that sent to (or is connected to) `peer`:
/// both of one family. `Ok(None)` when the kernel knows no such socket (it closed).
pub fn udp_cookie(socket: SocketAddr, peer: SocketAddr) -> io::Result<Option<u64>> {
    let family = match socket {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let request = Request {
        hdr: NlMsgHdr {
            len: u32::try_from(size_of::<Request>()).unwrap_or(u32::MAX),
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family: u8::try_from(family).unwrap_or(0),
            protocol: u8::try_from(libc::IPPROTO_UDP).unwrap_or(0),
            ext: 0,
            pad: 0,
            states: u32::MAX,
            // The kernel looks the socket up as it delivers a datagram: `src` is where the
            // datagram comes from (the peer), `dst` the socket's own address.
            id: SockId {
                sport: peer.port().to_be_bytes(),
                dport: socket.port().to_be_bytes(),
                src: addr_bytes(&peer),
                dst: addr_bytes(&socket),
                interface: 0,
                cookie: [u32::MAX; 2],
            },
        },
    };
    // SAFETY: `request` is a plain `repr(C)` value of the size given.
    let sent = unsafe { libc::send(raw, (&raw const request).cast(), size_of::<Request>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    parse_reply(&buf[..n])
}

fn parse_reply(bytes: &[u8]) -> io::Result<Option<u64>> {
    if bytes.len() < size_of::<NlMsgHdr>() {
        return Err(io::Error::other("short sock_diag reply"));
    }
    // SAFETY: length checked; plain integers, read unaligned.
    let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let body = &bytes[size_of::<NlMsgHdr>()..];
    match hdr.kind {
        NLMSG_ERROR => {
            let code = body
                .get(..4)
                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            if code == -libc::ENOENT {
                Ok(None)
            } else {
                Err(io::Error::from_raw_os_error(-code))
            }
        }
        SOCK_DIAG_BY_FAMILY if body.len() >= size_of::<DiagMsg>() => {
            // SAFETY: length checked; plain integers, read unaligned.
            let msg: DiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
            Ok(Some(
                u64::from(msg.id.cookie[0]) | (u64::from(msg.id.cookie[1]) << 32),
            ))
        }
        other => Err(io::Error::other(format!(
            "unexpected sock_diag reply type {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<ReqV2>(), 56);
        assert_eq!(size_of::<Request>(), 72);
    }

    /// Needs only a network stack: finds the cookie of a socket of this process, which
    /// `SO_COOKIE` also reports.
    #[test]
    fn finds_the_cookie_of_a_connected_udp_socket() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let mut cookie = 0u64;
        let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap();
        // SAFETY: a valid socket and an out-parameter of the stated size.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&client),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0);
        let found = udp_cookie(client.local_addr().unwrap(), server.local_addr().unwrap()).unwrap();
        assert_eq!(found, Some(cookie));
        // An unconnected socket is found from any peer.
        let loose = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(
            udp_cookie(loose.local_addr().unwrap(), server.local_addr().unwrap())
                .unwrap()
                .is_some()
        );
        drop(loose);
    }
}
