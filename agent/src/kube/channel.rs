//! The Kubernetes stream protocols seen from the side: a tap that reads the WebSocket frames
//! of an exec or attach stream (`v4.channel.k8s.io`, `v5.channel.k8s.io`) as they are relayed,
//! and hands each data chunk over with its channel (stdin, stdout, stderr, the status), for the
//! terminal record. The relay forwards the bytes untouched whatever the tap makes of them; the
//! tap only reads.
//!
//! Each binary message's first byte is its channel; a message may come in fragments
//! (continuation frames) and a frame in any number of reads. State is bounded: a frame head is
//! at most 14 bytes, and payloads are handed over as they arrive, never collected.

/// The exec/attach subprotocols whose frames the tap reads (binary, channel byte first).
pub const CHANNEL_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

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
    /// The frame carries data of a binary message (not a control or text frame).
    data: bool,
    /// The channel of the message in progress, once its first payload byte was seen.
    channel: Option<Channel>,
    /// The message in progress is binary (continuations belong to it).
    in_binary: bool,
    /// The stream broke the framing rules: the tap stops reading (the relay goes on).
    lost: bool,
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
            in_binary: false,
            lost: false,
        }
    }
}

impl FrameTap {
    /// Whether the tap lost track of the framing (what follows is not recorded).
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Reads `bytes` (the next bytes of the stream), calling `out` with each piece of channel
    /// data, unmasked.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut dyn FnMut(Channel, &[u8])) {
        let mut scratch = [0u8; 1024];
        while !bytes.is_empty() && !self.lost {
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
        match opcode {
            // Continuation: data of the message in progress.
            0 => self.data = self.in_binary,
            // Binary: a new message; its first byte is the channel.
            2 => {
                self.in_binary = true;
                self.channel = None;
                self.data = true;
            }
            // Text (the base64 protocols) and control frames are relayed, not read.
            1 => {
                self.in_binary = false;
                self.data = false;
            }
            8..=10 => self.data = false,
            _ => {
                self.lost = true;
                return;
            }
        }
        // A control frame's payload is at most 125 bytes (RFC 6455 5.5).
        if opcode >= 8 && len > 125 {
            self.lost = true;
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
        if fin && (opcode == 0 || opcode == 2) && self.data {
            self.in_binary = false;
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
        assert!(!tap.lost());
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
        stream.extend(frame(true, 1, b"1aGk=", None));
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
                ],
                "read {step} bytes at a time"
            );
        }
    }

    #[test]
    fn broken_framing_stops_the_tap_without_panicking() {
        let mut tap = FrameTap::default();
        tap.feed(&[0x83, 0x00], &mut |_, _| panic!("no data"));
        assert!(tap.lost(), "reserved opcode");
        let mut tap = FrameTap::default();
        tap.feed(&[0x89, 126, 0, 200], &mut |_, _| panic!("no data"));
        assert!(tap.lost(), "control frame over 125 bytes");
        let mut tap = FrameTap::default();
        tap.feed(
            &[0x82, 127, 255, 255, 255, 255, 255, 255, 255, 255, 1, 2],
            &mut |_, _| {},
        );
        assert!(!tap.lost(), "a huge length is only counted down");
    }
}
