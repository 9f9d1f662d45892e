//! The Kubernetes stream protocols seen from the side: a tap that reads the WebSocket frames
//! of an exec or attach stream (`channel.k8s.io`, `v4.channel.k8s.io`, `v5.channel.k8s.io`, or
//! no subprotocol, which the apiserver reads as `channel.k8s.io`) as they are relayed, and
//! hands each data chunk over with its channel (stdin, stdout, stderr, the status), for the
//! terminal record. The relay forwards the bytes untouched; the tap only reads, and says when
//! it cannot (then the relay ends the stream: what is not read is not relayed).
//!
//! Each data message's first byte is its channel. The apiserver (`wsstream`, on
//! `golang.org/x/net/websocket`) reads text and binary messages alike as bytes, so the tap
//! reads both. A message may come in fragments (continuation frames) and a frame in any number
//! of reads. State is bounded: a frame head is at most 14 bytes, and payloads are handed over
//! as they arrive, never collected.
//!
//! What the tap does not read ends its reading ([`FrameTap::lost`]): reserved bits (a
//! compression extension such as permessage-deflate, never negotiated through the gateway),
//! reserved opcodes, fragmented or oversized control frames, a continuation with no message in
//! progress and a new message inside a fragmented one.

/// The exec/attach subprotocols whose frames the tap reads (channel byte first, then raw
/// bytes). The `base64.channel.k8s.io` variants (channel digit, then base64 text) are not
/// among them: the gateway does not forward them.
pub const CHANNEL_PROTOCOLS: [&str; 3] =
    ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];

/// A stream of the channel protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stdin,
    Stdout,
    Stderr,
    /// The command's exit status (a `Status` object).
    Status,
    /// Terminal size changes.
    Resize,
    /// v5: a stream closed.
    Close,
    Other(u8),
}

impl Channel {
    fn from_byte(b: u8) -> Self {
        match b {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::Status,
            4 => Channel::Resize,
            255 => Channel::Close,
            other => Channel::Other(other),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame head (`have` bytes of it so far).
    Head,
    /// Inside a frame's payload.
    Payload,
}

/// Reads WebSocket frames from one direction of a relayed stream.
#[derive(Debug)]
pub struct FrameTap {
    state: State,
    head: [u8; 14],
    have: usize,
    remaining: u64,
    mask: Option<[u8; 4]>,
    /// Bytes of this frame's payload seen so far (for the mask's offset).
    offset: u64,
    /// The frame carries data of a message (not a control frame).
    data: bool,
    /// The channel of the message in progress, once its first payload byte was seen.
    channel: Option<Channel>,
    /// A fragmented data message is in progress (continuations belong to it).
    in_message: bool,
    /// Why the tap stopped reading: the stream broke the framing rules or used what the tap
    /// does not read. The relay must not go on unread.
    lost: Option<&'static str>,
}

impl Default for FrameTap {
    fn default() -> Self {
        Self {
            state: State::Head,
            head: [0; 14],
            have: 0,
            remaining: 0,
            mask: None,
            offset: 0,
            data: false,
            channel: None,
            in_message: false,
            lost: None,
        }
    }
}

impl FrameTap {
    /// Why the tap stopped reading, if it did (what follows would not be recorded).
    pub fn lost(&self) -> Option<&'static str> {
        self.lost
    }

    /// Reads `bytes` (the next bytes of the stream), calling `out` with each piece of channel
    /// data, unmasked.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut dyn FnMut(Channel, &[u8])) {
        let mut scratch = [0u8; 1024];
        while !bytes.is_empty() && self.lost.is_none() {
            match self.state {
                State::Head => {
                    let take = (self.head_len().unwrap_or(2) - self.have).min(bytes.len());
                    self.head[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                    self.have += take;
                    bytes = &bytes[take..];
                    if let Some(len) = self.head_len() {
                        if self.have == len {
                            self.start_frame();
                        }
                    }
                }
                State::Payload => {
                    let n = usize::try_from(self.remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len())
                        .min(scratch.len());
                    let chunk = &mut scratch[..n];
                    chunk.copy_from_slice(&bytes[..n]);
                    if let Some(mask) = self.mask {
                        for (i, b) in chunk.iter_mut().enumerate() {
                            let at = usize::try_from((self.offset + i as u64) % 4).unwrap_or(0);
                            *b ^= mask[at];
                        }
                    }
                    self.offset += n as u64;
                    self.remaining -= n as u64;
                    bytes = &bytes[n..];
                    if self.data {
                        let mut payload: &[u8] = chunk;
                        if self.channel.is_none() {
                            if let Some((&c, rest)) = payload.split_first() {
                                self.channel = Some(Channel::from_byte(c));
                                payload = rest;
                            }
                        }
                        if let (Some(c), false) = (self.channel, payload.is_empty()) {
                            out(c, payload);
                        }
                    }
                    if self.remaining == 0 {
                        self.end_frame();
                    }
                }
            }
        }
    }

    /// The frame head's full length, once its first two bytes are known.
    fn head_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let masked = self.head[1] & 0x80 != 0;
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + ext + if masked { 4 } else { 0 })
    }

    fn start_frame(&mut self) {
        let fin_opcode = self.head[0];
        let fin = fin_opcode & 0x80 != 0;
        let opcode = fin_opcode & 0x0f;
        let masked = self.head[1] & 0x80 != 0;
        let (len, next) = match self.head[1] & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                4,
            ),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        self.mask = masked.then(|| {
            let mut m = [0u8; 4];
            m.copy_from_slice(&self.head[next..next + 4]);
            m
        });
        // RSV1-3: set only by a negotiated extension (permessage-deflate sets RSV1), whose
        // payload the tap cannot read as the server will.
        if fin_opcode & 0x70 != 0 {
            self.lost = Some("a WebSocket frame with reserved bits set (compressed?)");
            return;
        }
        match opcode {
            // Continuation: data of the message in progress.
            0 if self.in_message => self.data = true,
            0 => {
                self.lost = Some("a WebSocket continuation frame with no message to continue");
                return;
            }
            1 | 2 if self.in_message => {
                self.lost = Some("a new WebSocket message inside a fragmented one");
                return;
            }
            // Text or binary: a new message; its first byte is the channel.
            1 | 2 => {
                self.in_message = true;
                self.channel = None;
                self.data = true;
            }
            8..=10 if !fin => {
                self.lost = Some("a fragmented WebSocket control frame");
                return;
            }
            8..=10 => self.data = false,
            _ => {
                self.lost = Some("a WebSocket frame with a reserved opcode");
                return;
            }
        }
        // A control frame's payload is at most 125 bytes (RFC 6455 5.5).
        if opcode >= 8 && len > 125 {
            self.lost = Some("a WebSocket control frame over 125 bytes");
            return;
        }
        self.remaining = len;
        self.offset = 0;
        self.have = 0;
        self.state = State::Payload;
        if len == 0 {
            self.end_frame();
        }
    }

    fn end_frame(&mut self) {
        let fin = self.head[0] & 0x80 != 0;
        let opcode = self.head[0] & 0x0f;
        if fin && opcode <= 2 && self.data {
            self.in_message = false;
            self.channel = None;
        }
        self.state = State::Head;
        self.have = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client (masked) or a server (not) sends it.
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => v.push(m | u8::try_from(n).unwrap()),
            n if n <= 0xffff => {
                v.push(m | 0x7e);
                v.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
            n => {
                v.push(m | 0x7f);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(k) = mask {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        } else {
            v.extend_from_slice(payload);
        }
        v
    }

    fn read(stream: &[u8], step: usize) -> Vec<(Channel, Vec<u8>)> {
        let mut tap = FrameTap::default();
        let mut got: Vec<(Channel, Vec<u8>)> = Vec::new();
        for piece in stream.chunks(step) {
            tap.feed(piece, &mut |c, d| match got.last_mut() {
                Some((last, data)) if *last == c => data.extend_from_slice(d),
                _ => got.push((c, d.to_vec())),
            });
        }
        assert_eq!(tap.lost(), None);
        got
    }

    #[test]
    fn channels_are_read_across_any_split_and_unmasked() {
        let big = vec![b'x'; 70_000];
        let mut stream = Vec::new();
        stream.extend(frame(true, 2, b"\x01hello\n", None));
        stream.extend(frame(true, 9, b"ping", None));
        stream.extend(frame(true, 2, b"\x00ls -l\n", Some([1, 2, 3, 4])));
        // A fragmented stderr message with a ping between its fragments.
        stream.extend(frame(false, 2, b"\x02err", None));
        stream.extend(frame(true, 10, b"", None));
        stream.extend(frame(true, 0, b"or\n", None));
        stream.extend(frame(true, 2, &[&[1u8][..], &big].concat(), None));
        stream.extend(frame(true, 2, b"\x03{\"status\":\"Success\"}", None));
        // A text message is read as the apiserver reads it: bytes, channel first.
        stream.extend(frame(false, 1, b"\x00typed ", Some([5, 6, 7, 8])));
        stream.extend(frame(true, 0, b"as text\n", Some([5, 6, 7, 8])));
        stream.extend(frame(true, 8, &[3, 232], None));
        for step in [1, 2, 3, 7, 1000, stream.len()] {
            let got = read(&stream, step);
            assert_eq!(
                got,
                vec![
                    (Channel::Stdout, b"hello\n".to_vec()),
                    (Channel::Stdin, b"ls -l\n".to_vec()),
                    (Channel::Stderr, b"error\n".to_vec()),
                    (Channel::Stdout, big.clone()),
                    (Channel::Status, b"{\"status\":\"Success\"}".to_vec()),
                    (Channel::Stdin, b"typed as text\n".to_vec()),
                ],
                "read {step} bytes at a time"
            );
        }
    }

    #[test]
    fn what_the_tap_cannot_read_stops_it_without_panicking() {
        let lost = |stream: &[u8]| {
            let mut tap = FrameTap::default();
            tap.feed(stream, &mut |_, _| {});
            tap.lost()
        };
        assert!(lost(&[0x83, 0x00]).is_some(), "reserved opcode");
        assert!(
            lost(&[0x89, 126, 0, 200]).is_some(),
            "control frame over 125 bytes"
        );
        assert!(lost(&[0x09, 0x00]).is_some(), "fragmented control frame");
        // permessage-deflate: RSV1 on the first frame of a compressed message.
        let compressed = frame(true, 2, b"\x00\xf2\xc9\x57\xe0\x02\x00", None);
        let mut rsv1 = compressed.clone();
        rsv1[0] |= 0x40;
        assert!(lost(&rsv1).is_some(), "RSV1");
        for bit in [0x20, 0x10] {
            let mut other = compressed.clone();
            other[0] |= bit;
            assert!(lost(&other).is_some(), "RSV bit {bit:#x}");
        }
        assert_eq!(lost(&compressed), None);
        assert!(
            lost(&frame(true, 0, b"\x00ls\n", None)).is_some(),
            "continuation with no message"
        );
        assert!(
            lost(
                &[
                    frame(false, 2, b"\x00l", None),
                    frame(true, 1, b"\x00s", None)
                ]
                .concat()
            )
            .is_some(),
            "a new message inside a fragmented one"
        );
        // Nothing after the break is handed over, even a well-formed frame.
        let mut tap = FrameTap::default();
        let stream = [rsv1, frame(true, 2, b"\x00after\n", None)].concat();
        tap.feed(&stream, &mut |_, d| panic!("read after the break: {d:?}"));
        assert!(tap.lost().is_some());
        let mut tap = FrameTap::default();
        tap.feed(
            &[0x82, 127, 255, 255, 255, 255, 255, 255, 255, 255, 1, 2],
            &mut |_, _| {},
        );
        assert_eq!(tap.lost(), None, "a huge length is only counted down");
    }
}
