//! Who may change the balancer through the admin listener: the one place that decides it, for
//! every write (`POST /reload`, `POST /backends/...`).
//!
//! - Without `--admin-token` (or `LB_ADMIN_TOKEN`), writes come from this machine only: the
//!   peer must be a loopback address.
//! - With it, every write must carry `Authorization: Bearer TOKEN` (or, from the statistics
//!   page's forms, which cannot set that field, a `token` form field), from any address.
//! - Whatever the address and the token, a write that a web page in another origin sent is
//!   refused: a browser names that page in `Origin`, and a page of evil.example must not drain
//!   a backend behind the operator's back (cross-site request forgery). The admin listener's
//!   own origin is `http://` followed by the `Host` it was reached by, and without a token that
//!   host must be this listener's address or `localhost`: a name would let a page whose DNS
//!   name was pointed at 127.0.0.1 (DNS rebinding) pass for the listener's own.
//!
//! Reading stays open, as it was: the statistics are no secret to whoever can reach the port.

use std::net::SocketAddr;

use crate::http::{Headers, RequestHead};
use crate::settings::AdminToken;

/// A write's credentials and where it came from.
pub(super) struct Writer<'a> {
    /// The request's head.
    pub request: &'a RequestHead,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// The admin listener's own address.
    pub listener: SocketAddr,
    /// A `token` field of a form's body, if any.
    pub form_token: Option<&'a str>,
}

/// Whether this write may change the balancer, given the token in force; `Err` says why not,
/// for the 403's body.
pub(super) fn may_write(writer: &Writer, token: Option<&AdminToken>) -> Result<(), &'static str> {
    match token {
        Some(token) if !carries(writer, token) => {
            return Err("admin writes need the admin token: Authorization: Bearer TOKEN")
        }
        Some(_) => {}
        None if !writer.peer.is_some_and(|peer| peer.ip().is_loopback()) => {
            return Err("admin writes are taken from loopback clients only (or with --admin-token)")
        }
        None => {}
    }
    if is_foreign(writer, token.is_some()) {
        return Err("a foreign Origin may not write to the admin listener");
    }
    Ok(())
}

/// Whether the write carries `token`: as a bearer token, or in a form's `token` field.
fn carries(writer: &Writer, token: &AdminToken) -> bool {
    let bearer = writer
        .request
        .header("authorization")
        .and_then(|value| strip_prefix_ignoring_case(value, b"bearer "));
    bearer.is_some_and(|given| token.matches(given.trim_ascii()))
        || writer
            .form_token
            .is_some_and(|given| token.matches(given.as_bytes()))
}

fn strip_prefix_ignoring_case<'v>(value: &'v [u8], prefix: &[u8]) -> Option<&'v [u8]> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Whether a browser says another origin's page sent this request. No `Origin` is a client
/// that is not a browser's page (curl, `loadbalancer ctl`), or a browser's same-origin GET.
fn is_foreign(writer: &Writer, token_in_force: bool) -> bool {
    let text = |name| {
        writer
            .request
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let Some(origin) = text("origin") else {
        return false;
    };
    let Some(host) = text("host") else {
        return true;
    };
    let same = origin == format!("http://{host}") || origin == format!("https://{host}");
    !(same && (token_in_force || names_listener(host, writer.listener)))
}

/// Whether `host` (a `Host` field) names the listener at `listener` without a DNS name: its
/// address (any address, when it listens on all of them), or `localhost`, with its port.
fn names_listener(host: &str, listener: SocketAddr) -> bool {
    let Some((name, port)) = host.rsplit_once(':') else {
        return false;
    };
    if port.parse() != Ok(listener.port()) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name.eq_ignore_ascii_case("localhost") {
        return listener.ip().is_loopback() || listener.ip().is_unspecified();
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip == listener.ip() || listener.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::tests::head_of;

    const LISTENER: &str = "127.0.0.1:8404";

    fn check(request: &str, peer: &str, token: Option<&str>, form: Option<&str>) -> bool {
        let head = head_of(request);
        let writer = Writer {
            request: &head,
            peer: peer.parse().ok(),
            listener: LISTENER.parse().unwrap(),
            form_token: form,
        };
        let token = token.map(|t| AdminToken::new(t).unwrap());
        may_write(&writer, token.as_ref()).is_ok()
    }

    const PLAIN: &str = "POST /reload HTTP/1.1\r\nHost: 127.0.0.1:8404\r\n\r\n";

    #[test]
    fn without_a_token_writes_come_from_loopback() {
        assert!(check(PLAIN, "127.0.0.1:50000", None, None));
        assert!(check(PLAIN, "[::1]:50000", None, None));
        assert!(!check(PLAIN, "192.0.2.7:50000", None, None));
        assert!(!check(PLAIN, "", None, None));
    }

    #[test]
    fn with_a_token_every_write_carries_it_from_any_address() {
        let bearer = |value: &str| {
            format!("POST /reload HTTP/1.1\r\nHost: lb:8404\r\nAuthorization: {value}\r\n\r\n")
        };
        let remote = "192.0.2.7:50000";
        assert!(check(
            &bearer("Bearer s3cret"),
            remote,
            Some("s3cret"),
            None
        ));
        assert!(check(
            &bearer("bearer s3cret"),
            remote,
            Some("s3cret"),
            None
        ));
        assert!(!check(
            &bearer("Bearer s3cre"),
            remote,
            Some("s3cret"),
            None
        ));
        assert!(!check(
            &bearer("Bearer s3cretX"),
            remote,
            Some("s3cret"),
            None
        ));
        assert!(!check(
            &bearer("Basic s3cret"),
            remote,
            Some("s3cret"),
            None
        ));
        assert!(!check(PLAIN, "127.0.0.1:50000", Some("s3cret"), None));
        assert!(check(PLAIN, remote, Some("s3cret"), Some("s3cret")));
        assert!(!check(PLAIN, remote, Some("s3cret"), Some("wrong")));
        assert!(AdminToken::new("").is_err());
        assert_eq!(
            format!("{:?}", AdminToken::new("s3cret").unwrap()),
            "AdminToken(hidden)"
        );
    }

    #[test]
    fn a_foreign_origin_is_refused_whatever_the_address_and_token() {
        let with = |host: &str, origin: &str| {
            format!("POST /reload HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n\r\n")
        };
        let local = "127.0.0.1:50000";
        assert!(check(
            &with(LISTENER, "http://127.0.0.1:8404"),
            local,
            None,
            None
        ));
        assert!(check(
            &with("localhost:8404", "http://localhost:8404"),
            local,
            None,
            None
        ));
        assert!(!check(
            &with(LISTENER, "http://evil.example"),
            local,
            None,
            None
        ));
        assert!(!check(&with(LISTENER, "null"), local, None, None));
        assert!(!check(
            &with(LISTENER, "http://evil.example"),
            local,
            Some("t"),
            Some("t")
        ));
        // DNS rebinding: the page's own name, pointed at 127.0.0.1.
        let rebound = with("evil.example:8404", "http://evil.example:8404");
        assert!(!check(&rebound, local, None, None));
        assert!(!check(
            &with("127.0.0.1:9999", "http://127.0.0.1:9999"),
            local,
            None,
            None
        ));
        // With a token, the operator's own name for the balancer is its origin.
        let named = "POST /reload HTTP/1.1\r\nHost: lb.internal:8404\r\n\
                     Origin: http://lb.internal:8404\r\nAuthorization: Bearer t\r\n\r\n";
        assert!(check(named, "192.0.2.7:50000", Some("t"), None));
    }
}
