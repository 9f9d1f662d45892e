//! A small TCP client and server for the integration tests and benchmarks, so tests know
//! exactly what a governed process did (its pid, its addresses, what came back).
//!
//! * `serve ADDR` — echo-style server: prints `ready`, then `accepted PEER` per connection;
//!   answers each connection, after the client's EOF, with a JSON line
//!   `{"peer": ..., "data": ...}`.
//! * `connect ADDR TEXT [BIND]` — (bound to BIND first, if given) sends TEXT, half-closes, prints a JSON line with its own pid, the
//!   local and peer addresses the socket reports, and the reply; exit 1 on error, with
//!   `{"error": ..., "kind": ...}`.
//! * `sink ADDR` — server that reads everything and answers with the byte count.
//! * `bench-connect ADDR N` — N times connect()+close(); prints nanoseconds in total.
//! * `bench-send ADDR BYTES` — sends BYTES, waits for the sink's count; prints nanoseconds.
//! * `bench-udp ADDR N` — N `sendto()` of a 64-byte datagram from one unconnected UDP socket;
//!   prints wall nanoseconds and this process's CPU nanoseconds (user + system).
//! * `echo ADDR` — server that writes back every read at once (request/response benches).
//! * `bench-rr ADDR N SIZE [WAIT_MS]` — on one connection (after waiting WAIT_MS once
//!   connected, if given), N times: write SIZE bytes, read SIZE back; prints nanoseconds in
//!   total (connect and the wait excluded).
//! * `bench-echo ADDR N` — N times connect(), one byte sent and its echo read back, close();
//!   prints nanoseconds in total (what a tool feels before its first answer).
//! * `relay ADDR TARGET` — the least a user-space TCP relay can do: per connection, one
//!   thread per direction copying with blocking `read`/`write` (no event loop, no parsing),
//!   passing a half-close on.
//!   Benchmarks use it as the ceiling for any proxy in the data path.
//! * `relay-async ADDR TARGET` — the least a relay on the gateway's own runtime can do: one
//!   tokio current-thread runtime (as the daemon's), one task per connection copying both
//!   directions (`copy_bidirectional`), no parsing, no policy, no record. The ceiling for a
//!   gateway built on tokio.
//! * `hyper-proxy ADDR TARGET` — the least an HTTP/1.1 proxy built as the gateway's is can do:
//!   the same runtime, and per client connection hyper's server reading each request and hyper's
//!   client sending it on one upstream connection of its own, driven by the same task, the
//!   response streamed back. `Authorization` is set, as the gateway and the nginx proxy of the
//!   benchmark do; no policy, no record. The ceiling for a gateway that re-serialises with hyper.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    let addr = || -> SocketAddr { arg(2).parse().expect("ADDR") };
    match arg(1) {
        "serve" => serve(addr(), false),
        "sink" => serve(addr(), true),
        "connect" => connect(
            addr(),
            arg(3),
            args.get(4).map(|b| b.parse().expect("BIND")),
        ),
        "bench-connect" => bench_connect(addr(), arg(3).parse().expect("N")),
        "bench-send" => bench_send(addr(), arg(3).parse().expect("BYTES")),
        "bench-udp" => bench_udp(addr(), arg(3).parse().expect("N")),
        "relay" => relay(addr(), arg(3).parse().expect("TARGET")),
        "relay-async" => relay_async(addr(), arg(3).parse().expect("TARGET")),
        "hyper-proxy" => hyper_proxy(addr(), arg(3).parse().expect("TARGET")),
        "echo" => echo(addr()),
        "bench-rr" => bench_rr(
            addr(),
            arg(3).parse().expect("N"),
            arg(4).parse().expect("SIZE"),
            arg(5).parse().unwrap_or(0),
        ),
        "bench-echo" => bench_echo(addr(), arg(3).parse().expect("N")),
        other => {
            eprintln!("unknown mode {other:?}");
            ExitCode::FAILURE
        }
    }
}

/// A listener with a deep accept queue, so connect loops measure connect, not SYN drops.
fn listen(addr: SocketAddr) -> TcpListener {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(4096).expect("listen");
    socket.into()
}

fn serve(addr: SocketAddr, sink: bool) -> ExitCode {
    let listener = listen(addr);
    println!("ready");
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
        if !sink {
            println!("accepted {peer}");
        }
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut data = Vec::new();
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        if !sink && data.len() < 64 * 1024 {
                            data.extend_from_slice(&buf[..n]);
                        }
                    }
                }
            }
            let reply = if sink {
                format!("{total}\n")
            } else {
                format!(
                    "{}\n",
                    serde_json::json!({ "peer": peer, "data": String::from_utf8_lossy(&data) })
                )
            };
            let _ = s.write_all(reply.as_bytes());
        });
    }
    ExitCode::SUCCESS
}

fn connect(addr: SocketAddr, text: &str, bind: Option<SocketAddr>) -> ExitCode {
    let result = (|| -> std::io::Result<serde_json::Value> {
        let mut s = match bind {
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
            Some(local) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                socket.set_reuse_address(true)?;
                socket.bind(&local.into())?;
                socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
                socket.into()
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let local = s.local_addr()?;
        let peer = s.peer_addr()?;
        s.write_all(text.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(serde_json::json!({
            "pid": std::process::id(),
            "local": local.to_string(),
            "peer": peer.to_string(),
            "reply": reply.trim_end(),
        }))
    })();
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "pid": std::process::id(), "error": e.to_string(), "kind": format!("{:?}", e.kind()) })
            );
            ExitCode::FAILURE
        }
    }
}

fn bench_connect(addr: SocketAddr, n: u32) -> ExitCode {
    let start = Instant::now();
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(s) => drop(s),
            Err(e) => {
                eprintln!("connect: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", start.elapsed().as_nanos());
    ExitCode::SUCCESS
}

fn bench_udp(addr: SocketAddr, n: u32) -> ExitCode {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("any")
    } else {
        "[::]:0".parse().expect("any")
    };
    let socket = std::net::UdpSocket::bind(bind).expect("bind");
    let payload = [0x5au8; 64];
    let cpu = || {
        // SAFETY: getrusage fills the struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
        let ns = |t: libc::timeval| t.tv_sec as u128 * 1_000_000_000 + t.tv_usec as u128 * 1_000;
        ns(ru.ru_utime) + ns(ru.ru_stime)
    };
    let (start, cpu_start) = (Instant::now(), cpu());
    for _ in 0..n {
        if let Err(e) = socket.send_to(&payload, addr) {
            eprintln!("sendto: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("{} {}", start.elapsed().as_nanos(), cpu() - cpu_start);
    ExitCode::SUCCESS
}

fn bench_send(addr: SocketAddr, bytes: u64) -> ExitCode {
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).expect("chunk");
        s.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut reply = Vec::new();
    read_to_end_blocking(&mut s, &mut reply);
    let reply = String::from_utf8_lossy(&reply);
    let elapsed = start.elapsed().as_nanos();
    assert_eq!(
        reply.trim(),
        bytes.to_string(),
        "the sink did not receive every byte"
    );
    println!("{elapsed}");
    ExitCode::SUCCESS
}

fn relay(addr: SocketAddr, target: SocketAddr) -> ExitCode {
    let listener = listen(addr);
    println!("ready");
    for stream in listener.incoming() {
        let Ok(client) = stream else { continue };
        let Ok(upstream) = TcpStream::connect(target) else {
            continue;
        };
        for s in [&client, &upstream] {
            let _ = s.set_nodelay(true);
        }
        let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || copy(client, upstream));
        std::thread::spawn(move || copy(upstream2, client2));
    }
    ExitCode::SUCCESS
}

/// Serves `addr` on the daemon's kind of runtime (tokio, current thread): prints `ready`, then
/// runs `serve` on a task of its own for each accepted connection.
fn serve_async<F, Fut>(addr: SocketAddr, serve: F) -> ExitCode
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        println!("ready");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            tokio::spawn(serve(client));
        }
    })
}

fn relay_async(addr: SocketAddr, target: SocketAddr) -> ExitCode {
    serve_async(addr, move |mut client| async move {
        let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let _ = upstream.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    })
}

/// Upstream connections of one `hyper-proxy` client connection, driven by its own task beside
/// the server side (as the gateway drives its own).
#[derive(Default)]
struct UpstreamConns {
    futures: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    waker: Option<std::task::Waker>,
}

fn hyper_proxy(addr: SocketAddr, target: SocketAddr) -> ExitCode {
    use std::sync::{Arc, Mutex};

    use hyper::{
        body::Incoming,
        client::conn::http1::SendRequest,
        header::{HeaderValue, AUTHORIZATION},
        Request,
    };
    use hyper_util::rt::TokioIo;

    // A new upstream connection (nginx closes one after its keep-alive request limit).
    async fn open(
        target: SocketAddr,
        conns: &Mutex<UpstreamConns>,
    ) -> Result<SendRequest<Incoming>, hyper::Error> {
        let upstream = tokio::net::TcpStream::connect(target)
            .await
            .expect("the target accepts");
        let _ = upstream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
        let mut c = conns.lock().expect("conns");
        c.futures.push(Box::pin(async move {
            let _ = conn.await;
        }));
        if let Some(w) = c.waker.take() {
            w.wake();
        }
        Ok(sender)
    }

    serve_async(addr, move |client| async move {
        let conns = Arc::new(Mutex::new(UpstreamConns::default()));
        let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
        let service = {
            let conns = Arc::clone(&conns);
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let conns = Arc::clone(&conns);
                let sender = Arc::clone(&sender);
                async move {
                    req.headers_mut()
                        .insert(AUTHORIZATION, HeaderValue::from_static("Bearer bench"));
                    let open_one = sender
                        .lock()
                        .expect("sender")
                        .take()
                        .filter(|s| !s.is_closed());
                    let mut s = match open_one {
                        Some(s) => s,
                        None => open(target, &conns).await?,
                    };
                    s.ready().await?;
                    let sent = s.send_request(req);
                    *sender.lock().expect("sender") = Some(s);
                    sent.await
                }
            })
        };
        let server = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(client), service);
        let drive = std::future::poll_fn(|cx| {
            let mut c = conns.lock().expect("conns");
            c.futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
            c.waker = Some(cx.waker().clone());
            std::task::Poll::<()>::Pending
        });
        tokio::select! {
            _ = server => {}
            () = drive => {}
        }
    })
}

/// Copies until EOF, which it passes on (a half-close, as the gateway does: the other
/// direction goes on, a sink's answer after the sender's EOF comes back), or until an error,
/// which shuts both directions so the peer thread ends too.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) if to.write_all(&buf[..n]).is_ok() => {}
            _ => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn echo(addr: SocketAddr) -> ExitCode {
    let listener = listen(addr);
    println!("ready");
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let _ = s.set_nodelay(true);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    ExitCode::SUCCESS
}

fn bench_rr(addr: SocketAddr, n: u32, size: usize, wait_ms: u64) -> ExitCode {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("TCP_NODELAY");
    std::thread::sleep(Duration::from_millis(wait_ms));
    let request = vec![0x5au8; size];
    let mut answer = vec![0u8; size];
    // One exchange first, so the connection is through the gateway's setup before the clock.
    s.write_all(&request).expect("write");
    read_exact_blocking(&mut s, &mut answer);
    let start = Instant::now();
    for _ in 0..n {
        s.write_all(&request).expect("write");
        read_exact_blocking(&mut s, &mut answer);
    }
    let elapsed = start.elapsed().as_nanos();
    assert_eq!(answer, request, "the echo came back changed");
    println!("{elapsed}");
    ExitCode::SUCCESS
}

/// `read_to_end` on a blocking socket without a timeout, where `EAGAIN` can only be spurious:
/// a socket in a sockmap (the kernel fast path) can return it from a blocking read on Linux
/// 6.18 (`tcp_bpf_recvmsg`, woken by something other than data). Counted on stderr.
fn read_to_end_blocking(s: &mut TcpStream, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => eprintln!("spurious EAGAIN"),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// `read_exact`, retrying a spurious `EAGAIN` (see [`read_to_end_blocking`]).
fn read_exact_blocking(s: &mut TcpStream, buf: &mut [u8]) {
    let mut at = 0;
    while at < buf.len() {
        match s.read(&mut buf[at..]) {
            Ok(0) => panic!("read: end of stream"),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => eprintln!("spurious EAGAIN"),
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn bench_echo(addr: SocketAddr, n: u32) -> ExitCode {
    let start = Instant::now();
    for _ in 0..n {
        let result = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.write_all(b"x")?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte)?;
            if byte != *b"x" {
                return Err(std::io::Error::other("echo sent back another byte"));
            }
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("connect and echo: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("{}", start.elapsed().as_nanos());
    ExitCode::SUCCESS
}
