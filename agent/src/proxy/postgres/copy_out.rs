//! COPY OUT data in text and CSV format, field by field.
//!
//! PostgreSQL sends one row per CopyData message; a message is nonetheless split into rows
//! here, and a row left unfinished at the end of a message makes the rest of the COPY
//! "misaligned": from then on every field is masked, since which column a field belongs to is
//! no longer known.

use std::borrow::Cow;

use crate::policy::{mask::Detectors, sql_copy::CopyFormat, MaskStyle};

/// What happens to one field of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldMask {
    /// Value detectors only.
    Detect,
    /// The whole value, in this style.
    Column(MaskStyle),
}

/// The rows of one COPY OUT, as they go by.
#[derive(Debug)]
pub struct CopyRows {
    pub format: CopyFormat,
    /// Per field; `None`: which column a field is is not known, every field gets `all`.
    pub fields: Option<Vec<FieldMask>>,
    /// The style for fields that cannot be attributed (the strongest column style).
    pub all: Option<MaskStyle>,
    pub detectors: Detectors,
    /// The first row is a header (column names), passed as it is.
    pub header: bool,
    pub misaligned: bool,
}

impl CopyRows {
    /// One CopyData message's rows, masked; `None` if nothing changed.
    pub fn mask(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut at = 0;
        while at < data.len() {
            let end = self.row_end(&data[at..]).map(|e| at + e);
            let (row, next) = match end {
                Some(e) => (&data[at..e], e + 1),
                None => (&data[at..], data.len()),
            };
            let complete = end.is_some();
            let masked = if std::mem::take(&mut self.header) && !self.misaligned {
                None
            } else {
                if !complete {
                    self.misaligned = true;
                }
                self.mask_row(row)
            };
            if let Some(m) = masked {
                let o = out.get_or_insert_with(|| data[..at].to_vec());
                o.extend_from_slice(&m);
                if complete {
                    o.push(b'\n');
                }
            } else if let Some(o) = out.as_mut() {
                o.extend_from_slice(&data[at..next]);
            }
            at = next;
        }
        out
    }

    /// Where the row starting at `data` ends (its newline), if it ends in this message.
    fn row_end(&self, data: &[u8]) -> Option<usize> {
        match &self.format {
            CopyFormat::Csv { quote, escape, .. } => {
                let mut quoted = false;
                let mut i = 0;
                while i < data.len() {
                    let c = data[i];
                    if quoted {
                        if c == *escape && is_escaped(data.get(i + 1).copied(), *quote, *escape) {
                            i += 1;
                        } else if c == *quote {
                            quoted = false;
                        }
                    } else if c == *quote {
                        quoted = true;
                    } else if c == b'\n' {
                        return Some(i);
                    }
                    i += 1;
                }
                None
            }
            _ => data.iter().position(|b| *b == b'\n'),
        }
    }

    fn mask_row(&self, row: &[u8]) -> Option<Vec<u8>> {
        let row_text = row.strip_suffix(b"\r").unwrap_or(row);
        let fields = match &self.format {
            CopyFormat::Text { delimiter, .. } => split_text(row_text, *delimiter),
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
                ..
            } => split_csv(row_text, *delimiter, *quote, *escape),
            CopyFormat::Binary => return None,
        };
        let attributed = self
            .fields
            .as_ref()
            .filter(|f| !self.misaligned && f.len() == fields.len());
        let mut changed = false;
        let mut out = Vec::with_capacity(row.len() + 16);
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(self.delimiter());
            }
            let style = match attributed.and_then(|f| f.get(i)) {
                Some(FieldMask::Column(style)) => Some(style),
                Some(FieldMask::Detect) => None,
                None => self.all.as_ref(),
            };
            match self.mask_field(field, style) {
                Some(m) => {
                    changed = true;
                    out.extend_from_slice(&m);
                }
                None => out.extend_from_slice(field),
            }
        }
        if !changed {
            return None;
        }
        if row_text.len() < row.len() {
            out.push(b'\r');
        }
        Some(out)
    }

    fn delimiter(&self) -> u8 {
        match &self.format {
            CopyFormat::Text { delimiter, .. } | CopyFormat::Csv { delimiter, .. } => *delimiter,
            CopyFormat::Binary => b'\t',
        }
    }

    /// A field's new raw text, if it changes: the whole value in `style`, else what the
    /// detectors find. NULL stays NULL.
    fn mask_field(&self, raw: &[u8], style: Option<&MaskStyle>) -> Option<Vec<u8>> {
        let value = match &self.format {
            CopyFormat::Text { null, .. } => {
                if raw == null.as_slice() {
                    return None;
                }
                unescape_text(raw)
            }
            CopyFormat::Csv {
                quote,
                escape,
                null,
                ..
            } => {
                if raw == null.as_slice() {
                    return None;
                }
                unquote_csv(raw, *quote, *escape)
            }
            CopyFormat::Binary => return None,
        };
        let text = String::from_utf8_lossy(&value);
        let masked = match style {
            Some(style) => Cow::Owned(style.apply(&text)),
            None => match self.detectors.mask_text(&text) {
                Cow::Borrowed(_) => return None,
                Cow::Owned(m) => Cow::Owned(m),
            },
        };
        Some(match &self.format {
            CopyFormat::Text { delimiter, .. } => escape_text(&masked, *delimiter),
            CopyFormat::Csv { quote, escape, .. } => quote_csv(&masked, *quote, *escape),
            CopyFormat::Binary => return None,
        })
    }
}

/// Text-format fields: split at each delimiter not escaped by a backslash.
pub fn split_text(row: &[u8], delimiter: u8) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < row.len() {
        if row[i] == b'\\' {
            i += 2;
            continue;
        }
        if row[i] == delimiter {
            fields.push(&row[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    fields.push(&row[start.min(row.len())..]);
    fields
}

/// A text-format field's value: backslash escapes undone.
pub fn unescape_text(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let byte = raw[i];
        i += 1;
        if byte != b'\\' || i >= raw.len() {
            out.push(byte);
            continue;
        }
        let e = raw[i];
        i += 1;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match raw.get(i).and_then(|d| char::from(*d).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push((v & 0xff) as u8);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// A value written as a text-format field.
pub fn escape_text(value: &str, delimiter: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 4);
    for &c in value.as_bytes() {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c == delimiter => {
                out.push(b'\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Inside quotes, whether the escape character before `next` escapes it.
fn is_escaped(next: Option<u8>, quote: u8, escape: u8) -> bool {
    next == Some(quote) || (escape != quote && next == Some(escape))
}

/// CSV fields (raw, quotes kept): split at each delimiter outside quotes.
pub fn split_csv(row: &[u8], delimiter: u8, quote: u8, escape: u8) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut i = 0;
    while i < row.len() {
        let c = row[i];
        if quoted {
            if c == escape && is_escaped(row.get(i + 1).copied(), quote, escape) {
                i += 1;
            } else if c == quote {
                quoted = false;
            }
        } else if c == quote {
            quoted = true;
        } else if c == delimiter {
            fields.push(&row[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    fields.push(&row[start.min(row.len())..]);
    fields
}

/// A CSV field's value: quotes removed, escaped characters undone.
pub fn unquote_csv(raw: &[u8], quote: u8, escape: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut quoted = false;
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        let next = raw.get(i + 1).copied();
        if quoted
            && c == escape
            && (next == Some(quote) || (escape != quote && next == Some(escape)))
        {
            out.push(raw[i + 1]);
            i += 2;
            continue;
        }
        if c == quote {
            quoted = !quoted;
        } else {
            out.push(c);
        }
        i += 1;
    }
    out
}

/// A value written as a quoted CSV field (quoted, so it is never read as NULL).
pub fn quote_csv(value: &str, quote: u8, escape: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 2);
    out.push(quote);
    for &c in value.as_bytes() {
        if c == quote || (c == escape && escape != quote) {
            out.push(escape);
        }
        out.push(c);
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{mask::Detector, MaskRule, Masker};

    fn detectors() -> Detectors {
        let rule = MaskRule::for_test(&["x"], &[Detector::Email], MaskStyle::Redact);
        Masker::new([&rule]).detectors().clone()
    }

    fn rows(format: CopyFormat, fields: Option<Vec<FieldMask>>, header: bool) -> CopyRows {
        CopyRows {
            format,
            fields,
            all: Some(MaskStyle::Redact),
            detectors: detectors(),
            header,
            misaligned: false,
        }
    }

    #[test]
    fn text_fields_split_on_unescaped_delimiters_and_round_trip() {
        assert_eq!(
            split_text(b"1\ta\\tb\t\\N", b'\t'),
            vec![&b"1"[..], b"a\\tb", b"\\N"]
        );
        assert_eq!(split_text(b"a\\,b,c", b','), vec![&b"a\\,b"[..], b"c"]);
        assert_eq!(split_text(b"", b'\t'), vec![&b""[..]]);
        assert_eq!(unescape_text(b"a\\tb\\\\c\\101\\x41\\"), b"a\tb\\cAA\\");
        let v = "tab\there\\back\nline,comma";
        assert_eq!(
            unescape_text(&escape_text(v, b',')),
            v.as_bytes(),
            "escape then unescape is the identity"
        );
        assert_eq!(
            split_text(&escape_text(v, b'\t'), b'\t').len(),
            1,
            "an escaped value is one field"
        );
    }

    #[test]
    fn csv_fields_respect_quotes() {
        let row = br#"1,"a,b","say ""hi""",,"""#;
        let f = split_csv(row, b',', b'"', b'"');
        assert_eq!(
            f,
            vec![&b"1"[..], b"\"a,b\"", b"\"say \"\"hi\"\"\"", b"", b"\"\""]
        );
        assert_eq!(unquote_csv(f[2], b'"', b'"'), b"say \"hi\"");
        assert_eq!(unquote_csv(f[4], b'"', b'"'), b"");
        assert_eq!(quote_csv("a\"b", b'"', b'"'), b"\"a\"\"b\"");
        assert_eq!(
            unquote_csv(&quote_csv("a\"b,c", b'"', b'"'), b'"', b'"'),
            b"a\"b,c"
        );
        assert_eq!(quote_csv("a\"b", b'"', b'\\'), b"\"a\\\"b\"");
        assert_eq!(unquote_csv(b"\"a\\\"b\"", b'"', b'\\'), b"a\"b");
    }

    #[test]
    fn named_columns_are_masked_whole_and_others_by_detectors() {
        let mut r = rows(
            CopyFormat::text(),
            Some(vec![
                FieldMask::Detect,
                FieldMask::Column(MaskStyle::KeepLast(4)),
                FieldMask::Detect,
            ]),
            false,
        );
        let out = r.mask(b"1\t123-45-6789\tmail bob@example.com\n").unwrap();
        assert_eq!(out, b"1\t*******6789\tmail [redacted]\n");
        assert!(r.mask(b"2\t\\N\tplain\n").is_none(), "NULL stays NULL");
        assert!(r.mask(b"3\t\\N\tplain\n4\t\\N\tx\n").is_none());
        let two = r.mask(b"3\t\\N\tplain\n4\tsecret\tx\n").unwrap();
        assert_eq!(two, b"3\t\\N\tplain\n4\t**cret\tx\n");
    }

    #[test]
    fn a_masked_value_is_escaped_for_its_format() {
        let mut r = rows(
            CopyFormat::text(),
            Some(vec![FieldMask::Column(MaskStyle::KeepLast(3))]),
            false,
        );
        // The value is a\tbc (escaped on the wire): its last three characters are \tbc.
        assert_eq!(r.mask(b"a\\tbc\n").unwrap(), b"*\\tbc\n");
        let mut c = rows(
            CopyFormat::csv(),
            Some(vec![
                FieldMask::Detect,
                FieldMask::Column(MaskStyle::Redact),
            ]),
            true,
        );
        assert!(c.mask(b"id,ssn\n").is_none(), "the header row passes");
        assert_eq!(c.mask(b"1,\"123,45\"\n").unwrap(), b"1,\"[redacted]\"\n");
        assert_eq!(
            c.mask(b"2,\"multi\nline\"\n").unwrap(),
            b"2,\"[redacted]\"\n",
            "a quoted newline does not end the row"
        );
        assert!(c.mask(b"3,\n").is_none(), "an unquoted empty field is NULL");
    }

    #[test]
    fn unattributable_rows_are_masked_whole_field_by_field() {
        let mut r = rows(CopyFormat::text(), None, false);
        assert_eq!(r.mask(b"1\tsecret\n").unwrap(), b"[redacted]\t[redacted]\n");
        // A field count that does not match the columns: not trusted.
        let mut r = rows(
            CopyFormat::text(),
            Some(vec![FieldMask::Detect, FieldMask::Detect]),
            false,
        );
        assert_eq!(
            r.mask(b"1\t2\t3\n").unwrap(),
            b"[redacted]\t[redacted]\t[redacted]\n"
        );
        // A row cut off at the end of a message: everything after it is masked.
        assert_eq!(r.mask(b"1\tpart").unwrap(), b"[redacted]\t[redacted]");
        assert!(r.misaligned);
        assert_eq!(r.mask(b"ial\n").unwrap(), b"[redacted]\n");
    }
}
