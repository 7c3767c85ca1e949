//! One client connection: the loop over its requests, and for each request the choice of a
//! backend, the retries on the next one, and the error answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::admin_state::AdminState;
use crate::backend::Backend;
use crate::balance;
use crate::eligibility::{self, Admission, Candidates};
use crate::error::ProxyError;
use crate::http::{self, BodyLength, BufferedStream, HeadError, Headers, RequestHead, MAX_HEAD};
use crate::stream::ClientStream;

use super::checks::check_request;
use super::notes::Notes;
use super::outcome::{Failure, Flow, TryError};
use super::request::{Attempt, OutgoingRequest};
use super::session::Session;
use super::{BackendSet, ConnectionState, LoadBalancer};

/// One client connection: its socket, who it is, and the state its requests share.
pub struct ClientConnection<'a> {
    pub(super) lb: &'a LoadBalancer,
    /// The backend set of the current request: read once per request, so that a reload
    /// reaches keep-alive connections at their next request and never one request halfway.
    pub(super) set: Arc<BackendSet>,
    pub(super) client: BufferedStream<ClientStream>,
    pub(super) client_ip: IpAddr,
    /// The client's address as text, written once per connection rather than per request.
    pub(super) client_ip_text: String,
    /// `https` when the client came through TLS, else `http` (for `X-Forwarded-Proto`).
    pub(super) scheme: &'static str,
    state: &'a ConnectionState,
    pub(super) shutdown: &'a AtomicBool,
    /// Whether the current request still has body bytes unread: the connection then cannot be
    /// reused if the request ends in an error.
    pub(super) body_pending: bool,
    /// The address the connection came from (or its PROXY header names); a request through a
    /// trusted proxy may name another client (`client_ip`).
    pub(super) connection_ip: IpAddr,
    /// What the access log learns about the current request.
    pub(super) notes: Notes,
}

impl<'a> ClientConnection<'a> {
    /// Prepares to serve `stream`, whose timeouts the server has set (and whose TLS handshake,
    /// for HTTPS, is done).
    pub fn new(
        lb: &'a LoadBalancer,
        stream: ClientStream,
        peer: SocketAddr,
        state: &'a ConnectionState,
        shutdown: &'a AtomicBool,
    ) -> Self {
        ClientConnection {
            set: lb.snapshot(),
            lb,
            scheme: if stream.is_tls() { "https" } else { "http" },
            // The buffer is taken when the first bytes arrive (see `serve`).
            client: BufferedStream::with_buffer(stream, Vec::new()),
            client_ip: peer.ip(),
            client_ip_text: peer.ip().to_string(),
            state,
            shutdown,
            body_pending: false,
            connection_ip: peer.ip(),
            notes: Notes::default(),
        }
    }

    /// Serves requests until the client closes, an error ends the connection, or the balancer
    /// shuts down.
    pub fn serve(&mut self) {
        // A connection served after shutdown began waited in the listen queue, its request on
        // the way: that first request is served, not dropped.
        let mut first_owed = self.shutdown.load(Ordering::SeqCst);
        while std::mem::take(&mut first_owed) || self.idle_unless_shutting_down() {
            // The whole head must arrive within the client timeout of this moment.
            let timeout = self.set.settings.client_timeout;
            let deadline = Instant::now() + timeout;
            if !self.next_request_begins() {
                break;
            }
            let head = http::read_request_head_until(&mut self.client, deadline, timeout, MAX_HEAD);
            self.busy();
            let flow = match head {
                Ok(Some(head)) => self.handle_logged(head),
                Ok(None) => Flow::Close,
                Err(err) => self.reject_logged(err),
            };
            if matches!(flow, Flow::Close) {
                break;
            }
        }
    }

    /// From here the connection is busy (shutdown waits for its answer), and it takes up the
    /// backend set of the latest reload.
    fn busy(&mut self) {
        self.state.idle.store(false, Ordering::SeqCst);
        self.lb.refresh(&mut self.set);
    }

    /// Whether the client's next request begins: between requests the connection holds no read
    /// buffer, it waits for the client's next bytes (up to the client timeout, the socket's) and
    /// only they take a buffer. False when the client closed, stayed quiet for the whole
    /// timeout, or reset the connection: nobody is left to answer.
    fn next_request_begins(&mut self) -> bool {
        !self.client.buffered().is_empty()
            || matches!(self.client.fill_when_idle(&self.lb.buffers), Ok(n) if n > 0)
    }

    /// Marks the connection idle between two requests, so that shutting down may close it at
    /// once, and says whether it may wait for another request.
    fn idle_unless_shutting_down(&self) -> bool {
        self.state.idle.store(true, Ordering::SeqCst);
        !self.shutdown.load(Ordering::SeqCst)
    }

    /// Ends the connection: the read buffer goes back for reuse, and the stream to the server,
    /// which closes it.
    pub fn into_stream(self) -> ClientStream {
        let (socket, buffer) = self.client.into_parts();
        self.lb.buffers.give(buffer);
        socket
    }

    /// Answers a head that could not be read, when there is anyone left to answer.
    pub(super) fn reject_head(&mut self, err: HeadError) -> Flow {
        let answer = match err {
            HeadError::TooLarge => ProxyError::HeadTooLarge,
            HeadError::LineTooLong => ProxyError::UriTooLong,
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
        self.note_answer(&answer);
        self.write_error(&answer, true);
        Flow::Close
    }

    /// Forwards one request and relays its response.
    pub(super) fn handle(&mut self, head: RequestHead) -> Flow {
        let started = Instant::now();
        self.lb.stats.count_request();
        if let Some(port) = self.redirect_port() {
            return self.redirect_to_https(&head, port);
        }
        match self.forward(&head, started) {
            Ok(flow) => flow,
            Err(failure) => self.fail(&head, failure, started),
        }
    }

    /// Ends a request that failed: an error answer while nothing of a response reached the
    /// client, else the end of the connection.
    fn fail(&mut self, head: &RequestHead, failure: Failure, started: Instant) -> Flow {
        match failure {
            Failure::Answer(err) => {
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
                self.note_answer(&err);
                self.write_error(&err, close);
                if close {
                    Flow::Close
                } else {
                    Flow::KeepAlive
                }
            }
            Failure::Abort { why, by_backend } => {
                log::debug!(
                    "{} {} {}: connection dropped: {why}",
                    self.client_ip,
                    head.method(),
                    head.target()
                );
                self.note_abort(&why);
                if by_backend {
                    self.client.get_mut().reset_on_close();
                }
                Flow::Close
            }
        }
    }

    /// The HTTPS port a plain-HTTP request is redirected to (`--redirect-https`), if any.
    fn redirect_port(&self) -> Option<u16> {
        let port = self.set.settings.redirect_https;
        port.filter(|_| self.scheme == "http")
    }

    /// `--redirect-https`: answers `308 Permanent Redirect` to the same host and target on the
    /// HTTPS port (308 rather than 301, so that a POST stays a POST, RFC 9110 §15.4.9).
    fn redirect_to_https(&mut self, head: &RequestHead, port: u16) -> Flow {
        let host = head
            .header("host")
            .and_then(|h| std::str::from_utf8(h).ok());
        let Some(host) = host.and_then(host_without_port) else {
            self.write_error(
                &ProxyError::BadRequest("no Host to redirect to".to_string()),
                true,
            );
            return Flow::Close;
        };
        let target = head.target();
        // An absolute-form target (`http://host/path`) keeps only its path.
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None if target.starts_with('/') => target,
            None => "/",
        };
        let authority = if port == 443 {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        // A request body is not read: the connection closes after the answer instead.
        let close = !head.wants_keep_alive()
            || check_request(head).map_or(true, |body| body != BodyLength::Empty)
            || self.shutdown.load(Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://{authority}{path}\r\n\
             Content-Length: 0\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        log::debug!(
            "{} {} {} -> 308 https://{authority}{path}",
            self.client_ip,
            head.method(),
            target
        );
        self.note_status(308);
        let client = self.client.get_mut();
        let _ = std::io::Write::write_all(client, response.as_bytes());
        if close {
            client.close_gracefully();
            Flow::Close
        } else {
            Flow::KeepAlive
        }
    }

    /// Answers with `err`; when the connection closes afterwards, closes it without losing the
    /// answer.
    fn write_error(&mut self, err: &ProxyError, close: bool) {
        let client = self.client.get_mut();
        let _ = std::io::Write::write_all(client, &err.to_response(close));
        if close {
            client.close_gracefully();
        }
    }

    /// Checks the request, then tries backends until one answers or none is left.
    fn forward(&mut self, head: &RequestHead, started: Instant) -> Result<Flow, Failure> {
        let body = self.check(head)?;
        let mut id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let request_id = request_id(head, &mut id_text);
        let (prefix, rest) = self.take_body_prefix(body);
        let set = Arc::clone(&self.set);
        let session = set.sticky.as_ref().map(|sticky| Session::of(sticky, head));
        let mut tries = Tries::default();
        while let Some(attempt) = self.next_attempt(&set, head, session.as_ref(), &mut tries) {
            let backend = attempt.backend;
            self.note_sticky(session.as_ref(), backend);
            let _slot = self.wait_for_room(backend)?;
            let _in_flight = backend.stats().begin_request();
            let request = OutgoingRequest::new(head, body, (&prefix, rest), request_id, &attempt);
            match self.try_backend(backend, &request, started) {
                Ok(flow) => return Ok(self.tunnel_if_switched(flow, backend)),
                Err(err) => self.may_retry(err, &request, backend, &mut tries)?,
            }
        }
        Err(tries.failed.unwrap_or_else(|| no_backend(&set)))
    }

    /// After a `101 Switching Protocols`, the connection is a tunnel to the backend until
    /// either side closes (`tunnel.rs`). The tunnel runs while the request counts as in flight
    /// on its backend, so that least connections sees it.
    fn tunnel_if_switched(&mut self, flow: Flow, backend: &Backend) -> Flow {
        let Flow::Switch(upstream) = flow else {
            return flow;
        };
        self.tunnel(backend, upstream);
        Flow::Close
    }

    /// Refuses what must not be forwarded (`checks.rs`), and says how the body is framed.
    fn check(&mut self, head: &RequestHead) -> Result<BodyLength, Failure> {
        // Until the body's framing is known, nothing tells a body from the next request: a
        // request refused here closes the connection, or its body would be read as a request
        // of its own (request smuggling).
        self.body_pending = true;
        let body = check_request(head).map_err(Failure::Answer)?;
        self.body_pending = body != BodyLength::Empty;
        Ok(body)
    }

    /// The next backend to try and what the try adds to the request, or `None` once the
    /// retries are used up or no backend is left.
    fn next_attempt<'s>(
        &self,
        set: &'s BackendSet,
        head: &RequestHead,
        session: Option<&Session>,
        tries: &mut Tries,
    ) -> Option<Attempt<'s>> {
        while tries.count <= set.settings.retries {
            let candidates = set.candidates(&tries.tried, &self.lb.stats);
            let pick = self.choose(&candidates, session)?;
            let attempt = self.attempt_on(set, &pick, session, &tries.tried);
            let admitted = candidates.lets_in(attempt.backend);
            tries.tried.push(pick.index);
            if admitted {
                self.count_try(head, attempt.backend, tries);
                return Some(attempt);
            }
        }
        None
    }

    /// A try on the picked backend, and what it adds to the request: the `X-Lb-Decision` line
    /// with `--explain` (else nothing), and a new sticky session's cookie, the session
    /// following the chosen backend (phase 4).
    fn attempt_on<'s>(
        &self,
        set: &'s BackendSet,
        pick: &balance::Pick,
        session: Option<&Session>,
        tried: &[usize],
    ) -> Attempt<'s> {
        let decision = if set.settings.explain {
            self.explain(pick, session, tried)
        } else {
            String::new()
        };
        if let Some(session) = session {
            session.follow(pick.index);
        }
        Attempt {
            backend: &set.backends[pick.index],
            decision,
            set_cookie: session.and_then(|s| s.set_cookie(pick.index)),
        }
    }

    /// Counts a request sent to `backend`; one sent on after another backend failed it is a
    /// retry, counted and logged.
    fn count_try(&self, head: &RequestHead, backend: &Backend, tries: &mut Tries) {
        tries.count += 1;
        if tries.count == 1 {
            return;
        }
        self.lb.stats.count_retry();
        log::debug!(
            "{} {} {}: retrying on {}",
            self.client_ip,
            head.method(),
            head.target(),
            backend.name()
        );
    }

    /// Whether a failed try may go on to the next backend: `Ok` when it may (with why this one
    /// failed the request in `tries`, when it reached it), or `Err` with the failure that ends it.
    fn may_retry(
        &self,
        err: TryError,
        request: &OutgoingRequest,
        backend: &Backend,
        tries: &mut Tries,
    ) -> Result<(), Failure> {
        match err {
            // Nothing reached the backend, so the next one may safely get the request.
            TryError::Unreachable => Ok(()),
            // The backend broke the exchange before any byte of the answer reached the
            // client (a timeout is a 504, not a broken exchange).
            TryError::Failed(Failure::Answer(err @ ProxyError::BadGateway(_)))
                if request.may_go_elsewhere() =>
            {
                log::debug!(
                    "{} {} {}: {} failed before answering ({err}); another backend may take it",
                    self.client_ip,
                    request.head.method(),
                    request.head.target(),
                    backend.name(),
                );
                tries.failed = Some(Failure::Answer(err));
                Ok(())
            }
            TryError::Failed(failure) => Err(failure),
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

    /// Chooses among the candidates (`eligibility.rs`): the session's own backend, when it is
    /// one of them, else the balancer's pick.
    fn choose(&self, candidates: &Candidates, session: Option<&Session>) -> Option<balance::Pick> {
        let bound = |i: usize| candidates.admits(i, Admission::Bound);
        if let Some(pick) = session.and_then(|s| s.choice(&bound)) {
            return Some(pick);
        }
        let request = balance::Request {
            client_ip: self.client_ip,
            explain: self.set.settings.explain,
        };
        candidates.pick(self.set.balancer.as_ref(), &request)
    }

    /// The `X-Lb-Decision` line: the sticky verdict, the algorithm's reason, the backends left
    /// out as unavailable and those already tried for this request, then the choice.
    fn explain(&self, pick: &balance::Pick, session: Option<&Session>, tried: &[usize]) -> String {
        let backends = &self.set.backends;
        let name = |i: usize| backends[i].name();
        let mut parts = Vec::new();
        if let Some(session) = session {
            parts.push(session.explain(pick.index, name));
        }
        if session.is_none_or(|s| s.backend != Some(pick.index)) {
            parts.push(pick.reason.clone());
        }
        let unavailable: Vec<String> = backends
            .iter()
            .filter(|b| !eligibility::admits(b, Admission::New))
            .map(|b| unavailable_name(b))
            .collect();
        if !unavailable.is_empty() {
            parts.push(format!("unavailable: {}", unavailable.join(", ")));
        }
        if !tried.is_empty() {
            let names: Vec<&str> = tried.iter().map(|&i| name(i)).collect();
            parts.push(format!("retry after {}", names.join(", ")));
        }
        if self.lb.stats.in_panic() {
            parts.push("panic: every primary backend is a candidate".to_string());
        } else if backends[pick.index].is_backup() {
            parts.push("no primary backend in rotation: a backup".to_string());
        }
        parts.push(format!("chose {}", name(pick.index)));
        parts.join("; ")
    }
}

/// A backend left out of the choice, for `X-Lb-Decision`: its name, and why when the operator
/// left it out (health needs no word: the page and the log say it).
fn unavailable_name(backend: &Backend) -> String {
    match backend.admin_state() {
        AdminState::Ready if backend.weight() == 0 => format!("{} (weight 0)", backend.name()),
        AdminState::Ready => backend.name().to_string(),
        state => format!("{} ({state})", backend.name()),
    }
}

/// No backend was left to try: a 503 that says when to come back.
fn no_backend(set: &BackendSet) -> Failure {
    Failure::Answer(ProxyError::NoBackend {
        retry_after: set.retry_after(),
    })
}

/// The tries of one request so far.
#[derive(Default)]
struct Tries {
    /// The backends already chosen, by index; a retry goes elsewhere.
    tried: Vec<usize>,
    /// Requests sent (a backend that refused its trial does not count).
    count: usize,
    /// Why the last backend tried failed the request, if another one may take it over.
    failed: Option<Failure>,
}

/// The request's id for the backend and the log: the client's own `X-Request-Id` is kept
/// (`None`: forwarded as it is), unless its `Connection` field names it (then it is not
/// forwarded, and the backend gets a new one, written into `text`).
fn request_id<'t>(
    head: &RequestHead,
    text: &'t mut [u8; uuid::fmt::Hyphenated::LENGTH],
) -> Option<&'t str> {
    match head.header("x-request-id") {
        Some(_) if !http::HopByHop::of(head).contains(b"x-request-id") => None,
        _ => Some(&*uuid::Uuid::new_v4().hyphenated().encode_lower(text)),
    }
}

/// The host part of a Host field (`example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`),
/// or `None` when it holds anything a host name or address cannot.
fn host_without_port(host: &str) -> Option<&str> {
    let host = match host.strip_prefix('[') {
        Some(rest) => &host[..rest.find(']')? + 2],
        None => host.split(':').next()?,
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._[]:".contains(c);
    (!host.is_empty() && host.chars().all(allowed)).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::host_without_port;

    #[test]
    fn the_host_of_a_host_field_is_found_without_its_port() {
        assert_eq!(host_without_port("example.com"), Some("example.com"));
        assert_eq!(host_without_port("example.com:8080"), Some("example.com"));
        assert_eq!(host_without_port("[::1]:8080"), Some("[::1]"));
        assert_eq!(host_without_port("[::1]"), Some("[::1]"));
        assert_eq!(host_without_port(""), None);
        assert_eq!(host_without_port("a b"), None);
        assert_eq!(host_without_port("evil.com/x"), None);
        assert_eq!(host_without_port("[::1"), None);
    }
}
