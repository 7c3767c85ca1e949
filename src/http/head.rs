//! Heads: the request and response heads, their header fields, and the one reader of both
//! (`read_head`): the two differ only in their first line, so a [`HeadKind`] says how to parse
//! each, and what to check of its first line before the rest arrives.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use super::buffer::{BufferedStream, Transport};
use super::version::{self, Version};
use super::{is_timeout, MAX_HEAD, MAX_HEADERS};

/// Where a piece of a head lies in its bytes.
type Span = std::ops::Range<usize>;

/// The header fields of a head, kept as they arrived: one copy of the head's bytes and where
/// each name and value lies in it. A head then costs two allocations however many fields it
/// has, which matters on a path that runs for every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderFields {
    bytes: Vec<u8>,
    spans: Vec<(Span, Span)>,
}

impl HeaderFields {
    /// Fields built from name and value pairs (for tests and hand-made heads).
    pub fn from_pairs(pairs: &[(&str, &[u8])]) -> Self {
        let mut fields = HeaderFields::default();
        for (name, value) in pairs {
            let name_at = fields.push_bytes(name.as_bytes());
            let value_at = fields.push_bytes(value);
            fields.spans.push((name_at, value_at));
        }
        fields
    }

    fn with_bytes(mut self, bytes: &[u8]) -> Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> Span {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// The text at `span` (names, methods and targets are ASCII, checked by the parser).
    fn text(&self, span: &Span) -> &str {
        std::str::from_utf8(&self.bytes[span.clone()]).unwrap_or_default()
    }

    /// The fields in order, as name and value bytes.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans
            .iter()
            .map(|(name, value)| (&self.bytes[name.clone()], &self.bytes[value.clone()]))
    }

    /// The values of the fields called `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.spans
            .iter()
            .filter(move |(n, _)| self.bytes[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| &self.bytes[value.clone()])
    }

    /// The value of the first field called `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.spans
            .iter()
            .find(|(n, _)| self.bytes[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| &self.bytes[value.clone()])
    }

    /// Whether any field called `name` lists `token` among its comma-separated values.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|value| value.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// A parsed request line and its header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    method: Span,
    target: Span,
    /// The protocol version.
    pub version: Version,
    /// The header fields in order.
    pub headers: HeaderFields,
}

/// A parsed status line and its header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code, e.g. 200.
    pub status: u16,
    reason: Span,
    /// The protocol version.
    pub version: Version,
    /// The header fields in order.
    pub headers: HeaderFields,
}

/// The questions asked of a head's header fields, for requests and responses alike.
pub trait Headers {
    /// The header fields in order.
    fn fields(&self) -> &HeaderFields;

    /// The value of the first field called `name` (compared case-insensitively).
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields().get(name)
    }

    /// Whether any field called `name` lists `token` among its comma-separated values.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.fields().has_token(name, token)
    }
}

impl Headers for RequestHead {
    fn fields(&self) -> &HeaderFields {
        &self.headers
    }
}

impl Headers for ResponseHead {
    fn fields(&self) -> &HeaderFields {
        &self.headers
    }
}

impl ResponseHead {
    /// The reason phrase, e.g. `OK` (may be empty).
    pub fn reason(&self) -> &str {
        self.headers.text(&self.reason)
    }
}

impl RequestHead {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.headers.text(&self.method)
    }

    /// The request target, e.g. `/index.html?x=1`.
    pub fn target(&self) -> &str {
        self.headers.text(&self.target)
    }

    /// Whether the client asks to keep the connection open after this exchange
    /// (RFC 9112 §9.3: the default for HTTP/1.1, opt-in for HTTP/1.0).
    pub fn wants_keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.has_token("connection", "close"),
            Version::Http10 => self.has_token("connection", "keep-alive"),
        }
    }

    /// Whether the method is idempotent (RFC 9110 §9.2.2), so sending it twice is harmless.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }
}

/// Appends `Name: value\r\n` to a head being built.
pub fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    push_field(out, name.as_bytes(), value);
}

/// Appends a field given as bytes, as it came from a parsed head.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Why a head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed the connection in the middle of a head.
    Truncated,
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    TooLarge,
    /// The first line alone (a request line with a very long target) is larger than
    /// [`MAX_HEAD`]: `414` for a request, as from nginx.
    LineTooLong,
    /// The bytes are not an HTTP/1.x head.
    Malformed(String),
    /// The head is for a version of HTTP other than HTTP/1 (`HTTP/2.0`, the HTTP/2 connection
    /// preface, an HTTP/0.9 line with no version), named here: `505` for a request.
    UnsupportedVersion(String),
    /// The head did not arrive in time.
    TimedOut,
    /// The socket failed.
    Io(io::Error),
}

impl From<io::Error> for HeadError {
    fn from(err: io::Error) -> Self {
        if is_timeout(&err) {
            HeadError::TimedOut
        } else {
            HeadError::Io(err)
        }
    }
}

/// Reads one request head. Returns `Ok(None)` when the client closed the connection cleanly
/// before sending anything, which is how keep-alive connections normally end.
///
/// When `timeout` passes before the head is complete, the read fails with `TimedOut`: that is
/// what stops a client that trickles its head a byte at a time from holding a thread forever.
pub fn read_request_head<S: Transport>(
    stream: &mut BufferedStream<S>,
    timeout: Duration,
) -> Result<Option<RequestHead>, HeadError> {
    read_request_head_until(stream, Instant::now() + timeout, timeout, MAX_HEAD)
}

/// Like [`read_request_head`], for an admin page's request, which needs less room than
/// [`MAX_HEAD`]: a head longer than `max_head` bytes is [`HeadError::TooLarge`].
pub fn read_request_head_within<S: Transport>(
    stream: &mut BufferedStream<S>,
    timeout: Duration,
    max_head: usize,
) -> Result<Option<RequestHead>, HeadError> {
    read_request_head_until(stream, Instant::now() + timeout, timeout, max_head)
}

/// Reads one request head of at most `max_head` bytes, complete by `deadline`: while it is
/// incomplete, the socket waits only for what is left, then gets back its usual `timeout`.
pub fn read_request_head_until<S: Transport>(
    stream: &mut BufferedStream<S>,
    deadline: Instant,
    timeout: Duration,
    max_head: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let mut shortened = false;
    let mut before_read = |stream: &mut BufferedStream<S>, partial: bool| {
        if partial {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HeadError::TimedOut);
            }
            stream.socket().set_read_timeout(Some(left))?;
            shortened = true;
        }
        Ok(())
    };
    let result = read_head(stream, &mut before_read, REQUEST, max_head);
    if shortened {
        stream.socket().set_read_timeout(Some(timeout))?;
    }
    result
}

/// Reads one response head; socket timeouts bound the wait.
pub fn read_response_head<S: Read>(
    stream: &mut BufferedStream<S>,
) -> Result<Option<ResponseHead>, HeadError> {
    read_head(stream, |_, _| Ok(()), RESPONSE, MAX_HEAD)
}

/// What parsing a head gives: the head and its length, or `None` while incomplete.
pub(super) type Parsed<T> = Result<Option<(usize, T)>, HeadError>;

/// A head parser.
type ParseHead<T> = fn(&[u8]) -> Parsed<T>;

/// How one kind of head is read.
pub(super) struct HeadKind<T> {
    /// Parses a complete head.
    parse: ParseHead<T>,
    /// Looks at the first line as soon as it is complete, before the rest of the head arrives.
    check_first_line: fn(&[u8]) -> Result<(), HeadError>,
}

pub(super) const REQUEST: HeadKind<RequestHead> = HeadKind {
    parse: parse_request_head,
    check_first_line: check_request_line,
};

pub(super) const RESPONSE: HeadKind<ResponseHead> = HeadKind {
    parse: parse_response_head,
    check_first_line: |_| Ok(()),
};

/// The one loop of both head readers: parse what is buffered once a head's blank line came (a
/// head sent a byte at a time is not parsed at every byte), else read more. `before_read` runs
/// before each read, told whether part of a head is buffered.
pub(super) fn read_head<S: Read, T>(
    stream: &mut BufferedStream<S>,
    mut before_read: impl FnMut(&mut BufferedStream<S>, bool) -> Result<(), HeadError>,
    kind: HeadKind<T>,
    max_head: usize,
) -> Result<Option<T>, HeadError> {
    let mut scanned = 0;
    let mut line_checked = false;
    loop {
        let buffered = stream.buffered();
        if let Some(end) = find_head_end(buffered, scanned) {
            let parsed = (kind.parse)(&buffered[..end])?;
            let (len, head) =
                parsed.ok_or_else(|| HeadError::Malformed("incomplete head".into()))?;
            stream.consume(len);
            return Ok(Some(head));
        }
        line_checked = line_checked || check_first_line(&kind, buffered, scanned)?;
        scanned = buffered.len();
        if scanned >= max_head {
            return Err(too_large(line_checked));
        }
        before_read(stream, scanned > 0)?;
        if stream.fill(max_head + 4)? == 0 {
            return match scanned {
                0 => Ok(None),
                _ => Err(HeadError::Truncated),
            };
        }
    }
}

/// Whether the first line is complete (then it was checked), looking only once a line feed
/// came after `scanned`. The first line alone can end the exchange: an HTTP/0.9 client sends
/// no blank line, and an HTTP/2 client deserves its 505 without waiting for a timeout.
fn check_first_line<T>(
    kind: &HeadKind<T>,
    buffered: &[u8],
    scanned: usize,
) -> Result<bool, HeadError> {
    if !buffered[scanned..].contains(&b'\n') || !version::first_line_is_complete(buffered) {
        return Ok(false);
    }
    (kind.check_first_line)(buffered)?;
    Ok(true)
}

/// A head over the limit: `TooLarge` (431 for a request), or `LineTooLong` (414) when its
/// first line alone did not fit.
fn too_large(line_checked: bool) -> HeadError {
    if line_checked {
        HeadError::TooLarge
    } else {
        HeadError::LineTooLong
    }
}

/// Finds the end of a head (just past its blank line), searching from about `from`.
/// Bare LF line endings are accepted as RFC 9112 §2.2 allows.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from.saturating_sub(3)..buf.len()).find_map(|i| match buf[i..] {
        [b'\n', b'\n', ..] => Some(i + 2),
        [b'\n', b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

/// Refuses a request line whose version is not HTTP/1 as soon as the line is complete.
fn check_request_line(buffered: &[u8]) -> Result<(), HeadError> {
    match version::of_request_line(buffered) {
        version::LineVersion::Unsupported(v) => Err(HeadError::UnsupportedVersion(v)),
        _ => Ok(()),
    }
}

/// Parses a request head; a later HTTP/1 minor version is read as HTTP/1.1 (RFC 9112 §2.3).
pub(super) fn parse_request_head(bytes: &[u8]) -> Parsed<RequestHead> {
    parse_head(bytes, parse_request_into, version::of_request_line)
}

/// Parses a response head; a later HTTP/1 minor version is read as HTTP/1.1 (RFC 9112 §2.3).
pub(super) fn parse_response_head(bytes: &[u8]) -> Parsed<ResponseHead> {
    parse_head(bytes, parse_response_into, version::of_status_line)
}

/// Parses one kind of head into room for its fields: the head and its length, or `None` while
/// incomplete. `parse_request_into` and `parse_response_into` are the two kinds.
type ParseInto<T> = for<'b> fn(&'b [u8], &mut [httparse::Header<'b>]) -> Parsed<T>;

/// The parsing both kinds of head share: as they are, else, when `httparse` refused the version
/// on the first line (`line_version` finds it), as HTTP/1.1 or refused with that version.
fn parse_head<T>(
    bytes: &[u8],
    parse_into: ParseInto<T>,
    line_version: fn(&[u8]) -> version::LineVersion,
) -> Parsed<T> {
    match parse_as_is(bytes, parse_into) {
        Err(HeadError::Malformed(why)) => match line_version(bytes) {
            version::LineVersion::LaterMinor { at } => {
                parse_as_is(&version::as_http11(bytes, at), parse_into)
            }
            version::LineVersion::Unsupported(v) => Err(HeadError::UnsupportedVersion(v)),
            version::LineVersion::Other => Err(HeadError::Malformed(why)),
        },
        other => other,
    }
}

/// Room for this many fields is made on a client thread's stack first, and for [`MAX_HEADERS`]
/// only when a head has more. Room for 100 takes 3.2 KB of stack, and with it every idle
/// client's thread had touched one more 4 KiB page.
const USUAL_HEADERS: usize = 32;

/// Parses with room for [`USUAL_HEADERS`] fields, and again with more when the head has more.
fn parse_as_is<T>(bytes: &[u8], parse_into: ParseInto<T>) -> Parsed<T> {
    let mut fields = [httparse::EMPTY_HEADER; USUAL_HEADERS];
    match parse_into(bytes, &mut fields) {
        Err(HeadError::TooLarge) => parse_with_room(bytes, parse_into),
        parsed => parsed,
    }
}

#[cold]
#[inline(never)]
fn parse_with_room<T>(bytes: &[u8], parse_into: ParseInto<T>) -> Parsed<T> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    parse_into(bytes, &mut fields)
}

/// Parses a request head with `httparse` into room for its `fields`.
fn parse_request_into<'b>(
    bytes: &'b [u8],
    fields: &mut [httparse::Header<'b>],
) -> Parsed<RequestHead> {
    let mut req = httparse::Request::new(fields);
    let httparse::Status::Complete(len) = req.parse(bytes).map_err(parse_error)? else {
        return Ok(None);
    };
    let mut headers = fields_of(&bytes[..len], req.headers);
    let method = headers.push_bytes(req.method.unwrap_or_default().as_bytes());
    let target = headers.push_bytes(req.path.unwrap_or_default().as_bytes());
    let head = RequestHead {
        method,
        target,
        version: version(req.version),
        headers,
    };
    Ok(Some((len, head)))
}

/// Parses a response head with `httparse` into room for its `fields`.
fn parse_response_into<'b>(
    bytes: &'b [u8],
    fields: &mut [httparse::Header<'b>],
) -> Parsed<ResponseHead> {
    let mut res = httparse::Response::new(fields);
    let httparse::Status::Complete(len) = res.parse(bytes).map_err(parse_error)? else {
        return Ok(None);
    };
    let status = check_status(res.code.unwrap_or_default())?;
    let mut headers = fields_of(&bytes[..len], res.headers);
    let reason = headers.push_bytes(res.reason.unwrap_or_default().as_bytes());
    let head = ResponseHead {
        status,
        reason,
        version: version(res.version),
        headers,
    };
    Ok(Some((len, head)))
}

/// Status codes run from 100 to 599 and, by custom, up to 999 (RFC 9110 §15). One below 100
/// would be taken for a bodiless interim answer, and its body for the next response.
fn check_status(status: u16) -> Result<u16, HeadError> {
    if status < 100 {
        return Err(HeadError::Malformed(format!("status code {status:03}")));
    }
    Ok(status)
}

fn parse_error(err: httparse::Error) -> HeadError {
    match err {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        other => HeadError::Malformed(other.to_string()),
    }
}

fn version(minor: Option<u8>) -> Version {
    if minor == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    }
}

/// Copies the header section of a head in one piece, noting where each field lies in it.
/// `httparse` hands out slices of `head`, so their offsets follow from their addresses.
fn fields_of(head: &[u8], parsed: &[httparse::Header]) -> HeaderFields {
    let base = head.as_ptr() as usize;
    let offset = |slice: &[u8]| slice.as_ptr() as usize - base;
    let span = |slice: &[u8]| offset(slice)..offset(slice) + slice.len();
    HeaderFields {
        bytes: Vec::with_capacity(head.len() + 64),
        spans: parsed
            .iter()
            .map(|h| (span(h.name.as_bytes()), span(h.value)))
            .collect(),
    }
    .with_bytes(head)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;
    use crate::http::test_support::{request, socket_pair};
    use crate::http::{request_body_length, BodyLength};

    #[test]
    fn finds_the_end_of_a_head_with_crlf_or_lf() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 0),
            Some(27)
        );
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\nHost: a\n\nrest", 0),
            Some(24)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        // Searching from a later offset still sees a terminator that straddles it.
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n", 16), Some(18));
    }

    #[test]
    fn parses_a_request_head() {
        let head = request("POST /a?b=1 HTTP/1.0\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(head.method(), "POST");
        assert_eq!(head.target(), "/a?b=1");
        assert_eq!(head.version, Version::Http10);
        assert_eq!(head.header("HOST"), Some(&b"x"[..]));
        assert_eq!(request_body_length(&head), Ok(BodyLength::Fixed(3)));
    }

    #[test]
    fn heads_with_many_fields_parse_up_to_the_limit() {
        let with_fields = |n: usize, start: &str| {
            let fields: String = (0..n).map(|i| format!("X-F{i}: {i}\r\n")).collect();
            format!("{start}\r\n{fields}\r\n")
        };
        for n in [USUAL_HEADERS, USUAL_HEADERS + 1, MAX_HEADERS] {
            let text = with_fields(n, "GET / HTTP/1.1");
            let (_, head) = parse_as_is(text.as_bytes(), parse_request_into)
                .unwrap()
                .unwrap();
            assert_eq!(head.header("x-f0"), Some(&b"0"[..]), "{n} fields");
            let last = format!("x-f{}", n - 1);
            assert!(head.header(&last).is_some(), "{n} fields");
            let text = with_fields(n, "HTTP/1.1 200 OK");
            let (_, head) = parse_as_is(text.as_bytes(), parse_response_into)
                .unwrap()
                .unwrap();
            assert!(head.header(&last).is_some(), "{n} fields");
        }
        let text = with_fields(MAX_HEADERS + 1, "GET / HTTP/1.1");
        assert!(matches!(
            parse_as_is(text.as_bytes(), parse_request_into),
            Err(HeadError::TooLarge)
        ));
        let text = with_fields(MAX_HEADERS + 1, "HTTP/1.1 200 OK");
        assert!(matches!(
            parse_as_is(text.as_bytes(), parse_response_into),
            Err(HeadError::TooLarge)
        ));
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(request("GET / HTTP/1.1\r\n\r\n").wants_keep_alive());
        assert!(!request("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").wants_keep_alive());
        assert!(!request("GET / HTTP/1.0\r\n\r\n").wants_keep_alive());
        assert!(request("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").wants_keep_alive());
    }

    #[test]
    fn reads_a_head_sent_a_byte_at_a_time_and_keeps_pipelined_bytes() {
        let (mut client, server) = socket_pair();
        let writer = std::thread::spawn(move || {
            for byte in b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nGET /two HTTP/1.1\r\n\r\n" {
                client.write_all(&[*byte]).unwrap();
            }
            client
        });
        let mut stream = BufferedStream::new(server, 16);
        let timeout = Duration::from_secs(5);
        let first = read_request_head(&mut stream, timeout).unwrap().unwrap();
        let second = read_request_head(&mut stream, timeout).unwrap().unwrap();
        assert_eq!((first.target(), second.target()), ("/one", "/two"));
        drop(writer.join().unwrap());
        assert!(read_request_head(&mut stream, timeout).unwrap().is_none());
    }

    #[test]
    fn an_oversized_head_is_refused() {
        let (mut client, server) = socket_pair();
        let writer = std::thread::spawn(move || {
            let _ = client.write_all(b"GET / HTTP/1.1\r\nX-Big: ");
            let _ = client.write_all(&vec![b'a'; MAX_HEAD + 10]);
        });
        let mut stream = BufferedStream::new(server, 1024);
        let timeout = Duration::from_secs(5);
        assert!(matches!(
            read_request_head(&mut stream, timeout),
            Err(HeadError::TooLarge)
        ));
        drop(stream);
        writer.join().unwrap();
    }
}
