//! A statement's `response` summary, built as its command tags arrive.

/// The command tags of a request's answers, joined as its `Response` event shows them
/// (`SELECT 1; UPDATE 2`), and the rows they count (each tag's last number). Built as the tags
/// arrive, in one string that becomes the summary: no list of tags and no `format!` per
/// statement.
#[derive(Debug, Default)]
pub(super) struct Tags {
    joined: String,
    count: u32,
    rows: u64,
}

impl Tags {
    pub(super) fn push(&mut self, tag: &str) {
        if self.count == 0 {
            // Room for the first tag and the row count appended by `summary`.
            self.joined.reserve(tag.len() + 32);
        } else {
            self.joined.push_str("; ");
        }
        self.joined.push_str(tag);
        self.count = self.count.saturating_add(1);
        let rows = tag
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        self.rows = self.rows.saturating_add(rows);
    }

    pub(super) fn one(tag: &str) -> Self {
        let mut tags = Self::default();
        tags.push(tag);
        tags
    }

    /// `TAGS (N rows)`, or `None` without a tag.
    pub(super) fn summary(self) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let mut out = self.joined;
        out.push_str(" (");
        out.push_str(itoa::Buffer::new().format(self.rows));
        out.push_str(" rows)");
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Tags;

    /// A response's summary as it was written with `format!`: the tags joined with `; `, then the
    /// rows they count (each tag's last number), without a tag none.
    #[test]
    fn a_response_summary_joins_the_tags_and_counts_their_rows() {
        assert_eq!(Tags::default().summary(), None);
        assert_eq!(
            Tags::one("SELECT 0").summary().as_deref(),
            Some("SELECT 0 (0 rows)")
        );
        let mut tags = Tags::default();
        for t in ["BEGIN", "INSERT 0 5", "UPDATE 12", "", "COMMIT"] {
            tags.push(t);
        }
        assert_eq!(
            tags.summary().as_deref(),
            Some("BEGIN; INSERT 0 5; UPDATE 12; ; COMMIT (17 rows)")
        );
        let mut huge = Tags::default();
        huge.push(&format!("SELECT {}", u64::MAX));
        huge.push("SELECT 1");
        assert_eq!(
            huge.summary(),
            Some(format!("SELECT {0}; SELECT 1 ({0} rows)", u64::MAX))
        );
    }
}
