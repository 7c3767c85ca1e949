//! The notes an access-log line is made of, carried by the client connection (`connection.rs`)
//! and filled in by the steps of `access.rs`, `exchange.rs` and `tunnel.rs` as a request goes
//! through them. A file of its own, so that the connection and the access log's steps do not
//! import each other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::access_log::{StickyOutcome, Tunnel};

/// What the access log learns about the current request while it is forwarded: nothing, and
/// no memory, while the log is off; with it on, one allocation per connection, reused by each
/// of its requests.
#[derive(Debug, Default)]
pub(super) struct Notes(Option<Box<Noted>>);

/// The notes themselves.
#[derive(Debug, Default)]
pub(super) struct Noted {
    pub(super) status: Option<u16>,
    pub(super) body_bytes: u64,
    pub(super) backend: Option<SocketAddr>,
    pub(super) try_started: Option<Instant>,
    pub(super) backend_time: Option<Duration>,
    pub(super) tries: u32,
    pub(super) request_id: Option<Box<str>>,
    pub(super) sticky: Option<StickyOutcome>,
    pub(super) tunnel: Option<Tunnel>,
    pub(super) error: Option<Box<str>>,
}

impl Notes {
    /// Starts noting a new request.
    pub(super) fn begin(&mut self) {
        **self.0.get_or_insert_with(Box::default) = Noted::default();
    }

    /// What was noted about the request that just ended.
    pub(super) fn take(&mut self) -> Noted {
        self.0
            .as_deref_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The notes, while the access log is on.
    pub(super) fn on(&mut self) -> Option<&mut Noted> {
        self.0.as_deref_mut()
    }

    /// A response with `status` was relayed, `written` bytes of it, `head` of them its head
    /// (all of them, or as far as the client took them). A method of the notes rather than of
    /// the connection, so that it can be called while the relay borrows the client's stream.
    pub(super) fn response(&mut self, status: u16, written: u64, head: usize) {
        if let Some(notes) = self.on().filter(|_| written > 0) {
            notes.status = Some(status);
            notes.body_bytes = written.saturating_sub(head as u64);
        }
    }
}
