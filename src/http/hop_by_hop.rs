//! Hop-by-hop header fields: those that describe one connection rather than the message, which
//! a proxy removes before passing a message on (RFC 9110 §7.6.1). The request and response heads
//! each side sees are written without them (`proxy/request.rs`).

use super::head::{HeaderFields, Headers};

/// Header fields that describe one connection rather than the message, which a proxy must not
/// forward (RFC 9110 §7.6.1): `Connection` itself and every field it names, plus the classic
/// hop-by-hop set that Go's `httputil.ReverseProxy` also removes. `Transfer-Encoding` is on the
/// list because the proxy writes its own framing for the next hop.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The hop-by-hop fields of one head: the fixed list, plus whatever its `Connection` fields name.
pub struct HopByHop<'a> {
    headers: &'a HeaderFields,
    /// Whether `Connection` names anything besides `close` and `keep-alive`. Usually it does
    /// not, and then no field needs checking against it.
    names_fields: bool,
}

impl<'a> HopByHop<'a> {
    /// Reads the `Connection` fields of `head` once, for the checks of all its fields.
    pub fn of(head: &'a impl Headers) -> Self {
        let headers = head.fields();
        let names_fields = headers
            .values("connection")
            .flat_map(|value| value.split(|&b| b == b','))
            .map(|token| token.trim_ascii())
            .any(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"));
        HopByHop {
            headers,
            names_fields,
        }
    }

    /// Whether the field `name` must not be forwarded. `Host` is forwarded whatever
    /// `Connection` says: the backend needs it to know which site is asked for.
    pub fn contains(&self, name: &[u8]) -> bool {
        HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
            || (self.names_fields && !name.eq_ignore_ascii_case(b"host") && self.names(name))
    }

    /// Whether a `Connection` field lists `name`.
    fn names(&self, name: &[u8]) -> bool {
        self.headers
            .values("connection")
            .flat_map(|value| value.split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_support::request;

    #[test]
    fn hop_by_hop_includes_fields_named_by_connection() {
        let head = request("GET / HTTP/1.1\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n");
        let hop_by_hop = HopByHop::of(&head);
        assert!(hop_by_hop.contains(b"Keep-Alive"));
        assert!(hop_by_hop.contains(b"x-secret"));
        assert!(hop_by_hop.contains(b"Transfer-Encoding"));
        assert!(!hop_by_hop.contains(b"Host"));
        let plain = request("GET / HTTP/1.1\r\nConnection: keep-alive\r\nX-Secret: 1\r\n\r\n");
        assert!(!HopByHop::of(&plain).contains(b"x-secret"));
    }
}
