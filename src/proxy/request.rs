//! Checking a request, and writing the heads each side sees: the request head the backend gets
//! (hop-by-hop fields removed, proxy fields added) and the response head the client gets.

use std::io::Write as _;

use crate::error::ProxyError;
use crate::http::{self, BodyLength, Headers, RequestHead, ResponseHead, Version};

/// What is needed to send one request to a backend.
pub(super) struct OutgoingRequest<'r> {
    pub(super) head: &'r RequestHead,
    /// How the whole body is framed.
    pub(super) body: BodyLength,
    /// The start of the body, which arrived with the head.
    pub(super) prefix: &'r [u8],
    /// How the rest of the body, still to be read from the client, is framed.
    pub(super) rest: BodyLength,
    pub(super) request_id: Option<&'r str>,
    /// The `X-Lb-Decision` value; empty unless `--explain`.
    pub(super) reason: &'r str,
    /// The balancer's `Set-Cookie` value, for a new sticky session.
    pub(super) set_cookie: Option<&'r str>,
    /// Whether the client asks to switch protocols (see [`is_upgrade`]).
    pub(super) upgrade: bool,
}

impl OutgoingRequest<'_> {
    /// Whether sending the request a second time is harmless if the first try got no answer:
    /// an idempotent method (RFC 9110 §9.2.2) or no body at all.
    pub(super) fn can_resend(&self) -> bool {
        self.head.is_idempotent() || self.body == BodyLength::Empty
    }

    /// Whether the request may go on to another backend after one broke the exchange before
    /// any byte of the answer reached the client, as nginx and Envoy do: the method is
    /// idempotent (RFC 9110 §9.2.2: sending it twice has the effect of sending it once), and
    /// the whole body is still held (a body streamed through is gone). A POST is never sent
    /// twice, since the first backend may have acted on it. Nor is a request that timed out
    /// (504): its backend may still be working on it, and a slow request would otherwise
    /// load every backend in turn.
    ///
    /// A request to switch protocols is not sent twice either: once a backend has it, it may
    /// have switched, and only a backend that could not be reached hands it on.
    pub(super) fn may_go_elsewhere(&self) -> bool {
        self.head.is_idempotent() && self.rest == BodyLength::Empty && !self.upgrade
    }
}

/// Whether `head` asks to switch protocols (a WebSocket handshake, `h2c`, ...): an `Upgrade`
/// field that `Connection` names, as RFC 9110 §7.8 requires. Both are hop-by-hop fields, so
/// without this they would be removed and the backend would never see the request to switch.
/// An `Upgrade` that `Connection` does not name is dropped like any hop-by-hop field, and
/// HTTP/1.0 has no upgrades.
pub(super) fn is_upgrade(head: &RequestHead) -> bool {
    head.version == Version::Http11
        && head.header("upgrade").is_some()
        && head.has_token("connection", "upgrade")
}

/// Writes `Connection: upgrade` and the `Upgrade` fields of `head` as sent, for a request or a
/// `101` response that switches protocols.
pub(super) fn push_upgrade_fields(out: &mut Vec<u8>, head: &impl Headers) {
    http::push_header(out, "Connection", b"upgrade");
    for value in head.fields().values("upgrade") {
        http::push_header(out, "Upgrade", value);
    }
}

/// Refuses requests a balancer must not forward, and says how the body is framed.
pub(super) fn check_request(head: &RequestHead) -> Result<BodyLength, ProxyError> {
    if head.method() == "CONNECT" {
        return Err(ProxyError::NotImplemented(head.method().to_string()));
    }
    check_target_and_host(head).map_err(|why| ProxyError::BadRequest(why.into()))?;
    http::request_body_length(head).map_err(ProxyError::BadRequest)
}

/// RFC 9112 §3.2 and §3.2.2: the target is a path, an absolute URI (as sent to a proxy) or `*`
/// for `OPTIONS`; an HTTP/1.1 request has exactly one `Host` field, and a valid one. A second
/// `Host`, or one the backend would read differently from the balancer, is how requests are
/// sent to a site they were not meant for; nginx answers 400 to both.
fn check_target_and_host(head: &RequestHead) -> Result<(), &'static str> {
    let target = head.target();
    let origin_or_asterisk =
        target.starts_with('/') || (target == "*" && head.method() == "OPTIONS");
    if !origin_or_asterisk {
        let (authority, _) =
            split_absolute(target).ok_or("the request target is not a path or an absolute URI")?;
        if !is_valid_host(authority.as_bytes()) {
            return Err("invalid host in the request target");
        }
    }
    let mut hosts = head.headers.values("host");
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err("more than one Host header"),
        (None, _) if head.version == Version::Http11 => Err("missing Host header"),
        (Some(host), _) if !is_valid_host(host) => Err("invalid Host header"),
        _ => Ok(()),
    }
}

/// Whether `host` is a host name or address with an optional port (RFC 3986 `host [":" port]`):
/// no spaces, slashes, `@` or other bytes that would make it mean something else.
fn is_valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

/// The authority and the path of an absolute-form target (`http://host:port/path?query`); the
/// path may be empty or start with `?`. `None` for any other target: for the usual path, at
/// once, since every request is written through here.
fn split_absolute(target: &str) -> Option<(&str, &str)> {
    if target.starts_with('/') {
        return None;
    }
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    Some(rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len())))
}

/// Writes the request line and headers for the backend: hop-by-hop fields removed, the client
/// added to X-Forwarded-For, X-Forwarded-Proto saying whether it came over HTTPS (`scheme`), an
/// X-Request-Id added when missing, and the framing stated once.
pub(super) fn write_request_head(
    out: &mut Vec<u8>,
    request: &OutgoingRequest,
    client_ip: &str,
    scheme: &str,
    backend_name: &str,
) {
    let head = request.head;
    // An absolute-form target (sent to a proxy) goes to the backend as a path, and its host
    // replaces the Host field, as RFC 9112 §3.2.2 has an origin server do and as nginx does.
    let absolute = split_absolute(head.target());
    write_request_line(out, head, absolute);
    copy_end_to_end_fields(out, head, absolute.is_some());
    if let Some((authority, _)) = absolute {
        http::push_header(out, "Host", authority.as_bytes());
    } else if head.header("host").is_none() {
        http::push_header(out, "Host", backend_name.as_bytes());
    }
    push_forwarded_fields(out, head, client_ip, scheme);
    if let Some(id) = request.request_id {
        http::push_header(out, "X-Request-Id", id.as_bytes());
    }
    if request.upgrade {
        push_upgrade_fields(out, head);
    }
    match request.body {
        BodyLength::Fixed(length) => {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "Content-Length: {length}\r\n");
        }
        BodyLength::Chunked => http::push_header(out, "Transfer-Encoding", b"chunked"),
        BodyLength::Empty | BodyLength::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// The request line, always HTTP/1.1 to the backend; an absolute-form target as its path.
fn write_request_line(out: &mut Vec<u8>, head: &RequestHead, absolute: Option<(&str, &str)>) {
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    match absolute {
        Some((_, path)) => {
            if !path.starts_with('/') {
                out.push(b'/');
            }
            out.extend_from_slice(path.as_bytes());
        }
        None => out.extend_from_slice(head.target().as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Copies the client's end-to-end fields, leaving out the hop-by-hop ones and those the
/// balancer writes itself (`host_replaced`: the Host of an absolute-form target).
fn copy_end_to_end_fields(out: &mut Vec<u8>, head: &RequestHead, host_replaced: bool) {
    let hop_by_hop = http::HopByHop::of(head);
    for (name, value) in head.headers.pairs() {
        // The client's own X-Forwarded-Proto is replaced: only the balancer knows whether the
        // request came over TLS, and a backend trusting the field must not be told otherwise.
        let rewritten = name.eq_ignore_ascii_case(b"x-forwarded-for")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(b"content-length")
            || (name.eq_ignore_ascii_case(b"host") && host_replaced)
            || (name.eq_ignore_ascii_case(b"expect") && head.has_token("expect", "100-continue"));
        if !rewritten && !hop_by_hop.contains(name) {
            http::push_field(out, name, value);
        }
    }
}

/// X-Forwarded-For, which lists every hop so far (the values the client sent, then the
/// client), and X-Forwarded-Proto.
fn push_forwarded_fields(out: &mut Vec<u8>, head: &RequestHead, client_ip: &str, scheme: &str) {
    out.extend_from_slice(b"X-Forwarded-For: ");
    for value in head.headers.values("x-forwarded-for") {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    http::push_header(out, "X-Forwarded-Proto", scheme.as_bytes());
}

/// Writes a status line and the end-to-end headers of a response (without the blank line, so
/// the caller can add its own fields). Framing headers that the relay replaces are left out.
pub(super) fn write_response_head(out: &mut Vec<u8>, head: &ResponseHead) {
    // The parser accepts only three-digit status codes, so the digits are written directly.
    let digits = [100, 10, 1].map(|unit| b'0' + (head.status / unit % 10) as u8);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(head.reason().as_bytes());
    out.extend_from_slice(b"\r\n");
    let framed_by_length = head.header("transfer-encoding").is_none();
    let hop_by_hop = http::HopByHop::of(head);
    for (name, value) in head.headers.pairs() {
        let stale_length = name.eq_ignore_ascii_case(b"content-length") && !framed_by_length;
        if !hop_by_hop.contains(name) && !stale_length {
            http::push_field(out, name, value);
        }
    }
}
