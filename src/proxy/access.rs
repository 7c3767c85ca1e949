//! Who sent a request and what became of it: the client's address for this request (behind a
//! trusted proxy, from `X-Forwarded-For`), and the notes its access-log line is made of, taken
//! as the request goes through the other files' steps and handed to the log when it ends.
//!
//! With the access log off, nothing is noted, copied or allocated; with it on, the client thread
//! copies the request line, `Referer` and `User-Agent` and leaves all formatting to the log's
//! writer thread (`access_log.rs`).

use std::time::{Duration, Instant, SystemTime};

use crate::access_log::{Record, StickyOutcome, Tunnel};
use crate::backend::Backend;
use crate::error::ProxyError;
use crate::http::{HeadError, Headers, RequestHead, Version};

use super::connection::ClientConnection;
use super::outcome::Flow;
use super::request::OutgoingRequest;
use super::session::Session;

impl ClientConnection<'_> {
    /// Serves one request (`handle`) as this client: the address behind a trusted proxy is
    /// found first, and the access log gets its line once the request ended.
    pub(super) fn handle_logged(&mut self, head: RequestHead) -> Flow {
        let lb = self.lb;
        self.client_ip = lb
            .client_addresses
            .of_request(self.connection_ip, &head.headers);
        let Some(log) = lb.access_log.as_ref() else {
            return self.handle(head);
        };
        let started = Instant::now();
        let mut record = Record {
            client: Some(self.client_ip),
            referer: head.header("referer").map(<[u8]>::to_vec),
            user_agent: head.header("user-agent").map(<[u8]>::to_vec),
            ..Record::default()
        };
        let version = match head.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        record.set_request(head.method(), head.target(), version);
        let client_request_id = head.header("x-request-id").map(<[u8]>::to_vec);
        self.notes.begin();
        let flow = self.handle(head);
        let notes = self.notes.take();
        record.time = Some(SystemTime::now());
        record.request_time = started.elapsed();
        record.status = notes.status;
        record.body_bytes = notes.body_bytes;
        record.backend = notes.backend;
        record.backend_time = notes.backend_time;
        record.retries = notes.tries.saturating_sub(1);
        // The client's own id, forwarded as it is, when the balancer made none.
        record.request_id = notes
            .request_id
            .or_else(|| client_request_id.map(|id| String::from_utf8_lossy(&id).into()));
        record.tls = self.tls_version();
        record.sticky = notes.sticky;
        record.tunnel = notes.tunnel;
        record.error = notes.error;
        log.log(record);
        flow
    }

    /// Answers a head that could not be read (`reject_head`), and logs the answer, if any.
    pub(super) fn reject_logged(&mut self, err: HeadError) -> Flow {
        let Some(log) = self.lb.access_log.as_ref() else {
            return self.reject_head(err);
        };
        self.notes.begin();
        let flow = self.reject_head(err);
        let notes = self.notes.take();
        // A client that closed or went quiet between requests was not answered: no line.
        if notes.status.is_some() {
            log.log(Record {
                time: Some(SystemTime::now()),
                client: Some(self.connection_ip),
                status: notes.status,
                body_bytes: notes.body_bytes,
                tls: self.tls_version(),
                error: notes.error,
                ..Record::default()
            });
        }
        flow
    }

    /// The TLS version as nginx's `$ssl_protocol` names it, for an HTTPS client.
    fn tls_version(&mut self) -> Option<&'static str> {
        let version = self.client.get_mut().tls()?.protocol_version()?;
        Some(match version {
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            _ => "TLS",
        })
    }

    /// A try at `backend` begins.
    pub(super) fn note_try(&mut self, backend: &Backend, request: &OutgoingRequest) {
        let Some(notes) = self.notes.on() else { return };
        notes.tries += 1;
        notes.backend = Some(backend.addr());
        notes.try_started = Some(Instant::now());
        notes.backend_time = None;
        if notes.request_id.is_none() {
            notes.request_id = request.request_id.map(Box::from);
        }
    }

    /// The try that began last is over (answered or not).
    pub(super) fn note_try_end(&mut self) {
        if let Some(notes) = self.notes.on() {
            notes.backend_time = notes.try_started.map(|started| started.elapsed());
        }
    }

    /// The balancer answered with `err` itself.
    pub(super) fn note_answer(&mut self, err: &ProxyError) {
        let Some(notes) = self.notes.on() else { return };
        let (code, reason) = err.status();
        notes.status = Some(code);
        // The body `ProxyError::to_response` writes.
        notes.body_bytes = format!("{code} {reason}: {err}\n").len() as u64;
        notes.error = Some(err.to_string().into());
    }

    /// The balancer answered with `status` and no body (a redirect).
    pub(super) fn note_status(&mut self, status: u16) {
        if let Some(notes) = self.notes.on() {
            notes.status = Some(status);
            notes.body_bytes = 0;
        }
    }

    /// The connection was dropped: `why`.
    pub(super) fn note_abort(&mut self, why: &str) {
        if let Some(notes) = self.notes.on() {
            notes.error = Some(why.into());
        }
    }

    /// What the request's sticky session did, now that it goes to `backend`.
    pub(super) fn note_sticky(&mut self, session: Option<&Session>, backend: &Backend) {
        let own = session.map(|s| s.backend.map(|i| &*self.set.backends[i]));
        let (Some(own), Some(notes)) = (own, self.notes.on()) else {
            return;
        };
        notes.sticky = Some(match own {
            None => StickyOutcome::New,
            Some(own) if std::ptr::eq(own, backend) => StickyOutcome::Kept,
            Some(_) => StickyOutcome::Moved,
        });
    }

    /// The tunnel after a `101` closed.
    pub(super) fn note_tunnel(&mut self, duration: Duration, bytes_up: u64, bytes_down: u64) {
        if let Some(notes) = self.notes.on() {
            notes.status = Some(101);
            notes.tunnel = Some(Tunnel {
                duration,
                bytes_up,
                bytes_down,
            });
        }
    }
}
