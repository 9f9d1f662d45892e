//! Small wording helpers for what admins read: counts with the right noun, durations as they
//! were written.

use std::time::Duration;

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
