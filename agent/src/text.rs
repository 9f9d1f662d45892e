//! Small wording helpers for what admins read: counts with the right noun, durations as they
//! were written, text a governed process wrote made safe for a terminal, command lines as a
//! shell reads them.

use std::time::{Duration, UNIX_EPOCH};

/// `text` safe to print on an admin's terminal: control characters other than newline and tab
/// (an escape sequence could redraw the screen or hide what follows), and the Unicode format
/// characters that reorder or hide text (bidirectional overrides, zero-width ones), are shown
/// as escapes (`\x1b`, `\u{202e}`).
pub fn terminal_safe(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if c.is_control() && u32::from(c) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}' => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// A command line as a shell would read it back: arguments with anything but
/// `A-Za-z0-9_@%+=:,./-` in single quotes (a `'` as `'\\''`), an empty one as `''`, and
/// escaped for the terminal.
pub fn shell_quoted(args: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(safe) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    terminal_safe(&quoted.join(" "))
        .replace('\n', "\\n")
        .replace('\t', "\\t")
}

/// An instant (microseconds since the epoch) as RFC 3339 UTC to the second:
/// `2026-12-01T05:40:12Z`. The one style of every time the CLI prints.
pub fn timestamp(micros: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
}

/// As [`timestamp`], with milliseconds (`2026-12-01T05:40:12.345Z`), where lines that follow
/// each other closely must show their order (`sessions tail`, `approvals watch`).
pub fn timestamp_ms(micros: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
}

/// `1 file`, `3 files`; `plural` is the noun for any other count.
pub fn count(n: usize, singular: &str, plural: &str) -> String {
    if n == 1 {
        format!("1 {singular}")
    } else {
        format!("{n} {plural}")
    }
}

/// A duration in the largest whole unit that states it exactly (`90days`, `36h`, `5min`,
/// `90s`), as an admin writes it in the configuration; anything finer in milliseconds.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, size) in [("days", 86_400), ("h", 3_600), ("min", 60)] {
        if secs % size == 0 {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_read_back_as_a_shell_would_and_stay_on_one_line() {
        let args: Vec<String> = ["psql", "-c", "SELECT 'a b';", "", "x\ny", "\u{1b}[2J"]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shell_quoted(&args),
            "psql -c 'SELECT '\\''a b'\\'';' '' 'x\\ny' '\\x1b[2J'"
        );
        assert_eq!(terminal_safe("a\u{202e}b\x07"), "a\\u{202e}b\\x07");
    }

    #[test]
    fn times_are_rfc_3339_utc_and_parse_back() {
        let us = 1_796_103_612_345_678; // 2026-12-01T05:40:12.345678Z
        assert_eq!(timestamp(us), "2026-12-01T05:40:12Z");
        assert_eq!(timestamp_ms(us), "2026-12-01T05:40:12.345Z");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        for text in [timestamp(us), timestamp_ms(us)] {
            let back = humantime::parse_rfc3339(&text).unwrap();
            let back = back.duration_since(UNIX_EPOCH).unwrap().as_micros();
            assert_eq!(
                u64::try_from(back).unwrap() / 1_000_000,
                us / 1_000_000,
                "{text}"
            );
        }
    }

    #[test]
    fn counts_and_durations_read_as_written() {
        assert_eq!(count(1, "file", "files"), "1 file");
        assert_eq!(count(0, "error", "errors"), "0 errors");
        assert_eq!(count(2, "error", "errors"), "2 errors");
        assert_eq!(duration(Duration::from_secs(90 * 86_400)), "90days");
        assert_eq!(duration(Duration::from_secs(36 * 3_600)), "36h");
        assert_eq!(duration(Duration::from_secs(300)), "5min");
        assert_eq!(duration(Duration::from_secs(90)), "90s");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        // Every output parses back to the same duration.
        for secs in [1, 59, 60, 61, 3_600, 86_400, 7_776_000] {
            let d = Duration::from_secs(secs);
            assert_eq!(
                humantime::parse_duration(&duration(d)).unwrap(),
                d,
                "{secs}"
            );
        }
    }
}
