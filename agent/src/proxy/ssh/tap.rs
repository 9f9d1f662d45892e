//! Terminal bytes to the record's text events: UTF-8 sequences split across SSH packets are
//! kept whole (the tail of a packet waits for the next), invalid bytes become U+FFFD.

/// One direction of a terminal, decoded incrementally.
#[derive(Debug, Default)]
pub struct Utf8Tap {
    /// An incomplete sequence at the end of the last chunk (at most 3 bytes).
    carry: Vec<u8>,
}

impl Utf8Tap {
    /// The text of `chunk` (with what was carried), keeping an incomplete tail for later.
    pub fn push(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        let mut out = String::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // valid_up_to is a char boundary: the prefix is UTF-8.
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    let Some(n) = e.error_len() else {
                        self.carry = bad.to_vec();
                        break;
                    };
                    out.push('\u{fffd}');
                    rest = bad.get(n..).unwrap_or_default();
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_split_across_chunks_stay_whole_and_invalid_bytes_are_replaced() {
        let mut tap = Utf8Tap::default();
        let text = "é€😀";
        let b = text.as_bytes();
        let mut out = String::new();
        for c in b.chunks(1) {
            out.push_str(&tap.push(c));
        }
        assert_eq!(out, text);
        assert_eq!(tap.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(tap.push(b"\xe2\x82"), "");
        assert_eq!(tap.push(b"\xac!"), "€!");
    }
}
