//! PostgreSQL v3 wire framing, typed by direction.
//!
//! Frames are kept as raw bytes and forwarded untouched; only the fields the gateway decides on
//! are parsed, once. Every length is checked against a cap before anything is allocated:
//! negative, too-small or oversized lengths are protocol errors, never panics or huge buffers.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest startup packet PostgreSQL itself accepts.
pub const MAX_STARTUP: usize = 10_000;
/// Largest frontend message: statement text, bind parameters, COPY data.
pub const MAX_FRONTEND: usize = 64 << 20;
/// Largest backend message (a DataRow with big values).
pub const MAX_BACKEND: usize = 256 << 20;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{side} sent a message with invalid length {len}")]
    BadLength { side: &'static str, len: i64 },
    #[error("{side} sent a {len}-byte message; the limit is {max}")]
    TooLong {
        side: &'static str,
        len: usize,
        max: usize,
    },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One tagged message: tag byte and body (without the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
    /// The whole frame as received (tag, length, body), for forwarding without re-encoding.
    pub raw: Bytes,
}

/// Reads frames from one side into a reusable buffer.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    side: &'static str,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, side: &'static str, max: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            side,
            max,
        }
    }

    /// Whether a whole frame is already buffered (so the caller may delay flushing).
    pub fn has_frame(&self) -> bool {
        if self.buf.len() < 5 {
            return false;
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        usize::try_from(len).is_ok_and(|l| self.buf.len() > l)
    }

    async fn fill(&mut self, want: usize) -> Result<bool, CodecError> {
        while self.buf.len() < want {
            self.buf.reserve(want - self.buf.len());
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(CodecError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Ok(true)
    }

    /// The next tagged frame; `None` on a clean EOF between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, CodecError> {
        if !self.fill(5).await? {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let body_len = checked_len(self.side, len, self.max)?;
        self.fill(5 + body_len).await?;
        let raw = self.buf.split_to(5 + body_len).freeze();
        let body = raw.slice(5..);
        Ok(Some(Frame { tag, body, raw }))
    }

    /// An untagged startup-phase packet (StartupMessage, SSLRequest, CancelRequest): the
    /// body after the length.
    pub async fn startup(&mut self) -> Result<Option<Bytes>, CodecError> {
        if !self.fill(4).await? {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let body_len = checked_len(self.side, len, MAX_STARTUP)?;
        if body_len < 4 {
            return Err(CodecError::BadLength {
                side: self.side,
                len: i64::from(len),
            });
        }
        self.fill(4 + body_len).await?;
        let mut packet = self.buf.split_to(4 + body_len);
        packet.advance(4);
        Ok(Some(packet.freeze()))
    }

    /// Bytes read but not yet framed (after a TLS upgrade these must be empty).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn into_inner(self) -> R {
        self.io
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// Replaces the reader's I/O (splitting a stream in two, say), keeping what it buffered.
    pub fn map_io<R2, T>(self, f: impl FnOnce(R) -> (R2, T)) -> (FrameReader<R2>, T) {
        let (io, other) = f(self.io);
        (
            FrameReader {
                io,
                buf: self.buf,
                side: self.side,
                max: self.max,
            },
            other,
        )
    }
}

/// The body length for a declared length (which counts itself), within `max`.
fn checked_len(side: &'static str, len: i32, max: usize) -> Result<usize, CodecError> {
    let Ok(total) = usize::try_from(len) else {
        return Err(CodecError::BadLength {
            side,
            len: i64::from(len),
        });
    };
    if total < 4 {
        return Err(CodecError::BadLength {
            side,
            len: i64::from(len),
        });
    }
    if total - 4 > max {
        return Err(CodecError::TooLong {
            side,
            len: total - 4,
            max,
        });
    }
    Ok(total - 4)
}

/// A NUL-terminated string at the front of `buf`, advancing past it.
pub fn take_cstr<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a str, CodecError> {
    let end = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(CodecError::Malformed { what })?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| CodecError::Malformed { what })?;
    *buf = &buf[end + 1..];
    Ok(s)
}

/// A parsed StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What the client's first packet asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup(Startup),
}

pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket, CodecError> {
    let malformed = CodecError::Malformed { what: "startup" };
    if packet.len() < 4 {
        return Err(malformed);
    }
    let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
    let mut rest = &packet[4..];
    match code {
        SSL_REQUEST => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST => {
            if rest.len() < 8 {
                return Err(malformed);
            }
            let pid = rest.get_i32();
            let secret = rest.get_i32();
            Ok(StartupPacket::Cancel { pid, secret })
        }
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let key = take_cstr(&mut rest, "startup")?;
                if key.is_empty() {
                    break;
                }
                let value = take_cstr(&mut rest, "startup")?;
                params.push((key.to_string(), value.to_string()));
            }
            Ok(StartupPacket::Startup(Startup { params }))
        }
        _ => Err(malformed),
    }
}

// Frontend messages the gateway decides on.

/// Query ('Q'): the SQL text.
pub fn query_text(body: &[u8]) -> Result<&str, CodecError> {
    let mut b = body;
    take_cstr(&mut b, "Query")
}

/// Parse ('P'): statement name and SQL text.
pub fn parse_message(body: &[u8]) -> Result<(&str, &str), CodecError> {
    let mut b = body;
    let name = take_cstr(&mut b, "Parse")?;
    let sql = take_cstr(&mut b, "Parse")?;
    Ok((name, sql))
}

/// Bind ('B'): portal and statement names.
pub fn bind_names(body: &[u8]) -> Result<(&str, &str), CodecError> {
    let mut b = body;
    let portal = take_cstr(&mut b, "Bind")?;
    let statement = take_cstr(&mut b, "Bind")?;
    Ok((portal, statement))
}

/// How much of one bound parameter, and of all of them, [`bind_parameters`] keeps for an
/// approver to read.
pub const PARAMETER_SHOWN: usize = 1024;
pub const PARAMETERS_SHOWN: usize = 16 * 1024;

/// Bind ('B'): the parameter values as an approver reads them: text-format values as text
/// (invalid UTF-8 replaced), binary ones as `\x` and hex, NULL as `None`; each cut at
/// [`PARAMETER_SHOWN`] bytes and all of them at [`PARAMETERS_SHOWN`] (marked `…`).
pub fn bind_parameters(body: &[u8]) -> Result<Vec<Option<String>>, CodecError> {
    use std::fmt::Write as _;
    let malformed = || CodecError::Malformed { what: "Bind" };
    let mut b = body;
    take_cstr(&mut b, "Bind")?;
    take_cstr(&mut b, "Bind")?;
    let count = |b: &mut &[u8]| -> Result<usize, CodecError> {
        if b.len() < 2 {
            return Err(malformed());
        }
        usize::try_from(b.get_i16()).map_err(|_| malformed())
    };
    let n_formats = count(&mut b)?;
    if b.len() < n_formats * 2 {
        return Err(malformed());
    }
    let formats: Vec<i16> = (0..n_formats).map(|_| b.get_i16()).collect();
    let n = count(&mut b)?;
    let mut out = Vec::with_capacity(n.min(1024));
    let mut shown = 0usize;
    for i in 0..n {
        if b.len() < 4 {
            return Err(malformed());
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| malformed())?;
        if b.len() < len {
            return Err(malformed());
        }
        let value = &b[..len];
        b.advance(len);
        let binary = match formats.as_slice() {
            [] => false,
            [one] => *one == 1,
            many => many.get(i).is_some_and(|f| *f == 1),
        };
        let room = PARAMETER_SHOWN.min(PARAMETERS_SHOWN.saturating_sub(shown));
        let mut text = if binary {
            let mut t = String::from("\\x");
            for byte in value.iter().take(room / 2) {
                let _ = write!(t, "{byte:02x}");
            }
            t
        } else {
            String::from_utf8_lossy(&value[..value.len().min(room)]).into_owned()
        };
        if (binary && value.len() * 2 > room) || (!binary && value.len() > room) {
            text.push('…');
        }
        shown += text.len();
        out.push(Some(text));
    }
    Ok(out)
}

/// Execute ('E'): portal name.
pub fn execute_portal(body: &[u8]) -> Result<&str, CodecError> {
    let mut b = body;
    take_cstr(&mut b, "Execute")
}

/// Close ('C') / Describe ('D'): kind ('S' statement, 'P' portal) and name.
pub fn close_target(body: &[u8]) -> Result<(u8, &str), CodecError> {
    let (&kind, mut rest) = body
        .split_first()
        .ok_or(CodecError::Malformed { what: "Close" })?;
    Ok((kind, take_cstr(&mut rest, "Close")?))
}

// Backend messages.

/// ReadyForQuery ('Z'): transaction status (`I`, `T` or `E`).
pub fn ready_status(body: &[u8]) -> u8 {
    body.first().copied().unwrap_or(b'I')
}

/// CommandComplete ('C'): the tag (`SELECT 1`, `INSERT 0 1`...).
pub fn command_tag(body: &[u8]) -> &str {
    let mut b = body;
    take_cstr(&mut b, "CommandComplete").unwrap_or("")
}

/// Fields of an ErrorResponse / NoticeResponse: (code byte, value).
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut b = body;
    while let Some((&code, rest)) = b.split_first() {
        if code == 0 {
            break;
        }
        b = rest;
        match take_cstr(&mut b, "ErrorResponse") {
            Ok(v) => out.push((code, v.to_string())),
            Err(_) => break,
        }
    }
    out
}

// Builders for what the gateway says itself.

fn frame(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(tag);
    buf.put_i32(0);
    body(&mut buf);
    let len = i32::try_from(buf.len() - 1).unwrap_or(i32::MAX);
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; the peer would misparse the rest.
    buf.put_slice(s.replace('\0', " ").as_bytes());
    buf.put_u8(0);
}

/// ErrorResponse with severity ERROR, a SQLSTATE and a message.
pub fn error_response(sqlstate: &str, message: &str) -> Bytes {
    error_with_severity("ERROR", sqlstate, message)
}

/// NoticeResponse from the gateway itself (severity NOTICE, SQLSTATE 00000): a message the
/// server may send at any time between other messages.
pub fn notice_response(message: &str) -> Bytes {
    fields_frame(b'N', "NOTICE", "00000", message)
}

/// FATAL ErrorResponse, for refusing a connection during startup.
pub fn fatal_response(sqlstate: &str, message: &str) -> Bytes {
    error_with_severity("FATAL", sqlstate, message)
}

fn error_with_severity(severity: &str, sqlstate: &str, message: &str) -> Bytes {
    fields_frame(b'E', severity, sqlstate, message)
}

/// An ErrorResponse or NoticeResponse: severity (localized and not), SQLSTATE, message.
fn fields_frame(tag: u8, severity: &str, sqlstate: &str, message: &str) -> Bytes {
    frame(tag, |b| {
        for (code, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', sqlstate),
            (b'M', message),
        ] {
            b.put_u8(code);
            put_cstr(b, value);
        }
        b.put_u8(0);
    })
}

/// A NotificationResponse ('A') with its payload replaced; the notifying process's id and the
/// channel are kept.
pub fn notification_with_payload(body: &[u8], payload: &str) -> Result<Bytes, CodecError> {
    let what = "NotificationResponse";
    let (pid, mut rest) = body
        .split_first_chunk::<4>()
        .ok_or(CodecError::Malformed { what })?;
    let channel = take_cstr(&mut rest, what)?;
    take_cstr(&mut rest, what)?;
    Ok(frame(b'A', |b| {
        b.put_slice(pid);
        put_cstr(b, channel);
        put_cstr(b, payload);
    }))
}

pub fn authentication_ok() -> Bytes {
    frame(b'R', |b| b.put_i32(0))
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    frame(b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

pub fn ready_for_query(status: u8) -> Bytes {
    frame(b'Z', |b| b.put_u8(status))
}

pub fn query(sql: &str) -> Bytes {
    frame(b'Q', |b| put_cstr(b, sql))
}

pub fn copy_data(data: &[u8]) -> Bytes {
    frame(b'd', |b| b.put_slice(data))
}

/// A DataRow ('D') with some values replaced: `f` returns the new value of a field, or `None`
/// to keep it. `Ok(None)` when nothing changed; an error for a malformed row, which must not
/// pass unmasked.
pub fn rewrite_data_row(
    body: &[u8],
    mut f: impl FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Result<Option<Bytes>, CodecError> {
    Ok(rewrite_row_body(body, |_, v| f(v).map(Replacement::Value))?.map(|b| data_row(&b)))
}

/// One column of a RowDescription ('T').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// The name the query gave the column (an alias, say): never used to decide masking.
    pub name: String,
    /// The table the column comes from, 0 for an expression.
    pub table_oid: u32,
    /// The column's attribute number in that table, 0 for an expression.
    pub column: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    /// 0 text, 1 binary (always 0 in the answer to a Describe of a statement).
    pub format: i16,
}

/// RowDescription ('T'): every field, checked against the message's length.
pub fn row_description(body: &[u8]) -> Result<Vec<FieldDescription>, CodecError> {
    let malformed = CodecError::Malformed {
        what: "RowDescription",
    };
    let mut b = body;
    if b.len() < 2 {
        return Err(malformed);
    }
    let count = usize::try_from(b.get_i16()).map_err(|_| CodecError::Malformed {
        what: "RowDescription",
    })?;
    // Each field takes at least 19 bytes: a count that cannot fit is not trusted to size
    // anything.
    if count > b.len() / 19 {
        return Err(malformed);
    }
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take_cstr(&mut b, "RowDescription")?.to_string();
        if b.len() < 18 {
            return Err(CodecError::Malformed {
                what: "RowDescription",
            });
        }
        fields.push(FieldDescription {
            name,
            table_oid: b.get_u32(),
            column: b.get_i16(),
            type_oid: b.get_u32(),
            type_len: b.get_i16(),
            type_mod: b.get_i32(),
            format: b.get_i16(),
        });
    }
    Ok(fields)
}

/// The values of a DataRow ('D') or of a binary COPY tuple, `None` for NULL.
pub fn data_row_values(body: &[u8]) -> Result<Vec<Option<&[u8]>>, CodecError> {
    let malformed = || CodecError::Malformed { what: "DataRow" };
    let mut b = body;
    if b.len() < 2 {
        return Err(malformed());
    }
    let count = usize::try_from(b.get_i16()).map_err(|_| malformed())?;
    if count > b.len() / 4 {
        return Err(malformed());
    }
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        if b.len() < 4 {
            return Err(malformed());
        }
        let len = b.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| malformed())?;
        if b.len() < len {
            return Err(malformed());
        }
        let (value, rest) = b.split_at(len);
        values.push(Some(value));
        b = rest;
    }
    Ok(values)
}

/// A new value for a field being rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    Value(Vec<u8>),
    Null,
}

/// The body of a DataRow (or of a binary COPY tuple, which has the same layout) with some
/// values replaced: `f` gets each non-NULL field's index and value. `Ok(None)` when nothing
/// changed; an error for a malformed row, which must not pass unmasked.
pub fn rewrite_row_body(
    body: &[u8],
    mut f: impl FnMut(usize, &[u8]) -> Option<Replacement>,
) -> Result<Option<BytesMut>, CodecError> {
    let values = data_row_values(body)?;
    let mut changed: Vec<Option<Replacement>> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if let Some(v) = v {
            if let Some(r) = f(i, v) {
                if changed.is_empty() {
                    changed.resize(values.len(), None);
                }
                changed[i] = Some(r);
            }
        }
    }
    if changed.is_empty() {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.put_i16(i16::try_from(values.len()).unwrap_or(i16::MAX));
    for (v, r) in values.iter().zip(&changed) {
        let value: Option<&[u8]> = match r {
            Some(Replacement::Null) => None,
            Some(Replacement::Value(new)) => Some(new),
            None => *v,
        };
        match value {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                out.put_slice(v);
            }
        }
    }
    Ok(Some(out))
}

/// A DataRow frame around a rewritten body.
pub fn data_row(body: &[u8]) -> Bytes {
    frame(b'D', |b| b.put_slice(body))
}

/// Bind ('B'): the result-column format codes (none: all text; one: all alike).
pub fn bind_result_formats(body: &[u8]) -> Result<Vec<i16>, CodecError> {
    let malformed = || CodecError::Malformed { what: "Bind" };
    let mut b = body;
    take_cstr(&mut b, "Bind")?;
    take_cstr(&mut b, "Bind")?;
    let skip = |b: &mut &[u8], n: usize| -> Result<(), CodecError> {
        if b.len() < n {
            return Err(malformed());
        }
        b.advance(n);
        Ok(())
    };
    let count = |b: &mut &[u8]| -> Result<usize, CodecError> {
        if b.len() < 2 {
            return Err(malformed());
        }
        usize::try_from(b.get_i16()).map_err(|_| malformed())
    };
    let parameter_formats = count(&mut b)?;
    skip(&mut b, parameter_formats * 2)?;
    for _ in 0..count(&mut b)? {
        if b.len() < 4 {
            return Err(malformed());
        }
        let len = b.get_i32();
        if len > 0 {
            skip(&mut b, usize::try_from(len).map_err(|_| malformed())?)?;
        }
    }
    let n = count(&mut b)?;
    if b.len() < n * 2 {
        return Err(malformed());
    }
    Ok((0..n).map(|_| b.get_i16()).collect())
}

/// CopyOutResponse ('H'): overall format (0 text, 1 binary) and the per-column formats.
pub fn copy_out_response(body: &[u8]) -> Result<(i8, Vec<i16>), CodecError> {
    let malformed = || CodecError::Malformed {
        what: "CopyOutResponse",
    };
    let mut b = body;
    if b.len() < 3 {
        return Err(malformed());
    }
    let format = b.get_i8();
    let n = usize::try_from(b.get_i16()).map_err(|_| malformed())?;
    if b.len() < n * 2 {
        return Err(malformed());
    }
    Ok((format, (0..n).map(|_| b.get_i16()).collect()))
}

pub fn terminate() -> Bytes {
    frame(b'X', |_| {})
}

/// Parse of `sql` as statement `name`, with no parameter types.
pub fn parse(name: &str, sql: &str) -> Bytes {
    frame(b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(0);
    })
}

/// Execute of portal `portal`, all rows.
pub fn execute(portal: &str) -> Bytes {
    frame(b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(0);
    })
}

/// A DataRow body holding `values` (`None`: SQL NULL), for tests here and in `columns`.
#[cfg(test)]
pub(crate) fn data_row_body(values: &[Option<&[u8]>]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i16(i16::try_from(values.len()).expect("field count"));
    for v in values {
        match v {
            Some(v) => {
                b.put_i32(i32::try_from(v.len()).expect("field length"));
                b.put_slice(v);
            }
            None => b.put_i32(-1),
        }
    }
    b
}

#[cfg(test)]
mod tests;
