//! The listening socket and what the kernel is told about it and about each client socket.
//!
//! None of this changes what a client sees; each option saves system calls or context switches
//! under load, or keeps a limit honest: connections accepted only once their first bytes arrive
//! (`TCP_DEFER_ACCEPT`), client threads scheduled as batch work (`SCHED_BATCH`), a second
//! balancer taking over the port (`--reuse-port`, and the newest instance steering new
//! connections to itself), the length of the listen queue, and what accepting does when the
//! process runs out of file descriptors: it pauses for a moment, as nginx does, rather than
//! accepting clients it could not serve.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::descriptors;
use crate::proxy::LoadBalancer;
use crate::settings::Settings;
use crate::warnings::RepeatedWarning;

/// Length of the kernel's queue of connections not yet accepted (the kernel may cap it).
pub(crate) const LISTEN_BACKLOG: i32 = 4096;

/// How often a thread blocked in `accept` looks whether shutdown began. Connecting to the
/// listener would wake it at once, but not with `--reuse-port` (the connection may go to the
/// other instance) nor with connections accepted only once they carry data (see
/// `accept_when_data_arrives`).
pub(super) const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// How long accepting pauses when the process is out of file descriptors (or a connection
/// closes first, giving one back).
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

static ACCEPT_FAILED: RepeatedWarning = RepeatedWarning::new(module_path!());

/// Sets the timeouts that bound every read and write of a client. Linux copies the listener's
/// options to the accepted socket; only the read timeout is left to set.
pub(super) fn prepare_client_socket(
    stream: &TcpStream,
    client_timeout: Duration,
) -> io::Result<()> {
    #[cfg(not(target_os = "linux"))]
    {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(client_timeout))?;
    }
    stream.set_read_timeout(Some(client_timeout))
}

/// How long accepting pauses after `accept` failed with `err`, if at all.
///
/// Out of descriptors: backend connections idle in the pools have taken the clients' share, so
/// some are closed and accepting goes on at once. With none idle (or out of kernel memory), the
/// thread pauses until a connection closes or for a moment, so clients wait in the listen queue
/// instead of being accepted and dropped. Other failures concern one client that gave up while
/// queued, and accepting goes on.
pub(super) fn pause_after_failed_accept(err: &io::Error, lb: &LoadBalancer) -> Option<Duration> {
    if descriptors::is_exhausted(err) && lb.give_back_descriptors() {
        log::debug!("accept failed: {err}; closed idle backend connections");
        return None;
    }
    let out_of_resources = descriptors::is_exhausted(err)
        || matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM));
    if !out_of_resources {
        log::debug!("accept failed: {err}");
        return None;
    }
    ACCEPT_FAILED.warn(format_args!(
        "accept failed: {err}; accepting paused until a connection closes (at most {EXHAUSTED_PAUSE:?})"
    ));
    Some(EXHAUSTED_PAUSE)
}

/// With `--reuse-port`, makes the newest listener on the address take every new connection.
///
/// Linux spreads new connections over the listeners sharing a port by a hash, and a listener
/// that closes resets the connections in its queue. A takeover loses nothing only if the old
/// instance gets none once the new one listens; then it empties its queue and closes it.
/// One classic BPF instruction, attached to the group of listeners, says so: `ret #1`, the
/// second listener of the group, which is the one that joined last. When it is alone (index 1
/// does not exist), the kernel falls back to the hash, which has only it to choose from; when
/// the old one closes, the new one takes its place as the first. (nginx and HAProxy avoid the
/// same loss by handing the listening socket itself to the new process.)
#[cfg(target_os = "linux")]
fn newest_takes_new_connections(socket: &Socket) -> io::Result<()> {
    let program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // `filter` points to `program`, both alive for the call; the kernel copies them.
    set_option(
        socket,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        &filter,
    )
}

/// Elsewhere the kernel's own spreading stays; the old instance's queue is still emptied.
#[cfg(not(target_os = "linux"))]
fn newest_takes_new_connections(_socket: &Socket) -> io::Result<()> {
    Ok(())
}

/// How many connections wait in `listener`'s queue, as the kernel counts them (`TCP_INFO` of a
/// listening socket gives its accept queue's length).
#[cfg(target_os = "linux")]
pub(super) fn queued_connections(listener: &TcpListener) -> Option<usize> {
    // SAFETY: `tcp_info` is plain data, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, alive for the call.
    let done = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (done == 0).then_some(info.tcpi_unacked as usize)
}

/// Elsewhere the queue's length is not known: the pool grows by steps.
#[cfg(not(target_os = "linux"))]
pub(super) fn queued_connections(_listener: &TcpListener) -> Option<usize> {
    None
}

/// Tells the kernel's scheduler that the calling thread is batch work (`SCHED_BATCH`): woken by
/// a packet, it no longer preempts the program running on that CPU but waits until that one
/// sleeps or its time slice ends. Every keep-alive request wakes a client thread twice; with
/// as many runnable threads as connections, preempting on each wake-up interrupts wrk, the
/// backends and the other client threads before they have handled what they have ready, so the
/// machine switches more and batches less. Not preempting lets them finish their batch first,
/// as an event loop does on its own. The price is latency when the CPUs are busy with other
/// programs (see `--cpu-scheduling` in docs/flags.md and why in docs/performance.md).
#[cfg(target_os = "linux")]
pub(super) fn schedule_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is alive for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        log::debug!(
            "client thread stays in the normal scheduling class: {}",
            io::Error::last_os_error()
        );
    }
}

/// Elsewhere threads keep the system's usual scheduling.
#[cfg(not(target_os = "linux"))]
pub(super) fn schedule_as_batch() {}

/// Makes `accept` return a connection only once its first bytes (a request head, a TLS
/// ClientHello) have arrived, as nginx's `listen ... deferred` and HAProxy's `defer-accept` do.
/// The thread that accepts then reads them at once instead of going back to sleep until they
/// come: one context switch less per new connection, which is a third of those a
/// `Connection: close` request costs. A client that connects and sends nothing is accepted
/// anyway a few seconds later, and `--client-timeout` runs from then.
#[cfg(target_os = "linux")]
fn accept_when_data_arrives(socket: &Socket) -> io::Result<()> {
    let seconds: libc::c_int = 1;
    set_option(socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, &seconds)
}

/// Sets a socket option that `socket2` does not offer.
#[cfg(target_os = "linux")]
fn set_option<T>(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live `T` for the whole call and its size is given; the kernel copies
    // what it needs.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere connections are accepted as soon as they are made.
#[cfg(not(target_os = "linux"))]
fn accept_when_data_arrives(_socket: &Socket) -> io::Result<()> {
    Ok(())
}

/// A listening socket on `addr`, with the options every client socket inherits.
pub(super) fn listen_socket(addr: SocketAddr, settings: &Settings) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // `--reuse-port`: a second balancer may listen on the same address (a new version taking
    // over while this one drains); see `newest_takes_new_connections` for which one gets
    // the new connections.
    if settings.reuse_port {
        socket.set_reuse_port(true)?;
    }
    // `accept` gives up every `ACCEPT_TICK`, so that a waiting thread sees shutdown begin
    // and, after `THREAD_KEEP` without a client, ends.
    socket.set_read_timeout(Some(ACCEPT_TICK))?;
    // Linux copies these options from the listening socket to every accepted one, which
    // saves two system calls per client connection (`prepare_client_socket` sets them on
    // other systems). Small messages must not wait for Nagle's algorithm, and the timeout
    // bounds every write to a client. (The read timeout is copied too;
    // `prepare_client_socket` replaces it with `--client-timeout`.)
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(settings.client_timeout))?;
    socket.bind(&addr.into())?;
    if let Err(err) = accept_when_data_arrives(&socket) {
        log::debug!("{addr}: connections are accepted before their first bytes: {err}");
    }
    socket.listen(LISTEN_BACKLOG)?;
    if settings.reuse_port {
        if let Err(err) = newest_takes_new_connections(&socket) {
            log::warn!(
                "--reuse-port: new connections will be spread over every instance on {addr}: {err}"
            );
        }
    }
    Ok(socket.into())
}

/// The address to connect to in order to wake a thread blocked in `accept` on `addr`: the
/// listener's own, with a wildcard IP (0.0.0.0 or ::) replaced by loopback, since connecting to a
/// wildcard address is not portable.
pub fn wake_address(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wake_address_replaces_wildcards_with_loopback() {
        let v4: SocketAddr = "0.0.0.0:8001".parse().unwrap();
        let v6: SocketAddr = "[::]:8001".parse().unwrap();
        let bound: SocketAddr = "127.0.0.2:8001".parse().unwrap();
        assert_eq!(wake_address(v4), "127.0.0.1:8001".parse().unwrap());
        assert_eq!(wake_address(v6), "[::1]:8001".parse().unwrap());
        assert_eq!(wake_address(bound), bound);
    }
}
