//! What a balancer refuses to forward, checked before a backend is chosen: `CONNECT`, a target
//! or `Host` that could send the request to a site it was not meant for, and a body whose framing
//! two readers could see differently (request smuggling). A first reading can skip it: a plain
//! `GET /` passes every check.

use crate::error::ProxyError;
use crate::http::{self, BodyLength, RequestHead, Version};

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
pub(super) fn split_absolute(target: &str) -> Option<(&str, &str)> {
    if target.starts_with('/') {
        return None;
    }
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    Some(rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len())))
}
