//! The heads each side sees: the request head the backend gets (hop-by-hop fields removed, proxy
//! fields added) and the response head the client gets.

use std::io::Write as _;

use crate::backend::Backend;
use crate::http::{self, BodyLength, Headers, RequestHead, ResponseHead, Version};

use super::checks::split_absolute;

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

/// One try: the backend, and what it adds to the request.
pub(super) struct Attempt<'a> {
    pub(super) backend: &'a Backend,
    /// The `X-Lb-Decision` value; empty unless `--explain`.
    pub(super) decision: String,
    /// A new sticky session's cookie.
    pub(super) set_cookie: Option<String>,
}

impl<'r> OutgoingRequest<'r> {
    /// The request as one `attempt` sends it: `body` is the whole body's framing, `prefix` the
    /// part of it that came with the head and `rest` the framing of what is still to be read.
    pub(super) fn new(
        head: &'r RequestHead,
        body: BodyLength,
        (prefix, rest): (&'r [u8], BodyLength),
        request_id: Option<&'r str>,
        attempt: &'r Attempt,
    ) -> Self {
        OutgoingRequest {
            head,
            body,
            prefix,
            rest,
            request_id,
            reason: &attempt.decision,
            set_cookie: attempt.set_cookie.as_deref(),
            upgrade: is_upgrade(head),
        }
    }

    /// Whether sending the request a second time is harmless if the first try got no answer:
    /// an idempotent method (RFC 9110 §9.2.2) or no body at all.
    pub(super) fn can_resend(&self) -> bool {
        self.head.is_idempotent() || self.body == BodyLength::Empty
    }

    /// Whether a pooled connection may take the request. A body that will be streamed cannot
    /// be sent twice, so it never risks a pooled connection that may turn out closed; nor does
    /// a request to switch protocols.
    pub(super) fn may_reuse_a_connection(&self) -> bool {
        self.rest == BodyLength::Empty && !self.upgrade
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
    let absolute = split_absolute(head.target());
    write_request_line(out, head, absolute);
    copy_end_to_end_fields(out, head, absolute.is_some());
    push_forwarded_fields(out, head, client_ip, scheme);
    push_balancer_fields(out, request, absolute, backend_name);
    out.extend_from_slice(b"\r\n");
}

/// The fields the balancer writes itself beside X-Forwarded-*: Host when the client's is not
/// passed on, an X-Request-Id, the fields of a request to switch protocols, and the framing.
fn push_balancer_fields(
    out: &mut Vec<u8>,
    request: &OutgoingRequest,
    absolute: Option<(&str, &str)>,
    backend_name: &str,
) {
    push_host(out, request.head, absolute, backend_name);
    if let Some(id) = request.request_id {
        http::push_header(out, "X-Request-Id", id.as_bytes());
    }
    if request.upgrade {
        push_upgrade_fields(out, request.head);
    }
    push_framing(out, request.body);
}

/// The Host field, when the client's is not passed on as it is: an absolute-form target (sent
/// to a proxy) goes to the backend as a path, and its host replaces the Host field, as RFC 9112
/// §3.2.2 has an origin server do and as nginx does; an HTTP/1.0 request without one gets the
/// backend's name.
fn push_host(
    out: &mut Vec<u8>,
    head: &RequestHead,
    absolute: Option<(&str, &str)>,
    backend_name: &str,
) {
    if let Some((authority, _)) = absolute {
        http::push_header(out, "Host", authority.as_bytes());
    } else if head.header("host").is_none() {
        http::push_header(out, "Host", backend_name.as_bytes());
    }
}

/// The body's framing, stated once: the client's own Content-Length and Transfer-Encoding
/// fields are not passed on, so that the backend cannot read them differently.
fn push_framing(out: &mut Vec<u8>, body: BodyLength) {
    match body {
        BodyLength::Fixed(length) => {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "Content-Length: {length}\r\n");
        }
        BodyLength::Chunked => http::push_header(out, "Transfer-Encoding", b"chunked"),
        BodyLength::Empty | BodyLength::UntilClose => {}
    }
}

/// The request line, always HTTP/1.1 to the backend; an absolute-form target as its path.
fn write_request_line(out: &mut Vec<u8>, head: &RequestHead, absolute: Option<(&str, &str)>) {
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    match absolute {
        Some((_, path)) => push_path(out, path),
        None => out.extend_from_slice(head.target().as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// The path of an absolute-form target, which may be empty or start with `?`, as an
/// origin-form target: `/` first.
fn push_path(out: &mut Vec<u8>, path: &str) {
    if !path.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
}

/// Copies the client's end-to-end fields, leaving out the hop-by-hop ones and those the
/// balancer writes itself (`host_replaced`: the Host of an absolute-form target).
fn copy_end_to_end_fields(out: &mut Vec<u8>, head: &RequestHead, host_replaced: bool) {
    let hop_by_hop = http::HopByHop::of(head);
    for (name, value) in head.headers.pairs() {
        if !hop_by_hop.contains(name) && !is_rewritten(name, head, host_replaced) {
            http::push_field(out, name, value);
        }
    }
}

/// Whether the balancer writes the field `name` itself rather than copying the client's: the
/// X-Forwarded-* fields, the framing, the Host of an absolute-form target (`host_replaced`),
/// and an `Expect: 100-continue` the balancer answers. The client's own X-Forwarded-Proto is
/// replaced: only the balancer knows whether the request came over TLS, and a backend trusting
/// the field must not be told otherwise.
fn is_rewritten(name: &[u8], head: &RequestHead, host_replaced: bool) -> bool {
    name.eq_ignore_ascii_case(b"x-forwarded-for")
        || name.eq_ignore_ascii_case(b"x-forwarded-proto")
        || name.eq_ignore_ascii_case(b"content-length")
        || (name.eq_ignore_ascii_case(b"host") && host_replaced)
        || (name.eq_ignore_ascii_case(b"expect") && head.has_token("expect", "100-continue"))
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
