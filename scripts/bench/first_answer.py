#!/usr/bin/env python3
"""How long a new HTTPS connection waits for its first answer, from a client that is not rustls:
Python's ssl module (OpenSSL) over a plain socket with Nagle's algorithm on, as most client
libraries and browsers' connection pools leave it (stdlib only).

  first_answer.py HOST PORT CA_FILE VERSION [COUNT]     (VERSION: 1.2 or 1.3; COUNT: 10)

Opens COUNT connections one after another, keeping each open, and times each from connect to
the first whole answer. The first connection sends three requests (keep-alive); the later ones
resume its session. Prints one JSON object: the version agreed, the times in milliseconds and
their median, the statuses, and whether each later connection resumed.

Used by tests/https.rs (does a Nagle client wait for a delayed acknowledgement?) and by
scripts/bench.sh --tls (the same, against nginx and HAProxy).
"""

import json
import socket
import ssl
import sys
import time
from statistics import median

host, port, ca_file, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count = int(sys.argv[5]) if len(sys.argv) > 5 else 10
context = ssl.create_default_context(cafile=ca_file)
context.minimum_version = context.maximum_version = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}[version]


def read_response(stream):
    """Reads one response with a Content-Length body; returns its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = stream.recv(65536)
        if not chunk:
            raise EOFError("closed before the head ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = stream.recv(65536)
        if not chunk:
            raise EOFError("closed inside the body")
        body += chunk
    return int(lines[0].split()[1])


def request(stream, path):
    stream.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return read_response(stream)


held, times, statuses, resumed = [], [], [], []
session = None
for n in range(count):
    started = time.monotonic()
    plain = socket.create_connection((host, port), timeout=10)
    stream = context.wrap_socket(plain, server_hostname="localhost", session=session)
    statuses.append(request(stream, f"/first-answer/{n}"))
    times.append((time.monotonic() - started) * 1000)
    if n == 0:
        statuses += [request(stream, "/first-answer/keep-alive") for _ in range(2)]
        session = stream.session
    else:
        resumed.append(stream.session_reused)
    held.append(stream)

print(json.dumps({
    "version": held[0].version(),
    "times_ms": times,
    "median_ms": median(times),
    "statuses": statuses,
    "resumed": resumed,
}))
for stream in held:
    stream.close()
