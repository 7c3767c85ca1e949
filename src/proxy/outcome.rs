//! How a request's forwarding ends, as the rest of the proxy passes it around: the connection
//! goes on or closes ([`Flow`]), the client gets an error answer or nothing more ([`Failure`]),
//! a try at one backend may be handed to the next ([`TryError`]), and one exchange may be sent
//! again on a fresh connection ([`ExchangeError`]). They live together so that `connection.rs`
//! (the retries) and `exchange.rs` (one try) both read them without reading each other.

use std::net::TcpStream;

use crate::error::ProxyError;

/// Whether the connection goes on after a request.
#[derive(Debug)]
pub(super) enum Flow {
    KeepAlive,
    Close,
    /// The backend answered `101 Switching Protocols` on this connection to it: the client's
    /// connection becomes a tunnel to it.
    Switch(TcpStream),
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

/// What one exchange with one backend ended in.
pub(super) enum ExchangeError {
    /// A pooled connection turned out closed before any response byte: safe to send again on a
    /// fresh connection.
    Stale,
    /// Any other failure.
    Failed(Failure),
}

/// The backend broke the exchange before anything of the response reached the client: a 502.
pub(super) fn bad_gateway(why: &str) -> ExchangeError {
    ExchangeError::Failed(Failure::Answer(ProxyError::BadGateway(why.to_string())))
}

/// The client broke the exchange.
pub(super) fn abort(why: &str) -> ExchangeError {
    ExchangeError::Failed(Failure::Abort {
        why: why.to_string(),
        by_backend: false,
    })
}
