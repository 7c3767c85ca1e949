//! Buffering: a socket with a read buffer this side owns, and the spare buffers kept for reuse.
//!
//! Everything read but not consumed stays in the buffer, which is how pipelined requests and
//! the first bytes of a body that arrived with its head are kept. A connection idle between
//! requests holds no buffer at all (see [`BufferedStream::fill_when_idle`]).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;

/// How many bytes an idle connection reads before it takes a buffer (see
/// [`BufferedStream::fill_when_idle`]): enough for most request heads, small enough for the
/// stack of a client thread.
const IDLE_READ: usize = 1024;

/// A TCP stream with a read buffer that this side owns.
///
/// Everything read but not yet consumed stays in the buffer, which is how pipelined requests and
/// the first bytes of a body that arrived together with the head are kept. The source is a
/// `TcpStream` everywhere but in tests, which feed it scripted reads.
pub struct BufferedStream<S = TcpStream> {
    pub(super) stream: S,
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl<S: Read> BufferedStream<S> {
    /// Wraps `stream` with a read buffer of `capacity` bytes (it grows only to fit a large head).
    pub fn new(stream: S, capacity: usize) -> Self {
        BufferedStream::with_buffer(stream, vec![0; capacity])
    }

    /// Wraps `stream` with `buf` as its read buffer (its contents are ignored).
    pub fn with_buffer(stream: S, buf: Vec<u8>) -> Self {
        BufferedStream {
            stream,
            buf,
            start: 0,
            end: 0,
        }
    }

    /// The bytes read but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks the first `n` buffered bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes into the buffer, returning how many arrived (0 at end of stream).
    ///
    /// Room is made by moving unconsumed bytes to the front, and the buffer only grows when it is
    /// full of unconsumed bytes and still under `limit`, so a caller bounds its own memory.
    pub fn fill(&mut self, limit: usize) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < limit {
                let grown = (self.buf.len() * 2).clamp(1024, limit);
                self.buf.resize(grown, 0);
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "read buffer is full",
                ));
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Reads the first bytes of the next message without holding a read buffer meanwhile: the
    /// buffer goes back to `pool`, the bytes arrive in a small one on the stack, and only then is
    /// a buffer taken from `pool` for them. An idle keep-alive connection thus holds no buffer
    /// (nginx frees an idle connection's buffers the same way), and a thousand idle clients
    /// cost a thousand buffers less. Returns how many bytes arrived (0 at end of stream).
    pub fn fill_when_idle(&mut self, pool: &BufferPool) -> io::Result<usize> {
        debug_assert!(self.buffered().is_empty());
        pool.give(std::mem::take(&mut self.buf));
        self.start = 0;
        self.end = 0;
        let mut first = [0u8; IDLE_READ];
        let n = self.stream.read(&mut first)?;
        if n > 0 {
            self.buf = pool.take();
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            self.buf[..n].copy_from_slice(&first[..n]);
            self.end = n;
        }
        Ok(n)
    }

    /// Enlarges an empty buffer to `capacity` bytes. A long body is then read in large pieces,
    /// while a connection that only sees small messages keeps a small buffer, which is most of
    /// what an idle connection costs.
    pub fn expand(&mut self, capacity: usize) {
        if self.start == self.end && self.buf.len() < capacity {
            self.buf = vec![0; capacity];
        }
    }

    /// Gives the socket and the buffer back, for reuse.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

impl<S: Transport> BufferedStream<S> {
    /// The underlying socket, for socket options (and for writing, when it is a plain one).
    pub fn socket(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// The stream itself, for writing through it (a TLS stream needs `&mut` to write).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

/// A byte stream over one TCP connection: the socket itself, or a layer over it such as TLS.
pub trait Transport: Read + Write {
    /// The TCP socket underneath, for timeouts, shutdown and addresses.
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// Read buffers kept for reuse by every client thread.
///
/// A buffer allocated (and zeroed) for each request showed up in profiles, mostly as the
/// allocator tidying its free lists before handing out a block that large. Taking a spare buffer
/// costs one short lock instead. Only a bounded number are kept, so an idle balancer holds
/// little memory.
#[derive(Debug)]
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl BufferPool {
    /// A pool of buffers of `size` bytes that keeps at most `keep` spare ones.
    pub fn new(size: usize, keep: usize) -> Self {
        BufferPool {
            spare: Mutex::new(Vec::new()),
            size,
            keep,
        }
    }

    /// A spare buffer, or a new one.
    pub fn take(&self) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| vec![0; self.size])
    }

    /// How many spare buffers are kept.
    pub fn spare(&self) -> usize {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The bytes the spare buffers hold: memory kept on purpose, up to `keep` buffers.
    pub fn spare_bytes(&self) -> usize {
        self.spare() * self.size
    }

    /// Keeps `buf` for reuse, unless it grew (for a long body) or enough are kept already.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.len() == self.size {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < self.keep {
                spare.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::http::test_support::socket_pair;
    use crate::http::{read_request_head, Headers};

    #[test]
    fn an_idle_connection_holds_no_buffer_until_bytes_arrive() {
        let pool = Arc::new(BufferPool::new(4096, 4));
        let (mut client, server) = socket_pair();
        let mut stream = BufferedStream::with_buffer(server, pool.take());
        assert_eq!(pool.spare(), 0);
        // The client sends only once the waiting side gave its buffer back; its head is larger
        // than what the wait reads on the stack, so the rest comes through the usual buffer.
        let spare = Arc::clone(&pool);
        let cookie = "c".repeat(3 * IDLE_READ);
        let sender = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while spare.spare() == 0 && Instant::now() < deadline {
                thread::yield_now();
            }
            let head = format!("GET /next HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n");
            client.write_all(head.as_bytes()).unwrap();
            client
        });
        assert!(stream.fill_when_idle(&pool).unwrap() > 0);
        let head = read_request_head(&mut stream, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(head.target(), "/next");
        assert_eq!(head.header("cookie").map(<[u8]>::len), Some(3 * IDLE_READ));
        assert_eq!(pool.spare(), 0, "the buffer was taken back for the bytes");
        // At the end of the stream, no buffer is taken.
        drop(sender.join().unwrap());
        assert_eq!(stream.fill_when_idle(&pool).unwrap(), 0);
        assert_eq!(pool.spare(), 1);
    }
}
