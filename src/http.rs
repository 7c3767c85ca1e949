//! The HTTP/1.1 layer: reading message heads, deciding how a body is framed, and relaying bodies.
//!
//! Heads are parsed with `httparse`, a push parser over a buffer this module owns and bounds
//! (64 KiB, 100 header fields), so a head may arrive one byte at a time or several pipelined
//! requests may arrive in one read. Bodies are never held whole: they are relayed piece by piece,
//! framed by Content-Length, chunked encoding, or (responses only) the end of the connection, as
//! RFC 9112 §6 lays out. The course's Python read a single `recv(4096)` instead, which cuts any
//! message larger than that. Versions other than HTTP/1.0 and HTTP/1.1 are sorted out in
//! `version`: later HTTP/1 minor versions are read as HTTP/1.1, other versions are refused.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod version;

#[cfg(test)]
pub(crate) mod fuzz;

/// The largest request or response head accepted, in bytes; a larger request gets `431`.
pub const MAX_HEAD: usize = 64 * 1024;

/// The most header fields one head may carry.
pub const MAX_HEADERS: usize = 100;

/// The longest chunk-size line (with extensions) accepted inside a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

/// The read buffer used while relaying a long body: large reads mean fewer system calls.
const BODY_BUFFER: usize = 64 * 1024;

/// Output gathered before it is written: small pieces become one `write` system call.
const SINK_LIMIT: usize = 64 * 1024;

/// How many bytes an idle connection reads before it takes a buffer (see
/// [`BufferedStream::fill_when_idle`]): enough for most request heads, small enough for the
/// stack of a client thread.
const IDLE_READ: usize = 1024;

/// A TCP stream with a read buffer that this side owns.
///
/// Everything read but not yet consumed stays in the buffer, which is how pipelined requests and
/// the first bytes of a body that arrived together with the head are kept. The source is a
/// `TcpStream` everywhere but in tests, which feed it scripted reads.
pub struct BufferedStream<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: Read> BufferedStream<S> {
    /// Wraps `stream` with a read buffer of `capacity` bytes (it grows only to fit a large head).
    pub fn new(stream: S, capacity: usize) -> Self {
        BufferedStream::with_buffer(stream, vec![0; capacity])
    }

    /// Wraps `stream` with `buf` as its read buffer (its contents are ignored).
    pub fn with_buffer(stream: S, buf: Vec<u8>) -> Self {
        BufferedStream {
            stream,
            buf,
            start: 0,
            end: 0,
        }
    }

    /// The bytes read but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks the first `n` buffered bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes into the buffer, returning how many arrived (0 at end of stream).
    ///
    /// Room is made by moving unconsumed bytes to the front, and the buffer only grows when it is
    /// full of unconsumed bytes and still under `limit`, so a caller bounds its own memory.
    pub fn fill(&mut self, limit: usize) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < limit {
                let grown = (self.buf.len() * 2).clamp(1024, limit);
                self.buf.resize(grown, 0);
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "read buffer is full",
                ));
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Reads the first bytes of the next message without holding a read buffer meanwhile: the
    /// buffer goes back to `pool`, the bytes arrive in a small one on the stack, and only then is
    /// a buffer taken from `pool` for them. An idle keep-alive connection thus holds no buffer
    /// (nginx frees an idle connection's buffers the same way), and a thousand idle clients
    /// cost a thousand buffers less. Returns how many bytes arrived (0 at end of stream).
    pub fn fill_when_idle(&mut self, pool: &BufferPool) -> io::Result<usize> {
        debug_assert!(self.buffered().is_empty());
        pool.give(std::mem::take(&mut self.buf));
        self.start = 0;
        self.end = 0;
        let mut first = [0u8; IDLE_READ];
        let n = self.stream.read(&mut first)?;
        if n > 0 {
            self.buf = pool.take();
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            self.buf[..n].copy_from_slice(&first[..n]);
            self.end = n;
        }
        Ok(n)
    }

    /// Enlarges an empty buffer to `capacity` bytes. A long body is then read in large pieces,
    /// while a connection that only sees small messages keeps a small buffer, which is most of
    /// what an idle connection costs.
    pub fn expand(&mut self, capacity: usize) {
        if self.start == self.end && self.buf.len() < capacity {
            self.buf = vec![0; capacity];
        }
    }

    /// Gives the socket and the buffer back, for reuse.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

impl<S: Transport> BufferedStream<S> {
    /// The underlying socket, for socket options (and for writing, when it is a plain one).
    pub fn socket(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// The stream itself, for writing through it (a TLS stream needs `&mut` to write).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

/// A byte stream over one TCP connection: the socket itself, or a layer over it such as TLS.
pub trait Transport: Read + Write {
    /// The TCP socket underneath, for timeouts, shutdown and addresses.
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// Read buffers kept for reuse by every client thread.
///
/// A buffer allocated (and zeroed) for each request showed up in profiles, mostly as the
/// allocator tidying its free lists before handing out a block that large. Taking a spare buffer
/// costs one short lock instead. Only a bounded number are kept, so an idle balancer holds
/// little memory.
#[derive(Debug)]
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl BufferPool {
    /// A pool of buffers of `size` bytes that keeps at most `keep` spare ones.
    pub fn new(size: usize, keep: usize) -> Self {
        BufferPool {
            spare: Mutex::new(Vec::new()),
            size,
            keep,
        }
    }

    /// A spare buffer, or a new one.
    pub fn take(&self) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| vec![0; self.size])
    }

    /// How many spare buffers are kept.
    #[cfg(test)]
    fn spare(&self) -> usize {
        self.spare.lock().unwrap().len()
    }

    /// Keeps `buf` for reuse, unless it grew (for a long body) or enough are kept already.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.len() == self.size {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < self.keep {
                spare.push(buf);
            }
        }
    }
}

/// The protocol version of a message; only HTTP/1.0 and HTTP/1.1 are spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: connections close after each response unless `Connection: keep-alive`.
    Http10,
    /// HTTP/1.1: connections persist unless `Connection: close`.
    Http11,
}

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

/// Whether an I/O error means a socket timeout ran out (Linux reports `WouldBlock` for it).
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one request head. Returns `Ok(None)` when the client closed the connection cleanly
/// before sending anything, which is how keep-alive connections normally end.
///
/// When `timeout` passes before the head is complete, the read fails with `TimedOut`: that is
/// what stops a client that trickles its head a byte at a time from holding a thread forever.
///
/// `timeout` is also the socket's usual read timeout; while a head is incomplete the socket waits
/// only for what is left of the deadline, and the usual timeout is restored afterwards.
pub fn read_request_head<S: Transport>(
    stream: &mut BufferedStream<S>,
    timeout: Duration,
) -> Result<Option<RequestHead>, HeadError> {
    read_request_head_until(stream, Instant::now() + timeout, timeout)
}

/// Like [`read_request_head`], for a head whose time began earlier: it must be complete by
/// `deadline` (the client connection began waiting for it with [`BufferedStream::fill_when_idle`]).
pub fn read_request_head_until<S: Transport>(
    stream: &mut BufferedStream<S>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Option<RequestHead>, HeadError> {
    let mut shortened = false;
    let result = read_head(
        stream,
        |stream, partial| {
            if partial {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HeadError::TimedOut);
                }
                stream.socket().set_read_timeout(Some(left))?;
                shortened = true;
            }
            Ok(())
        },
        REQUEST,
    );
    if shortened {
        stream.socket().set_read_timeout(Some(timeout))?;
    }
    result
}

/// Reads one response head; socket timeouts bound the wait.
pub fn read_response_head<S: Read>(
    stream: &mut BufferedStream<S>,
) -> Result<Option<ResponseHead>, HeadError> {
    read_head(stream, |_, _| Ok(()), RESPONSE)
}

/// A head parser: the head and its length, or `None` while incomplete.
type ParseHead<T> = fn(&[u8]) -> Result<Option<(usize, T)>, HeadError>;

/// How one kind of head is read.
struct HeadKind<T> {
    /// Parses a complete head.
    parse: ParseHead<T>,
    /// Looks at the first line as soon as it is complete, before the rest of the head arrives.
    check_first_line: fn(&[u8]) -> Result<(), HeadError>,
}

const REQUEST: HeadKind<RequestHead> = HeadKind {
    parse: parse_request_head,
    check_first_line: check_request_line,
};

const RESPONSE: HeadKind<ResponseHead> = HeadKind {
    parse: parse_response_head,
    check_first_line: |_| Ok(()),
};

/// The shared loop of both head readers: parse what is buffered, else read more.
/// `before_read` runs before each read, told whether part of a head is already buffered.
fn read_head<S: Read, T>(
    stream: &mut BufferedStream<S>,
    mut before_read: impl FnMut(&mut BufferedStream<S>, bool) -> Result<(), HeadError>,
    kind: HeadKind<T>,
) -> Result<Option<T>, HeadError> {
    let mut scanned = 0;
    let mut line_checked = false;
    loop {
        // Parsing only once the blank line that ends a head has arrived keeps a head sent one
        // byte at a time from being re-parsed at every byte.
        let buffered = stream.buffered();
        if let Some(end) = find_head_end(buffered, scanned) {
            return match (kind.parse)(&buffered[..end])? {
                Some((len, head)) => {
                    stream.consume(len);
                    Ok(Some(head))
                }
                None => Err(HeadError::Malformed("incomplete head".into())),
            };
        }
        // The first line alone can end the exchange: an HTTP/0.9 client sends no blank line,
        // and an HTTP/2 client deserves its 505 without waiting for a timeout.
        if !line_checked && buffered[scanned..].contains(&b'\n') {
            line_checked = version::first_line_is_complete(buffered);
            if line_checked {
                (kind.check_first_line)(buffered)?;
            }
        }
        scanned = buffered.len();
        if scanned >= MAX_HEAD {
            return Err(if line_checked {
                HeadError::TooLarge
            } else {
                HeadError::LineTooLong
            });
        }
        before_read(stream, scanned > 0)?;
        let got = stream.fill(MAX_HEAD + 4)?;
        if got == 0 {
            return if scanned == 0 {
                Ok(None)
            } else {
                Err(HeadError::Truncated)
            };
        }
    }
}

/// Finds the end of a head (just past its blank line), searching from about `from`.
/// Bare LF line endings are accepted as RFC 9112 §2.2 allows.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(pos) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        if buf.get(nl + 1) == Some(&b'\n') {
            return Some(nl + 2);
        }
        if buf.get(nl + 1) == Some(&b'\r') && buf.get(nl + 2) == Some(&b'\n') {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// Refuses a request line whose version is not HTTP/1 as soon as the line is complete.
fn check_request_line(buffered: &[u8]) -> Result<(), HeadError> {
    match version::of_request_line(buffered) {
        version::LineVersion::Unsupported(v) => Err(HeadError::UnsupportedVersion(v)),
        _ => Ok(()),
    }
}

/// Parses a request head; a later HTTP/1 minor version is read as HTTP/1.1 (RFC 9112 §2.3).
fn parse_request_head(bytes: &[u8]) -> Result<Option<(usize, RequestHead)>, HeadError> {
    match parse_request_as_is(bytes) {
        Err(HeadError::Malformed(why)) => match version::of_request_line(bytes) {
            version::LineVersion::LaterMinor { at } => {
                parse_request_as_is(&version::as_http11(bytes, at))
            }
            version::LineVersion::Unsupported(v) => Err(HeadError::UnsupportedVersion(v)),
            version::LineVersion::Other => Err(HeadError::Malformed(why)),
        },
        other => other,
    }
}

/// Parses a response head; a later HTTP/1 minor version is read as HTTP/1.1 (RFC 9112 §2.3).
fn parse_response_head(bytes: &[u8]) -> Result<Option<(usize, ResponseHead)>, HeadError> {
    match parse_response_as_is(bytes) {
        Err(HeadError::Malformed(why)) => match version::of_status_line(bytes) {
            version::LineVersion::LaterMinor { at } => {
                parse_response_as_is(&version::as_http11(bytes, at))
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

fn parse_request_as_is(bytes: &[u8]) -> Result<Option<(usize, RequestHead)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; USUAL_HEADERS];
    match parse_request_into(bytes, &mut fields) {
        Err(HeadError::TooLarge) => parse_request_with_room(bytes),
        parsed => parsed,
    }
}

#[cold]
#[inline(never)]
fn parse_request_with_room(bytes: &[u8]) -> Result<Option<(usize, RequestHead)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    parse_request_into(bytes, &mut fields)
}

fn parse_request_into<'b>(
    bytes: &'b [u8],
    fields: &mut [httparse::Header<'b>],
) -> Result<Option<(usize, RequestHead)>, HeadError> {
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(parse_error(err)),
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

fn parse_response_as_is(bytes: &[u8]) -> Result<Option<(usize, ResponseHead)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; USUAL_HEADERS];
    match parse_response_into(bytes, &mut fields) {
        Err(HeadError::TooLarge) => parse_response_with_room(bytes),
        parsed => parsed,
    }
}

#[cold]
#[inline(never)]
fn parse_response_with_room(bytes: &[u8]) -> Result<Option<(usize, ResponseHead)>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    parse_response_into(bytes, &mut fields)
}

fn parse_response_into<'b>(
    bytes: &'b [u8],
    fields: &mut [httparse::Header<'b>],
) -> Result<Option<(usize, ResponseHead)>, HeadError> {
    let mut res = httparse::Response::new(fields);
    let len = match res.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(parse_error(err)),
    };
    // Status codes run from 100 to 599 and, by custom, up to 999 (RFC 9110 §15). One below 100
    // would be taken for a bodiless interim answer, and its body for the next response.
    let status = res.code.unwrap_or_default();
    if status < 100 {
        return Err(HeadError::Malformed(format!("status code {status:03}")));
    }
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

/// How the body of a message is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Fixed(u64),
    /// Chunked transfer coding, ending with a zero-size chunk and optional trailers.
    Chunked,
    /// Everything until the sender closes the connection (responses only).
    UntilClose,
}

/// How a request's body is framed, refusing the ambiguous cases that enable request smuggling:
/// Content-Length together with Transfer-Encoding, and Content-Lengths that disagree
/// (RFC 9112 §6.1 and §6.3).
pub fn request_body_length(head: &RequestHead) -> Result<BodyLength, String> {
    let length = content_length(head)?;
    if head.header("transfer-encoding").is_some() {
        if length.is_some() {
            return Err("both Content-Length and Transfer-Encoding".into());
        }
        // A request whose final coding is not chunked has no knowable end: RFC 9112 §6.3 says 400.
        if !is_chunked(head) {
            return Err("Transfer-Encoding without chunked as the final coding".into());
        }
        return Ok(BodyLength::Chunked);
    }
    Ok(match length {
        Some(0) | None => BodyLength::Empty,
        Some(n) => BodyLength::Fixed(n),
    })
}

/// How a response's body is framed. Responses to HEAD, and 1xx, 204 and 304 responses, never have
/// a body whatever their headers say (RFC 9110 §6.4.1).
pub fn response_body_length(
    request_method: &str,
    head: &ResponseHead,
) -> Result<BodyLength, String> {
    if request_method == "HEAD" || head.status < 200 || head.status == 204 || head.status == 304 {
        return Ok(BodyLength::Empty);
    }
    if head.header("transfer-encoding").is_some() {
        return Ok(if is_chunked(head) {
            BodyLength::Chunked
        } else {
            BodyLength::UntilClose
        });
    }
    Ok(match content_length(head)? {
        Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Fixed(n),
        None => BodyLength::UntilClose,
    })
}

/// Whether `chunked` is the last transfer coding listed.
fn is_chunked(head: &impl Headers) -> bool {
    let last = head
        .fields()
        .values("transfer-encoding")
        .flat_map(|value| value.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
        .last();
    last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
}

/// The Content-Length, if any. Repeated values (in one field or several) must all agree.
fn content_length(head: &impl Headers) -> Result<Option<u64>, String> {
    let mut length = None;
    for value in head.fields().values("content-length") {
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|seen| seen != n) {
                return Err("conflicting Content-Length values".into());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

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

/// Why relaying a body stopped early. The side matters: a failure to read the source or write
/// the destination is blamed on different peers.
#[derive(Debug)]
pub enum RelayError {
    /// Reading the source failed (or timed out).
    Read(io::Error),
    /// Writing the destination failed (or timed out).
    Write(io::Error),
    /// The source closed before the body's end.
    Truncated,
    /// The chunked framing is broken.
    Malformed(&'static str),
}

/// The writing half of a relay: output is gathered and written in as few system calls as
/// possible, and always before the relay blocks on reading its source.
pub struct Sink<'a> {
    dst: Destination<'a>,
    out: Vec<u8>,
    written: u64,
}

/// Where a sink's output goes.
enum Destination<'a> {
    Writer(&'a mut dyn Write),
    /// Kept in memory, for tests of what a relay writes.
    #[cfg(test)]
    Memory(Vec<u8>),
    /// Thrown away.
    Discard,
}

impl<'a> Sink<'a> {
    /// A sink that writes to `dst`, starting with the bytes in `out` (usually a head).
    pub fn new(dst: &'a mut dyn Write, out: Vec<u8>) -> Self {
        Sink {
            dst: Destination::Writer(dst),
            out,
            written: 0,
        }
    }

    /// A sink that throws everything away: relaying into it skips a body.
    pub fn discard() -> Self {
        Sink {
            dst: Destination::Discard,
            out: Vec::new(),
            written: 0,
        }
    }

    /// A sink that keeps what is written, for tests.
    #[cfg(test)]
    fn memory() -> Self {
        Sink {
            dst: Destination::Memory(Vec::new()),
            out: Vec::new(),
            written: 0,
        }
    }

    /// What a memory sink holds once flushed.
    #[cfg(test)]
    fn into_written(mut self) -> Vec<u8> {
        let _ = self.flush();
        match self.dst {
            Destination::Memory(kept) => kept,
            _ => Vec::new(),
        }
    }

    /// Queues `data`, writing directly when it is large.
    pub fn emit(&mut self, data: &[u8]) -> Result<(), RelayError> {
        if matches!(self.dst, Destination::Discard) {
            return Ok(());
        }
        if self.out.len() + data.len() <= SINK_LIMIT {
            self.out.extend_from_slice(data);
            return Ok(());
        }
        self.flush()?;
        self.write(data)
    }

    /// Writes everything queued.
    pub fn flush(&mut self) -> Result<(), RelayError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let result = self.write(&out);
        self.out = out;
        self.out.clear();
        result
    }

    /// How many bytes reached the destination so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write(&mut self, data: &[u8]) -> Result<(), RelayError> {
        match &mut self.dst {
            Destination::Writer(dst) => dst.write_all(data).map_err(RelayError::Write)?,
            #[cfg(test)]
            Destination::Memory(kept) => kept.extend_from_slice(data),
            Destination::Discard => return Ok(()),
        }
        self.written += data.len() as u64;
        Ok(())
    }
}

/// Relays a body framed by `length` from `src` to `sink`, leaving anything after it buffered in
/// `src`. With `dechunk`, a chunked body is sent as plain bytes (for HTTP/1.0 peers) instead of
/// being passed on as it came.
pub fn relay_body<S: Read>(
    src: &mut BufferedStream<S>,
    length: BodyLength,
    sink: &mut Sink,
    dechunk: bool,
) -> Result<(), RelayError> {
    match length {
        BodyLength::Empty => Ok(()),
        BodyLength::Fixed(n) => relay_exact(src, n, sink),
        BodyLength::Chunked => relay_chunked(src, sink, dechunk),
        BodyLength::UntilClose => relay_until_close(src, sink),
    }
}

/// Reads more into `src`, first writing out what the sink holds so the peer is never kept
/// waiting for bytes already here. Fails with `Truncated` at end of stream.
fn refill<S: Read>(
    src: &mut BufferedStream<S>,
    sink: &mut Sink,
    limit: usize,
) -> Result<(), RelayError> {
    sink.flush()?;
    match src.fill(limit) {
        Ok(0) => Err(RelayError::Truncated),
        Ok(_) => Ok(()),
        Err(err) => Err(RelayError::Read(err)),
    }
}

fn relay_exact<S: Read>(
    src: &mut BufferedStream<S>,
    mut remaining: u64,
    sink: &mut Sink,
) -> Result<(), RelayError> {
    while remaining > 0 {
        if src.buffered().is_empty() {
            if remaining > src.buf.len() as u64 {
                src.expand(BODY_BUFFER);
            }
            refill(src, sink, 0)?;
        }
        let take = src
            .buffered()
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        sink.emit(&src.buffered()[..take])?;
        src.consume(take);
        remaining -= take as u64;
    }
    Ok(())
}

fn relay_until_close<S: Read>(
    src: &mut BufferedStream<S>,
    sink: &mut Sink,
) -> Result<(), RelayError> {
    loop {
        let buffered = src.buffered().len();
        sink.emit(&src.buffered()[..buffered])?;
        src.consume(buffered);
        src.expand(BODY_BUFFER);
        match refill(src, sink, 0) {
            Err(RelayError::Truncated) => return Ok(()),
            other => other?,
        }
    }
}

fn relay_chunked<S: Read>(
    src: &mut BufferedStream<S>,
    sink: &mut Sink,
    dechunk: bool,
) -> Result<(), RelayError> {
    loop {
        let line_len = read_line(src, sink)?;
        let size = chunk_size(&src.buffered()[..line_len])?;
        if !dechunk {
            sink.emit(&src.buffered()[..line_len])?;
        }
        src.consume(line_len);
        if size == 0 {
            return relay_trailers(src, sink, dechunk);
        }
        relay_exact(src, size, sink)?;
        let crlf = read_line(src, sink)?;
        if line_content(&src.buffered()[..crlf]) != Some(&[][..]) {
            return Err(RelayError::Malformed("chunk data longer than its size"));
        }
        if !dechunk {
            sink.emit(&src.buffered()[..crlf])?;
        }
        src.consume(crlf);
    }
}

/// Trailer fields end with an empty line; together they are bounded like a head. Each line must
/// be a field line or that empty line, since a backend reading them differently (a line of
/// spaces taken for a folded field, a bare CR for a line end) would see the request end
/// elsewhere than the balancer did.
fn relay_trailers<S: Read>(
    src: &mut BufferedStream<S>,
    sink: &mut Sink,
    dechunk: bool,
) -> Result<(), RelayError> {
    let mut total = 0;
    loop {
        let line_len = read_line(src, sink)?;
        let line = line_content(&src.buffered()[..line_len]).ok_or(BAD_TRAILER)?;
        let is_last = line.is_empty();
        if !is_last && !is_field_line(line) {
            return Err(BAD_TRAILER);
        }
        total += line_len;
        if total > MAX_HEAD {
            return Err(RelayError::Malformed("trailer section too large"));
        }
        if !dechunk {
            sink.emit(&src.buffered()[..line_len])?;
        }
        src.consume(line_len);
        if is_last {
            return Ok(());
        }
    }
}

/// Makes sure a whole line (through its LF) is buffered and returns its length.
fn read_line<S: Read>(src: &mut BufferedStream<S>, sink: &mut Sink) -> Result<usize, RelayError> {
    loop {
        if let Some(pos) = src.buffered().iter().position(|&b| b == b'\n') {
            return Ok(pos + 1);
        }
        if src.buffered().len() >= MAX_CHUNK_LINE {
            return Err(RelayError::Malformed("chunk line too long"));
        }
        refill(src, sink, MAX_CHUNK_LINE * 2)?;
    }
}

const BAD_TRAILER: RelayError = RelayError::Malformed("bad trailer field");
const BAD_CHUNK_SIZE: RelayError = RelayError::Malformed("bad chunk size");

/// Parses the hexadecimal size at the start of a chunk line, ignoring any chunk extensions.
/// The line is read strictly (RFC 9112 §7.1: `chunk-size [ BWS ";" chunk-ext ] CRLF`): the
/// balancer passes chunk lines on as they came, so a size that a backend could read differently
/// (` 5`, `5\r`, `5 x`) must not get through. Spaces after the size are let through, as nginx
/// does, for old servers that pad their chunk sizes.
fn chunk_size(line: &[u8]) -> Result<u64, RelayError> {
    let line = line_content(line).ok_or(BAD_CHUNK_SIZE)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (size, rest) = line.split_at(digits);
    let extension = rest.trim_ascii_start();
    if digits == 0 || digits > 15 || !(extension.is_empty() || extension.starts_with(b";")) {
        return Err(BAD_CHUNK_SIZE);
    }
    let text = std::str::from_utf8(size).map_err(|_| BAD_CHUNK_SIZE)?;
    u64::from_str_radix(text, 16).map_err(|_| BAD_CHUNK_SIZE)
}

/// A line of a chunked body without its CRLF (or bare LF, RFC 9112 §2.2), or `None` when it
/// holds another control byte than HTAB, a bare CR included.
fn line_content(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let is_control = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f;
    (!line.iter().any(is_control)).then_some(line)
}

/// Whether `line` is a field line: a token name, a colon, a value (RFC 9112 §5). A line that
/// starts with whitespace (an obs-fold) is not.
fn is_field_line(line: &[u8]) -> bool {
    let name_len = line.iter().position(|&b| b == b':').unwrap_or(0);
    name_len > 0
        && line[..name_len]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// How long, and how much, a closing connection's unread input is drained for.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;

/// Closes a connection after a final response without losing it. Closing a socket with unread
/// input (the rest of a refused request, say) makes the kernel send a reset, which can destroy the
/// response before the client reads it (RFC 9112 §9.6). So the FIN goes first, and what the client
/// still sends is read and dropped, for a bounded time and amount, as nginx's lingering close does.
pub fn close_gracefully(socket: &TcpStream) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let _ = socket.set_read_timeout(Some(LINGER_TIME));
    let deadline = Instant::now() + LINGER_TIME;
    let mut scratch = [0u8; 4096];
    let mut drained = 0;
    let mut reader = socket;
    while drained < LINGER_BYTES && Instant::now() < deadline {
        match reader.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::thread;

    fn request(text: &str) -> RequestHead {
        match parse_request_head(text.as_bytes()).unwrap() {
            Some((_, head)) => head,
            None => panic!("incomplete head"),
        }
    }

    fn response(text: &str) -> ResponseHead {
        match parse_response_head(text.as_bytes()).unwrap() {
            Some((_, head)) => head,
            None => panic!("incomplete head"),
        }
    }

    /// A connected pair of sockets on loopback: (client side, server side).
    fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (client, server)
    }

    #[test]
    fn an_idle_connection_holds_no_buffer_until_bytes_arrive() {
        let pool = Arc::new(BufferPool::new(4096, 4));
        let (mut client, server) = socket_pair();
        let mut stream = BufferedStream::with_buffer(server, pool.take());
        assert_eq!(pool.spare(), 0);
        // The client sends only once the waiting side gave its buffer back; its head is larger
        // than what the wait reads on the stack, so the rest comes through the usual buffer.
        let spare = Arc::clone(&pool);
        let cookie = "c".repeat(3 * IDLE_READ);
        let sender = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while spare.spare() == 0 && Instant::now() < deadline {
                thread::yield_now();
            }
            let head = format!("GET /next HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n");
            client.write_all(head.as_bytes()).unwrap();
            client
        });
        assert!(stream.fill_when_idle(&pool).unwrap() > 0);
        let head = read_request_head(&mut stream, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(head.target(), "/next");
        assert_eq!(head.header("cookie").map(<[u8]>::len), Some(3 * IDLE_READ));
        assert_eq!(pool.spare(), 0, "the buffer was taken back for the bytes");
        // At the end of the stream, no buffer is taken.
        drop(sender.join().unwrap());
        assert_eq!(stream.fill_when_idle(&pool).unwrap(), 0);
        assert_eq!(pool.spare(), 1);
    }

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
            let (_, head) = parse_request_as_is(text.as_bytes()).unwrap().unwrap();
            assert_eq!(head.header("x-f0"), Some(&b"0"[..]), "{n} fields");
            let last = format!("x-f{}", n - 1);
            assert!(head.header(&last).is_some(), "{n} fields");
            let text = with_fields(n, "HTTP/1.1 200 OK");
            let (_, head) = parse_response_as_is(text.as_bytes()).unwrap().unwrap();
            assert!(head.header(&last).is_some(), "{n} fields");
        }
        let text = with_fields(MAX_HEADERS + 1, "GET / HTTP/1.1");
        assert!(matches!(
            parse_request_as_is(text.as_bytes()),
            Err(HeadError::TooLarge)
        ));
        let text = with_fields(MAX_HEADERS + 1, "HTTP/1.1 200 OK");
        assert!(matches!(
            parse_response_as_is(text.as_bytes()),
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
    fn request_framing_refuses_smuggling() {
        let both =
            request("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(request_body_length(&both).is_err());
        let conflicting =
            request("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert!(request_body_length(&conflicting).is_err());
        let listed = request("POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n");
        assert!(request_body_length(&listed).is_err());
        let repeated = request("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(request_body_length(&repeated), Ok(BodyLength::Fixed(5)));
        let signed = request("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n");
        assert!(request_body_length(&signed).is_err());
        let gzip = request("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert!(request_body_length(&gzip).is_err());
        let chunked = request("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(request_body_length(&chunked), Ok(BodyLength::Chunked));
        assert_eq!(
            request_body_length(&request("GET / HTTP/1.1\r\n\r\n")),
            Ok(BodyLength::Empty)
        );
    }

    #[test]
    fn response_framing_knows_bodiless_responses() {
        let with_length = response("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        assert_eq!(
            response_body_length("GET", &with_length),
            Ok(BodyLength::Fixed(10))
        );
        assert_eq!(
            response_body_length("HEAD", &with_length),
            Ok(BodyLength::Empty)
        );
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let head = response(&format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n"));
            assert_eq!(
                response_body_length("GET", &head),
                Ok(BodyLength::Empty),
                "{status}"
            );
        }
        let close = response("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            response_body_length("GET", &close),
            Ok(BodyLength::UntilClose)
        );
        let chunked = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            response_body_length("GET", &chunked),
            Ok(BodyLength::Chunked)
        );
    }

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

    /// Relays `input` framed as `length` and returns what came out the other side.
    fn relay(input: &[u8], length: BodyLength, dechunk: bool) -> Result<Vec<u8>, RelayError> {
        let (mut src_client, src_server) = socket_pair();
        let (dst_client, mut dst_server) = socket_pair();
        src_client.write_all(input).unwrap();
        drop(src_client);
        let mut src = BufferedStream::new(src_server, 8);
        let result = {
            let mut dst = &dst_client;
            let mut sink = Sink::new(&mut dst, Vec::new());
            relay_body(&mut src, length, &mut sink, dechunk).and_then(|()| sink.flush())
        };
        drop(dst_client);
        let mut out = Vec::new();
        dst_server.read_to_end(&mut out).unwrap();
        result.map(|()| out)
    }

    #[test]
    fn relays_fixed_chunked_and_close_delimited_bodies() {
        assert_eq!(
            relay(b"hello world", BodyLength::Fixed(5), false).unwrap(),
            b"hello"
        );
        let chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let passed = relay(chunked, BodyLength::Chunked, false).unwrap();
        assert_eq!(passed, &chunked[..chunked.len() - 4]);
        assert_eq!(
            relay(chunked, BodyLength::Chunked, true).unwrap(),
            b"hello world"
        );
        assert_eq!(
            relay(b"all of it", BodyLength::UntilClose, false).unwrap(),
            b"all of it"
        );
    }

    #[test]
    fn broken_bodies_are_reported() {
        assert!(matches!(
            relay(b"abc", BodyLength::Fixed(5), false),
            Err(RelayError::Truncated)
        ));
        assert!(matches!(
            relay(b"zz\r\n", BodyLength::Chunked, false),
            Err(RelayError::Malformed(_))
        ));
        let long_data = b"2\r\nabc\r\n0\r\n\r\n";
        assert!(matches!(
            relay(long_data, BodyLength::Chunked, false),
            Err(RelayError::Malformed(_))
        ));
        assert!(matches!(
            relay(b"5\r\nab", BodyLength::Chunked, false),
            Err(RelayError::Truncated)
        ));
    }
}
