#!/usr/bin/env python3
"""Idle keep-alive client for scripts/bench.sh --idle N (stdlib only).

Opens N connections to 127.0.0.1:PORT all at once (non-blocking connects), sends
one `GET /` on each and reads the whole response. The connections then stay open
and idle. It reports:

  * the wall time from the first connect() until the last response arrived,
  * the server's resident memory (VmRSS summed over the process and its
    children, e.g. nginx workers) before connecting and with the N connections
    open,
  * how many connections are still open afterwards (the server must not have
    closed them).

Output: one tab-separated line
  label  n  answered  failed  still_open  wall_s  rss_before_kb  rss_with_kb
"""

import argparse
import os
import resource
import selectors
import socket
import time


def tree_pids(root):
    """The pid and all its descendants (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_kb(root):
    """VmRSS summed over the process tree, in KiB."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def response_complete(buf):
    """True once `buf` holds a whole response (Content-Length or chunked)."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head = buf[:head_end].decode("latin-1").lower()
    body = buf[head_end + 4:]
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip() == "content-length":
            return len(body) >= int(value.strip())
        if name.strip() == "transfer-encoding" and "chunked" in value:
            return body.endswith(b"0\r\n\r\n")
    return True  # no body framing: the status line and headers are enough here


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="server pid for RSS")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--label", default="server")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds to wait before sampling RSS with the clients open")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
               "User-Agent: bench-idle\r\n\r\n").encode()
    rss_before = rss_kb(args.pid)

    sel = selectors.DefaultSelector()
    socks, bufs = [], {}
    answered = failed = 0
    start = time.monotonic()
    for _ in range(args.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", args.port))  # EINPROGRESS; completion below
        socks.append(s)
        bufs[s] = b""
        sel.register(s, selectors.EVENT_WRITE)

    pending = args.n
    deadline = start + args.timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            try:
                if not bufs[s] and key.events == selectors.EVENT_WRITE:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    s.send(request)  # tiny; fits the socket buffer
                    sel.modify(s, selectors.EVENT_READ)
                    bufs[s] = b""
                    continue
                data = s.recv(65536)
                if not data:
                    raise OSError("closed before the response was complete")
                bufs[s] += data
                if response_complete(bufs[s]):
                    sel.unregister(s)
                    answered += 1
                    pending -= 1
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                sel.unregister(s)
                failed += 1
                pending -= 1
    wall = time.monotonic() - start if pending == 0 else float("nan")

    time.sleep(args.settle)
    rss_with = rss_kb(args.pid)

    still_open = 0
    for s in socks:
        try:
            still_open += 1 if s.recv(1, socket.MSG_PEEK) else 0  # data?! count open
        except BlockingIOError:
            still_open += 1  # nothing to read, not closed: idle as intended
        except OSError:
            pass
    for s in socks:
        s.close()

    print(f"{args.label}\t{args.n}\t{answered}\t{failed}\t{still_open}\t"
          f"{wall:.4f}\t{rss_before}\t{rss_with}")


if __name__ == "__main__":
    main()
