//! How a request's forwarding ends, as the rest of the proxy passes it around: the connection
//! goes on or closes ([`Flow`]), the client gets an error answer or nothing more ([`Failure`]),
//! a try at one backend may be handed to the next ([`TryError`]), and one exchange may be sent
//! again on a fresh connection ([`ExchangeError`]). They live together so that `connection.rs`
//! (the retries) and `exchange.rs` (one try) both read them without reading each other.
//!
//! Here too is what each failure on the way means, the error mapping the main path calls in
//! one line: which status the client gets, and whether the backend is to blame.

use std::io;
use std::net::TcpStream;

use crate::error::ProxyError;
use crate::http::{self, HeadError, RelayError};

/// Whether the connection goes on after a request.
#[derive(Debug)]
pub(super) enum Flow {
    KeepAlive,
    Close,
    /// The backend answered `101 Switching Protocols` on this connection to it: the client's
    /// connection becomes a tunnel to it.
    Switch(TcpStream),
}

impl Flow {
    /// How the connection goes on after a response relayed whole.
    pub(super) fn keep_alive_if(keep_alive: bool) -> Flow {
        if keep_alive {
            Flow::KeepAlive
        } else {
            Flow::Close
        }
    }
}

/// How forwarding one request went wrong.
pub(super) enum Failure {
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

/// Why a backend could not take a request.
pub(super) enum TryError {
    /// Connecting failed: nothing was sent, so another backend may take the request.
    Unreachable,
    /// The exchange failed after the request went out.
    Failed(Failure),
}

/// What one exchange gave: how the client connection goes on and the response status.
pub(super) type Exchanged = Result<(Flow, u16), ExchangeError>;

/// What one exchange with one backend ended in.
pub(super) enum ExchangeError {
    /// A pooled connection turned out closed before any response byte: safe to send again on a
    /// fresh connection.
    Stale,
    /// Any other failure.
    Failed(Failure),
}

impl From<ExchangeError> for TryError {
    /// A try that failed after the request went out; a pooled connection found closed a second
    /// time is the backend's failure.
    fn from(err: ExchangeError) -> Self {
        match err {
            ExchangeError::Stale => TryError::Failed(Failure::Answer(ProxyError::BadGateway(
                "connection closed".into(),
            ))),
            ExchangeError::Failed(failure) => TryError::Failed(failure),
        }
    }
}

/// The backend broke the exchange before anything of the response reached the client: a 502.
pub(super) fn bad_gateway(why: &str) -> ExchangeError {
    ExchangeError::Failed(Failure::Answer(ProxyError::BadGateway(why.to_string())))
}

/// A `101` to a request that did not ask to switch protocols.
pub(super) fn unasked_switch() -> ExchangeError {
    bad_gateway("a 101 to a request that did not ask to switch protocols")
}

/// The client broke the exchange.
pub(super) fn abort(why: &str) -> ExchangeError {
    ExchangeError::Failed(Failure::Abort {
        why: why.to_string(),
        by_backend: false,
    })
}

/// What a request head that could not be sent means: on a pooled connection, a stale one
/// (everything sent is still at hand, and the client's bytes still buffered), else a 502.
pub(super) fn send_failure(err: io::Error, reused: bool) -> ExchangeError {
    if reused {
        ExchangeError::Stale
    } else {
        bad_gateway(&format!("sending the request: {err}"))
    }
}

/// What a response head that did not come means (`None`: the backend closed the connection
/// first): a stale pooled connection when the request `may_resend` on a fresh one, a 504 for a
/// backend that went quiet, else a 502.
pub(super) fn no_response(err: Option<HeadError>, may_resend: bool) -> ExchangeError {
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
pub(super) fn request_body_failure(err: RelayError) -> ExchangeError {
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
pub(super) fn relay_failure(err: RelayError, nothing_sent: bool) -> ExchangeError {
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
pub(super) fn backend_verdict(result: &Exchanged) -> Option<bool> {
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
