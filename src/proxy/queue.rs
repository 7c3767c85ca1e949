//! A backend at its connection limit (`--backend-max-conns`, [`crate::limit`]): the request
//! goes to another backend with room when the algorithm may choose, else waits in the backend's
//! queue.
//!
//! Which algorithm does what:
//! - round robin, weighted round robin and least connections choose freely: a backend at its
//!   limit (or with requests already waiting) is passed over while another candidate has room
//!   (`Candidates::pick` in [`crate::eligibility`]),
//!   as if it were busy; only when every candidate is full does the request wait, in the queue
//!   of the backend the algorithm picks among them all;
//! - IP hash and consistent hashing tie a client to its backend, and so does a sticky session
//!   bound to one: such a request waits in its own backend's queue rather than move.
//!
//! The wait is the client's own thread sleeping on the queue's condition variable, in slices:
//! between them it looks whether the client is still there, so that a client that gave up
//! leaves the queue (and a slot handed to it goes on to the next in line) instead of holding a
//! place until the timeout.

use std::net::TcpStream;

use crate::backend::Backend;
use crate::error::ProxyError;
use crate::limit::{QueueEnd, Slot};

use super::connection::ClientConnection;
use super::outcome::Failure;

impl ClientConnection<'_> {
    /// A slot among `backend`'s requests in flight: at once while it is under its connection
    /// limit (or has none), else after waiting in its queue for `--queue-timeout` at most. A
    /// wait that runs out is a `503`; a client that goes away meanwhile ends the connection.
    pub(super) fn wait_for_room<'b>(&self, backend: &'b Backend) -> Result<Slot<'b>, Failure> {
        let socket = self.client.socket();
        let timeout = self.set.settings.queue_timeout;
        let end = match backend.limit().enter(timeout, &|| client_left(socket)) {
            Ok(slot) => return Ok(slot),
            Err(end) => end,
        };
        let max_conns = backend.limit().max().unwrap_or_default();
        let (what, failure) = match end {
            QueueEnd::TimedOut => (
                "the wait in its queue ran out",
                Failure::Answer(ProxyError::QueueTimeout {
                    max_conns,
                    waited: timeout,
                }),
            ),
            QueueEnd::ClientLeft => (
                "the client left its queue",
                Failure::Abort {
                    why: format!("the client went away while queued for {}", backend.name()),
                    by_backend: false,
                },
            ),
        };
        log::debug!(
            "{}: {} is at its limit of {max_conns}: {what}",
            self.client_ip,
            backend.name()
        );
        Err(failure)
    }
}

/// Whether the client went away: it closed its end of the connection (or only its writing
/// half: nothing more will come from it, as nginx counts it), or the connection failed. A
/// client still sending (a pipelined request, a body) is there. `POLLRDHUP` sees the close even
/// behind bytes not read yet, such as a TLS client's `close_notify`; looking takes no wait.
#[cfg(target_os = "linux")]
fn client_left(socket: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut watch = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; a timeout of 0 never blocks.
    let ready = unsafe { libc::poll(&mut watch, 1, 0) };
    ready > 0 && watch.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Elsewhere, a peek that does not wait: the end of the stream (nothing left to read) or an
/// error means the client went away. A close behind unread bytes is seen only once they are read.
#[cfg(not(target_os = "linux"))]
fn client_left(socket: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    let peeked = socket2::SockRef::from(socket)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
    match peeked {
        Ok(n) => n == 0,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[cfg(test)]
mod tests {
    use super::client_left;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// Whether `client_left` says so within a few seconds (a close takes a moment to arrive).
    fn seen_leaving(socket: &TcpStream) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if client_left(socket) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_client_is_there_until_it_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        assert!(!client_left(&server_side), "connected and quiet");
        client.write_all(b"GET /next HTTP/1.1\r\n").unwrap();
        assert!(!client_left(&server_side), "still sending");
        let (quiet, _) = {
            let other = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let accepted = listener.accept().unwrap();
            drop(other);
            accepted
        };
        assert!(seen_leaving(&quiet), "closed");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_close_is_seen_behind_bytes_not_read_yet() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        // As a TLS client's close_notify alert, then its FIN.
        client.write_all(b"\x15\x03\x03\x00\x02\x01\x00").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert!(seen_leaving(&server_side));
    }
}
