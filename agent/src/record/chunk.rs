//! The store's event values: a *chunk* of a session's events, each a little-endian u32 length
//! and the event's JSON, LZ4-compressed behind a small header ([`CHUNK_LZ4`]). Older values
//! still read: an uncompressed chunk ([`CHUNK_MAGIC`]) and a single event's JSON (from before
//! chunks).

use super::{Event, StoreError};

/// First byte of a chunk value. A value written one event per key (before chunks) is a JSON
/// object and starts with `{`.
pub(super) const CHUNK_MAGIC: u8 = 0xB1;
/// First byte of a compressed chunk (what the writer writes): then the number of events
/// (u32, little-endian), the length of the uncompressed body (u32, little-endian), and the
/// body, which is a [`CHUNK_MAGIC`] chunk without its first byte, as an LZ4 block.
pub(super) const CHUNK_LZ4: u8 = 0xB2;
/// Uncompressed body size past which the writer starts a new chunk for the same session, so a
/// body is at most this plus one event, however far the queue grew while the writer stalled.
pub(super) const CHUNK_TARGET: usize = 1 << 20;
/// The largest uncompressed chunk body a reader accepts: a damaged length must not make it
/// allocate gigabytes. Far above what the writer writes ([`CHUNK_TARGET`] plus one event).
pub(super) const MAX_CHUNK_BODY: usize = 256 << 20;

/// A chunk's uncompressed body and its compressed value, reused from one chunk to the next.
#[derive(Default)]
pub(super) struct ChunkBuffers {
    pub(super) body: Vec<u8>,
    /// Only ever grown: its bytes past a chunk's end are stale, never zeroed again.
    value: Vec<u8>,
}

/// A compressed chunk ([`CHUNK_LZ4`]) of the first of `events` (at least one; fewer than all
/// once the body passes [`CHUNK_TARGET`]), and how many it holds. The value is borrowed from
/// `buffers`, which keep their allocations from one chunk to the next.
pub(super) fn encode_chunk<'b>(
    events: &[&Event],
    buffers: &'b mut ChunkBuffers,
) -> Result<(&'b [u8], usize), StoreError> {
    let too_big = || StoreError::Encode(serde::ser::Error::custom("chunk larger than 4 GiB"));
    let ChunkBuffers { body, value } = buffers;
    body.clear();
    let mut taken = 0;
    for event in events {
        if taken > 0 && body.len() >= CHUNK_TARGET {
            break;
        }
        taken += 1;
        let at = body.len();
        body.extend_from_slice(&[0; 4]);
        event_json(event, body)?;
        let len = u32::try_from(body.len() - at - 4).map_err(|_| too_big())?;
        body[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    let count = u32::try_from(taken).map_err(|_| too_big())?;
    let body_len = u32::try_from(body.len()).map_err(|_| too_big())?;
    let header = 9;
    let need = header + lz4_flex::block::get_maximum_output_size(body.len());
    if value.len() < need {
        value.resize(need, 0);
    }
    value[0] = CHUNK_LZ4;
    value[1..5].copy_from_slice(&count.to_le_bytes());
    value[5..9].copy_from_slice(&body_len.to_le_bytes());
    let n = lz4_flex::block::compress_into(body, &mut value[header..])
        .map_err(|e| StoreError::Encode(serde::ser::Error::custom(e)))?;
    Ok((&value[..header + n], taken))
}

/// Appends `event` as JSON, the bytes `serde_json::to_writer(event)` writes, without serde's
/// path for a flattened field (a map serializer for every field of the kind): the envelope
/// written directly, then the kind as its own object with its opening brace made the comma
/// that joins the two.
pub(super) fn event_json(event: &Event, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"{\"v\":");
    out.extend_from_slice(n.format(event.v).as_bytes());
    out.extend_from_slice(b",\"session\":");
    out.extend_from_slice(n.format(event.session.0).as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(n.format(event.id).as_bytes());
    out.extend_from_slice(b",\"at_us\":");
    out.extend_from_slice(n.format(event.at_us).as_bytes());
    let kind = out.len();
    serde_json::to_writer(&mut *out, &event.kind).map_err(StoreError::Encode)?;
    // An internally tagged enum always writes its tag: the object is never empty.
    debug_assert_eq!(out.get(kind), Some(&b'{'));
    out[kind] = b',';
    Ok(())
}

/// How many events a stored value holds, without decompressing it.
pub(super) fn event_count(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    match value.split_first() {
        Some((&CHUNK_LZ4, rest)) => rest
            .get(..4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .ok_or_else(|| corrupt(key, serde::de::Error::custom("chunk header cut short"))),
        _ => Ok(chunk_events(key, value)?.len() as u64),
    }
}

/// A stored value as [`chunk_events`] reads it: a compressed chunk decompressed, anything else
/// as it is.
pub(super) fn chunk_plain<'v>(
    key: &[u8],
    value: &'v [u8],
) -> Result<std::borrow::Cow<'v, [u8]>, StoreError> {
    let Some((&CHUNK_LZ4, rest)) = value.split_first() else {
        return Ok(std::borrow::Cow::Borrowed(value));
    };
    let bad = |why: &str| corrupt(key, serde::de::Error::custom(why));
    let (Some(len), Some(block)) = (rest.get(4..8), rest.get(8..)) else {
        return Err(bad("chunk header cut short"));
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_CHUNK_BODY {
        return Err(bad("chunk body length out of range"));
    }
    let mut plain = vec![0u8; 1 + len];
    plain[0] = CHUNK_MAGIC;
    match lz4_flex::block::decompress_into(block, &mut plain[1..]) {
        Ok(n) if n == len => Ok(std::borrow::Cow::Owned(plain)),
        Ok(_) => Err(bad("chunk body shorter than its header says")),
        Err(e) => Err(bad(&format!("chunk does not decompress: {e}"))),
    }
}

/// The JSON of each event in a stored value: a chunk, or one event (the format before chunks).
pub(super) fn chunk_events<'v>(key: &[u8], value: &'v [u8]) -> Result<Vec<&'v [u8]>, StoreError> {
    let Some((&CHUNK_MAGIC, mut rest)) = value.split_first() else {
        return Ok(vec![value]);
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        let json = rest
            .get(..4)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .and_then(|len| rest.get(4..4 + len));
        let Some(json) = json else {
            return Err(corrupt(
                key,
                serde::de::Error::custom("chunk cut short inside an event"),
            ));
        };
        rest = &rest[4 + json.len()..];
        out.push(json);
    }
    Ok(out)
}

pub(super) fn corrupt(key: &[u8], source: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key: key.iter().map(|b| format!("{b:02x}")).collect(),
        source,
    }
}
