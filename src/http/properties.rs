//! Property tests of the HTTP/1.1 layer, over random bytes and over mutations of valid heads and
//! chunked bodies (structured fuzzing by `proptest`, not a coverage-guided fuzzer).
//!
//! The heads and bodies go through the very loops the balancer runs (`read_head` with the
//! request and response parsers, `relay_body`), fed by a scripted source instead of a socket so
//! that every way of cutting the input into reads can be tried. The properties: nothing panics;
//! a head is accepted or refused with a status, whatever the reads; the reader always returns
//! (a source read again after its end fails the test); an accepted head, written out the way the
//! proxy writes it, reads back the same; a chunked body comes out as it was encoded, and what the
//! relay accepts, a strict reference decoder written from RFC 9112 §7.1 reads the same way (the
//! relay passes chunk lines on as they came, so a backend must not see the body end elsewhere);
//! buffers stay within their bounds.
//!
//! `cargo test` runs a few thousand cases in a few seconds. The `fuzz_*` tests are the same
//! properties with many more cases, for a long run:
//! `cargo test --release -- --ignored fuzz` (`LB_FUZZ_CASES` sets the cases per property,
//! 100000 by default). Whatever they find becomes a named test in `regressions` below.

use super::body::{relay_body, BodyLength, RelayError, Sink, BODY_BUFFER, MAX_CHUNK_LINE};
use super::buffer::BufferedStream;
use super::head::{parse_response_head, read_head, HeadKind, REQUEST, RESPONSE};
use super::*;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use std::collections::VecDeque;

/// A source that hands out scripted pieces, at most one per read.
struct Script {
    pieces: VecDeque<Vec<u8>>,
    reads_after_end: usize,
}

impl Script {
    /// `bytes` cut at `cuts` (positions in it, in any order).
    fn cut(bytes: &[u8], cuts: &[usize]) -> Script {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut pieces = VecDeque::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            if cut > from {
                pieces.push_back(bytes[from..cut].to_vec());
                from = cut;
            }
        }
        Script {
            pieces,
            reads_after_end: 0,
        }
    }
}

impl BufferedStream<Script> {
    /// Everything not consumed yet: what is buffered, then what was never read.
    fn unconsumed(&self) -> Vec<u8> {
        let mut rest = self.buffered().to_vec();
        for piece in &self.stream.pieces {
            rest.extend_from_slice(piece);
        }
        rest
    }
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(piece) = self.pieces.front_mut() else {
            // A reader that keeps reading a closed source would spin forever on a socket.
            self.reads_after_end += 1;
            assert!(
                self.reads_after_end <= 1,
                "read again after the end of input"
            );
            return Ok(0);
        };
        let n = piece.len().min(buf.len());
        buf[..n].copy_from_slice(&piece[..n]);
        piece.drain(..n);
        if piece.is_empty() {
            self.pieces.pop_front();
        }
        Ok(n)
    }
}

/// What reading a head came to, comparable across runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome<T> {
    /// A head, and the bytes after it.
    Head(T, Vec<u8>),
    /// The source ended before any byte.
    Nothing,
    /// The source ended inside a head.
    Truncated,
    /// Refused with this status.
    Refused(u16),
}

/// The status the balancer answers a refused request head with (as `reject_head` maps them).
fn status_of(err: &HeadError) -> Option<u16> {
    match err {
        HeadError::Malformed(_) => Some(400),
        HeadError::TooLarge => Some(431),
        HeadError::LineTooLong => Some(414),
        HeadError::UnsupportedVersion(_) => Some(505),
        HeadError::TimedOut | HeadError::Truncated | HeadError::Io(_) => None,
    }
}

/// Reads one head of `kind` from `input` cut at `cuts`, with an initial buffer of `capacity`.
fn read_cut<T>(input: &[u8], cuts: &[usize], capacity: usize, kind: HeadKind<T>) -> Outcome<T> {
    let mut stream = BufferedStream::new(Script::cut(input, cuts), capacity);
    let result = read_head(&mut stream, |_, _| Ok(()), kind, MAX_HEAD);
    // The head buffer never grows past its bound, whatever arrived.
    assert!(stream.buf.len() <= (MAX_HEAD + 4).max(capacity));
    match result {
        Ok(Some(head)) => Outcome::Head(head, stream.unconsumed()),
        Ok(None) => Outcome::Nothing,
        Err(HeadError::Truncated) => Outcome::Truncated,
        Err(err) => match status_of(&err) {
            Some(status) => Outcome::Refused(status),
            None => panic!("a scripted source cannot fail: {err:?}"),
        },
    }
}

fn read_request_cut(input: &[u8], cuts: &[usize]) -> Outcome<RequestHead> {
    read_cut(input, cuts, 16, REQUEST)
}

fn read_response_cut(input: &[u8], cuts: &[usize]) -> Outcome<ResponseHead> {
    read_cut(input, cuts, 16, RESPONSE)
}

/// Reading `input` whole, cut at every single position, and a byte at a time, all agree.
fn check_every_split<T: PartialEq + std::fmt::Debug>(
    input: &[u8],
    read: impl Fn(&[u8], &[usize]) -> Outcome<T>,
) -> Result<Outcome<T>, TestCaseError> {
    let whole = read(input, &[]);
    for cut in 1..input.len() {
        prop_assert_eq!(&read(input, &[cut]), &whole, "cut at {}", cut);
    }
    let every: Vec<usize> = (1..input.len()).collect();
    prop_assert_eq!(&read(input, &every), &whole, "a byte at a time");
    Ok(whole)
}

/// The request head the proxy sends a backend, built by the rules of `write_request_head` in
/// `src/proxy.rs`: the request line as `METHOD TARGET HTTP/1.1`; every field but the hop-by-hop
/// ones, `Content-Length`, `X-Forwarded-For`, `X-Forwarded-Proto` and `Expect: 100-continue`, in
/// order; `Host` when missing; `X-Forwarded-For` with the client appended; `X-Forwarded-Proto`;
/// the framing stated once.
fn write_as_proxy(head: &RequestHead, body: BodyLength) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in end_to_end(head) {
        push_field(&mut out, name, value);
    }
    if head.header("host").is_none() {
        push_header(&mut out, "Host", b"127.0.0.1:8001");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    for value in head.headers.values("x-forwarded-for") {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"127.0.0.1\r\n");
    push_header(&mut out, "X-Forwarded-Proto", b"http");
    match body {
        BodyLength::Fixed(n) => push_header(&mut out, "Content-Length", n.to_string().as_bytes()),
        BodyLength::Chunked => push_header(&mut out, "Transfer-Encoding", b"chunked"),
        BodyLength::Empty | BodyLength::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The fields the proxy passes on as they came.
fn end_to_end(head: &RequestHead) -> Vec<(&[u8], &[u8])> {
    let hop_by_hop = HopByHop::of(head);
    head.headers
        .pairs()
        .filter(|(name, _)| {
            // As in `write_request_head`: these are rewritten, or not the message's to pass on.
            let rewritten = name.eq_ignore_ascii_case(b"x-forwarded-for")
                || name.eq_ignore_ascii_case(b"x-forwarded-proto")
                || name.eq_ignore_ascii_case(b"content-length")
                || (name.eq_ignore_ascii_case(b"expect")
                    && head.has_token("expect", "100-continue"));
            !rewritten && !hop_by_hop.contains(name)
        })
        .collect()
}

/// A request head writer: the head and its framing in, the bytes for the backend out.
pub(crate) type WriteHead<'w> = &'w dyn Fn(&RequestHead, BodyLength) -> Vec<u8>;

/// Reads `input` as a request head and, when it is accepted, checks that `write` round-trips
/// it. Open to the proxy's own tests, to run the real `write_request_head` over
/// [`mutated_request`] inputs.
pub(crate) fn request_round_trips(input: &[u8], write: WriteHead) -> Result<(), TestCaseError> {
    match read_request_cut(input, &[]) {
        Outcome::Head(head, _) => check_round_trip(&head, write),
        _ => Ok(()),
    }
}

/// An accepted request, written by `write`, reads back with the same method, target, fields
/// and framing, as HTTP/1.1. Fields `write` adds after the end-to-end ones are let be.
fn check_round_trip(head: &RequestHead, write: WriteHead) -> Result<(), TestCaseError> {
    // The proxy forwards only what `check_request` lets through.
    let Ok(body) = request_body_length(head) else {
        return Ok(());
    };
    let written = write(head, body);
    let again = match read_request_cut(&written, &[]) {
        Outcome::Head(again, rest) if rest.is_empty() => again,
        other => return Err(TestCaseError::fail(format!("{other:?} from {written:?}"))),
    };
    prop_assert_eq!(again.method(), head.method());
    prop_assert_eq!(again.target(), head.target());
    prop_assert_eq!(again.version, Version::Http11);
    let sent = end_to_end(head);
    let received = end_to_end(&again);
    prop_assert_eq!(&received[..sent.len()], &sent[..]);
    prop_assert_eq!(request_body_length(&again), Ok(body));
    Ok(())
}

/// Methods, including ones that mean something to this layer.
fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_string()),
        Just("POST".to_string()),
        Just("HEAD".to_string()),
        Just("PRI".to_string()),
        "[A-Z]{1,8}",
        "[!#$%&'*+.^_`|~0-9a-zA-Z-]{1,6}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        "/[a-zA-Z0-9/?=&%._~-]{0,24}",
        "http://[a-z]{1,8}(:[0-9]{1,5})?/[a-z]{0,8}",
    ]
}

fn version_token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("HTTP/1.1".to_string()),
        2 => Just("HTTP/1.0".to_string()),
        2 => "HTTP/[0-9]\\.[0-9]",
        1 => "HTTP/[0-9]{1,2}\\.?[0-9]{0,2}",
        1 => Just(String::new()),
        1 => Just("http/1.1".to_string()),
    ]
}

/// Field names, the framing ones often.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Content-Length".to_string()),
        Just("Transfer-Encoding".to_string()),
        Just("Host".to_string()),
        Just("Connection".to_string()),
        Just("X-Forwarded-For".to_string()),
        Just("Expect".to_string()),
        Just("Keep-Alive".to_string()),
        Just("TE".to_string()),
        "[a-zA-Z][a-zA-Z0-9-]{0,12}",
    ]
}

/// Field values, with the numbers and codings that framing turns on.
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[0-9]{1,3}".prop_map(String::into_bytes),
        Just(b"+5".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"0005".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"99999999999999999999999".to_vec()),
        Just(b"5, 5".to_vec()),
        Just(b"5,6".to_vec()),
        Just(b"chunked".to_vec()),
        Just(b"gzip, chunked".to_vec()),
        Just(b"chunked, gzip".to_vec()),
        Just(b" chunked ".to_vec()),
        Just(b"close, X-Secret".to_vec()),
        Just(b"100-continue".to_vec()),
        "[ -~\t]{0,24}".prop_map(String::into_bytes),
        proptest::collection::vec(0x80u8.., 0..6),
    ]
}

/// A request head as its parts, and its line ending.
fn request_head() -> impl Strategy<Value = Vec<u8>> {
    (
        method(),
        target(),
        version_token(),
        proptest::collection::vec((field_name(), field_value()), 0..8),
        prop_oneof![3 => Just("\r\n"), 1 => Just("\n")],
    )
        .prop_map(|(method, target, version, fields, eol)| {
            let mut head = if version.is_empty() {
                format!("{method} {target}{eol}").into_bytes()
            } else {
                format!("{method} {target} {version}{eol}").into_bytes()
            };
            for (name, value) in fields {
                head.extend_from_slice(name.as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(&value);
                head.extend_from_slice(eol.as_bytes());
            }
            head.extend_from_slice(eol.as_bytes());
            head
        })
}

/// One change to a head's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, Vec<u8>),
    Delete(usize),
    Replace(usize, u8),
}

/// Bytes that break heads in interesting ways: controls, line endings, an obs-fold, separators.
fn nasty_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\r\n ".to_vec()),
        Just(b"\r\n\t".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b" ".to_vec()),
        Just(b":".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"\x7f".to_vec()),
        Just(b"\xff".to_vec()),
        Just(b"\r\nContent-Length: 5".to_vec()),
        Just(b"\r\nTransfer-Encoding: chunked".to_vec()),
        (0u8..0x20).prop_map(|b| vec![b]),
        any::<u8>().prop_map(|b| vec![b]),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), nasty_bytes()).prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Replace(at, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        match mutation {
            Mutation::Insert(at, new) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Delete(at) if !bytes.is_empty() => {
                bytes.remove(at % bytes.len());
            }
            Mutation::Replace(at, b) if !bytes.is_empty() => {
                let at = at % bytes.len();
                bytes[at] = *b;
            }
            _ => {}
        }
    }
    bytes
}

/// A mutated request head, sometimes followed by the start of a next request.
pub(crate) fn mutated_request() -> impl Strategy<Value = Vec<u8>> {
    (
        request_head(),
        proptest::collection::vec(mutation(), 0..3),
        prop_oneof![Just(&b""[..]), Just(&b"GET /next HTTP/1.1\r\n"[..])],
    )
        .prop_map(|(head, mutations, rest)| {
            let mut bytes = mutate(head, &mutations);
            bytes.extend_from_slice(rest);
            bytes
        })
}

fn response_head() -> impl Strategy<Value = Vec<u8>> {
    (
        version_token(),
        "[0-9]{3}|[0-9]{1,4}",
        "[ -~\t]{0,12}",
        proptest::collection::vec((field_name(), field_value()), 0..6),
        proptest::collection::vec(mutation(), 0..2),
    )
        .prop_map(|(version, status, reason, fields, mutations)| {
            let mut head = format!("{version} {status} {reason}\r\n").into_bytes();
            for (name, value) in fields {
                push_field(&mut head, name.as_bytes(), &value);
            }
            head.extend_from_slice(b"\r\n");
            mutate(head, &mutations)
        })
}

/// A body cut into chunks, encoded with leading zeros, upper or lower case hex, extensions,
/// LF or CRLF line ends and trailers. Returns the body and its encoding.
fn chunked_body() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let chunk = (
        proptest::collection::vec(any::<u8>(), 1..40),
        0usize..3,
        any::<bool>(),
        prop_oneof![
            Just(""),
            Just(";ext"),
            Just(";name=value"),
            Just(" ;a=\"q\""),
        ],
        prop_oneof![3 => Just("\r\n"), 1 => Just("\n")],
    );
    (
        proptest::collection::vec(chunk, 0..6),
        prop_oneof![Just(""), Just("X-Trailer: 1\r\n"), Just("A: b\r\nC: d\r\n")],
        0usize..3,
    )
        .prop_map(|(chunks, trailers, last_zeros)| {
            let mut body = Vec::new();
            let mut encoded = Vec::new();
            for (data, zeros, upper, ext, eol) in chunks {
                let size = if upper {
                    format!("{:X}", data.len())
                } else {
                    format!("{:x}", data.len())
                };
                encoded.extend_from_slice("0".repeat(zeros).as_bytes());
                encoded.extend_from_slice(size.as_bytes());
                encoded.extend_from_slice(ext.as_bytes());
                encoded.extend_from_slice(eol.as_bytes());
                encoded.extend_from_slice(&data);
                encoded.extend_from_slice(eol.as_bytes());
                body.extend_from_slice(&data);
            }
            encoded.extend_from_slice("0".repeat(last_zeros + 1).as_bytes());
            encoded.extend_from_slice(b"\r\n");
            encoded.extend_from_slice(trailers.as_bytes());
            encoded.extend_from_slice(b"\r\n");
            (body, encoded)
        })
}

/// Relays a chunked body from `input` cut at `cuts`; returns the output and what stayed buffered.
fn relay_chunked_cut(
    input: &[u8],
    cuts: &[usize],
    dechunk: bool,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut src = BufferedStream::new(Script::cut(input, cuts), 8);
    let mut sink = Sink::memory();
    let result = relay_body(&mut src, BodyLength::Chunked, &mut sink, dechunk);
    assert!(src.buf.len() <= BODY_BUFFER.max(MAX_CHUNK_LINE * 2));
    match result {
        Ok(()) => Ok((sink.into_written(), src.unconsumed())),
        Err(RelayError::Truncated) => Err("truncated".into()),
        Err(RelayError::Malformed(why)) => Err(why.into()),
        Err(err) => panic!("a scripted source cannot fail: {err:?}"),
    }
}

/// An independent, strict reading of a chunked body, written from the grammar of RFC 9112 §7.1
/// (with the bare-LF line ends §2.2 allows): the body and the length of its encoding, or `None`
/// when the encoding breaks the grammar.
fn strict_dechunk(input: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let (line, next) = strict_line(input, at)?;
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let (size, rest) = line.split_at(digits);
        // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ); BWS before the line
        // end too, which every reader that accepts it reads the same way.
        let ext = rest.trim_ascii_start();
        if digits == 0 || !(ext.is_empty() || ext.starts_with(b";")) {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()?;
        at = next;
        if size == 0 {
            // trailer-section = *( field-line CRLF ), then CRLF.
            loop {
                let (line, next) = strict_line(input, at)?;
                at = next;
                if line.is_empty() {
                    return Some((body, at));
                }
                let name_len = line.iter().position(|&b| b == b':')?;
                if name_len == 0 || !line[..name_len].iter().all(|&b| is_tchar(b)) {
                    return None;
                }
            }
        }
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        body.extend_from_slice(input.get(at..end)?);
        at = end;
        at += match input.get(at..) {
            Some([b'\r', b'\n', ..]) => 2,
            Some([b'\n', ..]) => 1,
            _ => return None,
        };
    }
}

/// A line from `at`, without its CRLF or LF, and where the next one starts. A CR anywhere else,
/// or another control byte but HTAB, breaks it.
fn strict_line(input: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = input.get(at..)?.iter().position(|&b| b == b'\n')?;
    let line = &input[at..at + len];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return None;
    }
    Some((line, at + len + 1))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The properties, shared by the quick runs in `cargo test` and the long `fuzz_*` runs.
mod invariants {
    use super::*;

    /// Random bytes, read in random pieces, as a request and as a response: no panic, no hang,
    /// and an answer that does not depend on how the bytes were cut.
    pub fn random_bytes(input: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
        let whole = read_request_cut(input, &[]);
        // A head shorter than the buffer bound reads the same however it is cut.
        if input.len() < MAX_HEAD {
            prop_assert_eq!(read_request_cut(input, cuts), whole.clone());
            prop_assert_eq!(
                read_response_cut(input, cuts),
                read_response_cut(input, &[])
            );
        }
        if let Outcome::Head(head, _) = whole {
            check_round_trip(&head, &write_as_proxy)?;
        }
        Ok(())
    }

    /// A mutated request head: the same outcome at every split, and an accepted one round-trips.
    pub fn mutated_request(input: &[u8]) -> Result<(), TestCaseError> {
        check_every_split(input, read_request_cut)?;
        request_round_trips(input, &write_as_proxy)
    }

    /// A mutated response head: the same outcome at every split, and framing that never panics.
    pub fn mutated_response(input: &[u8]) -> Result<(), TestCaseError> {
        if let Outcome::Head(head, _) = check_every_split(input, read_response_cut)? {
            prop_assert!((100..=999).contains(&head.status));
            let _ = response_body_length("GET", &head);
            let _ = response_body_length("HEAD", &head);
        }
        Ok(())
    }

    /// A chunked body relays to what was encoded (de-chunked) or to its own bytes (passed on),
    /// for every split of the input into reads, and what follows it stays buffered.
    pub fn chunked(body: &[u8], encoded: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
        let mut input = encoded.to_vec();
        input.extend_from_slice(b"NEXT");
        let expected_dechunked = Ok((body.to_vec(), b"NEXT".to_vec()));
        let expected_passed = Ok((encoded.to_vec(), b"NEXT".to_vec()));
        prop_assert_eq!(&relay_chunked_cut(&input, cuts, true), &expected_dechunked);
        prop_assert_eq!(&relay_chunked_cut(&input, cuts, false), &expected_passed);
        for cut in 1..input.len() {
            prop_assert_eq!(
                &relay_chunked_cut(&input, &[cut], true),
                &expected_dechunked,
                "cut at {}",
                cut
            );
        }
        let every: Vec<usize> = (1..input.len()).collect();
        prop_assert_eq!(
            &relay_chunked_cut(&input, &every, true),
            &expected_dechunked
        );
        Ok(())
    }

    /// A mutated chunked body: no panic and no hang; an accepted one is the same at every split,
    /// passed on byte for byte, and read the same by the strict reference decoder. Whatever a
    /// strict backend would read differently could desynchronise it from the balancer.
    pub fn mutated_chunked(input: &[u8]) -> Result<(), TestCaseError> {
        let whole = relay_chunked_cut(input, &[], true);
        if let Ok((body, rest)) = &whole {
            let consumed = input.len() - rest.len();
            prop_assert_eq!(strict_dechunk(input), Some((body.clone(), consumed)));
            prop_assert_eq!(
                relay_chunked_cut(input, &[], false),
                Ok((input[..consumed].to_vec(), rest.clone()))
            );
        }
        for cut in 1..input.len() {
            prop_assert_eq!(
                &relay_chunked_cut(input, &[cut], true),
                &whole,
                "cut at {}",
                cut
            );
        }
        Ok(())
    }
}

/// Cases per property in the long runs: `LB_FUZZ_CASES`, or 100000.
fn long_run() -> ProptestConfig {
    let cases = std::env::var("LB_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Cases per property in `cargo test`.
fn quick_run(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0usize..600, 0..8)
}

fn mutated_chunked_input() -> impl Strategy<Value = Vec<u8>> {
    (chunked_body(), proptest::collection::vec(mutation(), 1..3))
        .prop_map(|((_, encoded), mutations)| mutate(encoded, &mutations))
}

proptest! {
    #![proptest_config(quick_run(1000))]

    #[test]
    fn random_bytes_read_the_same_however_cut(
        input in proptest::collection::vec(any::<u8>(), 0..300),
        cuts in cuts(),
    ) {
        invariants::random_bytes(&input, &cuts)?;
    }
}

proptest! {
    #![proptest_config(quick_run(600))]

    #[test]
    fn mutated_request_heads_read_the_same_at_every_split(input in mutated_request()) {
        invariants::mutated_request(&input)?;
    }

    #[test]
    fn mutated_response_heads_read_the_same_at_every_split(input in response_head()) {
        invariants::mutated_response(&input)?;
    }
}

proptest! {
    #![proptest_config(quick_run(300))]

    #[test]
    fn chunked_bodies_come_out_as_encoded(
        (body, encoded) in chunked_body(),
        cuts in cuts(),
    ) {
        invariants::chunked(&body, &encoded, &cuts)?;
    }

    #[test]
    fn mutated_chunked_bodies_read_the_same_at_every_split(input in mutated_chunked_input()) {
        invariants::mutated_chunked(&input)?;
    }
}

proptest! {
    #![proptest_config(long_run())]

    #[test]
    #[ignore = "long run: cargo test --release -- --ignored fuzz"]
    fn fuzz_random_bytes(
        input in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in cuts(),
    ) {
        invariants::random_bytes(&input, &cuts)?;
    }

    #[test]
    #[ignore = "long run: cargo test --release -- --ignored fuzz"]
    fn fuzz_mutated_request_heads(input in mutated_request()) {
        invariants::mutated_request(&input)?;
    }

    #[test]
    #[ignore = "long run: cargo test --release -- --ignored fuzz"]
    fn fuzz_mutated_response_heads(input in response_head()) {
        invariants::mutated_response(&input)?;
    }

    #[test]
    #[ignore = "long run: cargo test --release -- --ignored fuzz"]
    fn fuzz_chunked_bodies((body, encoded) in chunked_body(), cuts in cuts()) {
        invariants::chunked(&body, &encoded, &cuts)?;
    }

    #[test]
    #[ignore = "long run: cargo test --release -- --ignored fuzz"]
    fn fuzz_mutated_chunked_bodies(input in mutated_chunked_input()) {
        invariants::mutated_chunked(&input)?;
    }
}

/// Bounds that random inputs rarely reach, tested directly.
mod bounds {
    use super::*;

    #[test]
    fn a_head_over_64_kib_is_refused_with_the_buffer_bounded() {
        let mut head = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        head.extend_from_slice(b"\r\n\r\n");
        for cuts in [
            vec![],
            vec![1000, 30_000],
            (1..40).map(|i| i * 1700).collect(),
        ] {
            assert_eq!(read_request_cut(&head, &cuts), Outcome::Refused(431));
        }
    }

    #[test]
    fn more_than_100_fields_are_refused() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        assert_eq!(read_request_cut(&head, &[]), Outcome::Refused(431));
    }

    #[test]
    fn a_chunk_line_over_its_limit_is_refused() {
        let mut body = b"5;".to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE * 3));
        body.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(
            relay_chunked_cut(&body, &[], true),
            Err("chunk line too long".into())
        );
    }

    #[test]
    fn trailers_over_64_kib_are_refused() {
        let mut body = b"0\r\n".to_vec();
        for i in 0..(MAX_HEAD / 1000 + 2) {
            body.extend_from_slice(format!("X-{i}: ").as_bytes());
            body.extend(std::iter::repeat_n(b'x', 1000));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"\r\n");
        assert_eq!(
            relay_chunked_cut(&body, &[], true),
            Err("trailer section too large".into())
        );
    }
}

/// What the properties found, and the version rules, as named cases.
mod regressions {
    use super::*;

    fn request(text: &[u8]) -> Outcome<RequestHead> {
        read_request_cut(text, &[])
    }

    fn version_of(text: &[u8]) -> Option<Version> {
        match request(text) {
            Outcome::Head(head, _) => Some(head.version),
            _ => None,
        }
    }

    #[test]
    fn later_http1_minor_versions_are_read_as_http11() {
        assert_eq!(
            version_of(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
            Some(Version::Http11)
        );
        assert_eq!(version_of(b"GET / HTTP/1.9\n\n"), Some(Version::Http11));
        let Outcome::Head(head, _) = request(b"POST /x?y HTTP/1.5\r\nContent-Length: 2\r\n\r\nhi")
        else {
            panic!("not read");
        };
        assert_eq!((head.method(), head.target()), ("POST", "/x?y"));
        assert_eq!(request_body_length(&head), Ok(BodyLength::Fixed(2)));
        let Outcome::Head(response, _) = read_response_cut(b"HTTP/1.3 200 OK\r\n\r\n", &[]) else {
            panic!("not read");
        };
        assert_eq!((response.version, response.status), (Version::Http11, 200));
    }

    #[test]
    fn a_later_minor_version_does_not_excuse_a_malformed_head() {
        assert_eq!(
            request(b"GET / HTTP/1.2\r\nBad Name: x\r\n\r\n"),
            Outcome::Refused(400)
        );
        assert_eq!(request(b"GET / HTTP/1.2x\r\n\r\n"), Outcome::Refused(400));
        assert_eq!(request(b"G\0T / HTTP/1.2\r\n\r\n"), Outcome::Refused(400));
    }

    #[test]
    fn other_major_versions_and_http09_get_505() {
        for text in [
            &b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/3.0\r\n\r\n",
            b"GET / HTTP/0.9\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /\r\n\r\n",
        ] {
            assert_eq!(request(text), Outcome::Refused(505), "{text:?}");
        }
    }

    #[test]
    fn an_unsupported_version_is_refused_as_soon_as_its_line_arrives() {
        // An HTTP/0.9 client sends one line and waits; it must not wait for a timeout.
        assert_eq!(request(b"GET /index.html\r\n"), Outcome::Refused(505));
        assert_eq!(
            request(b"GET / HTTP/2.0\r\nHost: a\r\n"),
            Outcome::Refused(505)
        );
        // A valid line keeps the reader waiting for the rest of the head.
        assert_eq!(
            request(b"GET / HTTP/1.2\r\nHost: a\r\n"),
            Outcome::Truncated
        );
    }

    #[test]
    fn what_is_not_a_version_is_still_400() {
        for text in [
            &b"GET / HTTP/1.10\r\n\r\n"[..],
            b"GET / HTTP/10.0\r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"GET / http/2.0\r\n\r\n",
            b"GET / HTTP/2.0 x\r\n\r\n",
            b"GET\r\n\r\n",
        ] {
            assert_eq!(request(text), Outcome::Refused(400), "{text:?}");
        }
    }

    #[test]
    fn a_backend_answering_in_http2_is_refused() {
        assert!(matches!(
            parse_response_head(b"HTTP/2.0 200 OK\r\n\r\n"),
            Err(HeadError::UnsupportedVersion(v)) if v == "HTTP/2.0"
        ));
    }

    /// Found by the response fuzzer: httparse reads any three digits, and a status below 100
    /// counted as a bodiless interim response, so a backend's `000` answer with a body left
    /// that body in the pooled connection, to be read as the answer to another request.
    #[test]
    fn a_status_below_100_is_malformed() {
        for text in [
            &b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nhi"[..],
            b"HTTP/1.1 099 X\r\n\r\n",
        ] {
            assert_eq!(
                read_response_cut(text, &[]),
                Outcome::Refused(400),
                "{text:?}"
            );
        }
        let Outcome::Head(head, _) = read_response_cut(b"HTTP/1.1 100 Continue\r\n\r\n", &[])
        else {
            panic!("not read");
        };
        assert_eq!(head.status, 100);
    }

    fn dechunk(input: &[u8]) -> Result<Vec<u8>, String> {
        relay_chunked_cut(input, &[], true).map(|(body, _)| body)
    }

    /// Found by the chunked fuzzer against the strict reference decoder: trailer lines were
    /// only looked at for the blank line that ends them, so control bytes and bare CRs went
    /// through to the backend.
    #[test]
    fn a_control_byte_or_bare_cr_in_a_trailer_is_refused() {
        for input in [
            &b"0\r\nA: b\r\x0bC: d\r\n\r\n"[..],
            b"0\r\nA: b\rC: d\r\n\r\n",
            b"0\r\nA: \0\r\n\r\n",
        ] {
            assert_eq!(dechunk(input), Err("bad trailer field".into()), "{input:?}");
        }
        assert_eq!(dechunk(b"0\r\nA: b\tc\r\n\n"), Ok(Vec::new()));
    }

    /// Found with the same property: a trailer line of spaces ended the body here, while a
    /// backend reading it as a folded (or broken) field line keeps reading trailers, into
    /// the next request on its connection: the two would disagree on where requests start.
    #[test]
    fn trailers_ended_by_a_line_of_spaces_or_a_fold_are_refused() {
        for input in [
            &b"0\r\n \r\nGET /smuggled HTTP/1.1\r\n\r\n"[..],
            b"0\r\n\t\r\n\r\n",
            b"0\r\n\r\r\n\r\n",
            b"0\r\nA: b\r\n folded\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: no name\r\n\r\n",
        ] {
            assert_eq!(dechunk(input), Err("bad trailer field".into()), "{input:?}");
        }
    }

    /// Found with the same property: the line after chunk data was trimmed before it was
    /// checked, so `hello  \r\n` or `hello\r\r\n` ended a 5-byte chunk.
    #[test]
    fn chunk_data_ends_with_exactly_crlf_or_lf() {
        for input in [
            &b"5\r\nhello  \r\n0\r\n\r\n"[..],
            b"5\r\nhello\r\r\n0\r\n\r\n",
            b"5\r\nhello\t\n0\r\n\r\n",
        ] {
            assert_eq!(
                dechunk(input),
                Err("chunk data longer than its size".into()),
                "{input:?}"
            );
        }
        assert_eq!(dechunk(b"5\nhello\n0\n\n"), Ok(b"hello".to_vec()));
    }

    /// Found with the same property: the size was trimmed on both sides, so ` 5` and `5\r\r\n`
    /// were read as 5 and passed on as they came.
    #[test]
    fn a_chunk_size_is_hex_digits_then_only_spaces_or_an_extension() {
        for input in [
            &b" 5\r\nhello\r\n0\r\n\r\n"[..],
            b"\t5\r\nhello\r\n0\r\n\r\n",
            b"5\x0b\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"1000000000000000\r\n",
        ] {
            assert_eq!(dechunk(input), Err("bad chunk size".into()), "{input:?}");
        }
        for input in [
            &b"5  \r\nhello\r\n0\r\n\r\n"[..],
            b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
            b"005;x\r\nhello\r\n000\r\n\r\n",
        ] {
            assert_eq!(dechunk(input), Ok(b"hello".to_vec()), "{input:?}");
        }
    }
}
