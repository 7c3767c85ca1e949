//! The client's byte stream: a plain TCP socket, or a TLS connection over one.
//!
//! Everything above this type (reading heads, relaying bodies, answering errors) reads and writes
//! a [`ClientStream`] and never asks which kind it is; only the server, which performs the TLS
//! handshake, and the tunnel, which must wait on both directions of a TLS connection from one
//! thread, look inside. The TCP socket stays reachable through [`Transport::tcp`] for timeouts,
//! shutdown and the peer's address. Each client thread owns its `rustls` connection, so no lock
//! and no async runtime is needed: the blocking socket's timeouts bound every wait, as for plain
//! HTTP.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustls::{ServerConnection, StreamOwned};

use crate::http::{self, Transport};

/// A client connection's bytes, in the clear or through TLS.
// The TLS state is large (about 1 KiB) and boxed so that a plain connection stays small.
#[derive(Debug)]
pub enum ClientStream {
    /// Plain HTTP: the socket itself.
    Plain(TcpStream),
    /// HTTPS: the TLS connection and the socket it runs over.
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl ClientStream {
    /// Whether the client came through TLS (`X-Forwarded-Proto: https`).
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The socket underneath, without the TLS state.
    pub fn into_tcp(self) -> TcpStream {
        match self {
            ClientStream::Plain(socket) => socket,
            ClientStream::Tls(tls) => tls.sock,
        }
    }

    /// The TLS connection, for a TLS client.
    pub fn tls(&self) -> Option<&ServerConnection> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(tls) => Some(&tls.conn),
        }
    }

    /// Completes the TLS handshake (nothing to do for a plain client) before `deadline`, however
    /// slowly the client sends its part. The socket's read timeout is `timeout` when this begins
    /// and when it ends; each read waits at most for what is left until `deadline`, give or take
    /// a tenth of `timeout`: shortening the timeout costs a system call before a read and another
    /// to restore it after, and a handshake at the usual pace is over in milliseconds, so the
    /// timeout is shortened only once the time left is a tenth below it.
    ///
    /// Whatever rustls queued as the handshake ended goes out before this returns, as nginx and
    /// HAProxy send it: in TLS 1.2 the server's ChangeCipherSpec and Finished, without which the
    /// client never sends its request; in TLS 1.3 the session tickets. Holding the tickets back
    /// for the first response would save a write, but a client with Nagle's algorithm on (most
    /// client libraries) sends its Finished and its request in two writes, the second held until
    /// the first is acknowledged; with nothing to send, the kernel delays that acknowledgement by
    /// 40 ms, and every new connection waits that long for its first answer. For the same reason
    /// the acknowledgement is asked for at once when nothing is left to send.
    pub fn handshake(&mut self, deadline: Instant, timeout: Duration) -> io::Result<()> {
        let ClientStream::Tls(tls) = self else {
            return Ok(());
        };
        let StreamOwned { conn, sock } = &mut **tls;
        let mut read_timeout = timeout;
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
            if !conn.is_handshaking() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake not finished in time",
                ));
            }
            if left + timeout / 10 < read_timeout {
                sock.set_read_timeout(Some(left))?;
                read_timeout = left;
            }
            if conn.read_tls(sock)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed during the handshake",
                ));
            }
            if let Err(err) = conn.process_new_packets() {
                // rustls queued an alert saying what went wrong; the client may as well read it.
                let _ = conn.write_tls(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, err));
            }
        }
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        // When the client's flight was the last (a resumed TLS 1.2 session ends with the client's
        // Finished), there is nothing to send that would carry the acknowledgement: ask for it
        // now rather than in 40 ms, or a client with Nagle's algorithm on holds its request back
        // until then.
        let _ = socket2::SockRef::from(&*sock).set_quickack(true);
        if read_timeout != timeout {
            sock.set_read_timeout(Some(timeout))?;
        }
        Ok(())
    }

    /// Closes the connection after a final response without losing it: for TLS, the
    /// `close_notify` alert goes first, then the socket is closed as [`http::close_gracefully`]
    /// closes a plain one.
    pub fn close_gracefully(&mut self) {
        if let ClientStream::Tls(tls) = self {
            tls.conn.send_close_notify();
            while tls.conn.wants_write() {
                if tls.conn.write_tls(&mut tls.sock).is_err() {
                    break;
                }
            }
        }
        http::close_gracefully(self.tcp());
    }

    /// Makes the coming close a reset rather than an orderly end. After a response the backend
    /// cut short, an orderly end would let a client that reads a body to the end of the
    /// connection (HTTP/1.0, a response without a length) take the part it got for the whole.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(self.tcp()).set_linger(Some(Duration::ZERO));
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(socket) => socket.read(buf),
            ClientStream::Tls(tls) => read_plaintext(tls, buf),
        }
    }
}

/// Reads decrypted bytes, reading and decrypting records from the socket until some arrive.
/// Unlike `StreamOwned::read`, this writes nothing first: what rustls may queue while reading (the
/// answer to a client's key update) waits for the next response and goes out in the same write.
fn read_plaintext(
    tls: &mut StreamOwned<ServerConnection, TcpStream>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let StreamOwned { conn, sock } = tls;
    loop {
        match conn.reader().read(buf) {
            // No whole record yet: read more from the socket. At its end, the reader says how
            // the stream ended (`Ok(0)` after close_notify, else an unexpected end).
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            result => return result,
        }
        conn.read_tls(sock)?;
        conn.process_new_packets()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(socket) => socket.write(buf),
            ClientStream::Tls(tls) => tls.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            ClientStream::Plain(socket) => socket.write_all(buf),
            // rustls encrypts the bytes into its buffer (up to its limit at a time), after
            // whatever it still had queued, and all of it goes out before the caller goes on to
            // read: one write to the socket for a small response.
            ClientStream::Tls(tls) => {
                let mut rest = buf;
                loop {
                    if !rest.is_empty() {
                        let taken = tls.conn.writer().write(rest)?;
                        if taken == 0 {
                            return Err(io::ErrorKind::WriteZero.into());
                        }
                        rest = &rest[taken..];
                    }
                    while tls.conn.wants_write() {
                        tls.conn.write_tls(&mut tls.sock)?;
                    }
                    if rest.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(_) => Ok(()),
            ClientStream::Tls(tls) => tls.flush(),
        }
    }
}

impl Transport for ClientStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(socket) => socket,
            ClientStream::Tls(tls) => &tls.sock,
        }
    }
}
