#!/usr/bin/env python3
"""Mixed load for scripts/soak.sh (Python 3 standard library only).

One thread per simulated client, each a loop over requests to the balancer on
127.0.0.1:PORT until --duration seconds have passed:

  keepalive  GET / on one keep-alive connection, 20 a second
  close      GET / with `Connection: close`, a new connection each time
  sticky     GET / keeping the cookies it is given, as a browser does (a new
             visitor, with no cookies, every 50 requests); counts the times its
             backend changed while it kept the same cookie
  upload     POST /upload with a 1 MiB body, once a second
  slow       GET /bytes/1048576 read 16 KiB at a time, 20 reads a second, with a
             16 KiB receive buffer, so the balancer really has to wait for it
  websocket  one WebSocket to /ws held open, a text message echoed 5 times a
             second; a socket that ends is opened again (a tunnel cannot move to
             another backend, so the backend's death ends it)

With --tls-port, two more kinds over HTTPS, a mix like Socket.IO's (long-polling
requests on keep-alive connections, then upgraded WebSockets with small frames):

  tls_poll       keep-alive requests keeping cookies, as a long-polling client:
                 GETs with a small POST every third request, 10 a second, with
                 Nagle's algorithm on (as most client libraries leave it)
  tls_websocket  one WebSocket to /ws over TLS, three small messages sent in a
                 burst and then their three echoes read, 5 times a second

A WebSocket message whose echo does not come back within the timeout counts as
`websocket_no_echo`, an error no chaos event explains.

Every response is read whole and checked against its framing. An error is
counted by kind (status 5xx by code, cut short, reset, closed, timeout, ...),
then the client opens a new connection and goes on. Each error is also recorded
with its start and end time, method and the X-Backend of the answer (when a head
arrived), so that the report can tell which chaos event explains it.

--progress FILE is rewritten every second with the running totals; --out FILE
gets everything as JSON at the end.
"""

import argparse
import base64
import json
import os
import socket
import ssl
import threading
import time

HEAD_LIMIT = 64 * 1024
UPLOAD = b"u" * (1024 * 1024)
SLOW_BODY = 1024 * 1024
SLOW_CHUNK = 16 * 1024
# Errors are recorded one by one (each must be explained) up to this many per minute of load, and
# at least MIN_RECORDS: a 10-minute run sees about 270 a minute, most of them cut short on purpose.
RECORDS_PER_MINUTE = 1000
MIN_RECORDS = 5000
KINDS = ("keepalive", "close", "sticky", "upload", "slow", "websocket", "tls_poll",
         "tls_websocket")
POLL_BODY = b"4" + b"p" * 200


class Cut(Exception):
    """The connection ended inside a response whose head had arrived."""

    def __init__(self, why, backend, status):
        super().__init__(why)
        self.backend = backend
        self.status = status


class Closed(Exception):
    """The connection ended before any byte of the response arrived."""


class BadResponse(Exception):
    """The bytes that arrived are not an HTTP/1.1 response."""


class Totals:
    """Counters shared by every client thread."""

    def __init__(self, max_records):
        self.lock = threading.Lock()
        self.max_records = max_records
        self.kinds = {}
        self.by_backend = {}
        self.records = []
        self.dropped_records = 0
        self.moves = 0

    def kind(self, name):
        return self.kinds.setdefault(name, {"requests": 0, "ok": 0, "errors": {}})

    def ok(self, kind, backend):
        with self.lock:
            k = self.kind(kind)
            k["requests"] += 1
            k["ok"] += 1
            self.by_backend[backend] = self.by_backend.get(backend, 0) + 1

    def error(self, kind, method, outcome, started, backend=None, detail=""):
        ended = time.time()
        with self.lock:
            k = self.kind(kind)
            k["requests"] += 1
            k["errors"][outcome] = k["errors"].get(outcome, 0) + 1
            if len(self.records) < self.max_records:
                self.records.append({
                    "start": started, "end": ended, "client": kind, "method": method,
                    "outcome": outcome, "backend": backend, "detail": detail[:200],
                })
            else:
                self.dropped_records += 1

    def snapshot(self):
        with self.lock:
            requests = sum(k["requests"] for k in self.kinds.values())
            ok = sum(k["ok"] for k in self.kinds.values())
            errors = {}
            for k in self.kinds.values():
                for outcome, n in k["errors"].items():
                    errors[outcome] = errors.get(outcome, 0) + n
            return {"time": time.time(), "requests": requests, "ok": ok, "errors": errors}


class Connection:
    """One client connection speaking HTTP/1.1, with a read buffer."""

    def __init__(self, port, timeout, rcvbuf=None, tls=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Set before connecting, so the window the balancer sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        if tls is None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect(("127.0.0.1", port))
        if tls is not None:
            # Nagle's algorithm stays on over TLS, as in most client libraries.
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.kept = None
        self.open = True

    def close(self):
        self.open = False
        try:
            self.sock.close()
        except OSError:
            pass

    def recv(self, size=65536):
        data = self.sock.recv(size)
        if not data:
            raise EOFError
        return data

    def request(self, method, path, headers=(), body=b"", slow=None):
        """Sends one request and reads its response: (status, headers dict, body length)."""
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if body:
            self.sock.sendall(body)
        status, fields, raw_fields = self.read_head()
        backend = fields.get("x-backend")
        # The start of an error answer's body says what went wrong; keep it for the report.
        self.kept = b"" if status >= 300 else None
        try:
            length = self.read_body(method, status, fields, slow)
        except (EOFError, ConnectionError) as err:
            raise Cut(type(err).__name__, backend, status) from err
        except socket.timeout as err:
            raise Cut("timeout", backend, status) from err
        if "close" in fields.get("connection", "").lower():
            self.close()
        return status, fields, raw_fields, length

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > HEAD_LIMIT:
                raise BadResponse("response head over 64 KiB")
            try:
                self.buf += self.recv()
            except EOFError:
                if self.buf:
                    raise Cut("EOF inside the head", None, None) from None
                raise Closed("closed before any response byte") from None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadResponse(f"bad status line {lines[0][:80]!r}")
        fields, raw_fields = {}, []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
            raw_fields.append((name.strip().lower(), value.strip()))
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            return self.read_head()
        return status, fields, raw_fields

    def read_body(self, method, status, fields, slow):
        if method == "HEAD" or status in (204, 304):
            return 0
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return self.read_chunked()
        if "content-length" in fields:
            return self.read_exactly(int(fields["content-length"]), slow)
        # Delimited by the end of the connection.
        total = len(self.buf)
        self.buf = b""
        while True:
            try:
                total += len(self.recv())
            except EOFError:
                self.close()
                return total

    def keep(self, data):
        if self.kept is not None and len(self.kept) < 200:
            self.kept += data[:200 - len(self.kept)]

    def read_exactly(self, length, slow):
        got = min(len(self.buf), length)
        self.keep(self.buf[:got])
        self.buf = self.buf[got:]
        while got < length:
            data = self.recv(min(SLOW_CHUNK, length - got) if slow else 65536)
            take = min(len(data), length - got)
            got += take
            self.keep(data[:take])
            self.buf = data[take:]
            if slow:
                time.sleep(slow)
        return got

    def read_line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > HEAD_LIMIT:
                raise BadResponse("chunk line over 64 KiB")
            self.buf += self.recv()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_chunked(self):
        total = 0
        while True:
            size = int(self.read_line().split(b";")[0], 16)
            if size == 0:
                while self.read_line():  # trailer fields, up to the blank line
                    pass
                return total
            total += self.read_exactly(size + 2, None) - 2


class WebSocket:
    """A WebSocket to /ws through the balancer (RFC 6455, text frames only): the handshake,
    the backend's greeting, then masked frames out and plain frames back."""

    def __init__(self, port, timeout, tls=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
             "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
             f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
        head = self.take_until(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
        if status != b"101":
            raise BadResponse(f"the WebSocket handshake got {status.decode('latin-1')}")
        greeting = self.receive()
        self.backend = greeting.removeprefix("connected to ")

    def take(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise Closed("the WebSocket ended")
            self.buf += data
        taken, self.buf = self.buf[:n], self.buf[n:]
        return taken

    def take_until(self, marker):
        while marker not in self.buf:
            if len(self.buf) > HEAD_LIMIT:
                raise BadResponse("handshake response head too large")
            data = self.sock.recv(65536)
            if not data:
                raise Closed("closed during the WebSocket handshake")
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head

    def send(self, text):
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def receive(self):
        first, second = self.take(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self.take(2), "big")
        elif length == 127:
            length = int.from_bytes(self.take(8), "big")
        payload = self.take(length)
        if first & 0x0F == 0x8:
            raise Closed("the backend closed the WebSocket")
        return payload.decode("utf-8", "replace")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Client(threading.Thread):
    """One simulated client of a given kind, looping until the deadline."""

    def __init__(self, kind, ports, deadline, timeout, totals, tls):
        super().__init__(name=f"{kind}-client", daemon=True)
        self.kind, self.deadline = kind, deadline
        # The TLS kinds go to the HTTPS port with the client context; the others to plain HTTP.
        self.tls = tls if kind.startswith("tls_") else None
        self.port = ports[1] if self.tls else ports[0]
        self.timeout, self.totals = timeout, totals
        self.conn = None
        self.ws = None
        self.cookies = {}
        self.sticky_backend = None
        self.requests = 0

    def run(self):
        pause = {"keepalive": 0.05, "close": 0.1, "sticky": 0.1, "upload": 1.0, "slow": 0.5,
                 "websocket": 0.2, "tls_poll": 0.1, "tls_websocket": 0.2}[self.kind]
        while time.time() < self.deadline:
            if self.kind.endswith("websocket"):
                self.one_message()
            else:
                self.one_request()
            self.requests += 1
            time.sleep(pause)
        if self.conn:
            self.conn.close()
        if self.ws:
            self.ws.close()

    def one_message(self):
        """Messages echoed over the client's WebSocket, opened first if needed: one, or over
        TLS a burst of three sent before the three echoes are read."""
        started = time.time()
        backend = self.ws.backend if self.ws else None
        waiting = False
        try:
            if self.ws is None:
                self.ws = WebSocket(self.port, self.timeout, self.tls)
                backend = self.ws.backend
            texts = [f"message {self.requests}.{n}" for n in range(3 if self.tls else 1)]
            for text in texts:
                self.ws.send(text)
            waiting = True
            for text in texts:
                echoed = self.ws.receive()
                if echoed != text:
                    raise BadResponse(f"echo {echoed!r} for {text!r}")
        except (Closed, ConnectionError, OSError, BadResponse, ValueError) as err:
            if self.ws:
                self.ws.close()
            self.ws = None
            if isinstance(err, socket.timeout) and waiting:
                outcome = "websocket_no_echo"
            elif isinstance(err, ssl.SSLError) and not backend:
                outcome = "tls_handshake_failed"
            else:
                outcome = "websocket_ended" if backend else "websocket_handshake_failed"
            self.totals.error(self.kind, "WS", outcome, started, backend,
                              f"{type(err).__name__}: {err}")
            return
        self.totals.ok(self.kind, backend)

    def one_request(self):
        method, path, headers, body, slow, rcvbuf = "GET", "/", [], b"", None, None
        if self.kind == "close":
            headers.append(("Connection", "close"))
        elif self.kind == "upload":
            method, path, body = "POST", "/upload", UPLOAD
        elif self.kind == "slow":
            path, slow, rcvbuf = f"/bytes/{SLOW_BODY}", 0.05, SLOW_CHUNK
        elif self.kind == "tls_poll" and self.requests % 3 == 2:
            method, path, body = "POST", "/poll", POLL_BODY
        if self.kind in ("sticky", "tls_poll"):
            if self.requests % 50 == 0:
                self.cookies, self.sticky_backend = {}, None
            if self.cookies:
                headers.append(("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items())))
        started = time.time()
        try:
            if self.conn is None or not self.conn.open:
                self.conn = Connection(self.port, self.timeout, rcvbuf, self.tls)
            status, fields, raw_fields, length = self.conn.request(method, path, headers, body, slow)
        except Cut as cut:
            self.drop()
            outcome = "cut_short" if cut.status is not None else "cut_in_head"
            self.totals.error(self.kind, method, outcome, started, cut.backend, str(cut))
            return
        except Closed as err:
            self.drop()
            self.totals.error(self.kind, method, "closed_before_response", started, None, str(err))
            return
        except socket.timeout:
            self.drop()
            self.totals.error(self.kind, method, "timeout", started)
            return
        except ConnectionRefusedError as err:
            self.drop()
            self.totals.error(self.kind, method, "refused", started, None, str(err))
            return
        except ssl.SSLError as err:
            self.drop()
            self.totals.error(self.kind, method, "tls_handshake_failed", started, None,
                              f"{type(err).__name__}: {err}")
            return
        except (ConnectionError, OSError) as err:
            # A reset or broken pipe before the response head arrived (while sending, say).
            self.drop()
            self.totals.error(self.kind, method, "reset_before_response", started, None,
                              f"{type(err).__name__}: {err}")
            return
        except (BadResponse, ValueError) as err:
            self.drop()
            self.totals.error(self.kind, method, "bad_response", started, None, str(err))
            return
        except Exception as err:  # a bug here must show in the verdict, not end the client
            self.drop()
            self.totals.error(self.kind, method, "load_generator_error", started, None,
                              f"{type(err).__name__}: {err}")
            return
        backend = fields.get("x-backend", "?")
        if 200 <= status < 300:
            self.totals.ok(self.kind, backend)
        else:
            text = (self.conn.kept or b"").decode("utf-8", "replace").strip()
            self.totals.error(self.kind, method, str(status), started, fields.get("x-backend"),
                              f"{status} ({length} body bytes): {text}")
        if self.kind in ("sticky", "tls_poll"):
            self.keep_cookies(raw_fields, backend)

    def keep_cookies(self, raw_fields, backend):
        had_cookie = bool(self.cookies)
        for name, value in raw_fields:
            if name == "set-cookie":
                pair = value.split(";", 1)[0]
                key, _, val = pair.partition("=")
                self.cookies[key.strip()] = val.strip()
        if had_cookie and self.sticky_backend not in (None, backend):
            with self.totals.lock:
                self.totals.moves += 1
        self.sticky_backend = backend

    def drop(self):
        if self.conn:
            self.conn.close()
        self.conn = None


def write_json(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True, help="seconds of load")
    parser.add_argument("--out", required=True, help="JSON results, written at the end")
    parser.add_argument("--progress", help="running totals, rewritten every second")
    parser.add_argument("--timeout", type=float, default=45.0,
                        help="socket timeout; longer than the balancer's --backend-timeout")
    parser.add_argument("--grace", type=float, default=15.0,
                        help="seconds after the deadline to wait for requests in flight")
    parser.add_argument("--tls-port", type=int, help="the balancer's HTTPS port")
    parser.add_argument("--cafile", help="the certificate the HTTPS port shows")
    parser.add_argument("--clients", help="kind=N,... (default: "
                        "keepalive=12,close=8,sticky=8,upload=4,slow=4,websocket=4, and with "
                        "--tls-port tls_poll=8,tls_websocket=8)")
    args = parser.parse_args()
    if args.clients is None:
        args.clients = "keepalive=12,close=8,sticky=8,upload=4,slow=4,websocket=4"
        if args.tls_port:
            args.clients += ",tls_poll=8,tls_websocket=8"
    tls = None
    if args.tls_port:
        if not args.cafile:
            parser.error("--tls-port needs --cafile")
        tls = ssl.create_default_context(cafile=args.cafile)

    mix = {}
    for item in args.clients.split(","):
        kind, _, n = item.partition("=")
        if kind not in KINDS or not n.isdigit():
            parser.error(f"bad --clients item {item!r}")
        if kind.startswith("tls_") and tls is None:
            parser.error(f"--clients {kind} needs --tls-port")
        mix[kind] = int(n)

    totals = Totals(max(MIN_RECORDS, int(args.duration / 60 * RECORDS_PER_MINUTE)))
    started = time.time()
    deadline = started + args.duration
    clients = [Client(kind, (args.port, args.tls_port), deadline, args.timeout, totals, tls)
               for kind, n in mix.items() for _ in range(n)]
    for client in clients:
        client.start()
    while time.time() < deadline:
        if args.progress:
            write_json(args.progress, totals.snapshot())
        time.sleep(min(1.0, max(0.0, deadline - time.time())))
    stop_waiting = deadline + args.grace
    for client in clients:
        client.join(max(0.0, stop_waiting - time.time()))
    unfinished = sum(client.is_alive() for client in clients)
    result = totals.snapshot()
    with totals.lock:
        result.update({
            "started": started, "deadline": deadline, "clients": mix,
            "unfinished": unfinished, "kinds": totals.kinds, "by_backend": totals.by_backend,
            "sticky_moves": totals.moves, "records": totals.records,
            "dropped_records": totals.dropped_records,
        })
    if args.progress:
        write_json(args.progress, totals.snapshot())
    write_json(args.out, result)


if __name__ == "__main__":
    main()
