//! The demo backend's WebSocket echo at `/ws`, and `/chat`, a page that opens it.
//!
//! The balancer itself has no WebSocket code: it balances the handshake like any request and
//! then tunnels bytes. This is the other end, so a learner can watch a WebSocket go through
//! the balancer and stay on one backend. The frames are the `tungstenite` crate's, the
//! reference WebSocket implementation in Rust, rather than a codec of our own.
//!
//! On `/ws`, the backend first sends one text message, `connected to NAME`, so the client
//! knows which backend holds its socket; after that it echoes every text and binary message
//! as it came.

use std::io::{self, Write};

use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::http::{BufferedStream, Headers, RequestHead};

/// Whether `request` is a WebSocket handshake (RFC 6455 §4.2.1): GET, `Upgrade: websocket`,
/// `Connection: upgrade`, and a key.
pub(super) fn is_handshake(request: &RequestHead) -> bool {
    request.method() == "GET"
        && request.has_token("upgrade", "websocket")
        && request.has_token("connection", "upgrade")
        && request.header("sec-websocket-key").is_some()
}

/// Answers the handshake with `101 Switching Protocols`.
pub(super) fn accept(conn: &BufferedStream, request: &RequestHead, name: &str) -> io::Result<()> {
    let key = request.header("sec-websocket-key").unwrap_or_default();
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nX-Backend: {name}\r\n\r\n",
        derive_accept_key(key)
    );
    conn.socket().write_all(response.as_bytes())
}

/// Greets, then echoes messages until the client closes (or goes quiet past the socket's read
/// timeout). Bytes that arrived right behind the handshake are the first frames, not lost.
pub(super) fn echo(conn: BufferedStream, name: &str) -> io::Result<()> {
    let early = conn.buffered().to_vec();
    let (socket, _) = conn.into_parts();
    let mut socket = WebSocket::from_partially_read(socket, early, Role::Server, None);
    socket
        .send(Message::text(format!("connected to {name}")))
        .map_err(io::Error::other)?;
    loop {
        match socket.read() {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                socket.send(message).map_err(io::Error::other)?;
            }
            // Pings are answered by tungstenite itself; a close is answered, then read to the end.
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            // A socket with a timeout set fails a blocked read with EINTR when the process was
            // stopped and continued (SIGSTOP, SIGCONT; signal(7)); the socket is fine.
            Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(io::Error::other(err)),
        }
    }
}

/// The `/chat` page: a text box that sends each line over `/ws` and lists what comes back,
/// first of all which backend holds the socket. No external assets.
pub(super) fn chat_page(name: &str) -> Vec<u8> {
    let body = CHAT_PAGE.replace("{NAME}", name);
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         X-Backend: {name}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body.as_bytes());
    response
}

const CHAT_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>WebSocket chat through the load balancer</title>
<style>
body { font: 16px system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
#log { border: 1px solid #8884; border-radius: 6px; padding: .5rem; min-height: 12rem; }
#log p { margin: .2rem 0; } .me { color: #06c; } .note { color: #888; }
form { display: flex; gap: .5rem; margin-top: .5rem; } input { flex: 1; font: inherit; }
</style>
</head>
<body>
<h1>WebSocket echo</h1>
<p>This page came from <b>{NAME}</b>. Its WebSocket goes through the balancer again: the first
message says which backend holds it. Reload to be balanced again; with <code>--sticky</code> the
page and its socket stay on one backend.</p>
<div id="log"></div>
<form id="send"><input id="text" autocomplete="off" placeholder="a message"><button>Send</button></form>
<script>
const log = document.getElementById("log");
function show(text, cls) {
  const p = document.createElement("p");
  p.textContent = text;
  if (cls) p.className = cls;
  log.appendChild(p);
}
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const socket = new WebSocket(scheme + location.host + "/ws");
socket.onopen = () => show("socket open", "note");
socket.onmessage = (event) => show(event.data);
socket.onclose = () => show("socket closed", "note");
document.getElementById("send").onsubmit = (event) => {
  event.preventDefault();
  const input = document.getElementById("text");
  if (input.value && socket.readyState === WebSocket.OPEN) {
    show(input.value, "me");
    socket.send(input.value);
  }
  input.value = "";
};
</script>
</body>
</html>
"#;
