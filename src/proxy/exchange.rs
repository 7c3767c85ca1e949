//! One try against one backend: a connection from the pool or a new one, the request sent, the
//! response head read and the response relayed, the connection given back to the pool. What
//! can go wrong on the way is sorted here: safe to try again, the backend's fault, or the
//! client's.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backend::{report_health, Backend, Connection, FirstExchange};
use crate::descriptors;
use crate::error::ProxyError;
use crate::http::{
    self, BodyLength, BufferedStream, HeadError, Headers, RelayError, ResponseHead, Sink, Version,
};
use crate::warnings::RepeatedWarning;

use super::connection::ClientConnection;
use super::outcome::{abort, bad_gateway, ExchangeError, Failure, Flow, TryError};
use super::request::{
    push_upgrade_fields, write_request_head, write_response_head, OutgoingRequest,
};

/// Between two tries at connecting to a backend while the process is out of descriptors.
const DESCRIPTOR_WAIT: Duration = Duration::from_millis(10);

/// What one exchange gave: how the client connection goes on and the response status.
type Exchanged = Result<(Flow, u16), ExchangeError>;

static UNREACHABLE: RepeatedWarning = RepeatedWarning::new(module_path!());
static OUT_OF_DESCRIPTORS: RepeatedWarning = RepeatedWarning::new(module_path!());

impl ClientConnection<'_> {
    /// Sends the request to one backend, once more on a fresh connection if a pooled one turns
    /// out to have been closed by the backend.
    pub(super) fn try_backend(
        &mut self,
        backend: &Backend,
        request: &OutgoingRequest,
        started: Instant,
    ) -> Result<Flow, TryError> {
        // A body that will be streamed cannot be sent twice, so it never risks a pooled
        // connection that may turn out closed.
        // A request to switch protocols is not sent twice either (see `may_go_elsewhere`).
        let may_reuse = request.rest == BodyLength::Empty && !request.upgrade;
        self.note_try(backend, request);
        let connection = self.open_connection(backend, may_reuse)?;
        backend.stats().count_request();
        let out = self.request_bytes(backend, request);
        let mut result = self.exchange(backend, connection, &out, request);
        if matches!(result, Err(ExchangeError::Stale)) {
            result = self.resend_on_fresh(backend, &out, request, started)?;
        }
        self.note_try_end();
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

    /// Sends the request again on a fresh connection, after a pooled one turned out closed.
    fn resend_on_fresh(
        &mut self,
        backend: &Backend,
        out: &[u8],
        request: &OutgoingRequest,
        started: Instant,
    ) -> Result<Exchanged, TryError> {
        log::debug!(
            "pooled connection to {} was closed; retrying on a fresh one",
            backend.name()
        );
        // If no fresh connection can be had either, the request (which did reach this
        // backend) ends here as an error and goes on to the next backend.
        let fresh = self
            .open_connection(backend, false)
            .inspect_err(|_| backend.stats().record(started.elapsed(), false))?;
        Ok(self.exchange(backend, fresh, out, request))
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
                opening: false,
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
        // Its place in the queue for a connection to this backend, kept from one try to the next.
        let place = may_reuse.then(|| backend.queue_for_connection());
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
            let Some(place) = &place else {
                std::thread::sleep(step);
                continue;
            };
            if let Some(stream) = place.connection(step) {
                return Ok(Connection {
                    stream,
                    reused: true,
                    opening: false,
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
            report_health(&self.lb.backends, backend, &change);
        }
    }

    /// The request as the backend gets it: the head rewritten for the next hop, then whatever
    /// part of the body already arrived with it.
    fn request_bytes(&self, backend: &Backend, request: &OutgoingRequest) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + request.prefix.len());
        write_request_head(
            &mut out,
            request,
            &self.client_ip_text,
            self.scheme,
            backend.name(),
        );
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
    ) -> Exchanged {
        let reused = connection.reused;
        if reused && !request.can_resend() && connection.closed_while_idle() {
            // Nothing was sent: a fresh connection takes the request instead.
            return Err(ExchangeError::Stale);
        }
        let first_exchange = FirstExchange::new(backend, &connection);
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
        let relayed = self.relay_response(backend, upstream, request, response);
        // After the connection went back to the pool, so that a request waiting for its turn
        // takes it rather than opening another.
        drop(first_exchange);
        relayed
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
            let _ =
                std::io::Write::write_all(self.client.get_mut(), b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut dst = upstream.socket();
        let mut sink = Sink::new(&mut dst, Vec::new());
        let relayed = http::relay_body(&mut self.client, request.rest, &mut sink, false)
            .and_then(|()| sink.flush());
        relayed.map_err(request_body_failure)?;
        self.body_pending = false;
        Ok(())
    }

    /// Reads the response head, passing interim 1xx responses on to the client.
    fn read_response(
        &mut self,
        upstream: &mut BufferedStream,
        request: &OutgoingRequest,
        reused: bool,
    ) -> Result<ResponseHead, ExchangeError> {
        // A pooled connection the backend closed before answering may take the request again.
        let may_resend = reused && request.can_resend();
        loop {
            let head = match http::read_response_head(upstream) {
                Ok(Some(head)) => head,
                Ok(None) => return Err(no_response(None, may_resend)),
                Err(err) => return Err(no_response(Some(err), may_resend)),
            };
            match head.status {
                101 if request.upgrade => return Ok(head),
                101 => {
                    return Err(bad_gateway(
                        "a 101 to a request that did not ask to switch protocols",
                    ))
                }
                100..=199 => {
                    // Interim responses (such as 103 Early Hints) go to HTTP/1.1 clients as they are.
                    if request.head.version == Version::Http11 {
                        let mut interim = Vec::new();
                        write_response_head(&mut interim, &head);
                        interim.extend_from_slice(b"\r\n");
                        let _ = std::io::Write::write_all(self.client.get_mut(), &interim);
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
    ) -> Exchanged {
        if response.status == 101 {
            return self.switch_protocols(upstream, request, &response);
        }
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
        let head_len = head.len();
        let mut sink = Sink::new(self.client.get_mut(), head);
        let relayed =
            http::relay_body(&mut upstream, body, &mut sink, dechunk).and_then(|()| sink.flush());
        self.notes.response(status, sink.written(), head_len);
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
        self.push_balancer_fields(&mut out, request);
        if !keep_alive {
            http::push_header(&mut out, "Connection", b"close");
        } else if request.head.version == Version::Http10 {
            http::push_header(&mut out, "Connection", b"keep-alive");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The balancer's own response fields: the decision for `--explain`, and a new sticky
    /// session's cookie, as a field of its own so that the backend's own Set-Cookie fields
    /// (already copied) all reach the client too (RFC 6265 §3: one cookie per field).
    fn push_balancer_fields(&self, out: &mut Vec<u8>, request: &OutgoingRequest) {
        if self.lb.settings.explain {
            http::push_header(out, "X-Lb-Decision", request.reason.as_bytes());
        }
        if let Some(cookie) = request.set_cookie {
            http::push_header(out, "Set-Cookie", cookie.as_bytes());
        }
    }

    /// The backend switched protocols: the `101` goes to the client, followed by whatever the
    /// backend sent right after it, and whatever the client sent after its request goes to the
    /// backend, so that no byte is lost either way. From here on the connection is a tunnel
    /// (`tunnel.rs`), and the backend connection never goes back to the pool.
    fn switch_protocols(
        &mut self,
        upstream: BufferedStream,
        request: &OutgoingRequest,
        response: &ResponseHead,
    ) -> Exchanged {
        let mut head = Vec::with_capacity(512);
        write_response_head(&mut head, response);
        push_upgrade_fields(&mut head, response);
        self.push_balancer_fields(&mut head, request);
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(upstream.buffered());
        if let Err(err) = std::io::Write::write_all(self.client.get_mut(), &head) {
            return Err(abort(&format!("writing the 101 response: {err}")));
        }
        let early = self.client.buffered().len();
        if early > 0 {
            if let Err(err) =
                std::io::Write::write_all(&mut upstream.socket(), self.client.buffered())
            {
                return Err(ExchangeError::Failed(Failure::Abort {
                    why: format!("passing on what the client sent after its request: {err}"),
                    by_backend: true,
                }));
            }
            self.client.consume(early);
        }
        let (socket, buffer) = upstream.into_parts();
        self.lb.buffers.give(buffer);
        Ok((Flow::Switch(socket), 101))
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

/// What a response head that did not come means (`None`: the backend closed the connection
/// first): a stale pooled connection when the request `may_resend` on a fresh one, a 504 for a
/// backend that went quiet, else a 502.
fn no_response(err: Option<HeadError>, may_resend: bool) -> ExchangeError {
    match err {
        None | Some(HeadError::Io(_)) if may_resend => ExchangeError::Stale,
        None => bad_gateway("the backend closed the connection without a response"),
        Some(HeadError::TimedOut) => {
            ExchangeError::Failed(Failure::Answer(ProxyError::GatewayTimeout))
        }
        Some(HeadError::Io(err)) => bad_gateway(&format!("reading the response: {err}")),
        Some(HeadError::TooLarge | HeadError::LineTooLong) => {
            bad_gateway("the response head is too large")
        }
        Some(HeadError::Malformed(why) | HeadError::UnsupportedVersion(why)) => {
            bad_gateway(&format!("malformed response: {why}"))
        }
        Some(HeadError::Truncated) => bad_gateway("the response head was cut short"),
    }
}

/// What a request body that could not be passed on means: the backend's fault when writing to
/// it failed (502), the client's otherwise (400 for broken chunks, or the end of the connection).
fn request_body_failure(err: RelayError) -> ExchangeError {
    match err {
        RelayError::Write(err) => bad_gateway(&format!("sending the request body: {err}")),
        RelayError::Malformed(why) => {
            ExchangeError::Failed(Failure::Answer(ProxyError::BadRequest(why.to_string())))
        }
        RelayError::Read(err) => abort(&format!("reading the request body: {err}")),
        RelayError::Truncated => abort("the client closed during the request body"),
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

/// How an exchange counts for passive health checks (the contract's failed request): a 502,
/// 503 or 504 from the backend, or an exchange it broke or let time out, is a failure; any
/// other answer is a success; a client that went away or sent a malformed body says nothing
/// about the backend.
fn backend_verdict(result: &Exchanged) -> Option<bool> {
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
