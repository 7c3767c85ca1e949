#!/usr/bin/env python3
"""One sample of the balancer for scripts/soak.sh (Python 3 standard library only).

Prints one JSON line: the balancer's resident memory, threads and open file
descriptors from /proc/PID, its descriptors split into those of client connections,
of backend connections and the rest (from /proc/net/tcp), its /stats.json figures
(total requests, errors summed over backends, retries when the balancer reports
them), and the load generator's running totals from its progress file.
"""

import argparse
import json
import os
import sys
import time
import urllib.request


def status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def socket_inodes(pid):
    """The socket inode behind each of the process's descriptors (None for other kinds)."""
    inodes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inodes.append(target[8:-1] if target.startswith("socket:[") else None)
    return inodes


def tcp_sockets(pid):
    """inode -> (local port, remote port, state) for every TCP socket in the process's view."""
    table = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                    table[inode] = (int(local.rsplit(":", 1)[1], 16),
                                    int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            pass
    return table


def stats_json(admin_port):
    url = f"http://127.0.0.1:{admin_port}/stats.json"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            stats = json.load(response)
    except (OSError, ValueError) as err:
        return {"error": str(err)}
    backends = stats.get("backends", [])
    return {
        "total_requests": stats.get("total_requests"),
        "backend_requests": sum(b.get("requests", 0) for b in backends),
        "backend_errors": sum(b.get("errors", 0) for b in backends),
        "healthy": sum(1 for b in backends if b.get("healthy")),
        "backends": len(backends),
        "retries": stats.get("retries"),
        # The allocator's bytes in use (the balancer's live data) and held free: a leak grows
        # the first; RSS also grows with the second.
        "heap_in_use": (stats.get("heap") or {}).get("in_use_bytes"),
        "heap_free": (stats.get("heap") or {}).get("free_bytes"),
        "spare_buffers": (stats.get("heap") or {}).get("spare_buffer_bytes"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--lb-port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, help="the balancer's HTTPS port, if any")
    parser.add_argument("--backend-ports", required=True, help="comma-separated")
    parser.add_argument("--admin-port", type=int)
    parser.add_argument("--progress", help="the load generator's progress file")
    parser.add_argument("--t", type=float, required=True, help="seconds since the load started")
    parser.add_argument("--phase", default="load", help="baseline, load or drain")
    parser.add_argument("--baseline", help="a baseline sample (JSON line): exit 0 only when "
                        "threads and every kind of descriptor are back to it, 3 when not yet")
    args = parser.parse_args()

    backend_ports = {int(p) for p in args.backend_ports.split(",")}
    # Read /proc before asking for /stats.json, whose own connection would be counted.
    try:
        sample = {
            "t": args.t, "phase": args.phase, "time": time.time(),
            "rss_kb": status_field(args.pid, "VmRSS"),
            "threads": status_field(args.pid, "Threads"),
        }
        inodes = socket_inodes(args.pid)
        sample["fds"] = len(inodes)
        tcp = tcp_sockets(args.pid)
    except OSError as err:
        print(json.dumps({"t": args.t, "phase": args.phase, "error": f"balancer gone: {err}"}))
        return 1
    # Descriptors, not sockets: the balancer may hold two for one connection (a clone kept to
    # shut it down at exit).
    # A socket missing from /proc/net/tcp is closed (reset by its peer, say) and not yet
    # released by its thread, or not yet connected: a moment in its life, counted apart.
    client = backend = unlisted = 0
    for inode in inodes:
        if inode is None:
            continue
        if inode not in tcp:
            unlisted += 1
            continue
        local, remote, state = tcp[inode]
        if local in (args.lb_port, args.tls_port) and state != "0A":  # 0A: LISTEN
            client += 1
        elif remote in backend_ports:
            backend += 1
    sample["client_fds"] = client
    sample["backend_fds"] = backend
    sample["unlisted_fds"] = unlisted
    sample["other_fds"] = sample["fds"] - client - backend - unlisted
    if args.admin_port:
        sample["lb"] = stats_json(args.admin_port)
    if args.progress:
        try:
            with open(args.progress) as f:
                sample["load"] = json.load(f)
        except (OSError, ValueError):
            pass
    print(json.dumps(sample))
    if args.baseline:
        return 0 if is_back(sample, args.baseline) else 3
    return 0


def is_back(sample, baseline_file):
    """Threads and descriptors back to the baseline: no client connection left, no more
    descriptors of backend connections than before the load (idle pooled ones must have been
    closed), and no more of anything else."""
    with open(baseline_file) as f:
        baseline = json.load(f)
    return (sample["threads"] <= baseline["threads"]
            and sample["client_fds"] == 0
            and sample["backend_fds"] <= baseline["backend_fds"]
            and sample["unlisted_fds"] <= baseline["unlisted_fds"]
            and sample["other_fds"] <= baseline["other_fds"])


if __name__ == "__main__":
    sys.exit(main())
