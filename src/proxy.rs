//! The proxy: what happens on one client connection, request after request.
//!
//! A client connection is a loop over requests (HTTP/1.1 keep-alive). Each request goes through
//! a few named steps: read the head, check its framing, choose a backend, send the request,
//! relay the response, or write an error. The chapter's Python handled one `recv(4096)` per
//! connection and closed it; this loop serves as many requests as the client sends, streams
//! bodies of any size both ways, and answers each kind of failure with its own status.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, Connection};
use crate::balance::{self, Balancer};
use crate::descriptors;
use crate::error::ProxyError;
use crate::health::{self, HealthConfig};
use crate::http::{
    self, BodyLength, BufferPool, BufferedStream, HeadError, Headers, RelayError, RequestHead,
    ResponseHead, Sink, Version,
};
use crate::settings::Settings;
use crate::stats::Stats;
use crate::sticky::SessionTable;
use crate::warnings::RepeatedWarning;

/// The size of a read buffer, for a client or a backend connection: enough for the head and body
/// of most small messages. A buffer grows only for a large head or a long body.
const BUFFER_SIZE: usize = 4 * 1024;

/// Spare read buffers kept for reuse (at most 1 MiB of them).
const SPARE_BUFFERS: usize = 256;

/// Between two tries at connecting to a backend while the process is out of descriptors.
const DESCRIPTOR_WAIT: Duration = Duration::from_millis(10);

static UNREACHABLE: RepeatedWarning = RepeatedWarning::new(module_path!());
static OUT_OF_DESCRIPTORS: RepeatedWarning = RepeatedWarning::new(module_path!());

/// Everything client connections share: the backends, the algorithm, statistics and settings.
/// This is the chapter's `LoadBalancer` class.
pub struct LoadBalancer {
    backends: Vec<Arc<Backend>>,
    balancer: Box<dyn Balancer>,
    stats: Stats,
    settings: Settings,
    buffers: BufferPool,
    health: HealthConfig,
    sessions: Option<SessionTable>,
}

impl LoadBalancer {
    /// A balancer over `backends` that chooses with `balancer`.
    pub fn new(backends: Vec<Backend>, balancer: Box<dyn Balancer>, settings: Settings) -> Self {
        LoadBalancer {
            backends: backends.into_iter().map(Arc::new).collect(),
            balancer,
            stats: Stats::new(),
            buffers: BufferPool::new(BUFFER_SIZE, SPARE_BUFFERS),
            settings,
            health: HealthConfig::default(),
            sessions: None,
        }
    }

    /// Turns on the health checks of `config` for every backend (phase 3). Without it, every
    /// backend is always considered healthy. Call it before the balancer starts serving.
    pub fn with_health(mut self, config: HealthConfig) -> Self {
        for backend in &self.backends {
            backend.health().configure(config.clone());
        }
        self.health = config;
        self
    }

    /// Which health checks run, and how.
    pub fn health_config(&self) -> &HealthConfig {
        &self.health
    }

    /// The same balancer with sticky sessions: a client that sends back its session cookie
    /// goes to its session's backend while that backend is available.
    pub fn with_sessions(mut self, sessions: SessionTable) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// The sticky-session table, when sessions are on.
    pub fn sessions(&self) -> Option<&SessionTable> {
        self.sessions.as_ref()
    }

    /// The backends, in the order they were given.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The balancing algorithm.
    pub fn balancer(&self) -> &dyn Balancer {
        self.balancer.as_ref()
    }

    /// The balancer's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The run-time settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Closes one idle pooled connection per backend, giving descriptors back to clients (the
    /// budget keeps them for clients first); false when no connection was idle.
    pub fn give_back_descriptors(&self) -> bool {
        let mut closed = false;
        for backend in &self.backends {
            closed |= backend.close_one_idle();
        }
        closed
    }

    /// How long until some backend could take requests again: the `Retry-After` of a 503.
    fn retry_after(&self) -> Duration {
        self.backends
            .iter()
            .map(|b| b.health().available_in())
            .min()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Flags a client connection shares with the server, which reads them to shut down gracefully.
#[derive(Debug, Default)]
pub struct ConnectionState {
    /// True while the connection waits for a next request, so shutting down may close it at once.
    pub idle: AtomicBool,
}

/// Whether the connection goes on after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    KeepAlive,
    Close,
}

/// How forwarding one request went wrong.
enum Failure {
    /// Nothing of a response reached the client yet: answer with this error.
    Answer(ProxyError),
    /// The connection cannot carry more: the client went away, or a response was cut short.
    Abort {
        /// What happened.
        why: String,
        /// Whether the backend broke the exchange (rather than the client).
        by_backend: bool,
    },
}

/// What one exchange with one backend ended in.
enum ExchangeError {
    /// A pooled connection turned out closed before any response byte: safe to send again on a
    /// fresh connection.
    Stale,
    /// Any other failure.
    Failed(Failure),
}

/// One client connection: its socket, who it is, and the state its requests share.
pub struct ClientConnection<'a> {
    lb: &'a LoadBalancer,
    client: BufferedStream,
    client_ip: IpAddr,
    /// The client's address as text, written once per connection rather than per request.
    client_ip_text: String,
    state: &'a ConnectionState,
    shutdown: &'a AtomicBool,
    /// Whether the current request still has body bytes unread: the connection then cannot be
    /// reused if the request ends in an error.
    body_pending: bool,
}

impl<'a> ClientConnection<'a> {
    /// Prepares to serve `stream`, whose timeouts the server has set.
    pub fn new(
        lb: &'a LoadBalancer,
        stream: TcpStream,
        peer: SocketAddr,
        state: &'a ConnectionState,
        shutdown: &'a AtomicBool,
    ) -> Self {
        ClientConnection {
            lb,
            client: BufferedStream::with_buffer(stream, lb.buffers.take()),
            client_ip: peer.ip(),
            client_ip_text: peer.ip().to_string(),
            state,
            shutdown,
            body_pending: false,
        }
    }

    /// Serves requests until the client closes, an error ends the connection, or the balancer
    /// shuts down.
    pub fn serve(&mut self) {
        loop {
            self.state.idle.store(true, Ordering::SeqCst);
            if self.shutdown.load(Ordering::SeqCst) {
                break;
            }
            let head = http::read_request_head(&mut self.client, self.lb.settings.client_timeout);
            self.state.idle.store(false, Ordering::SeqCst);
            let flow = match head {
                Ok(Some(head)) => self.handle(head),
                Ok(None) => Flow::Close,
                Err(err) => self.reject_head(err),
            };
            if flow == Flow::Close {
                break;
            }
        }
    }

    /// Ends the connection: the read buffer goes back for reuse, and the socket to the server,
    /// which closes it.
    pub fn into_socket(self) -> TcpStream {
        let (socket, buffer) = self.client.into_parts();
        self.lb.buffers.give(buffer);
        socket
    }

    /// Answers a head that could not be read, when there is anyone left to answer.
    fn reject_head(&mut self, err: HeadError) -> Flow {
        let answer = match err {
            HeadError::TooLarge => ProxyError::HeadTooLarge,
            HeadError::Malformed(why) => ProxyError::BadRequest(why),
            HeadError::UnsupportedVersion(version) => ProxyError::VersionNotSupported(version),
            // A keep-alive client that stays quiet is closed without a word; one that started a
            // request and did not finish it in time is told so.
            HeadError::TimedOut if self.client.buffered().is_empty() => return Flow::Close,
            HeadError::TimedOut => ProxyError::RequestTimeout,
            HeadError::Truncated | HeadError::Io(_) => return Flow::Close,
        };
        log::debug!("{}: {answer}", self.client_ip);
        self.lb.stats.count_request();
        self.write_error(&answer, true);
        Flow::Close
    }

    /// Forwards one request and relays its response.
    fn handle(&mut self, head: RequestHead) -> Flow {
        let started = Instant::now();
        self.lb.stats.count_request();
        match self.forward(&head, started) {
            Ok(flow) => flow,
            Err(Failure::Answer(err)) => {
                let close = self.body_pending
                    || !head.wants_keep_alive()
                    || self.shutdown.load(Ordering::SeqCst);
                log::debug!(
                    "{} {} {} -> {} ({:?})",
                    self.client_ip,
                    head.method(),
                    head.target(),
                    err.status().0,
                    started.elapsed()
                );
                self.write_error(&err, close);
                if close {
                    Flow::Close
                } else {
                    Flow::KeepAlive
                }
            }
            Err(Failure::Abort { why, .. }) => {
                log::debug!(
                    "{} {} {}: connection dropped: {why}",
                    self.client_ip,
                    head.method(),
                    head.target()
                );
                Flow::Close
            }
        }
    }

    /// Answers with `err`; when the connection closes afterwards, closes it without losing the
    /// answer.
    fn write_error(&mut self, err: &ProxyError, close: bool) {
        let mut socket = self.client.socket();
        let _ = std::io::Write::write_all(&mut socket, &err.to_response(close));
        if close {
            http::close_gracefully(socket);
        }
    }

    /// Checks the request, then tries backends until one answers or none is left.
    fn forward(&mut self, head: &RequestHead, started: Instant) -> Result<Flow, Failure> {
        let body = check_request(head).map_err(Failure::Answer)?;
        self.body_pending = body != BodyLength::Empty;
        let mut id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let request_id = match head.header("x-request-id") {
            Some(_) => None,
            None => Some(&*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id_text)),
        };
        let (prefix, rest) = self.take_body_prefix(body);
        let session = self
            .lb
            .sessions
            .as_ref()
            .map(|table| Session::of(table, head));
        let set_cookie = session.as_ref().and_then(Session::set_cookie);
        let mut tried: Vec<usize> = Vec::new();
        // Why the last backend tried failed the request, if another one may take it over.
        let mut failed: Option<Failure> = None;
        let mut attempts = 0;
        loop {
            let pick = if attempts > self.lb.settings.retries {
                None
            } else {
                self.choose(&tried, session.as_ref())
            };
            let Some(pick) = pick else {
                return Err(failed.unwrap_or_else(|| {
                    Failure::Answer(ProxyError::NoBackend {
                        retry_after: self.lb.retry_after(),
                    })
                }));
            };
            let decision = if self.lb.settings.explain {
                self.explain(&pick, session.as_ref(), &tried)
            } else {
                String::new()
            };
            if let Some(session) = &session {
                session.follow(pick.index);
            }
            tried.push(pick.index);
            let backend = &self.lb.backends[pick.index];
            if !backend.health().admit() {
                // Another request took this backend's one trial after its fail-timeout.
                continue;
            }
            if attempts > 0 {
                self.lb.stats.count_retry();
                log::debug!(
                    "{} {} {}: retrying on {}",
                    self.client_ip,
                    head.method(),
                    head.target(),
                    backend.name()
                );
            }
            attempts += 1;
            let _in_flight = backend.stats().begin_request();
            let request = OutgoingRequest {
                head,
                body,
                prefix: &prefix,
                rest,
                request_id,
                reason: &decision,
                set_cookie: set_cookie.as_deref(),
            };
            match self.try_backend(backend, &request, started) {
                // Nothing reached the backend, so the next one may safely get the request.
                Err(TryError::Unreachable) => continue,
                // The backend broke the exchange before any byte of the answer reached the
                // client (a timeout is a 504, not a broken exchange).
                Err(TryError::Failed(Failure::Answer(err @ ProxyError::BadGateway(_))))
                    if request.may_go_elsewhere() =>
                {
                    log::debug!(
                        "{} {} {}: {} failed before answering ({err}); another backend may take it",
                        self.client_ip,
                        head.method(),
                        head.target(),
                        backend.name(),
                    );
                    failed = Some(Failure::Answer(err));
                }
                Err(TryError::Failed(failure)) => return Err(failure),
                Ok(flow) => return Ok(flow),
            }
        }
    }

    /// Takes the part of the body that arrived together with the head, so it can go out in the
    /// same write as the head (and again, if a pooled connection turns out closed). Returns it
    /// and how the rest of the body is framed.
    fn take_body_prefix(&mut self, body: BodyLength) -> (Vec<u8>, BodyLength) {
        let BodyLength::Fixed(length) = body else {
            return (Vec::new(), body);
        };
        let ready = self
            .client
            .buffered()
            .len()
            .min(usize::try_from(length).unwrap_or(usize::MAX));
        let prefix = self.client.buffered()[..ready].to_vec();
        self.client.consume(ready);
        let rest = length - ready as u64;
        if rest == 0 {
            self.body_pending = false;
            (prefix, BodyLength::Empty)
        } else {
            (prefix, BodyLength::Fixed(rest))
        }
    }

    /// Chooses a backend among those available and not yet tried: the session's own backend
    /// when it is one of them, else whichever the balancer picks.
    fn choose(&self, tried: &[usize], session: Option<&Session>) -> Option<balance::Pick> {
        let backends = &self.lb.backends;
        let is_candidate = |i: usize| !tried.contains(&i) && backends[i].health().is_available();
        if let Some(index) = session.and_then(|s| s.backend).filter(|&i| is_candidate(i)) {
            return Some(balance::Pick {
                index,
                reason: String::new(),
            });
        }
        let request = balance::Request {
            client_ip: self.client_ip,
            explain: self.lb.settings.explain,
        };
        self.lb.balancer.pick(backends, &request, &is_candidate)
    }

    /// The `X-Lb-Decision` line: the sticky verdict, the algorithm's reason, the backends left
    /// out as unavailable and those already tried for this request, then the choice.
    fn explain(&self, pick: &balance::Pick, session: Option<&Session>, tried: &[usize]) -> String {
        let backends = &self.lb.backends;
        let name = |i: usize| backends[i].name();
        let mut parts = Vec::new();
        match session {
            Some(s) if s.backend == Some(pick.index) => {
                parts.push(format!(
                    "sticky hit: session {} belongs to {}",
                    s.id,
                    name(pick.index)
                ));
            }
            Some(s) => {
                parts.push(match s.backend {
                    Some(old) => format!("sticky miss: session {} moves from {}", s.id, name(old)),
                    None => format!("sticky miss: new session {}", s.id),
                });
                parts.push(pick.reason.clone());
            }
            None => parts.push(pick.reason.clone()),
        }
        let unavailable: Vec<&str> = backends
            .iter()
            .filter(|b| !b.health().is_available())
            .map(|b| b.name())
            .collect();
        if !unavailable.is_empty() {
            parts.push(format!("unavailable: {}", unavailable.join(", ")));
        }
        if !tried.is_empty() {
            let names: Vec<&str> = tried.iter().map(|&i| name(i)).collect();
            parts.push(format!("retry after {}", names.join(", ")));
        }
        parts.push(format!("chose {}", name(pick.index)));
        parts.join("; ")
    }

    /// Sends the request to one backend, once more on a fresh connection if a pooled one turns
    /// out to have been closed by the backend.
    fn try_backend(
        &mut self,
        backend: &Backend,
        request: &OutgoingRequest,
        started: Instant,
    ) -> Result<Flow, TryError> {
        // A body that will be streamed cannot be sent twice, so it never risks a pooled
        // connection that may turn out closed.
        let connection = self.open_connection(backend, request.rest == BodyLength::Empty)?;
        backend.stats().count_request();
        let out = self.request_bytes(backend, request);
        let mut result = self.exchange(backend, connection, &out, request);
        if matches!(result, Err(ExchangeError::Stale)) {
            log::debug!(
                "pooled connection to {} was closed; retrying on a fresh one",
                backend.name()
            );
            // If no fresh connection can be had either, the request (which did reach this
            // backend) ends here as an error and goes on to the next backend.
            let fresh = self
                .open_connection(backend, false)
                .inspect_err(|_| backend.stats().record(started.elapsed(), false))?;
            result = self.exchange(backend, fresh, &out, request);
        }
        // A client that went away or sent a broken body is not the backend's error.
        let verdict = backend_verdict(&result);
        backend
            .stats()
            .record(started.elapsed(), verdict == Some(false));
        self.observe(backend, verdict);
        match result {
            Ok((flow, status)) => {
                self.log_exchange(backend, request, status, started);
                Ok(flow)
            }
            Err(ExchangeError::Stale) => Err(TryError::Failed(Failure::Answer(
                ProxyError::BadGateway("connection closed".into()),
            ))),
            Err(ExchangeError::Failed(failure)) => Err(TryError::Failed(failure)),
        }
    }

    /// A connection to `backend`: from the idle pool when `may_reuse`, else a new one. A backend
    /// that cannot be reached counts an error and is reported to the health checks.
    fn open_connection(&self, backend: &Backend, may_reuse: bool) -> Result<Connection, TryError> {
        match self.connect(backend, may_reuse) {
            Ok(connection) => Ok(connection),
            Err(err) if descriptors::is_exhausted(&err) => {
                self.wait_for_a_descriptor(backend, may_reuse)
            }
            Err(err) => Err(self.unreachable(backend, &err)),
        }
    }

    fn connect(&self, backend: &Backend, may_reuse: bool) -> std::io::Result<Connection> {
        let settings = &self.lb.settings;
        if may_reuse {
            return backend.connection(settings.connect_timeout, settings.backend_timeout);
        }
        backend
            .connect(settings.connect_timeout, settings.backend_timeout)
            .map(|stream| Connection {
                stream,
                reused: false,
            })
    }

    /// Out of file descriptors: the balancer's trouble, not the backend's, so it is not counted
    /// against the backend. The request waits for a descriptor, as requests queue for a
    /// server's connections in HAProxy: a connection to this backend that another request gives
    /// back to the pool needs none, and closing an idle connection to another backend (of no use
    /// to this request) gives one back. After `--connect-timeout` the client is told to come
    /// back in a second (503), never reset.
    fn wait_for_a_descriptor(
        &self,
        backend: &Backend,
        may_reuse: bool,
    ) -> Result<Connection, TryError> {
        log::debug!(
            "no file descriptor for a connection to {}: waiting",
            backend.name()
        );
        let deadline = Instant::now() + self.lb.settings.connect_timeout;
        loop {
            // A descriptor comes back when an idle connection this request cannot use is
            // closed, or when a client closes.
            let _freed = self.lb.backends.iter().any(|other| {
                (!may_reuse || !std::ptr::eq(&**other, backend)) && other.close_one_idle()
            });
            match self.connect(backend, false) {
                Ok(connection) => return Ok(connection),
                Err(err) if !descriptors::is_exhausted(&err) => {
                    return Err(self.unreachable(backend, &err))
                }
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                OUT_OF_DESCRIPTORS.warn(format_args!(
                    "no file descriptor left for a connection to {} within --connect-timeout: \
                     answered 503 (raise ulimit -n, or lower --max-connections)",
                    backend.name()
                ));
                return Err(TryError::Failed(Failure::Answer(
                    ProxyError::OutOfDescriptors,
                )));
            }
            // Or a connection to this backend comes back to its pool.
            let step = left.min(DESCRIPTOR_WAIT);
            if !may_reuse {
                std::thread::sleep(step);
            } else if let Some(stream) = backend.wait_idle(step) {
                return Ok(Connection {
                    stream,
                    reused: true,
                });
            }
        }
    }

    /// Counts a backend that could not be reached, and reports it to the health checks.
    fn unreachable(&self, backend: &Backend, err: &std::io::Error) -> TryError {
        UNREACHABLE.warn(format_args!(
            "backend {} unreachable: {err}",
            backend.name()
        ));
        backend.stats().record_error();
        self.observe(backend, Some(false));
        TryError::Unreachable
    }

    /// The debug log's line for a request a backend answered.
    fn log_exchange(
        &self,
        backend: &Backend,
        request: &OutgoingRequest,
        status: u16,
        started: Instant,
    ) {
        log::debug!(
            "{} {} {} -> {} {} ({:?}){}",
            self.client_ip,
            request.head.method(),
            request.head.target(),
            backend.name(),
            status,
            started.elapsed(),
            request
                .request_id
                .map(|id| format!(" id {id}"))
                .unwrap_or_default()
        );
    }

    /// Tells passive health checks how a request went (`None`: not the backend's doing), and
    /// reports the backend's state flipping.
    fn observe(&self, backend: &Backend, ok: Option<bool>) {
        let Some(ok) = ok else { return };
        if let Some(change) = backend.health().observe_request(ok) {
            health::report(&self.lb.backends, backend, &change);
        }
    }

    /// The request as the backend gets it: the head rewritten for the next hop, then whatever
    /// part of the body already arrived with it.
    fn request_bytes(&self, backend: &Backend, request: &OutgoingRequest) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + request.prefix.len());
        write_request_head(&mut out, request, &self.client_ip_text, backend.name());
        out.extend_from_slice(request.prefix);
        out
    }

    /// One request and response over one backend connection. Returns how the client connection
    /// goes on and the response status.
    fn exchange(
        &mut self,
        backend: &Backend,
        connection: Connection,
        out: &[u8],
        request: &OutgoingRequest,
    ) -> Result<(Flow, u16), ExchangeError> {
        let reused = connection.reused;
        let mut upstream = BufferedStream::with_buffer(connection.stream, self.lb.buffers.take());
        if let Err(err) = std::io::Write::write_all(&mut upstream.socket(), out) {
            // Everything sent is still in `out`, and the client's bytes are still buffered.
            return Err(if reused {
                ExchangeError::Stale
            } else {
                bad_gateway(&format!("sending the request: {err}"))
            });
        }
        self.send_rest_of_body(&mut upstream, request)?;
        let response = self.read_response(&mut upstream, request, reused)?;
        self.relay_response(backend, upstream, request, response)
    }

    /// Streams the part of the request body that did not come with the head.
    fn send_rest_of_body(
        &mut self,
        upstream: &mut BufferedStream,
        request: &OutgoingRequest,
    ) -> Result<(), ExchangeError> {
        if request.rest == BodyLength::Empty {
            return Ok(());
        }
        if request.head.has_token("expect", "100-continue") && self.client.buffered().is_empty() {
            // The client waits for this before sending its body. The balancer answers it itself,
            // as nginx does, since the request is now on its way to a backend.
            let _ = std::io::Write::write_all(
                &mut self.client.socket(),
                b"HTTP/1.1 100 Continue\r\n\r\n",
            );
        }
        let mut sink = Sink::new(upstream.socket(), Vec::new());
        let relayed = http::relay_body(&mut self.client, request.rest, &mut sink, false)
            .and_then(|()| sink.flush());
        match relayed {
            Ok(()) => {
                self.body_pending = false;
                Ok(())
            }
            Err(RelayError::Write(err)) => {
                Err(bad_gateway(&format!("sending the request body: {err}")))
            }
            Err(RelayError::Malformed(why)) => Err(ExchangeError::Failed(Failure::Answer(
                ProxyError::BadRequest(why.to_string()),
            ))),
            Err(RelayError::Read(err)) => Err(abort(&format!("reading the request body: {err}"))),
            Err(RelayError::Truncated) => Err(abort("the client closed during the request body")),
        }
    }

    /// Reads the response head, passing interim 1xx responses on to the client.
    fn read_response(
        &mut self,
        upstream: &mut BufferedStream,
        request: &OutgoingRequest,
        reused: bool,
    ) -> Result<ResponseHead, ExchangeError> {
        loop {
            let head = match http::read_response_head(upstream) {
                Ok(Some(head)) => head,
                Ok(None) | Err(HeadError::Io(_)) if reused && request.can_resend() => {
                    return Err(ExchangeError::Stale)
                }
                Ok(None) => {
                    return Err(bad_gateway(
                        "the backend closed the connection without a response",
                    ))
                }
                Err(HeadError::TimedOut) => {
                    return Err(ExchangeError::Failed(Failure::Answer(
                        ProxyError::GatewayTimeout,
                    )))
                }
                Err(HeadError::Io(err)) => {
                    return Err(bad_gateway(&format!("reading the response: {err}")))
                }
                Err(HeadError::TooLarge) => {
                    return Err(bad_gateway("the response head is too large"))
                }
                Err(HeadError::Malformed(why) | HeadError::UnsupportedVersion(why)) => {
                    return Err(bad_gateway(&format!("malformed response: {why}")))
                }
                Err(HeadError::Truncated) => {
                    return Err(bad_gateway("the response head was cut short"))
                }
            };
            match head.status {
                101 => return Err(bad_gateway("protocol upgrades are not supported")),
                100..=199 => {
                    // Interim responses (such as 103 Early Hints) go to HTTP/1.1 clients as they are.
                    if request.head.version == Version::Http11 {
                        let mut interim = Vec::new();
                        write_response_head(&mut interim, &head);
                        interim.extend_from_slice(b"\r\n");
                        let _ = std::io::Write::write_all(&mut self.client.socket(), &interim);
                    }
                }
                _ => return Ok(head),
            }
        }
    }

    /// Sends the response head and streams its body to the client, then pools the backend
    /// connection if it can carry another request.
    fn relay_response(
        &mut self,
        backend: &Backend,
        mut upstream: BufferedStream,
        request: &OutgoingRequest,
        response: ResponseHead,
    ) -> Result<(Flow, u16), ExchangeError> {
        let status = response.status;
        let body = http::response_body_length(request.head.method(), &response)
            .map_err(|why| bad_gateway(&why))?;
        // Without a length, the end of the body can only be shown by closing the connection;
        // HTTP/1.0 clients cannot read chunked bodies, so they get the plain bytes and a close.
        let dechunk = request.head.version == Version::Http10 && body == BodyLength::Chunked;
        let keep_alive = request.head.wants_keep_alive()
            && !self.body_pending
            && !self.shutdown.load(Ordering::SeqCst)
            && body != BodyLength::UntilClose
            && !dechunk;

        let head = self.client_response_head(request, &response, body, dechunk, keep_alive);
        let mut sink = Sink::new(self.client.socket(), head);
        let relayed =
            http::relay_body(&mut upstream, body, &mut sink, dechunk).and_then(|()| sink.flush());
        if let Err(err) = relayed {
            return Err(relay_failure(err, sink.written() == 0));
        }
        self.release(backend, upstream, &response, body);
        Ok((
            if keep_alive {
                Flow::KeepAlive
            } else {
                Flow::Close
            },
            status,
        ))
    }

    /// The response head as the client gets it: the backend's end-to-end fields, then the
    /// framing, the balancer's own fields, and how the connection goes on.
    fn client_response_head(
        &self,
        request: &OutgoingRequest,
        response: &ResponseHead,
        body: BodyLength,
        dechunk: bool,
        keep_alive: bool,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        write_response_head(&mut out, response);
        if body == BodyLength::Chunked && !dechunk {
            http::push_header(&mut out, "Transfer-Encoding", b"chunked");
        }
        if self.lb.settings.explain {
            http::push_header(&mut out, "X-Lb-Decision", request.reason.as_bytes());
        }
        // The balancer's cookie is a field of its own, so the backend's own Set-Cookie fields
        // (already copied above) all reach the client too (RFC 6265 §3: one cookie per field).
        if let Some(cookie) = request.set_cookie {
            http::push_header(&mut out, "Set-Cookie", cookie.as_bytes());
        }
        if !keep_alive {
            http::push_header(&mut out, "Connection", b"close");
        } else if request.head.version == Version::Http10 {
            http::push_header(&mut out, "Connection", b"keep-alive");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// After a complete response, returns the read buffer for reuse and the backend connection
    /// to the pool, if the backend keeps it open and nothing unexpected follows the response.
    fn release(
        &self,
        backend: &Backend,
        upstream: BufferedStream,
        response: &ResponseHead,
        body: BodyLength,
    ) {
        let reusable = body != BodyLength::UntilClose
            && upstream.buffered().is_empty()
            && match response.version {
                Version::Http11 => !response.has_token("connection", "close"),
                Version::Http10 => response.has_token("connection", "keep-alive"),
            };
        let (socket, buffer) = upstream.into_parts();
        self.lb.buffers.give(buffer);
        if reusable {
            backend.put_idle(socket);
        }
    }
}

/// What a response cut short means for the client: an error answer while nothing of the
/// response was sent yet (504 for a backend that went quiet, 502 otherwise), else the end of the
/// connection.
fn relay_failure(err: RelayError, nothing_sent: bool) -> ExchangeError {
    match err {
        RelayError::Read(e) if nothing_sent && http::is_timeout(&e) => {
            ExchangeError::Failed(Failure::Answer(ProxyError::GatewayTimeout))
        }
        RelayError::Read(_) | RelayError::Truncated | RelayError::Malformed(_) if nothing_sent => {
            bad_gateway("the response body was cut short")
        }
        RelayError::Write(e) => abort(&format!("writing the response: {e}")),
        other => ExchangeError::Failed(Failure::Abort {
            why: format!("relaying the response: {other:?}"),
            by_backend: true,
        }),
    }
}

/// Why a backend could not take a request.
enum TryError {
    /// Connecting failed: nothing was sent, so another backend may take the request.
    Unreachable,
    /// The exchange failed after the request went out.
    Failed(Failure),
}

/// What is needed to send one request to a backend.
struct OutgoingRequest<'r> {
    head: &'r RequestHead,
    /// How the whole body is framed.
    body: BodyLength,
    /// The start of the body, which arrived with the head.
    prefix: &'r [u8],
    /// How the rest of the body, still to be read from the client, is framed.
    rest: BodyLength,
    request_id: Option<&'r str>,
    /// The `X-Lb-Decision` value; empty unless `--explain`.
    reason: &'r str,
    /// The balancer's `Set-Cookie` value, for a new sticky session.
    set_cookie: Option<&'r str>,
}

/// A request's sticky session: the id it goes by, and the backend the table holds for it.
struct Session<'t> {
    table: &'t SessionTable,
    id: uuid::Uuid,
    /// The session's backend; `None` for a new session (no cookie, or one the table forgot).
    backend: Option<usize>,
}

impl<'t> Session<'t> {
    /// The session named by the request's cookie, or a new one with a fresh id. An id the table
    /// does not know is replaced rather than adopted, so clients cannot choose their session ids.
    fn of(table: &'t SessionTable, head: &RequestHead) -> Self {
        let known = table
            .session_in(&head.headers)
            .and_then(|id| Some((id, table.backend_of(id)?)));
        match known {
            Some((id, backend)) => Session {
                table,
                id,
                backend: Some(backend),
            },
            None => Session {
                table,
                id: uuid::Uuid::new_v4(),
                backend: None,
            },
        }
    }

    /// The `Set-Cookie` value a new session's response carries.
    fn set_cookie(&self) -> Option<String> {
        self.backend
            .is_none()
            .then(|| self.table.set_cookie(self.id))
    }

    /// Records that the session now goes to `backend` (a new session, or one whose backend was
    /// unavailable and moved); the cookie stays the same.
    fn follow(&self, backend: usize) {
        if self.backend != Some(backend) {
            self.table.remember(self.id, backend);
        }
    }
}

impl OutgoingRequest<'_> {
    /// Whether sending the request a second time is harmless if the first try got no answer:
    /// an idempotent method (RFC 9110 §9.2.2) or no body at all.
    fn can_resend(&self) -> bool {
        self.head.is_idempotent() || self.body == BodyLength::Empty
    }

    /// Whether the request may go on to another backend after one broke the exchange before
    /// any byte of the answer reached the client, as nginx and Envoy do: the method is
    /// idempotent (RFC 9110 §9.2.2: sending it twice has the effect of sending it once), and
    /// the whole body is still held (a body streamed through is gone). A POST is never sent
    /// twice, since the first backend may have acted on it. Nor is a request that timed out
    /// (504): its backend may still be working on it, and a slow request would otherwise
    /// load every backend in turn.
    fn may_go_elsewhere(&self) -> bool {
        self.head.is_idempotent() && self.rest == BodyLength::Empty
    }
}

/// Refuses requests a balancer must not forward, and says how the body is framed.
fn check_request(head: &RequestHead) -> Result<BodyLength, ProxyError> {
    if head.method() == "CONNECT" {
        return Err(ProxyError::NotImplemented(head.method().to_string()));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400.
    if head.version == Version::Http11 && head.header("host").is_none() {
        return Err(ProxyError::BadRequest("missing Host header".into()));
    }
    http::request_body_length(head).map_err(ProxyError::BadRequest)
}

/// Writes the request line and headers for the backend: hop-by-hop fields removed, the client
/// added to X-Forwarded-For, an X-Request-Id added when missing, and the framing stated once.
fn write_request_head(
    out: &mut Vec<u8>,
    request: &OutgoingRequest,
    client_ip: &str,
    backend_name: &str,
) {
    let head = request.head;
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let hop_by_hop = http::HopByHop::of(head);
    for (name, value) in head.headers.pairs() {
        let rewritten = name.eq_ignore_ascii_case(b"x-forwarded-for")
            || name.eq_ignore_ascii_case(b"content-length")
            || (name.eq_ignore_ascii_case(b"expect") && head.has_token("expect", "100-continue"));
        if !rewritten && !hop_by_hop.contains(name) {
            http::push_field(out, name, value);
        }
    }
    if head.header("host").is_none() {
        http::push_header(out, "Host", backend_name.as_bytes());
    }
    // X-Forwarded-For lists every hop so far: the values the client sent, then the client.
    out.extend_from_slice(b"X-Forwarded-For: ");
    for value in head.headers.values("x-forwarded-for") {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(id) = request.request_id {
        http::push_header(out, "X-Request-Id", id.as_bytes());
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

/// Writes a status line and the end-to-end headers of a response (without the blank line, so
/// the caller can add its own fields). Framing headers that the relay replaces are left out.
fn write_response_head(out: &mut Vec<u8>, head: &ResponseHead) {
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

fn bad_gateway(why: &str) -> ExchangeError {
    ExchangeError::Failed(Failure::Answer(ProxyError::BadGateway(why.to_string())))
}

/// The client broke the exchange.
fn abort(why: &str) -> ExchangeError {
    ExchangeError::Failed(Failure::Abort {
        why: why.to_string(),
        by_backend: false,
    })
}

/// How an exchange counts for passive health checks (the contract's failed request): a 502,
/// 503 or 504 from the backend, or an exchange it broke or let time out, is a failure; any
/// other answer is a success; a client that went away or sent a malformed body says nothing
/// about the backend.
fn backend_verdict(result: &Result<(Flow, u16), ExchangeError>) -> Option<bool> {
    match result {
        Ok((_, status)) => Some(!matches!(status, 502..=504)),
        Err(ExchangeError::Stale) => Some(false),
        Err(ExchangeError::Failed(Failure::Answer(
            ProxyError::BadGateway(_) | ProxyError::GatewayTimeout,
        ))) => Some(false),
        Err(ExchangeError::Failed(Failure::Answer(_))) => None,
        Err(ExchangeError::Failed(Failure::Abort { by_backend, .. })) => {
            by_backend.then_some(false)
        }
    }
}
