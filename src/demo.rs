//! The demo backend: the small HTTP/1.1 server the balancer sends traffic to while you follow the chapter.
//! Every path answers `Hello from NAME (ADDR): METHOD PATH` with an `X-Backend: NAME` header, so each
//! response shows which backend served it, and `GET /health` answers `ok` for the health checker.
//! Like the rest of the crate it uses blocking `std::net` I/O and one thread per connection, and it speaks
//! enough HTTP/1.1 (keep-alive, pipelining, Content-Length and chunked request bodies) that the balancer's
//! keep-alive connections to backends are exercised for real. `/ws` is a WebSocket echo and `/chat` a
//! page that opens it (see `websocket.rs`), to watch a tunnel through the balancer.
//!
//! Two additions serve the soak test (`scripts/soak.sh`): `GET /bytes/N` answers N bytes, streamed,
//! for clients that download a large body slowly; and [`Options::reset_percent`] makes the backend
//! cut that share of its responses off midway (the head and half the body sent, then the connection
//! reset), the fault a balancer cannot hide from its clients once the head has been relayed.

mod websocket;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::SockRef;

use crate::http::{
    self, BodyLength, BufferedStream, HeadError, Headers, RelayError, RequestHead, Sink, Version,
};
use crate::server::{wake_address, LISTEN_BACKLOG};

/// A connection whose next request head has not fully arrived within this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The read buffer of a connection; it also bounds how much body is buffered at once.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Stack of each connection thread. Buffers live on the heap, so a small stack is plenty.
const CONNECTION_STACK_BYTES: usize = 128 * 1024;
/// How long `stop` waits to connect to its own listener to wake the accept thread.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept`, so running out of file descriptors does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The largest body `GET /bytes/N` serves (1 GiB); it is streamed, so this bounds time, not memory.
pub const MAX_BYTES_BODY: u64 = 1 << 30;
/// Bytes written at once when streaming a `/bytes/N` body.
const BYTES_CHUNK: usize = 16 * 1024;

/// How a demo backend behaves, besides its name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Slept before each response except `/health`, to imitate a slow backend.
    pub delay: Duration,
    /// Share of responses (0–100, not `/health`) cut off midway: the head and half the body are
    /// sent, then the connection is reset (`SO_LINGER` 0). The cut responses are spread evenly:
    /// with 5, every 20th response.
    pub reset_percent: u8,
}

/// A demo backend serving on its own accept thread, started by [`start`].
///
/// Stopping it (with [`DemoBackend::stop`] or by dropping it) stops accepting, closes the listener and
/// shuts down the connections it has open, so a balancer sees it go away as a real backend would.
pub struct DemoBackend {
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

/// Starts a demo backend on `listener` in the background and returns at once.
///
/// `name` appears in every response; `delay` is slept before each response except `/health`, to
/// imitate a slow backend. Fails if the listener's address cannot be read, the name holds control
/// characters (it goes into a header), or the accept thread cannot be spawned.
pub fn start(listener: TcpListener, name: String, delay: Duration) -> io::Result<DemoBackend> {
    start_with(
        listener,
        name,
        Options {
            delay,
            ..Options::default()
        },
    )
}

/// Like [`start`], with every [`Options`] field; a `reset_percent` over 100 is refused.
pub fn start_with(
    listener: TcpListener,
    name: String,
    options: Options,
) -> io::Result<DemoBackend> {
    let shared = Shared::new(&listener, name, options)?;
    let accept_thread = thread::Builder::new()
        .name(format!("demo-accept-{}", shared.addr.port()))
        .spawn({
            let shared = Arc::clone(&shared);
            move || accept_loop(&listener, &shared)
        })?;
    Ok(DemoBackend {
        shared,
        accept_thread: Some(accept_thread),
    })
}

/// Runs a demo backend on `listener` on the calling thread, forever.
///
/// This is what the `backend` binary runs; it returns only with a start-up error (see [`start`]).
pub fn serve(listener: TcpListener, name: String, delay: Duration) -> io::Result<()> {
    serve_with(
        listener,
        name,
        Options {
            delay,
            ..Options::default()
        },
    )
}

/// Like [`serve`], with every [`Options`] field; a `reset_percent` over 100 is refused.
pub fn serve_with(listener: TcpListener, name: String, options: Options) -> io::Result<()> {
    let shared = Shared::new(&listener, name, options)?;
    accept_loop(&listener, &shared);
    Ok(())
}

impl DemoBackend {
    /// The address the backend listens on (with the real port when it was bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Stops accepting, waits for the accept thread to end and shuts down open connections.
    pub fn stop(mut self) {
        self.shut_down();
    }

    /// Does the work of [`DemoBackend::stop`]; a second call does nothing, so `Drop` can call it too.
    fn shut_down(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        // `accept` cannot be interrupted, so, as tiny-http does, raise the flag and then connect once
        // to ourselves: the accept thread wakes up, sees the flag and ends, dropping the listener.
        self.shared.stopping.store(true, Ordering::SeqCst);
        match TcpStream::connect_timeout(&wake_address(self.shared.addr), WAKE_TIMEOUT) {
            Ok(_) => {
                if accept_thread.join().is_err() {
                    log::warn!("demo backend {}: accept thread panicked", self.shared.name);
                }
            }
            // Joining now could wait forever; the thread ends at its next accept instead.
            Err(err) => log::warn!(
                "demo backend {}: could not wake the accept thread: {err}",
                self.shared.name
            ),
        }
        self.shared.connections.close_all();
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl fmt::Debug for DemoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoBackend")
            .field("name", &self.shared.name)
            .field("addr", &self.shared.addr)
            .field("options", &self.shared.options)
            .finish()
    }
}

/// What the accept thread and every connection thread of one backend share.
struct Shared {
    name: String,
    addr: SocketAddr,
    options: Options,
    /// Responses started so far (not counting `/health`), to pick the ones to cut off.
    responses: AtomicU64,
    stopping: AtomicBool,
    connections: Connections,
}

impl Shared {
    fn new(listener: &TcpListener, name: String, options: Options) -> io::Result<Arc<Shared>> {
        if name.bytes().any(|byte| byte.is_ascii_control()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "backend name must not contain control characters",
            ));
        }
        if options.reset_percent > 100 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "reset percent must be between 0 and 100",
            ));
        }
        // A listener left non-blocking by its creator would make `accept` spin.
        listener.set_nonblocking(false)?;
        // `TcpListener::bind` queues only 128 connections not yet accepted. A balancer opening
        // hundreds at once (a burst of clients, the benchmarks) would overflow it, and each
        // dropped connection would wait a second for its retry. Listening again on a listening
        // socket only lengthens its queue.
        SockRef::from(listener).listen(LISTEN_BACKLOG)?;
        Ok(Arc::new(Shared {
            name,
            addr: listener.local_addr()?,
            options,
            responses: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            connections: Connections::default(),
        }))
    }

    /// Counts a response and says whether it is one of the `reset_percent` to cut off: response
    /// n is cut when n × percent / 100 reaches a new whole number, which spreads the cuts evenly
    /// (and makes them predictable in tests).
    fn cut_next_response(&self) -> bool {
        let percent = u64::from(self.options.reset_percent);
        if percent == 0 {
            return false;
        }
        let n = self.responses.fetch_add(1, Ordering::Relaxed) + 1;
        n * percent / 100 > (n - 1) * percent / 100
    }
}

/// Open connections, kept so that stopping a backend can shut them down.
#[derive(Default)]
struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, TcpStream>>,
}

impl Connections {
    /// Remembers a clone of `stream` until the returned guard is dropped.
    fn register(shared: &Arc<Shared>, stream: &TcpStream) -> Registration {
        let id = shared.connections.next_id.fetch_add(1, Ordering::Relaxed);
        // Without a clone the connection still works; it just outlives `stop` until its client leaves.
        if let Ok(clone) = stream.try_clone() {
            shared.connections.lock().insert(id, clone);
        }
        Registration {
            shared: Arc::clone(shared),
            id,
        }
    }

    /// Shuts down every open connection, which ends its thread's next read or write.
    fn close_all(&self) {
        let streams: Vec<TcpStream> = self.lock().drain().map(|(_, stream)| stream).collect();
        for stream in streams {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TcpStream>> {
        // The map stays consistent even if a thread panicked while holding the lock.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a connection from [`Connections`] when its thread ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.connections.lock().remove(&self.id);
    }
}

/// Accepts connections and gives each its own thread, until the backend is stopped.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match stream {
            Ok(stream) => spawn_connection(stream, shared),
            Err(err) => {
                log::warn!("demo backend {}: accept failed: {err}", shared.name);
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

fn spawn_connection(stream: TcpStream, shared: &Arc<Shared>) {
    // Registering here, on the accept thread, means `stop` (which joins this thread first) sees
    // every connection when it shuts them down.
    let registration = Connections::register(shared, &stream);
    let spawned = thread::Builder::new()
        .name("demo-conn".to_string())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || {
            let shared = &registration.shared;
            let peer = stream.peer_addr().ok();
            if let Err(err) = handle_connection(stream, shared) {
                log::debug!(
                    "demo backend {}: connection from {peer:?} ended: {err}",
                    shared.name
                );
            }
        });
    if let Err(err) = spawned {
        log::warn!(
            "demo backend {}: cannot spawn a connection thread: {err}",
            shared.name
        );
    }
}

/// Serves requests on one connection, one after another, until either side closes it.
fn handle_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // A client that stops sending or reading must not hold this thread forever.
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut conn = BufferedStream::new(stream, READ_BUFFER_BYTES);
    loop {
        match exchange(&mut conn, shared) {
            Ok(Persist::KeepAlive) => {}
            Ok(Persist::WebSocket) => return websocket::echo(conn, &shared.name),
            Ok(Persist::Close) => {
                http::close_gracefully(conn.socket());
                return Ok(());
            }
            Ok(Persist::Reset) => {
                // With a zero linger time, closing sends a reset instead of a FIN, and whatever
                // the peer has not read yet of the response is all it gets.
                SockRef::from(conn.socket()).set_linger(Some(Duration::ZERO))?;
                return Ok(());
            }
            Err(Abort::ClientClosed) => return Ok(()),
            Err(Abort::Reject(reject)) => {
                let response = render(
                    reject.status_line(),
                    reject.body(),
                    true,
                    Some("close"),
                    &shared.name,
                );
                conn.socket().write_all(&response)?;
                http::close_gracefully(conn.socket());
                return Ok(());
            }
            Err(Abort::Io(err)) => return Err(err),
        }
    }
}

/// Whether a connection stays open after a response.
enum Persist {
    KeepAlive,
    Close,
    /// The connection switched to the WebSocket protocol (`/ws`).
    WebSocket,
    /// The response was cut off midway on purpose (`reset_percent`): reset the connection.
    Reset,
}

/// Why a connection stops before a response could be written.
enum Abort {
    /// The client closed the connection between requests (or went quiet), as it may.
    ClientClosed,
    /// The request broke a rule; it is answered with an error status and the connection closed.
    Reject(Reject),
    /// Reading or writing failed (a reset, a timeout, or the client closed mid-request).
    Io(io::Error),
}

impl From<io::Error> for Abort {
    fn from(err: io::Error) -> Abort {
        Abort::Io(err)
    }
}

impl From<Reject> for Abort {
    fn from(reject: Reject) -> Abort {
        Abort::Reject(reject)
    }
}

impl From<HeadError> for Abort {
    fn from(err: HeadError) -> Abort {
        match err {
            HeadError::TooLarge => Reject::HeadTooLarge.into(),
            HeadError::LineTooLong => Reject::UriTooLong.into(),
            HeadError::Malformed(_) => Reject::BadRequest.into(),
            HeadError::UnsupportedVersion(_) => Reject::VersionNotSupported.into(),
            HeadError::TimedOut | HeadError::Truncated => Abort::ClientClosed,
            HeadError::Io(err) => Abort::Io(err),
        }
    }
}

impl From<RelayError> for Abort {
    fn from(err: RelayError) -> Abort {
        match err {
            RelayError::Malformed(_) => Reject::BadRequest.into(),
            RelayError::Read(err) | RelayError::Write(err) => Abort::Io(err),
            RelayError::Truncated => Abort::Io(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// A request the backend refuses to answer normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    /// Malformed request line, headers, framing or chunked body: `400`.
    BadRequest,
    /// Request head over 64 KiB or 100 fields: `431`.
    HeadTooLarge,
    /// Request line alone over 64 KiB: `414`.
    UriTooLong,
    /// A major version of HTTP other than 1, or an HTTP/0.9 line: `505`.
    VersionNotSupported,
}

impl Reject {
    fn status_line(self) -> &'static str {
        match self {
            Reject::BadRequest => "400 Bad Request",
            Reject::HeadTooLarge => "431 Request Header Fields Too Large",
            Reject::UriTooLong => "414 URI Too Long",
            Reject::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Reject::BadRequest => "bad request\n",
            Reject::HeadTooLarge => "request header fields too large\n",
            Reject::UriTooLong => "uri too long\n",
            Reject::VersionNotSupported => {
                "http version not supported; this server speaks HTTP/1.1\n"
            }
        }
    }
}

/// One request and response: read the head, skip the body, wait the delay, answer. The head and
/// the body are read by the same `http` module the balancer uses.
fn exchange(conn: &mut BufferedStream, shared: &Shared) -> Result<Persist, Abort> {
    let Some(request) = http::read_request_head(conn, IDLE_TIMEOUT)? else {
        return Err(Abort::ClientClosed);
    };
    skip_body(conn, &request)?;
    let method = request.method();
    let path = request.target().split('?').next().unwrap_or_default();
    if path == "/ws" && websocket::is_handshake(&request) {
        websocket::accept(conn, &request, &shared.name)?;
        return Ok(Persist::WebSocket);
    }
    if path == "/chat" && method == "GET" {
        conn.socket()
            .write_all(&websocket::chat_page(&shared.name))?;
        return Ok(Persist::KeepAlive);
    }
    let is_health = matches!(method, "GET" | "HEAD") && path == "/health";
    let body = if is_health {
        Body::Text("ok\n".to_string())
    } else {
        if !shared.options.delay.is_zero() {
            thread::sleep(shared.options.delay);
        }
        match bytes_length(method, path) {
            Some(length) => Body::Bytes(length),
            None => Body::Text(format!(
                "Hello from {} ({}): {method} {}\n",
                shared.name,
                shared.addr,
                request.target()
            )),
        }
    };
    answer(conn, shared, &request, &body, is_health)
}

/// Reads the request's body and throws it away, so the next request on the connection starts
/// in step.
fn skip_body(conn: &mut BufferedStream, request: &RequestHead) -> Result<(), Abort> {
    let body = http::request_body_length(request).map_err(|_| Reject::BadRequest)?;
    // A client that sent `Expect: 100-continue` waits for this before sending the body
    // (RFC 9110 section 10.1.1); HTTP/1.0 clients do not know the interim status.
    if request.version == Version::Http11
        && body != BodyLength::Empty
        && request.has_token("expect", "100-continue")
    {
        conn.socket().write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    http::relay_body(conn, body, &mut Sink::discard(), true)?;
    Ok(())
}

/// Writes the response with `body` and says how the connection goes on: kept alive, closed,
/// or reset after a response cut short on purpose.
fn answer(
    conn: &mut BufferedStream,
    shared: &Shared,
    request: &RequestHead,
    body: &Body,
    is_health: bool,
) -> Result<Persist, Abort> {
    let method = request.method();
    let is_http11 = request.version == Version::Http11;
    // Transfer-Encoding in an HTTP/1.0 request is a framing fault that ends the connection
    // (RFC 9112 section 6.1).
    let keep_alive =
        request.wants_keep_alive() && (is_http11 || request.header("transfer-encoding").is_none());
    // `close` when closing, and `keep-alive` for an HTTP/1.0 client that asked to keep the
    // connection (it would assume close otherwise).
    let connection = match (keep_alive, is_http11) {
        (false, _) => Some("close"),
        (true, false) => Some("keep-alive"),
        (true, true) => None,
    };
    // Health checks are never cut off, so the fault shows in responses and not in the backend's
    // health.
    let cut = !is_health && method != "HEAD" && shared.cut_next_response();
    write_response(
        conn.socket(),
        shared,
        body,
        method != "HEAD",
        connection,
        cut,
    )?;
    Ok(if cut {
        Persist::Reset
    } else if keep_alive {
        Persist::KeepAlive
    } else {
        Persist::Close
    })
}

/// Writes a `200 OK` carrying `body`, or only its head when `include_body` is false (HEAD gets
/// the headers a GET would get, Content-Length included, but no body: RFC 9110 section 9.3.2).
/// When `cut`, only the first half of the body goes out.
fn write_response(
    mut socket: &TcpStream,
    shared: &Shared,
    body: &Body,
    include_body: bool,
    connection: Option<&str>,
    cut: bool,
) -> io::Result<()> {
    match body {
        Body::Text(text) => {
            let response = render("200 OK", text, include_body, connection, &shared.name);
            let sent = if cut {
                response.len() - text.len() / 2
            } else {
                response.len()
            };
            socket.write_all(&response[..sent])
        }
        Body::Bytes(length) => {
            let head = render_head(
                "200 OK",
                "application/octet-stream",
                *length,
                connection,
                &shared.name,
            );
            socket.write_all(head.as_bytes())?;
            if !include_body {
                return Ok(());
            }
            write_filler(socket, if cut { length / 2 } else { *length })
        }
    }
}

/// What a response carries: a short text, or `/bytes/N`'s N filler bytes.
enum Body {
    Text(String),
    Bytes(u64),
}

/// N when the request is `GET` or `HEAD` `/bytes/N`, N a number no larger than [`MAX_BYTES_BODY`].
/// Anything else under `/bytes/` is an ordinary path and answers hello.
fn bytes_length(method: &str, path: &str) -> Option<u64> {
    if !matches!(method, "GET" | "HEAD") {
        return None;
    }
    let digits = path.strip_prefix("/bytes/")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n <= MAX_BYTES_BODY)
}

/// Writes `length` filler bytes in chunks, so a large body never sits in memory whole.
fn write_filler(mut socket: &TcpStream, length: u64) -> io::Result<()> {
    let chunk = [b'x'; BYTES_CHUNK];
    let mut left = length;
    while left > 0 {
        let now = usize::try_from(left).map_or(BYTES_CHUNK, |left| left.min(BYTES_CHUNK));
        socket.write_all(&chunk[..now])?;
        left -= now as u64;
    }
    Ok(())
}

/// A response head with a Content-Length, ending with the blank line.
fn render_head(
    status_line: &str,
    content_type: &str,
    length: u64,
    connection: Option<&str>,
    name: &str,
) -> String {
    let mut head = format!(
        "HTTP/1.1 {status_line}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nX-Backend: {name}\r\n"
    );
    if let Some(connection) = connection {
        head.push_str("Connection: ");
        head.push_str(connection);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// Builds a whole response in one buffer, so it goes out in one write.
fn render(
    status_line: &str,
    body: &str,
    include_body: bool,
    connection: Option<&str>,
    name: &str,
) -> Vec<u8> {
    let head = render_head(
        status_line,
        "text/plain; charset=utf-8",
        body.len() as u64,
        connection,
        name,
    );
    let mut response = head.into_bytes();
    if include_body {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::MAX_HEAD as MAX_HEAD_BYTES;
    use httparse::Status;
    use std::io::Read;
    use std::time::Instant;

    /// How long a test waits for any one read before failing instead of hanging.
    const TEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// Most reads one response may take in a test.
    const MAX_READS: usize = 10_000;

    fn start_backend(name: &str, delay: Duration) -> DemoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        start(listener, name.to_string(), delay).expect("start demo backend")
    }

    /// A parsed response as the tests see it.
    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }
    }

    /// A raw client: writes bytes as given and parses responses, keeping leftovers for the next one.
    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        fn connect(addr: SocketAddr) -> Client {
            let stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(TEST_TIMEOUT))
                .expect("read timeout");
            stream
                .set_write_timeout(Some(TEST_TIMEOUT))
                .expect("write timeout");
            stream.set_nodelay(true).expect("nodelay");
            Client {
                stream,
                buf: Vec::new(),
            }
        }

        fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).expect("write request");
        }

        fn read_more(&mut self) {
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).expect("read response");
            assert!(
                read > 0,
                "connection closed before a whole response arrived"
            );
            self.buf.extend_from_slice(&chunk[..read]);
        }

        /// Reads one response; `to_head` says it answers a HEAD request and so has no body.
        fn response(&mut self, to_head: bool) -> Response {
            for _ in 0..MAX_READS {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Response::new(&mut headers);
                let Status::Complete(head_len) = parsed.parse(&self.buf).expect("valid response")
                else {
                    self.read_more();
                    continue;
                };
                let status = parsed.code.expect("status code");
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let mut response = Response {
                    status,
                    headers,
                    body: String::new(),
                };
                let body_len = if to_head {
                    0
                } else {
                    let length = response.header("content-length").expect("content-length");
                    length.parse::<usize>().expect("numeric content-length")
                };
                for _ in 0..MAX_READS {
                    if self.buf.len() >= head_len + body_len {
                        break;
                    }
                    self.read_more();
                }
                let bytes: Vec<u8> = self.buf.drain(..head_len + body_len).collect();
                response.body = String::from_utf8(bytes[head_len..].to_vec()).expect("utf-8 body");
                return response;
            }
            panic!("no complete response after {MAX_READS} reads");
        }

        /// True when the server has closed the connection and nothing is left unread.
        fn is_closed(&mut self) -> bool {
            let mut byte = [0u8; 1];
            self.buf.is_empty() && matches!(self.stream.read(&mut byte), Ok(0))
        }
    }

    fn hello(backend: &DemoBackend, name: &str, method: &str, target: &str) -> String {
        format!(
            "Hello from {name} ({}): {method} {target}\n",
            backend.local_addr()
        )
    }

    #[test]
    fn answers_hello_with_its_name() {
        let backend = start_backend("alpha", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET /some/path?q=1 HTTP/1.1\r\nHost: test\r\n\r\n");
        let response = client.response(false);
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body,
            hello(&backend, "alpha", "GET", "/some/path?q=1")
        );
        assert_eq!(response.header("x-backend"), Some("alpha"));
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        backend.stop();
    }

    #[test]
    fn health_answers_ok() {
        let backend = start_backend("beta", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n");
        let response = client.response(false);
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "ok\n");
        assert_eq!(response.header("x-backend"), Some("beta"));
        backend.stop();
    }

    #[test]
    fn health_skips_the_delay() {
        // Were /health delayed by a minute, the client's read timeout would fail this test.
        let backend = start_backend("slow", Duration::from_secs(60));
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(false).body, "ok\n");
        backend.stop();
    }

    #[test]
    fn delay_comes_before_the_response() {
        let delay = Duration::from_millis(200);
        let backend = start_backend("slow", delay);
        let mut client = Client::connect(backend.local_addr());
        let started = Instant::now();
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(false).status, 200);
        assert!(started.elapsed() >= delay);
        backend.stop();
    }

    #[test]
    fn keep_alive_serves_three_requests() {
        let backend = start_backend("gamma", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        for path in ["/one", "/two", "/three"] {
            client.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
            let response = client.response(false);
            assert_eq!(response.body, hello(&backend, "gamma", "GET", path));
            assert_eq!(response.header("connection"), None);
        }
        backend.stop();
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let backend = start_backend("delta", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(
            b"GET /first HTTP/1.1\r\nHost: test\r\n\r\nGET /second HTTP/1.1\r\nHost: test\r\n\r\n",
        );
        assert_eq!(
            client.response(false).body,
            hello(&backend, "delta", "GET", "/first")
        );
        assert_eq!(
            client.response(false).body,
            hello(&backend, "delta", "GET", "/second")
        );
        backend.stop();
    }

    #[test]
    fn head_may_arrive_one_byte_at_a_time() {
        let backend = start_backend("epsilon", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        for byte in b"GET /slowly HTTP/1.1\r\nHost: test\r\n\r\n" {
            client.send(&[*byte]);
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            client.response(false).body,
            hello(&backend, "epsilon", "GET", "/slowly")
        );
        backend.stop();
    }

    #[test]
    fn large_body_is_discarded_and_connection_stays_in_step() {
        let backend = start_backend("zeta", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        let body = vec![b'x'; 1024 * 1024];
        client.send(
            format!(
                "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        client.send(&body);
        client.send(b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(
            client.response(false).body,
            hello(&backend, "zeta", "POST", "/upload")
        );
        assert_eq!(
            client.response(false).body,
            hello(&backend, "zeta", "GET", "/after")
        );
        backend.stop();
    }

    #[test]
    fn chunked_body_is_discarded() {
        let backend = start_backend("eta", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(
            b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6;note=1\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n\
              GET /next HTTP/1.1\r\nHost: test\r\n\r\n",
        );
        assert_eq!(
            client.response(false).body,
            hello(&backend, "eta", "POST", "/chunked")
        );
        assert_eq!(
            client.response(false).body,
            hello(&backend, "eta", "GET", "/next")
        );
        backend.stop();
    }

    #[test]
    fn head_gets_headers_without_body() {
        let backend = start_backend("theta", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(
            b"HEAD /page HTTP/1.1\r\nHost: test\r\n\r\nGET /page HTTP/1.1\r\nHost: test\r\n\r\n",
        );
        let head = client.response(true);
        let expected = hello(&backend, "theta", "HEAD", "/page");
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some(expected.len().to_string().as_str())
        );
        // Had the HEAD response carried a body, this response would not parse.
        assert_eq!(
            client.response(false).body,
            hello(&backend, "theta", "GET", "/page")
        );
        backend.stop();
    }

    #[test]
    fn http10_closes_after_one_response() {
        let backend = start_backend("iota", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET / HTTP/1.0\r\n\r\n");
        let response = client.response(false);
        assert_eq!(response.body, hello(&backend, "iota", "GET", "/"));
        assert_eq!(response.header("connection"), Some("close"));
        assert!(client.is_closed());
        backend.stop();
    }

    #[test]
    fn http10_keep_alive_stays_open() {
        let backend = start_backend("kappa", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        for _ in 0..2 {
            client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
            assert_eq!(
                client.response(false).header("connection"),
                Some("keep-alive")
            );
        }
        backend.stop();
    }

    #[test]
    fn connection_close_is_honoured() {
        let backend = start_backend("lambda", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        assert_eq!(client.response(false).header("connection"), Some("close"));
        assert!(client.is_closed());
        backend.stop();
    }

    #[test]
    fn malformed_request_gets_400_and_close() {
        let backend = start_backend("mu", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"NOT A REQUEST\r\n\r\n");
        let response = client.response(false);
        assert_eq!(response.status, 400);
        assert_eq!(response.header("x-backend"), Some("mu"));
        assert!(client.is_closed());
        backend.stop();
    }

    #[test]
    fn conflicting_framing_gets_400() {
        let backend = start_backend("nu", Duration::ZERO);
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        ] {
            let mut client = Client::connect(backend.local_addr());
            client.send(head.as_bytes());
            assert_eq!(client.response(false).status, 400, "for {head:?}");
        }
        backend.stop();
    }

    #[test]
    fn oversized_head_gets_431() {
        let backend = start_backend("xi", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        let filler = "a".repeat(MAX_HEAD_BYTES);
        client.send(format!("GET / HTTP/1.1\r\nX-Filler: {filler}\r\n\r\n").as_bytes());
        assert_eq!(client.response(false).status, 431);
        backend.stop();
    }

    #[test]
    fn stop_closes_open_connections() {
        let backend = start_backend("omicron", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(false).status, 200);
        backend.stop();
        assert!(client.is_closed());
    }

    fn start_with_resets(name: &str, reset_percent: u8) -> DemoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let options = Options {
            reset_percent,
            ..Options::default()
        };
        start_with(listener, name.to_string(), options).expect("start demo backend")
    }

    /// Reads until the connection ends; returns what arrived and how it ended (`None`: a FIN).
    fn read_to_end(client: &mut Client) -> (Vec<u8>, Option<io::ErrorKind>) {
        let mut received = std::mem::take(&mut client.buf);
        let mut chunk = [0u8; 4096];
        loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => return (received, None),
                Ok(read) => received.extend_from_slice(&chunk[..read]),
                Err(err) => return (received, Some(err.kind())),
            }
        }
    }

    /// Splits a raw response into its head (without the blank line) and what followed it.
    fn split_head(raw: &[u8]) -> (String, &[u8]) {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole head arrived");
        (
            String::from_utf8_lossy(&raw[..end]).into_owned(),
            &raw[end + 4..],
        )
    }

    #[test]
    fn bytes_path_streams_that_many_bytes() {
        let backend = start_backend("bytes", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        client.send(b"GET /bytes/100000 HTTP/1.1\r\nHost: test\r\n\r\n");
        let response = client.response(false);
        assert_eq!(response.status, 200);
        assert_eq!(response.body.len(), 100_000);
        assert!(response.body.bytes().all(|b| b == b'x'));
        // The connection stays in step for the next request.
        client.send(b"HEAD /bytes/7 HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(true).header("content-length"), Some("7"));
        backend.stop();
    }

    #[test]
    fn bytes_path_without_a_number_answers_hello() {
        let backend = start_backend("bytes", Duration::ZERO);
        let mut client = Client::connect(backend.local_addr());
        let too_large = format!("/bytes/{}", MAX_BYTES_BODY + 1);
        for path in ["/bytes/", "/bytes/12ab", "/bytes/-1", too_large.as_str()] {
            client.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
            assert_eq!(
                client.response(false).body,
                hello(&backend, "bytes", "GET", path)
            );
        }
        backend.stop();
    }

    #[test]
    fn reset_percent_cuts_responses_midway_and_evenly() {
        // With 50, responses 2, 4, 6, … are cut: the head and half the body, then a reset.
        let backend = start_with_resets("cutter", 50);
        for round in 0..3 {
            let mut client = Client::connect(backend.local_addr());
            client.send(b"GET /whole HTTP/1.1\r\nHost: test\r\n\r\n");
            let whole = client.response(false);
            assert_eq!(
                whole.body,
                hello(&backend, "cutter", "GET", "/whole"),
                "round {round}"
            );

            client.send(b"GET /cut HTTP/1.1\r\nHost: test\r\n\r\n");
            let (raw, ending) = read_to_end(&mut client);
            let (head, body) = split_head(&raw);
            let expected = hello(&backend, "cutter", "GET", "/cut");
            assert!(head.starts_with("HTTP/1.1 200 OK"), "round {round}: {head}");
            assert!(head.contains(&format!("Content-Length: {}", expected.len())));
            assert_eq!(
                body,
                &expected.as_bytes()[..expected.len() - expected.len() / 2]
            );
            assert_eq!(
                ending,
                Some(io::ErrorKind::ConnectionReset),
                "round {round}"
            );
        }
        backend.stop();
    }

    #[test]
    fn reset_cuts_a_large_body_in_half_but_never_health() {
        let backend = start_with_resets("cutter", 100);
        let mut client = Client::connect(backend.local_addr());
        for _ in 0..3 {
            client.send(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n");
            assert_eq!(client.response(false).body, "ok\n");
        }
        client.send(b"GET /bytes/200000 HTTP/1.1\r\nHost: test\r\n\r\n");
        let (raw, ending) = read_to_end(&mut client);
        let (head, body) = split_head(&raw);
        assert!(head.contains("Content-Length: 200000"), "{head}");
        assert_eq!(body.len(), 100_000);
        assert_eq!(ending, Some(io::ErrorKind::ConnectionReset));
        backend.stop();
    }

    #[test]
    fn reset_percent_over_100_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let options = Options {
            reset_percent: 101,
            ..Options::default()
        };
        let result = start_with(listener, "over".to_string(), options);
        assert_eq!(
            result.err().map(|err| err.kind()),
            Some(io::ErrorKind::InvalidInput)
        );
    }

    #[test]
    fn name_with_control_characters_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let result = start(listener, "bad\r\nname".to_string(), Duration::ZERO);
        assert_eq!(
            result.err().map(|err| err.kind()),
            Some(io::ErrorKind::InvalidInput)
        );
    }
}
