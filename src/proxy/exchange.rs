//! One try against one backend: a connection from the pool or a new one, the request sent, the
//! response head read and the response relayed, the connection given back to the pool.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backend::{report_health, Backend, Connection, FirstExchange};
use crate::descriptors;
use crate::error::ProxyError;
use crate::http::{self, BodyLength, BufferedStream, Headers, ResponseHead, Sink, Version};
use crate::warnings::RepeatedWarning;

use super::connection::ClientConnection;
use super::outcome::{
    abort, backend_verdict, bad_gateway, no_response, relay_failure, request_body_failure,
    send_failure, unasked_switch, ExchangeError, Exchanged, Failure, Flow, TryError,
};
use super::request::{
    push_upgrade_fields, write_request_head, write_response_head, OutgoingRequest,
};

/// Between two tries at connecting to a backend while the process is out of descriptors.
const DESCRIPTOR_WAIT: Duration = Duration::from_millis(10);

static UNREACHABLE: RepeatedWarning = RepeatedWarning::new(module_path!());
static OUT_OF_DESCRIPTORS: RepeatedWarning = RepeatedWarning::new(module_path!());

impl ClientConnection<'_> {
    /// Sends the request to one backend and relays its answer; once more on a fresh connection
    /// if a pooled one turns out to have been closed by the backend.
    pub(super) fn try_backend(
        &mut self,
        backend: &Backend,
        request: &OutgoingRequest,
        started: Instant,
    ) -> Result<Flow, TryError> {
        let may_reuse = request.may_reuse_a_connection();
        self.note_try(backend, request);
        let connection = self.open_connection(backend, may_reuse)?;
        backend.stats().count_request();
        let out = self.request_bytes(backend, request);
        let mut result = self.exchange(backend, connection, &out, request);
        if matches!(result, Err(ExchangeError::Stale)) {
            result = self.resend_on_fresh(backend, &out, request, started)?;
        }
        self.note_try_end();
        self.account(backend, request, &result, started);
        Ok(result?.0)
    }

    /// Counts and logs how the try went, and tells the health checks. A client that went away
    /// or sent a broken body is not the backend's error.
    fn account(
        &self,
        backend: &Backend,
        request: &OutgoingRequest,
        result: &Exchanged,
        started: Instant,
    ) {
        let verdict = backend_verdict(result);
        backend
            .stats()
            .record(started.elapsed(), verdict == Some(false));
        self.observe(backend, verdict);
        if let Ok((_, status)) = result {
            self.log_exchange(backend, request, *status, started);
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

    /// A connection to `backend`: from the idle pool when `may_reuse`, else a new one.
    fn open_connection(&self, backend: &Backend, may_reuse: bool) -> Result<Connection, TryError> {
        self.connect(backend, may_reuse)
            .or_else(|err| self.cannot_connect(backend, may_reuse, &err))
    }

    /// No connection: out of file descriptors, a wait for one; else the backend is unreachable,
    /// which counts an error and is reported to the health checks.
    fn cannot_connect(
        &self,
        backend: &Backend,
        may_reuse: bool,
        err: &std::io::Error,
    ) -> Result<Connection, TryError> {
        if descriptors::is_exhausted(err) {
            self.wait_for_a_descriptor(backend, may_reuse)
        } else {
            Err(self.unreachable(backend, err))
        }
    }

    /// Opens a connection, or takes one from the pool when `may_reuse`.
    fn connect(&self, backend: &Backend, may_reuse: bool) -> std::io::Result<Connection> {
        let settings = &self.set.settings;
        if may_reuse {
            return backend.connection(settings.connect_timeout, settings.backend_timeout);
        }
        let fresh = backend.connect(settings.connect_timeout, settings.backend_timeout);
        fresh.map(new_connection)
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
        let deadline = Instant::now() + self.set.settings.connect_timeout;
        // Its place in the queue for a connection to this backend, kept from one try to the next.
        let place = may_reuse.then(|| backend.queue_for_connection());
        loop {
            // A descriptor comes back when an idle connection this request cannot use is
            // closed, or when a client closes.
            let _freed = self.set.backends.iter().any(|other| {
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
            report_health(&self.set.backends, backend, &change);
        }
    }

    /// The request as the backend gets it: the head rewritten for the next hop, then the part
    /// of the body that arrived with it.
    fn request_bytes(&self, backend: &Backend, request: &OutgoingRequest) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + request.prefix.len());
        let (client_ip, scheme) = (&self.client_ip_text, self.scheme);
        write_request_head(&mut out, request, client_ip, scheme, backend.name());
        out.extend_from_slice(request.prefix);
        out
    }

    /// One request and response over one backend connection: how the client connection goes
    /// on, and the response status.
    fn exchange(
        &mut self,
        backend: &Backend,
        connection: Connection,
        out: &[u8],
        request: &OutgoingRequest,
    ) -> Exchanged {
        let reused = connection.reused;
        if is_stale(&connection, request) {
            return Err(ExchangeError::Stale);
        }
        let first_exchange = FirstExchange::new(backend, &connection);
        let mut upstream = BufferedStream::with_buffer(connection.stream, self.lb.buffers.take());
        std::io::Write::write_all(&mut upstream.socket(), out)
            .map_err(|err| send_failure(err, reused))?;
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
                nothing => return Err(no_response(nothing.err(), may_resend)),
            };
            match head.status {
                101 if !request.upgrade => return Err(unasked_switch()),
                100 | 102..=199 => self.pass_interim(&head, request),
                _ => return Ok(head),
            }
        }
    }

    /// An interim response (such as 103 Early Hints) goes to an HTTP/1.1 client as it is.
    fn pass_interim(&mut self, head: &ResponseHead, request: &OutgoingRequest) {
        if request.head.version == Version::Http11 {
            let mut interim = Vec::new();
            write_response_head(&mut interim, head);
            interim.extend_from_slice(b"\r\n");
            let _ = std::io::Write::write_all(self.client.get_mut(), &interim);
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
        let body = http::response_body_length(request.head.method(), &response)
            .map_err(|why| bad_gateway(&why))?;
        // Without a length, the end of the body can only be shown by closing the connection;
        // HTTP/1.0 clients cannot read chunked bodies, so they get the plain bytes and a close.
        let dechunk = request.head.version == Version::Http10 && body == BodyLength::Chunked;
        let keep_alive = self.keeps_alive(request, body, dechunk);
        let head = self.client_response_head(request, &response, body, dechunk, keep_alive);
        let head_len = head.len();
        let mut sink = Sink::new(self.client.get_mut(), head);
        let relayed =
            http::relay_body(&mut upstream, body, &mut sink, dechunk).and_then(|()| sink.flush());
        self.notes
            .response(response.status, sink.written(), head_len);
        relayed.map_err(|err| relay_failure(err, sink.written() == 0))?;
        self.release(backend, upstream, &response, body);
        Ok((Flow::keep_alive_if(keep_alive), response.status))
    }

    /// Whether the client's connection stays open after this response: the client asked for
    /// it, its request's body was read to the end, the balancer is not shutting down, and the
    /// response's end is not shown by closing.
    fn keeps_alive(&self, request: &OutgoingRequest, body: BodyLength, dechunk: bool) -> bool {
        request.head.wants_keep_alive()
            && !self.body_pending
            && !self.shutdown.load(Ordering::SeqCst)
            && body != BodyLength::UntilClose
            && !dechunk
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
        if self.set.settings.explain {
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

    /// After a complete response: the read buffer back for reuse, and the backend connection to
    /// the pool if the backend keeps it open and nothing unexpected follows the response.
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

/// A freshly opened connection, not from the pool.
fn new_connection(stream: TcpStream) -> Connection {
    Connection {
        stream,
        reused: false,
        opening: false,
    }
}

/// Whether a pooled connection turned out closed before a request that cannot be sent twice
/// went out on it: nothing was sent, and a fresh connection takes the request instead.
fn is_stale(connection: &Connection, request: &OutgoingRequest) -> bool {
    connection.reused && !request.can_resend() && connection.closed_while_idle()
}
