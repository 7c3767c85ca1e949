//! Helpers shared by the integration tests: start a balancer binary as a child process on port 0,
//! start backends in-process, and speak raw HTTP/1.1 to them.
//!
//! Every wait here is bounded, every process is killed when its handle drops, and readiness is
//! checked (by reading the balancer's start-up log line) instead of slept for.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// Every `--algorithm` of `loadbalancer`.
pub const ALGORITHMS: [&str; 5] = [
    "round-robin",
    "weighted",
    "least-conn",
    "ip-hash",
    "consistent-hash",
];

/// A balancer binary running as a child process.
pub struct Balancer {
    child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where the statistics listener is, when it is on.
    pub admin: Option<SocketAddr>,
    /// Where HTTPS clients connect, with `--tls-listen`.
    pub tls_addr: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    /// Starts `bin` (a `CARGO_BIN_EXE_…` path) listening on 127.0.0.1:0 with `--admin off`
    /// unless `args` says otherwise, and waits until it logs its listening address.
    pub fn start(bin: &str, args: &[&str]) -> Balancer {
        Balancer::start_with(bin, args, |_| {})
    }

    /// Starts `bin` as [`Balancer::start`] does, after `setup` has adjusted the command (its
    /// environment, its limits).
    pub fn start_with(bin: &str, args: &[&str], setup: impl FnOnce(&mut Command)) -> Balancer {
        let admin_off: &[&str] = if args.contains(&"--admin") {
            &[]
        } else {
            &["--admin", "off"]
        };
        Balancer::launch(bin, &[admin_off, args].concat(), setup)
    }

    /// Starts `bin` like [`Balancer::start`] but without adding `--admin off`: unless `args`
    /// says otherwise, statistics go to the default port 8404 or the next free one. `admin` is
    /// the address the start-up log announced, or none when statistics are off (that line comes
    /// before the listening address, so it has been read when this returns).
    pub fn start_default_admin(bin: &str, args: &[&str]) -> Balancer {
        Balancer::launch(bin, args, |_| {})
    }

    fn launch(bin: &str, args: &[&str], setup: impl FnOnce(&mut Command)) -> Balancer {
        let mut command = Command::new(bin);
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command.args(["--stats-interval", "0"]);
        command
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        setup(&mut command);
        let mut child = command.spawn().expect("balancer starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, addresses) = mpsc::channel();
        let lines = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The line is stored before it is announced, so a test that goes on once the
                // balancer listens finds the line in the log.
                lines.lock().unwrap().push(line.clone());
                // The HTTPS address is on the same line, so it is sent first.
                if let Some(addr) = address_after(&line, "(HTTPS on ") {
                    let _ = found.send(("tls", addr));
                }
                if let Some(addr) = address_after(&line, "load balancer listening on ") {
                    let _ = found.send(("listen", addr));
                }
                if let Some(addr) = address_after(&line, "statistics on http://") {
                    let _ = found.send(("admin", addr));
                }
            }
        });
        let wants_admin =
            args.contains(&"--admin") && !args.windows(2).any(|w| w == ["--admin", "off"]);
        let (mut addr, mut admin, mut tls_addr) = (None, None, None);
        let deadline = Instant::now() + WAIT;
        while addr.is_none() || (wants_admin && admin.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match addresses.recv_timeout(left) {
                Ok(("listen", a)) if addr.is_none() => addr = Some(a),
                Ok(("admin", a)) => admin = Some(a),
                Ok(("tls", a)) => tls_addr = Some(a),
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "balancer did not start; log:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
        Balancer {
            child,
            addr: addr.unwrap(),
            admin,
            tls_addr,
            log,
        }
    }

    /// Everything the balancer logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGINT, as Ctrl-C does.
    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        assert!(
            status.map(|s| s.success()).unwrap_or(false),
            "kill -INT works"
        );
    }

    /// Sends SIGTERM, as systemd and `kill` do.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(
            status.map(|s| s.success()).unwrap_or(false),
            "kill -TERM works"
        );
    }

    /// Waits for the process to exit, at most `limit`; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` distinct loopback ports that were free a moment ago (bound on port 0, then let go), for
/// a child process that must bind the port itself.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

/// The `HOST:PORT` that follows `marker` in a log line, if any.
fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| c == ',' || c == '/' || c == ')' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A backend in the test process, served by the library's demo backend.
pub struct DemoBackend {
    pub addr: SocketAddr,
    pub name: String,
    server: Option<lb::demo::DemoBackend>,
}

impl DemoBackend {
    /// A demo backend on 127.0.0.1:0 answering as `name`.
    pub fn start(name: &str) -> DemoBackend {
        DemoBackend::with_delay(name, Duration::ZERO)
    }

    /// A demo backend that waits `delay` before each answer.
    pub fn with_delay(name: &str, delay: Duration) -> DemoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = lb::demo::start(listener, name.to_string(), delay).unwrap();
        DemoBackend {
            addr,
            name: name.to_string(),
            server: Some(server),
        }
    }

    /// The `--backend` value for this backend.
    pub fn spec(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the backend; its port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A backend whose every connection is handed to `handle`, for behaviour the demo backend does
/// not have (slow answers, broken answers, big bodies). Threads end when their client does.
pub struct RawBackend {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RawBackend {
    /// Starts accepting on 127.0.0.1:0; each connection runs `handle` on its own thread.
    pub fn start(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let handle = Arc::new(handle);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(WAIT));
                let handle = Arc::clone(&handle);
                thread::spawn(move || handle(stream));
            }
        });
        RawBackend { addr, stop }
    }

    /// The `--backend` value for this backend.
    pub fn spec(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header fields with lower-case names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Parsed header fields as owned pairs with lower-case names.
fn lowercase_fields(fields: &[httparse::Header]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// The first value of header `name` (lower case) among `headers`.
fn first_value<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

impl Response {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }

    /// Every value of header `name` (lower case).
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection that reads responses one by one (keep-alive, pipelining), over a plain
/// socket or (with [`Client::connect_tls`]) TLS.
pub struct Client<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

/// A TLS client's stream.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Client<TlsStream> {
    /// Connects to `addr` over TLS, asking for `server_name` (SNI) and trusting only the
    /// certificates in `trusted` (PEM), with a read timeout of [`WAIT`]. The handshake is done
    /// when this returns.
    pub fn connect_tls(addr: SocketAddr, server_name: &str, trusted: &[&str]) -> Client<TlsStream> {
        Client::try_connect_tls(addr, server_name, trusted).expect("TLS handshake")
    }

    /// Like [`Client::connect_tls`], returning the handshake's failure.
    pub fn try_connect_tls(
        addr: SocketAddr,
        server_name: &str,
        trusted: &[&str],
    ) -> Result<Client<TlsStream>, std::io::Error> {
        Client::try_connect_tls_with(addr, tls_client(server_name, trusted))
    }

    /// Like [`Client::try_connect_tls`], with a client connection made by the caller (whose
    /// configuration may hold a session to resume).
    pub fn try_connect_tls_with(
        addr: SocketAddr,
        connection: rustls::ClientConnection,
    ) -> Result<Client<TlsStream>, std::io::Error> {
        let socket = TcpStream::connect_timeout(&addr, WAIT)?;
        socket.set_nodelay(true)?;
        Client::over_tls(socket, connection)
    }

    /// Completes a TLS handshake over `socket`, as the caller set it up (with Nagle's algorithm
    /// on or off), with a read timeout of [`WAIT`].
    pub fn over_tls(
        socket: TcpStream,
        connection: rustls::ClientConnection,
    ) -> Result<Client<TlsStream>, std::io::Error> {
        socket.set_read_timeout(Some(WAIT))?;
        let mut stream = rustls::StreamOwned::new(connection, socket);
        stream.conn.complete_io(&mut stream.sock)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }
}

/// A rustls client connection to `server_name` that trusts `trusted` (PEM certificates) only.
pub fn tls_client(server_name: &str, trusted: &[&str]) -> rustls::ClientConnection {
    tls_client_with(tls_client_config(trusted), server_name)
}

/// A rustls client connection to `server_name` with `config`.
pub fn tls_client_with(
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> rustls::ClientConnection {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    rustls::ClientConnection::new(config, name).unwrap()
}

/// A rustls client configuration (ALPN `http/1.1`) that trusts `trusted` (PEM certificates)
/// only. Connections made with the same one resume each other's sessions.
pub fn tls_client_config(trusted: &[&str]) -> Arc<rustls::ClientConfig> {
    tls_client_config_for(trusted, rustls::DEFAULT_VERSIONS)
}

/// Like [`tls_client_config`], offering only `versions` (`&[&rustls::version::TLS12]` for a
/// TLS 1.2 client).
pub fn tls_client_config_for(
    trusted: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A self-signed certificate for `names` and its key, both PEM, written to files in a fresh
/// directory under the system's temporary one (removed when dropped).
pub struct TestCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}

impl Drop for TestCertificate {
    fn drop(&mut self) {
        if let Some(dir) = self.cert_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl TestCertificate {
    /// A new self-signed certificate (ECDSA P-256) valid for `names`.
    pub fn new(names: &[&str]) -> TestCertificate {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        TestCertificate::write(certified.cert.pem(), certified.key_pair.serialize_pem())
    }

    /// The flags of an HTTPS listener on `listen` serving this certificate.
    pub fn tls_flags<'a>(&'a self, listen: &'a str) -> [&'a str; 6] {
        [
            "--tls-listen",
            listen,
            "--tls-cert",
            self.cert(),
            "--tls-key",
            self.key(),
        ]
    }

    /// Writes `cert_pem` and `key_pem` to files of their own.
    pub fn write(cert_pem: String, key_pem: String) -> TestCertificate {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, &key_pem).unwrap();
        TestCertificate {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
        }
    }

    /// The certificate file's path, as a flag value.
    pub fn cert(&self) -> &str {
        self.cert_path.to_str().unwrap()
    }

    /// The key file's path, as a flag value.
    pub fn key(&self) -> &str {
        self.key_path.to_str().unwrap()
    }
}

impl Client {
    /// Connects to `addr` with a read timeout of [`WAIT`].
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connects");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects to `addr` like [`Client::connect`], returning the error instead of panicking.
    pub fn try_connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    /// Connects from a given local IP (e.g. 127.0.0.2) so the balancer sees another client.
    pub fn connect_from(addr: SocketAddr, local_ip: &str) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("{local_ip}:0").parse().unwrap();
        socket.bind(&local.into()).unwrap();
        socket.connect_timeout(&addr.into(), WAIT).unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("request written");
    }

    /// Sends `GET path` with keep-alive.
    pub fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        self.read_response("GET")
    }

    /// Reads one response to a request with `method` (HEAD responses have no body).
    pub fn read_response(&mut self, method: &str) -> Response {
        self.try_read_response(method).expect("a complete response")
    }

    /// Reads one response, or `None` if the connection closed or broke first.
    pub fn try_read_response(&mut self, method: &str) -> Option<Response> {
        let (status, headers) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            if let Ok(httparse::Status::Complete(len)) = parsed.parse(&self.buf) {
                let status = parsed.code.unwrap_or(0);
                let headers = lowercase_fields(parsed.headers);
                self.buf.drain(..len);
                if (100..200).contains(&status) {
                    continue;
                }
                break (status, headers);
            }
            if !self.fill() {
                return None;
            }
        };
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let no_body = method == "HEAD" || status == 204 || status == 304;
        if no_body {
            return Some(response);
        }
        response.body = self.read_body(&response.headers, true)?;
        Some(response)
    }

    /// Reads a body framed by `headers`: chunked, by Content-Length, or else (responses) until
    /// the connection closes.
    fn read_body(&mut self, headers: &[(String, String)], until_close: bool) -> Option<Vec<u8>> {
        if first_value(headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            return self.read_chunked();
        }
        if let Some(length) = first_value(headers, "content-length") {
            let length: usize = length.trim().parse().ok()?;
            while self.buf.len() < length {
                if !self.fill() {
                    return None;
                }
            }
            return Some(self.buf.drain(..length).collect());
        }
        if until_close {
            while self.fill() {}
        }
        Some(if until_close {
            std::mem::take(&mut self.buf)
        } else {
            Vec::new()
        })
    }

    fn read_chunked(&mut self) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break pos;
                }
                if !self.fill() {
                    return None;
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    let end = loop {
                        if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break pos;
                        }
                        if !self.fill() {
                            return None;
                        }
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Some(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if !self.fill() {
                    return None;
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads more bytes; false at end of stream or on error.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Whether the server closed the connection: the next read ends the stream (or finds it
    /// reset) within [`WAIT`]. Unread bytes, or a connection still open after [`WAIT`], are not
    /// closed.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

/// One request on a new connection: `GET path`, returning the response.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    Client::connect(addr).get(path)
}

/// The `X-Backend` header of each of `n` sequential requests on new connections.
pub fn backends_hit(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            get(addr, "/")
                .header("x-backend")
                .unwrap_or("none")
                .to_string()
        })
        .collect()
}

/// How many of `names` are each value.
pub fn count(names: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for name in names {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

/// Polls `condition` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A request as a raw test backend received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: String,
    pub path: String,
    /// Header fields with lower-case names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ReceivedRequest {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }
}

/// The server side of a raw test backend: reads whole requests (Content-Length or chunked
/// bodies) from one connection.
pub struct ServerConn {
    pub stream: TcpStream,
    reader: Client,
}

impl ServerConn {
    /// Wraps an accepted connection.
    pub fn new(stream: TcpStream) -> ServerConn {
        let reader = Client {
            stream: stream.try_clone().unwrap(),
            buf: Vec::new(),
        };
        ServerConn { stream, reader }
    }

    /// Reads the next request, or `None` when the client closed the connection.
    pub fn read_request(&mut self) -> Option<ReceivedRequest> {
        let r = &mut self.reader;
        let (method, path, headers) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut fields);
            if let Ok(httparse::Status::Complete(len)) = parsed.parse(&r.buf) {
                let method = parsed.method.unwrap_or("").to_string();
                let path = parsed.path.unwrap_or("").to_string();
                let headers = lowercase_fields(parsed.headers);
                r.buf.drain(..len);
                break (method, path, headers);
            }
            if !r.fill() {
                return None;
            }
        };
        let mut request = ReceivedRequest {
            method,
            path,
            headers,
            body: Vec::new(),
        };
        request.body = r.read_body(&request.headers, false)?;
        Some(request)
    }

    /// Writes raw bytes (ignoring a client that went away).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Writes a complete response with a Content-Length body.
    pub fn respond(&mut self, status: u16, extra_headers: &str, body: &[u8]) {
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{extra_headers}\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.send(&out);
    }
}

/// A raw backend that answers every request with `respond(request)`: (status, extra header
/// lines each ending in CRLF, body), keeping connections alive.
pub fn responder(
    respond: impl Fn(&ReceivedRequest) -> (u16, String, Vec<u8>) + Send + Sync + 'static,
) -> RawBackend {
    RawBackend::start(move |stream| {
        let mut conn = ServerConn::new(stream);
        while let Some(request) = conn.read_request() {
            let (status, headers, body) = respond(&request);
            conn.respond(status, &headers, &body);
        }
    })
}

/// A raw backend that answers every request with the request's header fields, one
/// `name: value` line each, adding `extra_headers` (lines ending in CRLF) to its response.
pub fn header_echo_with(extra_headers: &'static str) -> RawBackend {
    responder(move |request| {
        let lines: String = request
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\n"))
            .collect();
        (200, extra_headers.to_string(), lines.into_bytes())
    })
}

/// The MD5 of `bytes` as hex, to compare large bodies.
pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a test backend's `/health` answers, changed by the test while it runs.
#[derive(Default)]
pub struct HealthControl {
    /// The status `/health` answers; 0 means 200.
    pub status: AtomicU16,
    /// While true, `/health` does not answer (for at most [`WAIT`]).
    pub hang: AtomicBool,
    /// Probes received.
    pub probes: AtomicUsize,
}

/// A backend named `name` whose `/health` follows `control`; every other path answers
/// `Hello from NAME` with `X-Backend: NAME`.
pub fn controlled(name: &str, control: &Arc<HealthControl>) -> RawBackend {
    let (name, control) = (name.to_string(), Arc::clone(control));
    responder(move |request| {
        if request.path != "/health" {
            let body = format!("Hello from {name}").into_bytes();
            return (200, format!("X-Backend: {name}\r\n"), body);
        }
        control.probes.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + WAIT;
        while control.hang.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        match control.status.load(Ordering::SeqCst) {
            0 => (200, String::new(), b"ok".to_vec()),
            status => (status, String::new(), b"unhealthy".to_vec()),
        }
    })
}

/// `GET /` on a new connection with the given extra header lines (each ending in CRLF).
pub fn get_with(addr: SocketAddr, headers: &str) -> Response {
    let mut client = Client::connect(addr);
    client.send(format!("GET / HTTP/1.1\r\nHost: test\r\n{headers}\r\n").as_bytes());
    client.read_response("GET")
}

/// The session id in the balancer's `Set-Cookie`, if the response has one.
pub fn session_cookie(response: &Response) -> Option<String> {
    response
        .headers_named("set-cookie")
        .into_iter()
        .find_map(|value| value.strip_prefix("SESSION_ID="))
        .map(|rest| rest.split(';').next().unwrap_or_default().to_string())
}

pub fn backend_of(response: &Response) -> String {
    response.header("x-backend").unwrap_or("none").to_string()
}

/// The `/stats.json` document of a balancer started with `--admin 127.0.0.1:0`.
pub fn stats_json(lb: &Balancer) -> serde_json::Value {
    let response = get(lb.admin.expect("admin is on"), "/stats.json");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    serde_json::from_slice(&response.body).expect("stats.json is JSON")
}

/// Checks that every element is closed in order, void elements aside.
pub fn check_tags_balance(page: &str) -> Result<(), String> {
    const VOID: [&str; 6] = ["meta", "br", "hr", "img", "input", "link"];
    let mut open: Vec<String> = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').ok_or("a tag is never closed")? + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if name.is_empty() {
            return Err(format!("bad tag <{tag}>"));
        }
        if tag.starts_with('/') {
            match open.pop() {
                Some(top) if top == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else if !VOID.contains(&name.as_str()) && !tag.ends_with('/') {
            open.push(name);
        }
    }
    if open.is_empty() {
        Ok(())
    } else {
        Err(format!("never closed: {open:?}"))
    }
}
