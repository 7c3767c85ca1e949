#!/usr/bin/env python3
"""What a context switch costs on this machine, for `bench.sh --explain-limit`.

Two processes pass one byte back and forth over two pipes, so each round trip puts each of them
to sleep once and wakes it once: two context switches. The same process writing to a pipe and
reading it back does the same system calls without sleeping. The difference, halved, is the
price of one sleep and wake-up, which every keep-alive request costs a blocking thread twice.

Measured twice: both processes on one CPU (a busy machine, where the woken side runs next on
the same CPU) and on two (an idle CPU has to be woken, which on a virtual machine can cost far
more than the switch itself).

    switch_cost.py [ROUND_TRIPS]   ->   "one_cpu_us two_cpus_us" (two_cpus_us is nan on one CPU)
"""
import math
import os
import sys
import time


def ping_pong(round_trips, cpus):
    """Seconds per round trip between two processes pinned to cpus[0] and cpus[1]."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {cpus[1]})
        for _ in range(round_trips + 1):
            os.read(to_child, 1)
            os.write(from_child, b"x")
        os._exit(0)
    os.sched_setaffinity(0, {cpus[0]})
    os.write(from_parent, b"x")      # one round trip first, so the child is pinned and ready
    os.read(to_parent, 1)
    start = time.perf_counter()
    for _ in range(round_trips):
        os.write(from_parent, b"x")
        os.read(to_parent, 1)
    elapsed = time.perf_counter() - start
    os.waitpid(pid, 0)
    for fd in (to_child, from_parent, to_parent, from_child):
        os.close(fd)
    return elapsed / round_trips


def no_sleep(round_trips, cpu):
    """Seconds for the same four system calls as a round trip, in one process that never sleeps."""
    os.sched_setaffinity(0, {cpu})
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    start = time.perf_counter()
    for _ in range(round_trips):
        os.write(w1, b"x")
        os.read(r1, 1)
        os.write(w2, b"x")
        os.read(r2, 1)
    elapsed = time.perf_counter() - start
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return elapsed / round_trips


def switch_us(round_trips, cpus):
    """Microseconds per sleep and wake-up: the best of three tries of each measurement."""
    trip = min(ping_pong(round_trips, cpus) for _ in range(3))
    calls = min(no_sleep(round_trips, cpus[0]) for _ in range(3))
    return max(trip - calls, 0.0) / 2 * 1e6


def main():
    round_trips = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    allowed = sorted(os.sched_getaffinity(0))
    one = switch_us(round_trips, (allowed[0], allowed[0]))
    # Waking an idle CPU is slow on some machines; fewer round trips keep this part short.
    two = switch_us(max(round_trips // 10, 100), (allowed[0], allowed[1])) if len(allowed) > 1 else math.nan
    print(f"{one:.2f} {two:.2f}")


if __name__ == "__main__":
    main()
