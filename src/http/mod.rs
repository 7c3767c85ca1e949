//! The HTTP/1.1 layer: reading message heads, deciding how a body is framed, and relaying bodies.
//!
//! Heads are parsed with `httparse`, a push parser over a buffer this module owns and bounds
//! (64 KiB, 100 header fields), so a head may arrive one byte at a time or several pipelined
//! requests may arrive in one read. Bodies are never held whole: they are relayed piece by piece,
//! framed by Content-Length, chunked encoding, or (responses only) the end of the connection, as
//! RFC 9112 §6 lays out. The course's Python read a single `recv(4096)` instead, which cuts any
//! message larger than that.
//!
//! One file per thing a reader looks for:
//!
//! | file | owns |
//! |---|---|
//! | `buffer.rs` | [`BufferedStream`], a socket with a read buffer this side owns, and the [`BufferPool`] |
//! | `head.rs` | heads: [`RequestHead`], [`ResponseHead`], their fields, and the one reader of both |
//! | `body.rs` | bodies: how one is framed ([`BodyLength`]) and relayed piece by piece ([`relay_body`]) |
//! | `hop_by_hop.rs` | [`HopByHop`]: the fields a proxy does not pass on (RFC 9110 §7.6.1) |
//! | `version.rs` | versions other than HTTP/1.0 and HTTP/1.1: later minors read as 1.1, others refused |
//! | `properties.rs` | property tests of all of it over random and mutated input (tests only) |

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod body;
mod buffer;
mod head;
mod hop_by_hop;
pub mod percent;
mod version;

#[cfg(test)]
mod properties;

pub use body::{
    relay_body, request_body_length, response_body_length, BodyLength, RelayError, Sink,
};
pub use buffer::{BufferPool, BufferedStream, Transport};
pub use head::{
    push_field, push_header, read_request_head, read_request_head_until, read_request_head_within,
    read_response_head, HeadError, HeaderFields, Headers, RequestHead, ResponseHead,
};
pub use hop_by_hop::HopByHop;
pub use version::Version;

/// The largest request or response head accepted, in bytes; a larger request gets `431`.
pub const MAX_HEAD: usize = 64 * 1024;

/// The most header fields one head may carry.
pub const MAX_HEADERS: usize = 100;

/// Whether an I/O error means a socket timeout ran out (Linux reports `WouldBlock` for it).
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// How long, and how much, a closing connection's unread input is drained for.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;

/// Closes a connection after a final response without losing it. Closing a socket with unread
/// input (the rest of a refused request, say) makes the kernel send a reset, which can destroy the
/// response before the client reads it (RFC 9112 §9.6). So the FIN goes first, and what the client
/// still sends is read and dropped, for a bounded time and amount, as nginx's lingering close does.
pub fn close_gracefully(socket: &TcpStream) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let _ = socket.set_read_timeout(Some(LINGER_TIME));
    let deadline = Instant::now() + LINGER_TIME;
    let mut scratch = [0u8; 4096];
    let mut drained = 0;
    let mut reader = socket;
    while drained < LINGER_BYTES && Instant::now() < deadline {
        match reader.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod test_support {
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::head::{parse_request_head, parse_response_head};
    use super::{RequestHead, ResponseHead};

    /// The request head of `text`, which must be complete.
    pub(super) fn request(text: &str) -> RequestHead {
        match parse_request_head(text.as_bytes()).unwrap() {
            Some((_, head)) => head,
            None => panic!("incomplete head"),
        }
    }

    /// The response head of `text`, which must be complete.
    pub(super) fn response(text: &str) -> ResponseHead {
        match parse_response_head(text.as_bytes()).unwrap() {
            Some((_, head)) => head,
            None => panic!("incomplete head"),
        }
    }

    /// A connected pair of sockets on loopback: (client side, server side).
    pub(super) fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (client, server)
    }
}
