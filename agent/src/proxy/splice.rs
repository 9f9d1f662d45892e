//! Zero-copy relay between two TCP sockets with `splice(2)` through a pipe.
//!
//! Opaque TCP never needs to look at the bytes, so they go socket → pipe → socket inside the
//! kernel instead of being copied into and out of a user-space buffer. Readiness comes from
//! tokio (`readable()`/`writable()` + `try_io`, which clears readiness on `EAGAIN`), so the
//! relay is as asynchronous as a read/write loop.
//!
//! Like tokio's own reads and writes, a short splice clears readiness without the `EAGAIN`
//! call that would otherwise prove it (see [`drained`]): two system calls fewer per short
//! connection, one per small message and direction.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{Mutex, PoisonError},
};

use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per `splice` call; also the pipe's capacity.
const PIPE_SIZE: usize = 1 << 20;

/// Empty pipes kept for the next connections: a short connection then costs no `pipe2`,
/// `F_SETPIPE_SZ` and two `close` per direction.
const POOLED_PIPES: usize = 16;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A non-blocking pipe sized for bulk transfers.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its buffers (capacity over the page size): a splice into it stops when they are all
    /// taken, whatever they hold.
    slots: usize,
}

/// A pipe taken from the pool (or made), given back only when it was left empty: a pump that
/// ended with bytes in it, or was dropped midway, closes it instead.
struct Pooled {
    pipe: Option<Pipe>,
    empty: bool,
}

impl Pooled {
    fn take() -> io::Result<Self> {
        let pooled = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let pipe = match pooled {
            Some(p) => p,
            None => Pipe::new()?,
        };
        Ok(Self {
            pipe: Some(pipe),
            empty: false,
        })
    }

    fn pipe(&self) -> &Pipe {
        // Only `drop` takes it out.
        self.pipe
            .as_ref()
            .expect("a pooled pipe is present until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (true, Some(pipe)) = (self.empty, self.pipe.take()) {
            let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.len() < POOLED_PIPES {
                pool.push(pipe);
            }
        }
    }
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer round trips; failure (pipe-max-size) only costs speed.
        // SAFETY: plain fcntl on a descriptor we own.
        let mut capacity = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        if capacity < 0 {
            // SAFETY: as above.
            capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // Unknown: 0 slots, so no splice is taken for a drained socket (one `EAGAIN` more).
        let slots = match (usize::try_from(capacity), usize::try_from(page)) {
            (Ok(c), Ok(p)) if p > 0 => c / p,
            _ => 0,
        };
        Ok(Self { read, write, slots })
    }
}

/// Whether a splice of `moved` bytes from a socket into an empty pipe of `slots` buffers
/// emptied the socket's receive queue, so that asking again could only return `EAGAIN`.
///
/// A splice from a socket stops when the queue is empty, at the length asked for
/// (`PIPE_SIZE`, more than `slots` bytes), or when the pipe's buffers are all taken. Each buffer
/// holds at least one byte, so fewer bytes than buffers cannot have filled the pipe: the
/// queue was empty. From `slots` bytes on, the pipe may have been full, and the next splice
/// asks. (A read that stops at urgent data stops there either way: the relay stalls at an
/// out-of-band byte as it did before.) Data that arrives after the splice wakes the socket
/// again: tokio clears only the readiness the splice was made under, and keeps a seen EOF.
fn drained(moved: usize, slots: usize) -> bool {
    moved > 0 && moved < slots
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets are valid
    // for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves bytes from `from` to `to` through `pipe` until `from` reaches EOF, then half-closes
/// `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    mut pooled: Pooled,
    count: &mut u64,
) -> io::Result<()> {
    let pipe = pooled.pipe();
    loop {
        // The pipe is empty here: every read is written out whole before the next.
        let n = loop {
            from.readable().await?;
            // A splice that drained the socket reports `WouldBlock` to `try_io`, which then
            // clears the readiness it was made under; the bytes it moved are kept here.
            let mut drained_with = 0;
            match from.try_io(Interest::READABLE, || {
                let n = splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)?;
                if drained(n, pipe.slots) {
                    drained_with = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && drained_with > 0 => {
                    break drained_with
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // SAFETY: shutdown on a socket we hold a reference to.
            if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } != 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::NotConnected {
                    return Err(e);
                }
            }
            // Everything read was written: the pipe is empty and can serve another connection.
            pooled.empty = true;
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            // The pipe holds exactly `left` bytes: a shorter splice means the socket's send
            // buffer is full, and readiness is cleared as for a drained read.
            let mut full_after = 0;
            let moved = match to.try_io(Interest::WRITABLE, || {
                let m = splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)?;
                if m > 0 && m < left {
                    full_after = m;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(m)
            }) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => full_after,
                Err(e) => return Err(e),
            };
            left -= moved;
            *count += moved as u64;
        }
    }
}

/// Relays both ways between two sockets; returns bytes client→upstream, upstream→client and
/// the first error. `Err` before anything moved when the pipes cannot be created (descriptor
/// limits): the caller can still relay by copying.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<(u64, u64, io::Result<()>)> {
    let (up_pipe, down_pipe) = (Pooled::take()?, Pooled::take()?);
    let mut sent = 0u64;
    let mut received = 0u64;
    let result = tokio::try_join!(
        pump(client, upstream, up_pipe, &mut sent),
        pump(upstream, client, down_pipe, &mut received)
    );
    Ok((sent, received, result.map(|_| ())))
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn moves_bulk_data_both_ways_with_half_close() {
        let (mut app, gw_client) = pair().await;
        let (gw_up, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(&gw_client, &gw_up).await.unwrap() });

        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(b"done").await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        app.write_all(&payload).await.unwrap();
        app.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();

        assert!(server.await.unwrap() == expected, "payload arrived intact");
        assert_eq!(back, b"done");
        let (up, down, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!((up, down), (5_000_000, 4));
    }

    #[test]
    fn a_splice_drained_the_socket_only_if_it_could_not_have_filled_the_pipe() {
        assert!(!drained(0, 256), "end of file is read, not assumed");
        assert!(drained(1, 256));
        assert!(drained(255, 256));
        assert!(!drained(256, 256), "256 one-byte buffers fill the pipe");
        assert!(!drained(1, 0), "a pipe of unknown size proves nothing");
    }

    /// Sends one byte from each of `pages` different pages of a file, each a buffer of its own
    /// in the socket's receive queue (page-cache pages are not merged as copied bytes are),
    /// all before the relay runs: its first splice meets more buffers than the pipe has.
    fn one_byte_from_each_page(to: &TcpStream, pages: usize) {
        use std::io::Write as _;
        let page = 4096;
        let mut file = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..pages * page).map(|i| (i / page) as u8).collect();
        file.write_all(&bytes).unwrap();
        for i in 0..pages {
            let mut offset = (i * page) as libc::off_t;
            // SAFETY: both descriptors are open; `offset` is a valid pointer.
            let n = unsafe { libc::sendfile(to.as_raw_fd(), file.as_raw_fd(), &mut offset, 1) };
            assert_eq!(n, 1, "{}", io::Error::last_os_error());
        }
    }

    #[tokio::test]
    async fn bytes_beyond_a_full_pipe_are_relayed_without_more_arriving() {
        let (app, gw_client) = pair().await;
        let (gw_up, mut server) = pair().await;
        app.set_nodelay(true).unwrap();
        let relaying = tokio::spawn(async move { relay(&gw_client, &gw_up).await.unwrap() });
        // 300 buffers queued at once against a pipe of 256 (or 16): the first splice stops
        // with the pipe full, short of `PIPE_SIZE`, and the socket still holds the rest. A
        // relay that took that for a drained socket would wait for data that never comes.
        let pages = 300;
        one_byte_from_each_page(&app, pages);
        let mut got = vec![0u8; pages];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            server.read_exact(&mut got),
        )
        .await
        .expect("every byte relayed while the client waits, its connection open")
        .unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8));
        drop((app, server));
        let (up, _, result) = relaying.await.unwrap();
        result.unwrap();
        assert_eq!(up, pages as u64);
    }

    #[tokio::test]
    async fn small_messages_go_back_and_forth_without_stalling() {
        let (mut app, gw_client) = pair().await;
        let (gw_up, mut server) = pair().await;
        let relaying = tokio::spawn(async move { relay(&gw_client, &gw_up).await.unwrap() });
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                server.write_all(&buf[..n]).await.unwrap();
            }
        });
        for i in 0..2000u32 {
            let msg = i.to_be_bytes();
            app.write_all(&msg).await.unwrap();
            let mut back = [0u8; 4];
            tokio::time::timeout(std::time::Duration::from_secs(5), app.read_exact(&mut back))
                .await
                .expect("each echo arrives")
                .unwrap();
            assert_eq!(back, msg);
        }
        app.shutdown().await.unwrap();
        echo.await.unwrap();
        let (up, down, result) = relaying.await.unwrap();
        result.unwrap();
        assert_eq!((up, down), (8000, 8000));
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay_with_an_error() {
        let (mut app, gw_client) = pair().await;
        let (gw_up, server) = pair().await;
        let relay = tokio::spawn(async move { relay(&gw_client, &gw_up).await.unwrap() });
        // Close with unread data pending: the kernel resets the connection.
        let s2 = socket2::SockRef::from(&server);
        s2.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(server);
        let _ = app.write_all(&[1u8; 100_000]).await;
        let (_, _, result) = relay.await.unwrap();
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_pipe_left_with_bytes_is_never_reused() {
        // Many relays cut off by a reset while the pipe toward the dead server holds bytes,
        // each followed by a relay that must see exactly its own bytes.
        for round in 0..20u8 {
            let (mut app, gw_client) = pair().await;
            let (gw_up, server) = pair().await;
            let relaying = tokio::spawn(async move { relay(&gw_client, &gw_up).await.unwrap() });
            socket2::SockRef::from(&server)
                .set_linger(Some(std::time::Duration::ZERO))
                .unwrap();
            let _ = app.write_all(&[round; 300_000]).await;
            drop(server);
            let (_, _, result) = relaying.await.unwrap();
            assert!(result.is_err());

            let (mut app, gw_client) = pair().await;
            let (gw_up, mut server) = pair().await;
            let relaying = tokio::spawn(async move { relay(&gw_client, &gw_up).await.unwrap() });
            app.write_all(b"fresh").await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"fresh", "round {round}: only this connection's bytes");
            drop(server);
            let (up, _, result) = relaying.await.unwrap();
            result.unwrap();
            assert_eq!(up, 5);
        }
    }
}
