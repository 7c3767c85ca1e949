//! The errors a request can end in, each knowing the HTTP status the client is told.
//!
//! The course's Python answered every failure with a bare 502. Here each cause keeps its own
//! status, so a client (and a learner reading `curl -i`) can tell a bad request from a dead
//! backend from a slow one.

use std::fmt;
use std::time::Duration;

/// Why the balancer answered a request itself instead of relaying a backend's response.
#[derive(Debug)]
pub enum ProxyError {
    /// The request is not valid HTTP/1.1, or its framing is ambiguous: `400`.
    BadRequest(String),
    /// The request head did not arrive within `--client-timeout`: `408`.
    RequestTimeout,
    /// The request head is over 64 KiB or has too many fields: `431`.
    HeadTooLarge,
    /// The request line alone is over 64 KiB (its target is): `414`.
    UriTooLong,
    /// The method is one a load balancer does not relay (CONNECT): `501`.
    NotImplemented(String),
    /// The request is for a major version of HTTP other than 1 (`HTTP/2.0`, the HTTP/2
    /// preface, an HTTP/0.9 line), named here: `505` (RFC 9110 §15.6.6).
    VersionNotSupported(String),
    /// The exchange with a backend failed after the request went out: `502`.
    BadGateway(String),
    /// No backend could take the request; the client may retry after the given time: `503`.
    NoBackend {
        /// Time until the earliest backend could be back.
        retry_after: Duration,
    },
    /// The balancer had no file descriptor left for a backend connection, even after waiting
    /// for one: `503`, to try again in a second.
    OutOfDescriptors,
    /// The backend was at its connection limit (`--backend-max-conns`) and the request's wait
    /// in its queue ran out (`--queue-timeout`): `503`, to try again after as long.
    QueueTimeout {
        /// The backend's limit.
        max_conns: u32,
        /// How long the request waited.
        waited: Duration,
    },
    /// The backend did not answer within `--backend-timeout`: `504`.
    GatewayTimeout,
}

impl ProxyError {
    /// The status code and reason phrase sent to the client.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            ProxyError::BadRequest(_) => (400, "Bad Request"),
            ProxyError::RequestTimeout => (408, "Request Timeout"),
            ProxyError::HeadTooLarge => (431, "Request Header Fields Too Large"),
            ProxyError::UriTooLong => (414, "URI Too Long"),
            ProxyError::NotImplemented(_) => (501, "Not Implemented"),
            ProxyError::BadGateway(_) => (502, "Bad Gateway"),
            ProxyError::NoBackend { .. }
            | ProxyError::OutOfDescriptors
            | ProxyError::QueueTimeout { .. } => (503, "Service Unavailable"),
            ProxyError::GatewayTimeout => (504, "Gateway Timeout"),
            ProxyError::VersionNotSupported(_) => (505, "HTTP Version Not Supported"),
        }
    }

    /// When a client may try again, for the answers that say so (503).
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::NoBackend { retry_after } => Some(*retry_after),
            ProxyError::OutOfDescriptors => Some(Duration::from_secs(1)),
            // A backend that kept a queue full this long is unlikely to have room sooner.
            ProxyError::QueueTimeout { waited, .. } => Some(*waited),
            _ => None,
        }
    }

    /// The complete response: a status line, framing headers and a one-line plain-text body.
    /// It always closes the connection when the request's body may still be unread.
    pub fn to_response(&self, close: bool) -> Vec<u8> {
        let (code, reason) = self.status();
        let body = format!("{code} {reason}: {self}\n");
        let mut out = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(retry_after) = self.retry_after() {
            // Retry-After is whole seconds (RFC 9110 §10.2.3); round up so clients never come back early.
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            out.push_str(&format!("Retry-After: {}\r\n", seconds.max(1)));
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::BadRequest(why) => write!(f, "malformed request: {why}"),
            ProxyError::RequestTimeout => write!(f, "the request head did not arrive in time"),
            ProxyError::HeadTooLarge => write!(f, "the request head is too large"),
            ProxyError::UriTooLong => write!(f, "the request target is too long"),
            ProxyError::NotImplemented(method) => write!(f, "method {method} is not supported"),
            ProxyError::BadGateway(why) => write!(f, "the backend failed: {why}"),
            ProxyError::NoBackend { .. } => write!(f, "no backend is available"),
            ProxyError::OutOfDescriptors => {
                write!(
                    f,
                    "the balancer is out of file descriptors; try again shortly"
                )
            }
            ProxyError::QueueTimeout { max_conns, waited } => write!(
                f,
                "the backend is at its limit of {max_conns} connections and the wait in its \
                 queue ran out after {waited:?}"
            ),
            ProxyError::GatewayTimeout => write!(f, "the backend did not answer in time"),
            ProxyError::VersionNotSupported(version) => {
                write!(f, "{version} is not supported; this server speaks HTTP/1.1")
            }
        }
    }
}

/// A reason the balancer could not start, such as a port already in use. It reaches `main`,
/// which prints it and exits with code 2.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_says_when_to_retry() {
        let err = ProxyError::NoBackend {
            retry_after: Duration::from_millis(2500),
        };
        let text = String::from_utf8(err.to_response(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 3\r\n"));
        assert!(!text.contains("Connection: close"));
    }

    #[test]
    fn out_of_descriptors_is_a_503_to_retry_in_a_second() {
        let text = String::from_utf8(ProxyError::OutOfDescriptors.to_response(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 1\r\n"));
        assert!(text.contains("file descriptors"));
    }

    #[test]
    fn a_queue_that_ran_out_is_a_503_that_says_so() {
        let err = ProxyError::QueueTimeout {
            max_conns: 2,
            waited: Duration::from_millis(300),
        };
        let text = String::from_utf8(err.to_response(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 1\r\n"));
        assert!(text.contains("at its limit of 2 connections"), "{text}");
        assert!(text.contains("ran out after 300ms"), "{text}");
    }

    #[test]
    fn an_unsupported_version_is_a_505_that_names_it() {
        let err = ProxyError::VersionNotSupported("HTTP/2.0".into());
        let text = String::from_utf8(err.to_response(true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n505 HTTP Version Not Supported: HTTP/2.0 is not supported; this server speaks HTTP/1.1\n"));
    }

    #[test]
    fn the_body_length_matches_the_body() {
        let text = String::from_utf8(ProxyError::HeadTooLarge.to_response(true)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: close"));
    }
}
