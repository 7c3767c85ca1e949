//! The access log: one line per request, in nginx's `combined` format or as JSON.
//!
//! A client thread never writes the log itself. When a request ends it fills in a [`Record`]
//! (copies of a few fields of the request, numbers and addresses, nothing formatted) and hands
//! it to one writer thread through a bounded channel with `try_send`. The writer formats the
//! line and writes it through a `BufWriter`, flushed at least once a second. When the writer
//! falls behind (a slow disk, a pipe nobody reads) the channel fills up and records are
//! dropped and counted (`lb_access_log_dropped_total`), so a client never waits for the log.
//! A write that fails later (a full disk) is a warning at most once a second; serving goes on.
//!
//! [`AccessLog::reopen`] makes the writer open the file again by its name, for `logrotate`:
//! it renames the file and sends `SIGUSR1`, and new lines go to a new file at the old path.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crate::warnings::RepeatedWarning;

/// Records the channel holds while the writer is busy; past them, records are dropped.
const CHANNEL_CAPACITY: usize = 4096;

/// The longest a written line waits in the buffer before it is flushed.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// How long the writer sleeps once it has taken every record queued. The channel holds
/// [`CHANNEL_CAPACITY`] records, so lines are dropped only beyond 200,000 a second.
const TICK: Duration = Duration::from_millis(20);

/// How long shutting down waits for the writer to write what is queued.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The writer's buffer: big enough to take many lines per write.
const BUFFER_SIZE: usize = 64 * 1024;

static WRITE_FAILED: RepeatedWarning = RepeatedWarning::new(module_path!());

/// The line format (`--access-log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// nginx's `combined` format, then the backend, the request and backend times, the
    /// request id, the retry count and what went wrong.
    #[default]
    Combined,
    /// One JSON object per line, with the same fields and TLS, sticky and tunnel details.
    Json,
}

/// Where the log goes (`--access-log PATH`, or `-` for standard output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// A file, appended to, created when missing.
    File(PathBuf),
}

impl Target {
    /// `-` for standard output, anything else a file's path.
    pub fn parse(text: &str) -> Result<Target, String> {
        match text {
            "" => Err("an empty path".to_string()),
            "-" => Ok(Target::Stdout),
            path => Ok(Target::File(PathBuf::from(path))),
        }
    }
}

/// What a sticky session did for a request (phase 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyOutcome {
    /// A new session: the response carries its cookie.
    New,
    /// The session's backend took the request.
    Kept,
    /// The session's backend was unavailable: the session moved to another.
    Moved,
}

/// A tunnel after `101 Switching Protocols`, as it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    /// How long it was open.
    pub duration: Duration,
    /// Bytes from the client to the backend.
    pub bytes_up: u64,
    /// Bytes from the backend to the client.
    pub bytes_down: u64,
}

/// Everything one line says about one request, filled in by the client thread. Text fields
/// are copied as the client sent them; escaping them is the writer's job.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// When the request ended.
    pub time: Option<SystemTime>,
    /// The client's address (after the PROXY protocol and trusted proxies).
    pub client: Option<IpAddr>,
    /// The request line, `METHOD TARGET VERSION`; empty for a head that could not be read.
    pub request_line: Vec<u8>,
    /// Where the method ends and the target begins in `request_line`.
    pub method_len: usize,
    /// Where the target ends in `request_line`.
    pub target_end: usize,
    /// The status sent to the client; `None` when none was.
    pub status: Option<u16>,
    /// Bytes of response body sent to the client (nginx's `$body_bytes_sent`).
    pub body_bytes: u64,
    /// The `Referer` field.
    pub referer: Option<Vec<u8>>,
    /// The `User-Agent` field.
    pub user_agent: Option<Vec<u8>>,
    /// The last backend tried.
    pub backend: Option<SocketAddr>,
    /// From the head's arrival to the end of the response.
    pub request_time: Duration,
    /// From the last try's start to the end of its response.
    pub backend_time: Option<Duration>,
    /// The request id the backend got (`X-Request-Id`).
    pub request_id: Option<Box<str>>,
    /// Tries after the first.
    pub retries: u32,
    /// The TLS version of an HTTPS client, as nginx's `$ssl_protocol` names it.
    pub tls: Option<&'static str>,
    /// What a sticky session did, when sessions are on.
    pub sticky: Option<StickyOutcome>,
    /// An upgraded connection's tunnel.
    pub tunnel: Option<Tunnel>,
    /// Why the request failed, when it did: no status sent, or a response cut short.
    pub error: Option<Box<str>>,
}

impl Record {
    /// Sets the request line from its parts.
    pub fn set_request(&mut self, method: &str, target: &str, version: &str) {
        let line = &mut self.request_line;
        line.clear();
        line.reserve(method.len() + target.len() + version.len() + 2);
        line.extend_from_slice(method.as_bytes());
        self.method_len = line.len();
        line.push(b' ');
        line.extend_from_slice(target.as_bytes());
        self.target_end = line.len();
        line.push(b' ');
        line.extend_from_slice(version.as_bytes());
    }

    fn method(&self) -> &[u8] {
        &self.request_line[..self.method_len]
    }

    fn target(&self) -> &[u8] {
        self.request_line
            .get(self.method_len + 1..self.target_end)
            .unwrap_or_default()
    }

    fn protocol(&self) -> &[u8] {
        self.request_line
            .get(self.target_end + 1..)
            .unwrap_or_default()
    }
}

/// What the writer thread is told.
enum Message {
    /// Boxed, so that the channel's slots stay small (a pointer each).
    Record(Box<Record>),
    /// Flush and end.
    Stop,
}

/// State shared by the client threads and the writer.
#[derive(Default)]
struct Shared {
    dropped: AtomicU64,
    reopen: AtomicBool,
}

/// The access log: a channel to its writer thread.
pub struct AccessLog {
    sender: SyncSender<Message>,
    shared: Arc<Shared>,
    format: Format,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// Opens `target` (a file is created when missing and appended to) and starts the writer
    /// thread. A file that cannot be opened is an error here, before anything is served.
    pub fn start(target: Target, format: Format) -> io::Result<AccessLog> {
        let output = Output::open(&target)?;
        let (sender, receiver) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            target,
            format,
            output,
            shared: Arc::clone(&shared),
            line: String::with_capacity(512),
        };
        let handle = thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(receiver))?;
        Ok(AccessLog {
            sender,
            shared,
            format,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// The line format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Hands `record` to the writer, or drops and counts it when the writer is behind. Never
    /// waits.
    pub fn log(&self, record: Record) {
        match self.sender.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Opens the file again by its path (after `logrotate` renamed it): call it on `SIGUSR1`
    /// and on a reload. Lines already queued go to the new file. Returns at once; the writer
    /// thread reopens within a tick (20 ms). Nothing to do for standard output.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::SeqCst);
    }

    /// Writes what is queued, flushes and stops the writer thread (at shutdown). A writer stuck
    /// in a write (standard output piped to a program that stopped reading) is given
    /// `STOP_WAIT` (5 s) and then left behind, so that shutting down never hangs on the log.
    pub fn stop(&self) {
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(handle) = handle else { return };
        let deadline = Instant::now() + STOP_WAIT;
        let mut stop = Message::Stop;
        loop {
            match self.sender.try_send(stop) {
                Ok(()) => break,
                Err(TrySendError::Full(message)) if Instant::now() < deadline => {
                    stop = message;
                    thread::sleep(TICK);
                }
                Err(_) => return,
            }
        }
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return;
            }
            thread::sleep(TICK);
        }
        let _ = handle.join();
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// Where the writer's bytes go: the file or standard output, buffered.
struct Output(BufWriter<File>);

impl Output {
    fn open(target: &Target) -> io::Result<Output> {
        let file = match target {
            Target::File(path) => open_file(path)?,
            // Standard output's own handle is line-buffered: one write per line. A duplicate of
            // its descriptor, buffered here, writes many lines at once.
            Target::Stdout => {
                use std::os::fd::AsFd;
                File::from(io::stdout().as_fd().try_clone_to_owned()?)
            }
        };
        Ok(Output(BufWriter::with_capacity(BUFFER_SIZE, file)))
    }
}

fn open_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread's state.
struct Writer {
    target: Target,
    format: Format,
    output: Output,
    shared: Arc<Shared>,
    /// The line being formatted, reused.
    line: String,
}

impl Writer {
    /// Formats and writes records until told to stop, flushing within a second of a write.
    ///
    /// The writer takes what is queued and then sleeps for a [`TICK`], rather than waiting in
    /// `recv`: a writer waiting there would be woken by every record, which costs the client
    /// thread a system call and the machine a context switch per request.
    fn run(mut self, receiver: Receiver<Message>) {
        let mut flush_due: Option<Instant> = None;
        loop {
            loop {
                match receiver.try_recv() {
                    Ok(Message::Record(record)) => {
                        self.write(&record);
                        flush_due.get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
                    }
                    Ok(Message::Stop) | Err(TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if flush_due.is_some_and(|due| Instant::now() >= due) {
                self.flush();
                flush_due = None;
            }
            if self.shared.reopen.swap(false, Ordering::SeqCst) {
                self.reopen();
            }
            thread::sleep(TICK);
        }
    }

    fn write(&mut self, record: &Record) {
        self.line.clear();
        match self.format {
            Format::Combined => combined(&mut self.line, record),
            Format::Json => json(&mut self.line, record),
        }
        self.line.push('\n');
        if let Err(err) = self.output.0.write_all(self.line.as_bytes()) {
            self.warn(&err);
        }
    }

    fn flush(&mut self) {
        if let Err(err) = self.output.0.flush() {
            self.warn(&err);
        }
    }

    fn warn(&self, err: &io::Error) {
        let name = match &self.target {
            Target::File(path) => path.display().to_string(),
            Target::Stdout => "standard output".to_string(),
        };
        WRITE_FAILED.warn(format_args!(
            "access log {name}: writing failed, lines are lost: {err}"
        ));
    }

    /// Flushes the old file and opens the path again; on failure the old file stays.
    fn reopen(&mut self) {
        if self.target == Target::Stdout {
            return;
        }
        self.flush();
        let Target::File(path) = &self.target else {
            return;
        };
        match open_file(path) {
            Ok(file) => {
                self.output = Output(BufWriter::with_capacity(BUFFER_SIZE, file));
                log::info!("access log {} reopened", path.display());
            }
            Err(err) => log::warn!(
                "access log {}: cannot reopen, still writing to the old file: {err}",
                path.display()
            ),
        }
    }
}

/// nginx's `combined` format, byte for byte:
///
/// ```text
/// $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"
/// ```
///
/// then, separated by spaces: the backend's address, the request time and the backend's
/// response time in seconds with milliseconds (nginx's `$upstream_addr`, `$request_time`,
/// `$upstream_response_time`), the request id, the retry count, and what went wrong in quotes.
/// A value that is not there is `-`, as nginx writes it; the time is UTC.
pub fn combined(out: &mut String, record: &Record) {
    match record.client {
        Some(ip) => {
            let _ = write!(out, "{ip}");
        }
        None => out.push('-'),
    }
    out.push_str(" - - [");
    push_time_local(out, record.time.unwrap_or_else(SystemTime::now));
    out.push_str("] \"");
    if record.request_line.is_empty() {
        out.push('-');
    }
    push_escaped(out, &record.request_line);
    out.push_str("\" ");
    match record.status {
        Some(status) => {
            let _ = write!(out, "{status}");
        }
        None => out.push('-'),
    }
    let _ = write!(out, " {} \"", record.body_bytes);
    push_escaped_or_dash(out, record.referer.as_deref());
    out.push_str("\" \"");
    push_escaped_or_dash(out, record.user_agent.as_deref());
    out.push_str("\" ");
    match record.backend {
        Some(addr) => {
            let _ = write!(out, "{addr}");
        }
        None => out.push('-'),
    }
    out.push(' ');
    push_seconds(out, Some(record.request_time));
    out.push(' ');
    push_seconds(out, record.backend_time);
    out.push(' ');
    push_escaped_or_dash(out, record.request_id.as_deref().map(str::as_bytes));
    let _ = write!(out, " {} \"", record.retries);
    push_escaped_or_dash(out, record.error.as_deref().map(str::as_bytes));
    out.push('"');
}

/// One JSON object: the fields of [`combined`] by name, plus `tls`, `sticky` and `tunnel`.
pub fn json(out: &mut String, record: &Record) {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let seconds = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    // A head that could not be read has no request line.
    let request = !record.request_line.is_empty();
    let object = serde_json::json!({
        "time": rfc3339(record.time.unwrap_or_else(SystemTime::now)),
        "client": record.client.map(|ip| ip.to_string()),
        "method": request.then(|| text(record.method())),
        "target": request.then(|| text(record.target())),
        "protocol": request.then(|| text(record.protocol())),
        "status": record.status,
        "body_bytes": record.body_bytes,
        "referer": record.referer.as_deref().map(text),
        "user_agent": record.user_agent.as_deref().map(text),
        "backend": record.backend.map(|addr| addr.to_string()),
        "request_time": seconds(record.request_time),
        "backend_time": record.backend_time.map(seconds),
        "request_id": record.request_id.as_deref(),
        "retries": record.retries,
        "tls": record.tls,
        "sticky": record.sticky.map(|sticky| match sticky {
            StickyOutcome::New => "new",
            StickyOutcome::Kept => "kept",
            StickyOutcome::Moved => "moved",
        }),
        "tunnel": record.tunnel.map(|tunnel| serde_json::json!({
            "duration": seconds(tunnel.duration),
            "bytes_up": tunnel.bytes_up,
            "bytes_down": tunnel.bytes_down,
        })),
        "error": record.error.as_deref(),
    });
    let _ = write!(out, "{object}");
}

/// Seconds with milliseconds, as nginx writes `$request_time` (`0.004`); `-` for none.
fn push_seconds(out: &mut String, duration: Option<Duration>) {
    match duration {
        Some(d) => {
            let millis = d.as_millis();
            let _ = write!(out, "{}.{:03}", millis / 1000, millis % 1000);
        }
        None => out.push('-'),
    }
}

/// Text as nginx escapes it in a log line: `"`, `\` and bytes outside printable ASCII as
/// `\xXX`.
fn push_escaped(out: &mut String, bytes: &[u8]) {
    let plain = |b: &u8| *b != b'"' && *b != b'\\' && (0x20..0x7f).contains(b);
    // Most fields need no escaping: they go in at once.
    if bytes.iter().all(plain) {
        // Printable ASCII is UTF-8.
        out.push_str(std::str::from_utf8(bytes).unwrap_or_default());
        return;
    }
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

fn push_escaped_or_dash(out: &mut String, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => push_escaped(out, bytes),
        None => out.push('-'),
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// nginx's `$time_local`, `06/Dec/2026:22:27:54 +0000`, in UTC.
fn push_time_local(out: &mut String, time: SystemTime) {
    let t = time::OffsetDateTime::from(time);
    let month = MONTHS[usize::from(u8::from(t.month())) - 1];
    let _ = write!(
        out,
        "{:02}/{month}/{}:{:02}:{:02}:{:02} +0000",
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    );
}

/// `2026-12-06T22:27:54.123Z`, for JSON.
fn rfc3339(time: SystemTime) -> String {
    let t = time::OffsetDateTime::from(time);
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Record {
        let mut record = Record {
            // 2026-12-06 22:27:54.250 UTC.
            time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_596_074_250)),
            client: Some("192.0.2.7".parse().unwrap()),
            status: Some(200),
            body_bytes: 612,
            referer: None,
            user_agent: Some(b"curl/8.5.0 \"quoted\"".to_vec()),
            backend: Some("127.0.0.1:8001".parse().unwrap()),
            request_time: Duration::from_micros(3_600),
            backend_time: Some(Duration::from_millis(2)),
            request_id: Some("0b6b1f5e-8f0a-4c4f-9d1e-3a2b1c0d9e8f".into()),
            ..Record::default()
        };
        record.set_request("GET", "/a b", "HTTP/1.1");
        record
    }

    #[test]
    fn combined_is_nginx_s_format_then_the_balancer_s_fields() {
        let mut line = String::new();
        combined(&mut line, &example());
        assert_eq!(
            line,
            "192.0.2.7 - - [06/Dec/2026:22:27:54 +0000] \"GET /a b HTTP/1.1\" 200 612 \"-\" \
             \"curl/8.5.0 \\x22quoted\\x22\" 127.0.0.1:8001 0.003 0.002 \
             0b6b1f5e-8f0a-4c4f-9d1e-3a2b1c0d9e8f 0 \"-\""
        );
    }

    #[test]
    fn a_failed_request_says_so_in_both_formats() {
        let mut record = example();
        record.status = None;
        record.body_bytes = 0;
        record.backend = None;
        record.backend_time = None;
        record.error = Some("the client went away".into());
        let mut line = String::new();
        combined(&mut line, &record);
        assert!(line.contains("\" - 0 \""), "{line}");
        assert!(
            line.ends_with(
                " - 0.003 - 0b6b1f5e-8f0a-4c4f-9d1e-3a2b1c0d9e8f 0 \"the client went away\""
            ),
            "{line}"
        );
        line.clear();
        json(&mut line, &record);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["status"], serde_json::Value::Null);
        assert_eq!(value["error"], "the client went away");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["target"], "/a b");
        assert_eq!(value["protocol"], "HTTP/1.1");
        assert_eq!(value["time"], "2026-12-06T22:27:54.250Z");
    }

    #[test]
    fn reopen_writes_to_a_new_file_at_the_old_path() {
        let dir = std::env::temp_dir().join(format!("lb-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::start(Target::File(path.clone()), Format::Combined).unwrap();
        log.log(example());
        let rotated = dir.join("access.log.1");
        // Renamed before the writer flushed: the line lands in the renamed file, as with nginx.
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        log.log(example());
        log.stop();
        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!((old.lines().count(), new.lines().count()), (1, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What formatting one line costs the writer thread:
    /// `cargo test --release --lib formatting_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, for docs/performance.md"]
    fn formatting_cost() {
        let record = example();
        let mut line = String::with_capacity(512);
        for (name, format) in [
            ("combined", combined as fn(&mut String, &Record)),
            ("json", json),
        ] {
            let began = Instant::now();
            for _ in 0..200_000 {
                line.clear();
                format(&mut line, &record);
            }
            println!("{name}: {:?} per line", began.elapsed() / 200_000);
        }
    }

    #[test]
    fn a_full_channel_drops_and_counts() {
        let (sender, _receiver) = mpsc::sync_channel(1);
        let log = AccessLog {
            sender,
            shared: Arc::default(),
            format: Format::Combined,
            writer: Mutex::new(None),
        };
        for _ in 0..3 {
            log.log(Record::default());
        }
        assert_eq!(log.dropped(), 2);
    }
}
