//! Counts in words, for log lines and pages: "1 request", "2 requests", "3 retries".
//!
//! The chapter's statistics print "N requests" whatever N is; ours agree with their number, so a
//! log line reads as English when a count is 1.

/// `n` followed by `noun`, plural unless `n` is 1 (a noun ending in `y` takes `ies`).
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        (_, None) => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn the_noun_agrees_with_its_number() {
        assert_eq!(count(0u32, "request"), "0 requests");
        assert_eq!(count(1u32, "request"), "1 request");
        assert_eq!(count(2u32, "request"), "2 requests");
        assert_eq!(count(1u32, "retry"), "1 retry");
        assert_eq!(count(3u32, "retry"), "3 retries");
        assert_eq!(count(5u64, "open connection"), "5 open connections");
    }
}
