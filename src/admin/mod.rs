//! The admin listener: statistics over HTTP on a port of its own (`--admin`, default
//! 127.0.0.1:8404, loopback so that only the machine itself can read them).
//!
//! It is deliberately tiny and separate from the traffic path: its own thread accepts, each
//! connection is one request answered and closed, heads are bounded in size and time, and at
//! most a few connections are served at once, so a misbehaving client of the admin port cannot
//! slow the balancer down. It serves `/stats` (HTML), `/stats.json` and `/metrics` (Prometheus),
//! all rendered by [`crate::report`], and `GET /backends` (JSON). Writes change the balancer:
//! `POST /reload` reads the configuration again (see [`crate::reload`]), and
//! `POST /backends/{name}/ready|drain|maint|weight` takes a backend out and puts it back
//! (`backends.rs`); `access.rs` decides who may write (loopback, or the admin token; never a
//! foreign `Origin`).
//!
//! When `--admin` is not given, the listener takes the first free port of [`DEFAULT_PORTS`], so
//! that a second balancer started beside the first (a learner comparing two phases) keeps its
//! statistics instead of failing over a port it never asked for.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::http::{self, BufferedStream, HeadError, Headers, RequestHead};
use crate::proxy::LoadBalancer;
use crate::report::Snapshot;

mod access;
mod backends;

use access::Writer;

/// The largest request head read from an admin client; the three pages need only a request line.
const MAX_HEAD: usize = 8 * 1024;

/// The largest body of a write (a form with a weight and a token).
const MAX_BODY: usize = 4 * 1024;

/// How long an admin client may take to send its request, and to read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin connections served at once; more are answered `503` at once.
const MAX_CLIENTS: usize = 8;

/// Where statistics are served when `--admin` is not given: loopback, so only the machine
/// itself can read them.
pub const DEFAULT_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The ports tried in turn when `--admin` is not given: 8404 (the port HAProxy's statistics
/// examples use), then the next nine, enough for every phase binary side by side.
pub const DEFAULT_PORTS: RangeInclusive<u16> = 8404..=8413;

/// Binds the first port of `ports` on `ip` that is not in use. Only "address in use" moves on
/// to the next port; any other error is returned at once, and when every port is in use the
/// error is the last port's.
pub fn bind_first_free(ip: IpAddr, ports: RangeInclusive<u16>) -> io::Result<TcpListener> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no port to try");
    for port in ports {
        match TcpListener::bind((ip, port)) {
            Ok(listener) => return Ok(listener),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => last = err,
            Err(err) => return Err(err),
        }
    }
    Err(last)
}

/// A running admin listener; [`AdminServer::stop`] ends it.
pub struct AdminServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` and serves the statistics of `lb` on a thread of its own.
    pub fn start(addr: SocketAddr, lb: Arc<LoadBalancer>) -> io::Result<AdminServer> {
        AdminServer::start_on(TcpListener::bind(addr)?, lb)
    }

    /// Serves the statistics of `lb` on `listener`, already bound, on a thread of its own.
    pub fn start_on(listener: TcpListener, lb: Arc<LoadBalancer>) -> io::Result<AdminServer> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stopping);
        let thread = thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(&listener, &lb, &stop_flag))?;
        Ok(AdminServer {
            addr,
            stopping,
            thread,
        })
    }

    /// The address it listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the accepting thread to end.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        // `accept` blocks until a client arrives, so become that client.
        let wake = crate::server::wake_address(self.addr);
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = self.thread.join();
    }
}

fn accept_loop(listener: &TcpListener, lb: &Arc<LoadBalancer>, stopping: &AtomicBool) {
    let Ok(own) = listener.local_addr() else {
        return;
    };
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                log::debug!("admin accept failed: {err}");
                // Out of file descriptors, for instance: give closing connections a moment.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
            let _ = stream.write_all(&response(503, "text/plain", b"busy\n", false));
            continue;
        }
        let lb = Arc::clone(lb);
        let done = Arc::clone(&busy);
        let spawned = thread::Builder::new()
            .name("admin-client".into())
            .spawn(move || {
                serve(stream, &lb, own);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(err) = spawned {
            busy.fetch_sub(1, Ordering::SeqCst);
            log::warn!("admin: cannot start a thread: {err}");
        }
    }
}

/// Answers the one request of an admin connection, which reached the listener at `own`.
fn serve(stream: TcpStream, lb: &LoadBalancer, own: SocketAddr) {
    let peer = stream.peer_addr().ok();
    if stream.set_read_timeout(Some(CLIENT_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(CLIENT_TIMEOUT)).is_err()
    {
        return;
    }
    // The same head reader as the proxy's: bounded in size, and in time as a whole, so a client
    // trickling one byte at a time is still cut off.
    let mut reader = BufferedStream::new(stream, 1024);
    let answer = match http::read_request_head_within(&mut reader, CLIENT_TIMEOUT, MAX_HEAD) {
        Ok(Some(head)) => match read_body(&mut reader, &head) {
            Ok(body) => route(
                &Request {
                    head: &head,
                    body: &body,
                    peer,
                    own,
                },
                lb,
            ),
            Err(status) => response(
                status,
                "text/plain",
                b"send a body of at most 4 KiB with a Content-Length\n",
                false,
            ),
        },
        // The client closed, stalled or broke the connection before a whole head arrived.
        Ok(None) | Err(HeadError::Truncated | HeadError::TimedOut | HeadError::Io(_)) => return,
        Err(HeadError::TooLarge | HeadError::LineTooLong) => {
            response(431, "text/plain", b"request head too large\n", false)
        }
        Err(HeadError::Malformed(_) | HeadError::UnsupportedVersion(_)) => {
            response(400, "text/plain", b"bad request\n", false)
        }
    };
    let (mut stream, _) = reader.into_parts();
    if stream.write_all(&answer).is_ok() {
        linger(&mut stream);
    }
}

/// Closes our side and reads what the client still sends, for a moment and a few kilobytes.
/// Closing a socket with unread bytes makes the kernel send a reset, which can destroy the
/// response before the client reads it (the problem nginx's `lingering_close` solves).
fn linger(stream: &mut TcpStream) {
    const LINGER_BYTES: usize = 64 * 1024;
    if stream.shutdown(std::net::Shutdown::Write).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// The body of a write: what its `Content-Length` says, at most [`MAX_BODY`] bytes (`Err` with
/// the status that refuses it: 411 for a body of another framing, 413 for a larger one).
fn read_body(reader: &mut BufferedStream<TcpStream>, head: &RequestHead) -> Result<String, u16> {
    if head.header("transfer-encoding").is_some() {
        return Err(411);
    }
    let length = match head.header("content-length") {
        None => return Ok(String::new()),
        Some(value) => std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or(400u16)?,
    };
    if length > MAX_BODY {
        return Err(413);
    }
    while reader.buffered().len() < length {
        match reader.fill(MAX_HEAD + MAX_BODY) {
            Ok(0) | Err(_) => return Err(400),
            Ok(_) => {}
        }
    }
    Ok(String::from_utf8_lossy(&reader.buffered()[..length]).into_owned())
}

/// An admin request: its head and body, who sent it, and the listener it reached.
struct Request<'a> {
    head: &'a RequestHead,
    body: &'a str,
    peer: Option<SocketAddr>,
    own: SocketAddr,
}

/// The response to an admin request: one of the views, a write's answer, 404 or 405.
fn route(request: &Request, lb: &LoadBalancer) -> Vec<u8> {
    let method = request.head.method();
    let (path, query) = split_target(request.head.target());
    let writable = path == "/reload" || path.starts_with("/backends/");
    match method {
        "POST" if writable => write_to(path, query, request, lb),
        "GET" | "HEAD" if !writable => read(path, lb, method == "HEAD"),
        _ if writable => not_allowed("POST"),
        _ if READABLE.contains(&path) => not_allowed("GET, HEAD"),
        _ => response(404, "text/plain", b"not found: try /stats\n", false),
    }
}

/// What the admin listener serves to GET and HEAD.
const READABLE: [&str; 4] = ["/stats", "/stats.json", "/metrics", "/backends"];

/// A view: the statistics page, JSON or Prometheus metrics, or the backends' list.
fn read(path: &str, lb: &LoadBalancer, head_only: bool) -> Vec<u8> {
    let (content_type, body) = match path {
        "/backends" => ("application/json", backends::list(lb).1.to_string()),
        "/stats" => ("text/html; charset=utf-8", Snapshot::of(lb).to_html()),
        "/stats.json" => ("application/json", Snapshot::of(lb).to_json()),
        "/metrics" => (
            "text/plain; version=0.0.4; charset=utf-8",
            Snapshot::of(lb).to_prometheus(),
        ),
        _ => return response(404, "text/plain", b"not found: try /stats\n", head_only),
    };
    response(200, content_type, body.as_bytes(), head_only)
}

/// A write: `POST /reload`, or `POST /backends/{name}/{action}` with a weight in the body or
/// the query.
fn write_to(path: &str, query: &str, request: &Request, lb: &LoadBalancer) -> Vec<u8> {
    let Some(rest) = path.strip_prefix("/backends/") else {
        return write(request, lb, |_| reload(lb));
    };
    let weight =
        backends::field(request.body, "weight").or_else(|| backends::field(query, "weight"));
    write(request, lb, |who| {
        backends::change(lb, rest, weight.as_deref(), who)
    })
}

/// `405 Method Not Allowed`, naming the methods that are.
fn not_allowed(allow: &str) -> Vec<u8> {
    let body = format!("only {allow}\n");
    let allow = format!("Allow: {allow}\r\n");
    response_with(405, "text/plain", body.as_bytes(), false, &allow)
}

/// The path and the query of a request target.
fn split_target(target: &str) -> (&str, &str) {
    let target = target.split('#').next().unwrap_or_default();
    target.split_once('?').unwrap_or((target, ""))
}

/// A write: `apply` runs (given the client's address) only when [`access::may_write`] lets the
/// request change the balancer, else 403. The answer is JSON, or for a form of the statistics
/// page (a browser asking for HTML) a redirect back to the page.
fn write(
    request: &Request,
    lb: &LoadBalancer,
    apply: impl FnOnce(IpAddr) -> backends::Answer,
) -> Vec<u8> {
    let form_token = backends::field(request.body, "token");
    let writer = Writer {
        request: request.head,
        peer: request.peer,
        listener: request.own,
        form_token: form_token.as_deref(),
    };
    let token = lb.snapshot().settings().admin_token.clone();
    let (status, body) = match (access::may_write(&writer, token.as_ref()), request.peer) {
        (Ok(()), Some(peer)) => apply(peer.ip()),
        (Err(why), _) => (
            403,
            serde_json::json!({ "result": "refused", "error": why }),
        ),
        (Ok(()), None) => (
            403,
            serde_json::json!({ "error": "the client's address is unknown" }),
        ),
    };
    let from_page = request
        .head
        .header("accept")
        .is_some_and(|accept| accept.windows(9).any(|w| w == b"text/html"));
    if from_page && status == 200 {
        return redirect("/stats");
    }
    response(
        status,
        "application/json",
        body.to_string().as_bytes(),
        false,
    )
}

/// `POST /reload`: reads the configuration again and applies it, answering in JSON what
/// changed (200) or why the configuration in use stays (422).
fn reload(lb: &LoadBalancer) -> backends::Answer {
    match lb.reload() {
        Ok(changes) => (
            200,
            serde_json::json!({ "result": "ok", "changes": changes }),
        ),
        Err(why) => (422, serde_json::json!({ "result": "error", "error": why })),
    }
}

/// `303 See Other` to `location`: a form's answer sends the browser back to the page.
fn redirect(location: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 303 See Other\r\nLocation: {location}\r\nContent-Length: 0\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// A whole response that closes the connection; `head_only` leaves the body out (for HEAD).
fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    response_with(status, content_type, body, head_only, "")
}

/// A whole response as [`response`] makes it, with `extra` header lines (each ending in CRLF).
fn response_with(
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    extra: &str,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The head of `request` as the admin listener reads it, over a real socket.
    pub(crate) fn head_of(request: &str) -> RequestHead {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(request.as_bytes()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut reader = BufferedStream::new(server, 1024);
        http::read_request_head_within(&mut reader, CLIENT_TIMEOUT, MAX_HEAD)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn responses_state_their_length_and_close() {
        let text = String::from_utf8(response(404, "text/plain", b"gone\n", false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 5\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\ngone\n"));
        let refused = String::from_utf8(not_allowed("GET, HEAD")).unwrap();
        assert!(refused.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(refused.contains("\r\nAllow: GET, HEAD\r\n"));
        assert!(refused.ends_with("\r\n\r\nonly GET, HEAD\n"));
        assert!(refused.contains("Content-Length: 15\r\n"));
    }

    /// `n` listeners on consecutive loopback ports: port 0 picks the first, the rest are tried
    /// after it, and the whole run is picked again (a bounded number of times) if one is taken.
    fn consecutive_listeners(n: u16) -> Vec<TcpListener> {
        for _ in 0..50 {
            let first = TcpListener::bind((DEFAULT_IP, 0)).unwrap();
            let port = first.local_addr().unwrap().port();
            if port > u16::MAX - n {
                continue;
            }
            let rest: Result<Vec<TcpListener>, _> = (port + 1..port + n)
                .map(|p| TcpListener::bind((DEFAULT_IP, p)))
                .collect();
            if let Ok(rest) = rest {
                return std::iter::once(first).chain(rest).collect();
            }
        }
        panic!("no {n} consecutive free ports on loopback");
    }

    fn port_of(listener: &TcpListener) -> u16 {
        listener.local_addr().unwrap().port()
    }

    #[test]
    fn the_first_free_port_of_the_range_is_taken() {
        let mut held = consecutive_listeners(3);
        let ports = port_of(&held[0])..=port_of(&held[2]);

        // The first two busy: the third.
        let third = held.pop().unwrap();
        let expected = port_of(&third);
        drop(third);
        let taken = bind_first_free(DEFAULT_IP, ports.clone()).unwrap();
        assert_eq!(port_of(&taken), expected);

        // All three busy: "address in use", nothing bound.
        held.push(taken);
        let err = bind_first_free(DEFAULT_IP, ports.clone()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

        // All free: the first.
        drop(held);
        let taken = bind_first_free(DEFAULT_IP, ports.clone()).unwrap();
        assert_eq!(port_of(&taken), *ports.start());
    }

    #[test]
    fn an_error_other_than_in_use_stops_the_search() {
        // 192.0.2.1 (TEST-NET-1) is not an address of this machine.
        let elsewhere = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let err = bind_first_free(elsewhere, 8404..=8413).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
    }
}
