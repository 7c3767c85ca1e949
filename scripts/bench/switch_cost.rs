//! What a context switch costs on this machine, for `scripts/bench.sh --explain-limit`.
//!
//! Built by the script with plain `rustc -O` (standard library only), apart from the crate.
//!
//! Pairs of threads pass one byte back and forth over two Unix socket pairs, so each round trip
//! puts each thread of a pair to sleep once and wakes it once: two context switches. One thread
//! writing to a socket and reading it back itself makes the same system calls without sleeping.
//! The difference, halved, is the price of one sleep and wake-up, which every keep-alive request
//! costs a blocking client thread twice.
//!
//!     switch_cost THREADS...   ->   one line of numbers, microseconds:
//!         for each THREADS (even), one sleep and wake-up with THREADS threads taking turns on
//!         one CPU; then one with two threads on two CPUs, where the woken one's CPU is idle
//!         ("nan" when the process may use only one CPU)
//!
//! With many threads, each switch finds a thread whose stack and sockets have left the CPU's
//! caches, which is what a balancer with a thread per connection meets under load; the cost with
//! two CPUs is what waking an idle CPU adds (on a virtual machine, often far more than a switch).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

/// Round trips per pair: enough to last a few hundred milliseconds on a slow machine.
const ROUND_TRIPS: usize = 20_000;
/// Waking an idle CPU can be slow; fewer round trips keep that part short.
const ROUND_TRIPS_ACROSS: usize = 2_000;

extern "C" {
    /// glibc's `sched_setaffinity(2)` wrapper; pid 0 is the calling thread.
    fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
}

/// Keeps the calling thread on one CPU.
fn pin(cpu: usize) {
    let mut mask = [0u64; 16];
    mask[cpu / 64] |= 1 << (cpu % 64);
    // SAFETY: the mask is a valid array of size_of_val(&mask) bytes for the call's duration.
    let rc = unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) };
    if rc != 0 {
        eprintln!("switch_cost: cannot pin a thread to CPU {cpu}");
        std::process::exit(1);
    }
}

/// The CPUs this process may use, from `Cpus_allowed_list` in /proc/self/status ("0-3,6").
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("0")
        .trim();
    let mut cpus = Vec::new();
    for range in list.split(',') {
        let mut ends = range
            .split('-')
            .map(|n| n.trim().parse::<usize>().unwrap_or(0));
        let first = ends.next().unwrap_or(0);
        let last = ends.next().unwrap_or(first);
        cpus.extend(first..=last);
    }
    cpus
}

fn send_byte(mut stream: &UnixStream) {
    stream.write_all(b"x").expect("write to a socket pair");
}

fn receive_byte(mut stream: &UnixStream) {
    let mut byte = [0u8; 1];
    stream
        .read_exact(&mut byte)
        .expect("read from a socket pair");
}

/// Microseconds per round trip of `pairs` pairs of threads: the first of each pair on
/// `cpus.0`, the second on `cpus.1`. All start together, once every thread is pinned.
fn ping_pong(pairs: usize, round_trips: usize, cpus: (usize, usize)) -> f64 {
    let start = Arc::new(Barrier::new(2 * pairs + 1));
    let mut threads = Vec::new();
    for _ in 0..pairs {
        let (ping, ping_peer) = UnixStream::pair().expect("socket pair");
        let (pong, pong_peer) = UnixStream::pair().expect("socket pair");
        let gate = Arc::clone(&start);
        threads.push(thread::spawn(move || {
            pin(cpus.0);
            gate.wait();
            for _ in 0..round_trips {
                send_byte(&ping);
                receive_byte(&pong);
            }
        }));
        let gate = Arc::clone(&start);
        threads.push(thread::spawn(move || {
            pin(cpus.1);
            gate.wait();
            for _ in 0..round_trips {
                receive_byte(&ping_peer);
                send_byte(&pong_peer);
            }
        }));
    }
    start.wait();
    let began = Instant::now();
    for thread in threads {
        thread.join().expect("a ping-pong thread panicked");
    }
    began.elapsed().as_secs_f64() * 1e6 / (pairs * round_trips) as f64
}

/// Microseconds for the four system calls of a round trip, in one thread that never sleeps.
fn no_sleep(round_trips: usize, cpu: usize) -> f64 {
    thread::spawn(move || {
        pin(cpu);
        let (a, a_peer) = UnixStream::pair().expect("socket pair");
        let (b, b_peer) = UnixStream::pair().expect("socket pair");
        let began = Instant::now();
        for _ in 0..round_trips {
            send_byte(&a);
            receive_byte(&a_peer);
            send_byte(&b_peer);
            receive_byte(&b);
        }
        began.elapsed().as_secs_f64() * 1e6 / round_trips as f64
    })
    .join()
    .expect("the no-sleep thread panicked")
}

/// Microseconds per sleep and wake-up: the best of three tries of each measurement.
fn switch_us(pairs: usize, round_trips: usize, cpus: (usize, usize)) -> f64 {
    let best = |measure: &dyn Fn() -> f64| (0..3).map(|_| measure()).fold(f64::MAX, f64::min);
    let trip = best(&|| ping_pong(pairs, round_trips, cpus));
    let calls = best(&|| no_sleep(round_trips, cpus.0));
    (trip - calls).max(0.0) / 2.0
}

fn main() {
    let cpus = allowed_cpus();
    let mut figures = Vec::new();
    for arg in std::env::args().skip(1) {
        let threads: usize = match arg.parse() {
            Ok(n) if n >= 2 && n % 2 == 0 => n,
            _ => {
                eprintln!("switch_cost: THREADS must be an even number of at least 2, got '{arg}'");
                std::process::exit(2);
            }
        };
        let pairs = threads / 2;
        figures.push(switch_us(pairs, ROUND_TRIPS / pairs, (cpus[0], cpus[0])));
    }
    let across = match cpus.get(1) {
        Some(&other) => switch_us(1, ROUND_TRIPS_ACROSS, (cpus[0], other)),
        None => f64::NAN,
    };
    figures.push(across);
    let line: Vec<String> = figures.iter().map(|us| format!("{us:.2}")).collect();
    println!("{}", line.join(" "));
}
