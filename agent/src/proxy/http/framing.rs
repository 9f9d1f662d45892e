//! HTTP/1.1 request framing, read from the client's bytes before hyper reads them.
//!
//! hyper settles a request that carries both Content-Length and Transfer-Encoding by reading
//! it as chunked, dropping Content-Length from the headers the service sees and closing the
//! connection afterwards: after the fact the gateway cannot tell such a request from a plain
//! chunked one, yet a server or proxy behind another reader could frame it the other way.
//! [`Sniffed`] hands hyper the client's bytes untouched and reads them alongside: each request
//! head (httparse, as hyper does) and the body framing it declares (counted or chunked), to
//! find the next head. A head whose framing is ambiguous marks its request, and every later
//! one on the connection, as refused ([`Framing::refused`]); the service answers those 400
//! and closes. What the reader cannot follow (a head it cannot parse, bad chunk framing)
//! marks everything from there on as refused: fail closed. After a protocol switch (101) the
//! bytes are no longer HTTP/1 and hyper serves no more requests on the connection, so what
//! the reader then makes of them refuses nothing that would be served. Reading is pure
//! ([`Reader`]), tested without sockets.

use std::{
    io,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{MAX_HEADERS, MAX_HEAD_BYTES};

/// Why a head longer than [`MAX_HEAD_BYTES`] is refused (answered 431, not 400).
pub const HEAD_TOO_LARGE: &str = "a request head larger than the gateway reads";

/// The longest chunk-size line (with extensions) or trailer section followed.
const MAX_CHUNK_LINE: usize = 4096;

/// Why and from which request on (1-based, in the order of the connection's HTTP/1 requests)
/// the connection's requests are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub from: u64,
    pub why: &'static str,
}

/// What the reader found, shared between the client's stream and the service.
#[derive(Debug, Default)]
pub struct Framing {
    refused: OnceLock<Refusal>,
}

impl Framing {
    /// The refusal covering the connection's `nth` HTTP/1 request (1-based), if any.
    pub fn refused(&self, nth: u64) -> Option<Refusal> {
        self.refused.get().filter(|r| nth >= r.from).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head (buffered in `Reader::head` while it spans reads).
    Head,
    /// Body bytes left of a Content-Length body.
    Counted(u64),
    /// A chunk-size line: the size so far, whether its digits ended (whitespace or an
    /// extension), whether `\r` was seen, and the line's length.
    ChunkSize {
        size: u64,
        digits: u8,
        ended: bool,
        cr: bool,
        len: usize,
    },
    /// Data bytes left of a chunk.
    ChunkData(u64),
    /// After a chunk's data: 0 (`\r` expected) or 1 (`\n` expected).
    ChunkEnd(u8),
    /// Trailer lines after the last chunk: the current line's length, whether `\r` was seen,
    /// and the section's length so far.
    Trailers { line: usize, cr: bool, total: usize },
    /// No longer read: HTTP/2, an upgraded connection, or after a refusal.
    Opaque,
}

/// The framing reader's state: pure, fed the bytes as they arrive.
#[derive(Debug)]
pub struct Reader {
    state: State,
    /// A head that spans reads, bounded by [`MAX_HEAD_BYTES`].
    head: Vec<u8>,
    /// Heads read so far.
    heads: u64,
}

impl Default for Reader {
    fn default() -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            heads: 0,
        }
    }
}

/// A head's reading.
enum Head {
    /// Incomplete: more bytes needed.
    Partial,
    /// Complete, `usize` bytes long, with the body framing that follows it.
    Complete(usize, Body),
    /// Not an HTTP/1 request head the reader can follow.
    Bad(&'static str),
}

enum Body {
    Counted(u64),
    Chunked,
}

/// The body framing a parsed head declares, or why it is ambiguous.
fn body_of(req: &httparse::Request<'_, '_>) -> Result<Body, &'static str> {
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = h.value.trim_ascii();
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return Err("a Content-Length that is not one number");
            }
            let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers");
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // hyper reads the body as chunked when the last Transfer-Encoding line names
            // chunked last; anything else it refuses.
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    match (length, chunked) {
        (Some(_), Some(_)) => Err("both Content-Length and Transfer-Encoding"),
        (_, Some(false)) => Err("a Transfer-Encoding that does not end in chunked"),
        (_, Some(true)) => Ok(Body::Chunked),
        (Some(n), None) => Ok(Body::Counted(n)),
        (None, None) => Ok(Body::Counted(0)),
    }
}

fn read_head(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) => Head::Partial,
        Ok(httparse::Status::Complete(n)) => match body_of(&req) {
            Ok(body) => Head::Complete(n, body),
            Err(why) => Head::Bad(why),
        },
        Err(_) => Head::Bad("a request head that does not parse"),
    }
}

/// The HTTP/2 connection preface (prior knowledge), which is no HTTP/1 head.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Reader {
    /// Reads `data`, the next bytes from the client. `Some` when a request is refused (the
    /// first refusal only: after it nothing more is read).
    pub fn feed(&mut self, mut data: &[u8]) -> Option<Refusal> {
        while !data.is_empty() {
            match self.state {
                State::Opaque => return None,
                State::Head => match self.head_step(&mut data) {
                    Ok(()) => {}
                    Err(why) => {
                        self.state = State::Opaque;
                        self.head = Vec::new();
                        return Some(Refusal {
                            from: self.heads + 1,
                            why,
                        });
                    }
                },
                State::Counted(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[usize::try_from(n).unwrap_or(data.len())..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Counted(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[usize::try_from(n).unwrap_or(data.len())..];
                    self.state = if n == left {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                _ => {
                    let (b, rest) = (data[0], &data[1..]);
                    data = rest;
                    if let Err(why) = self.chunk_byte(b) {
                        self.state = State::Opaque;
                        // The request whose body this was is answered already (or will be):
                        // hyper refuses the body too; nothing after it is read.
                        return Some(Refusal {
                            from: self.heads + 1,
                            why,
                        });
                    }
                }
            }
        }
        None
    }

    /// Reads a head from `data` (advancing it past what the head took).
    fn head_step(&mut self, data: &mut &[u8]) -> Result<(), &'static str> {
        if self.heads == 0 {
            let seen = self.head.len() + data.len();
            let n = seen.min(H2_PREFACE.len());
            if self
                .head
                .iter()
                .chain(data.iter())
                .take(n)
                .eq(&H2_PREFACE[..n])
            {
                if seen >= H2_PREFACE.len() {
                    // Prior-knowledge HTTP/2: no HTTP/1 framing follows.
                    self.state = State::Opaque;
                    self.head = Vec::new();
                } else {
                    // Too short to tell from a request line yet.
                    self.head.extend_from_slice(data);
                }
                *data = &[];
                return Ok(());
            }
        }
        let (read, taken_before) = if self.head.is_empty() {
            (read_head(data), 0)
        } else {
            let room = (MAX_HEAD_BYTES + 1).saturating_sub(self.head.len());
            let before = self.head.len();
            self.head.extend_from_slice(&data[..room.min(data.len())]);
            (read_head(&self.head), before)
        };
        match read {
            Head::Partial => {
                if self.head.is_empty() {
                    self.head
                        .extend_from_slice(&data[..data.len().min(MAX_HEAD_BYTES + 1)]);
                }
                if self.head.len() > MAX_HEAD_BYTES {
                    return Err(HEAD_TOO_LARGE);
                }
                *data = &[];
                Ok(())
            }
            Head::Complete(len, body) => {
                self.heads += 1;
                *data = &data[len - taken_before..];
                self.head.clear();
                self.state = match body {
                    Body::Counted(0) => State::Head,
                    Body::Counted(n) => State::Counted(n),
                    Body::Chunked => State::ChunkSize {
                        size: 0,
                        digits: 0,
                        ended: false,
                        cr: false,
                        len: 0,
                    },
                };
                Ok(())
            }
            Head::Bad(why) => Err(why),
        }
    }

    /// One byte of chunk framing (size line, the CRLF after data, trailers).
    fn chunk_byte(&mut self, b: u8) -> Result<(), &'static str> {
        match &mut self.state {
            State::ChunkSize {
                size,
                digits,
                ended,
                cr,
                len,
            } => {
                *len += 1;
                if *len > MAX_CHUNK_LINE {
                    return Err("a chunk-size line longer than the gateway reads");
                }
                if *cr {
                    if b != b'\n' {
                        return Err("a chunk-size line not ended by CRLF");
                    }
                    if *digits == 0 {
                        return Err("a chunk without a size");
                    }
                    self.state = if *size == 0 {
                        State::Trailers {
                            line: 0,
                            cr: false,
                            total: 0,
                        }
                    } else {
                        State::ChunkData(*size)
                    };
                    return Ok(());
                }
                match b {
                    b'\r' => *cr = true,
                    // After the digits: whitespace and an extension, up to CR.
                    b'\n' => return Err("a chunk-size line not ended by CRLF"),
                    _ if *ended => {}
                    b' ' | b'\t' | b';' => *ended = true,
                    _ => {
                        let d = char::from(b)
                            .to_digit(16)
                            .ok_or("a chunk size that is not hexadecimal")?;
                        *digits += 1;
                        if *digits > 15 {
                            return Err("a chunk size too large");
                        }
                        *size = *size * 16 + u64::from(d);
                    }
                }
                Ok(())
            }
            State::ChunkEnd(seen) => {
                match (*seen, b) {
                    (0, b'\r') => *seen = 1,
                    (1, b'\n') => {
                        self.state = State::ChunkSize {
                            size: 0,
                            digits: 0,
                            ended: false,
                            cr: false,
                            len: 0,
                        };
                    }
                    _ => return Err("chunk data not followed by CRLF"),
                }
                Ok(())
            }
            State::Trailers { line, cr, total } => {
                *total += 1;
                if *total > MAX_HEAD_BYTES {
                    return Err("trailers larger than the gateway reads");
                }
                if *cr {
                    if b != b'\n' {
                        return Err("a trailer line not ended by CRLF");
                    }
                    if *line == 0 {
                        self.state = State::Head;
                    } else {
                        *line = 0;
                        *cr = false;
                    }
                    return Ok(());
                }
                match b {
                    b'\r' => *cr = true,
                    b'\n' => return Err("a trailer line not ended by CRLF"),
                    _ => *line += 1,
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The client's stream, read alongside by a [`Reader`].
pub struct Sniffed<S> {
    inner: S,
    reader: Reader,
    framing: Arc<Framing>,
}

impl<S> Sniffed<S> {
    pub fn new(inner: S, framing: Arc<Framing>) -> Self {
        Self {
            inner,
            reader: Reader::default(),
            framing,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if let Some(refusal) = this.reader.feed(&buf.filled()[before..]) {
                let _ = this.framing.refused.set(refusal);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal `stream` gets, fed whole and fed in every two-part split.
    fn refusal(stream: &[u8]) -> Option<Refusal> {
        let whole = Reader::default().feed(stream);
        for at in 0..=stream.len() {
            let mut r = Reader::default();
            let got = r.feed(&stream[..at]).or_else(|| r.feed(&stream[at..]));
            assert_eq!(got, whole, "split at {at}");
        }
        let mut r = Reader::default();
        let bytewise = stream.iter().find_map(|b| r.feed(std::slice::from_ref(b)));
        assert_eq!(bytewise, whole, "byte by byte");
        whole
    }

    fn from(stream: &[u8]) -> Option<u64> {
        refusal(stream).map(|r| r.from)
    }

    #[test]
    fn plain_requests_and_their_bodies_are_followed() {
        let inner = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let s = format!(
            "GET /a HTTP/1.1\r\nHost: a\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{inner}\
             POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n3 \r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n\
             GET /d HTTP/1.1\r\nHost: a\r\n\r\n",
            inner.len()
        );
        let s = s.as_bytes();
        assert_eq!(from(s), None);
        let mut r = Reader::default();
        assert_eq!(r.feed(s), None);
        assert_eq!(r.heads, 4);
        assert_eq!(r.state, State::Head);
    }

    #[test]
    fn ambiguous_framing_refuses_its_request_and_what_follows() {
        assert_eq!(
            refusal(
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            Some(Refusal {
                from: 1,
                why: "both Content-Length and Transfer-Encoding"
            })
        );
        // Either order, any case, after a first request that was fine.
        assert_eq!(
            from(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-LENGTH: 3\r\n\r\n"),
            Some(2)
        );
        assert_eq!(
            from(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"),
            Some(1)
        );
        assert_eq!(
            from(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
            None
        );
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert_eq!(from(bad), Some(1), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn bad_chunk_framing_refuses_the_rest() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"\r\n",
            b"0\r\n\r\r",
            b"1234567890abcdef0\r\n",
        ] {
            let s = [&head[..], body].concat();
            assert_eq!(from(&s), Some(2), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_request_inside_a_body_is_not_a_request() {
        let inner =
            b"DELETE /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut s =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", inner.len()).into_bytes();
        s.extend_from_slice(inner);
        assert_eq!(from(&s), None);
        let mut s = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            inner.len()
        )
        .into_bytes();
        s.extend_from_slice(inner);
        s.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(from(&s), None);
    }

    #[test]
    fn http2_is_not_read_and_heads_are_bounded() {
        assert_eq!(
            from(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04"),
            None
        );
        let mut big = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 10, b'a');
        let mut r = Reader::default();
        let got = big.chunks(1000).find_map(|c| r.feed(c));
        assert_eq!(got.map(|r| r.from), Some(1));
    }

    #[test]
    fn framing_covers_the_nth_request_on() {
        let f = Framing::default();
        assert_eq!(f.refused(1), None);
        let _ = f.refused.set(Refusal { from: 2, why: "x" });
        assert_eq!(f.refused(1), None);
        assert_eq!(f.refused(3).map(|r| r.from), Some(2));
    }
}
