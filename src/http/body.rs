//! Bodies: how a message's body is framed (RFC 9112 §6.3), and relaying it piece by piece: a
//! body is never held whole, but goes through the source's read buffer and a [`Sink`] that
//! gathers small pieces into one write.

use std::io::{self, Read, Write};

use super::buffer::BufferedStream;
use super::head::{Headers, RequestHead, ResponseHead};
use super::MAX_HEAD;

/// The longest chunk-size line (with extensions) accepted inside a chunked body.
pub(super) const MAX_CHUNK_LINE: usize = 4096;

/// The read buffer used while relaying a long body: large reads mean fewer system calls.
pub(super) const BODY_BUFFER: usize = 64 * 1024;

/// Output gathered before it is written: small pieces become one `write` system call.
const SINK_LIMIT: usize = 64 * 1024;

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
pub fn response_body_length(method: &str, head: &ResponseHead) -> Result<BodyLength, String> {
    if method == "HEAD" || head.status < 200 || head.status == 204 || head.status == 304 {
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
    pub(super) fn memory() -> Self {
        Sink {
            dst: Destination::Memory(Vec::new()),
            out: Vec::new(),
            written: 0,
        }
    }

    /// What a memory sink holds once flushed.
    #[cfg(test)]
    pub(super) fn into_written(mut self) -> Vec<u8> {
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

/// Relays a body framed by `length` from `src` to `sink`, leaving what follows it buffered in
/// `src`; with `dechunk`, a chunked body goes out as plain bytes (for HTTP/1.0 peers).
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::http::test_support::{request, response, socket_pair};

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
