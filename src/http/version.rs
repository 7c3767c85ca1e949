//! The protocol version on a request or status line, for the versions `httparse` refuses.
//!
//! `httparse` reads `HTTP/1.0` and `HTTP/1.1` and calls anything else an error. RFC 9112 §2.3
//! and RFC 9110 §2.5 ask for more: a message with a later minor version of HTTP/1 (`HTTP/1.2`) is
//! processed as the highest minor version the recipient speaks, HTTP/1.1; a request for another
//! major version (`HTTP/2.0`, the HTTP/2 connection preface `PRI * HTTP/2.0`, or an HTTP/0.9
//! line with no version at all) is answered `505 HTTP Version Not Supported` (RFC 9110 §15.6.6).
//! This module only looks at a line `httparse` refused; anything that is not a version stays
//! malformed (400). The two versions spoken are [`Version`].

/// The protocol version of a message; only HTTP/1.0 and HTTP/1.1 are spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: connections close after each response unless `Connection: keep-alive`.
    Http10,
    /// HTTP/1.1: connections persist unless `Connection: close`.
    Http11,
}

/// What the version on the first line of a head says, when `httparse` refused the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LineVersion {
    /// `HTTP/1.x` with a single digit x above 1: the head is read as HTTP/1.1. `at` is the
    /// offset of the minor digit in the head's bytes.
    LaterMinor {
        /// Where the minor version digit is.
        at: usize,
    },
    /// A version this server does not speak, as it was written (`HTTP/2.0`, or `HTTP/0.9` for a
    /// request line without a version).
    Unsupported(String),
    /// Nothing to say about the version: the head is malformed for another reason.
    Other,
}

/// The version on a request line (`METHOD SP TARGET SP HTTP-VERSION`).
pub(super) fn of_request_line(head: &[u8]) -> LineVersion {
    let Some((start, line)) = first_line(head) else {
        return LineVersion::Other;
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return LineVersion::Other;
    };
    if !is_token(method) || !is_target(target) {
        return LineVersion::Other;
    }
    match (parts.next(), parts.next()) {
        // HTTP/0.9's simple request was `GET /path`, with no version.
        (None, _) => LineVersion::Unsupported("HTTP/0.9".into()),
        (Some(version), None) => of_token(version, start + method.len() + target.len() + 2),
        (Some(_), Some(_)) => LineVersion::Other,
    }
}

/// The version on a status line (`HTTP-VERSION SP STATUS SP REASON`).
pub(super) fn of_status_line(head: &[u8]) -> LineVersion {
    match first_line(head) {
        Some((start, line)) => {
            of_token(line.split(|&b| b == b' ').next().unwrap_or_default(), start)
        }
        None => LineVersion::Other,
    }
}

/// Whether the first line of a head has arrived whole.
pub(super) fn first_line_is_complete(head: &[u8]) -> bool {
    first_line(head).is_some()
}

/// A copy of `head` with the minor version digit at `at` made `1`: the head as HTTP/1.1.
pub(super) fn as_http11(head: &[u8], at: usize) -> Vec<u8> {
    let mut copy = head.to_vec();
    copy[at] = b'1';
    copy
}

/// Reads `HTTP-version = HTTP-name "/" DIGIT "." DIGIT` (RFC 9112 §2.3): exactly one digit each,
/// so `HTTP/1.10` or `HTTP/2` is no version at all. `start` is the token's offset in the head.
fn of_token(token: &[u8], start: usize) -> LineVersion {
    match *token {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            match (major, minor) {
                (b'1', b'0' | b'1') => LineVersion::Other,
                (b'1', _) => LineVersion::LaterMinor { at: start + 7 },
                _ => LineVersion::Unsupported(String::from_utf8_lossy(token).into_owned()),
            }
        }
        _ => LineVersion::Other,
    }
}

/// The first line of a head without its line ending, and where it starts, once its LF has
/// arrived. Empty lines before it are skipped as `httparse` skips them (RFC 9112 §2.2): CRLF or
/// a bare LF.
fn first_line(head: &[u8]) -> Option<(usize, &[u8])> {
    let mut start = 0;
    loop {
        match head.get(start..) {
            Some([b'\r', b'\n', ..]) => start += 2,
            Some([b'\n', ..]) => start += 1,
            _ => break,
        }
    }
    let len = head.get(start..)?.iter().position(|&b| b == b'\n')?;
    let line = &head[start..start + len];
    Some((start, line.strip_suffix(b"\r").unwrap_or(line)))
}

/// Whether `bytes` is a method name: a non-empty RFC 9110 §5.6.2 token.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `bytes` can be a request target: visible characters, no spaces or controls.
fn is_target(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| b.is_ascii_graphic() || b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_minor_versions_are_read_as_http11() {
        let head = b"GET / HTTP/1.2\r\n\r\n";
        assert_eq!(of_request_line(head), LineVersion::LaterMinor { at: 13 });
        assert_eq!(as_http11(head, 13), b"GET / HTTP/1.1\r\n\r\n");
        // Leading empty lines move the digit along.
        assert_eq!(
            of_request_line(b"\r\n\nGET /a HTTP/1.9\n\n"),
            LineVersion::LaterMinor { at: 17 }
        );
        assert_eq!(
            of_status_line(b"HTTP/1.7 200 OK\r\n\r\n"),
            LineVersion::LaterMinor { at: 7 }
        );
    }

    #[test]
    fn other_major_versions_are_unsupported() {
        for (line, version) in [
            ("GET / HTTP/2.0\r\n", "HTTP/2.0"),
            ("GET / HTTP/3.0\r\n", "HTTP/3.0"),
            ("GET / HTTP/0.9\r\n", "HTTP/0.9"),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2.0"),
            ("GET /\r\n", "HTTP/0.9"),
            ("GET /index.html\n", "HTTP/0.9"),
        ] {
            assert_eq!(
                of_request_line(line.as_bytes()),
                LineVersion::Unsupported(version.into()),
                "{line:?}"
            );
        }
        assert_eq!(
            of_status_line(b"HTTP/2.0 200 OK\r\n"),
            LineVersion::Unsupported("HTTP/2.0".into())
        );
    }

    #[test]
    fn what_is_not_a_version_stays_malformed() {
        for line in [
            "GET / HTTP/1.10\r\n",
            "GET / HTTP/10.0\r\n",
            "GET / HTTP/2\r\n",
            "GET / http/1.2\r\n",
            "GET / HTTP/1.x\r\n",
            "GET / HTTP/2.0 extra\r\n",
            "GET  / HTTP/2.0\r\n",
            "GET\r\n",
            "G@T /\r\n",
            "GET /\t\r\n",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.2",
            "",
        ] {
            assert_eq!(
                of_request_line(line.as_bytes()),
                LineVersion::Other,
                "{line:?}"
            );
        }
        assert_eq!(of_status_line(b"HTTP/1.1 200 OK\r\n"), LineVersion::Other);
        assert_eq!(of_status_line(b"200 OK\r\n"), LineVersion::Other);
    }
}
