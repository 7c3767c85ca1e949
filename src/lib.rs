//! An HTTP/1.1 load balancer, built in the four phases of the course chapter
//! "Load Balancer Implementation" (로드 밸런서 구현).
//!
//! Each phase is a small binary in `phases/` that wires parts of this library together. The
//! modules follow the chapter:
//!
//! | phase | module | what it owns |
//! |---|---|---|
//! | 1 | [`server`], [`proxy`], [`http`] | listening, one thread per client, forwarding HTTP/1.1 |
//! | 1 | [`proxy`] (`tunnel.rs`) | WebSocket and every `Upgrade`: a tunnel after `101 Switching Protocols` |
//! | 1 | [`tls`], [`stream`] | HTTPS: certificates, the TLS listener's configuration, the client's stream |
//! | 1 | [`balance`] (`RoundRobin`) | choosing a backend |
//! | 1 | [`backend`], [`stats`] | the backends, their connection pools and counters |
//! | 1 | [`dns`] | backends named by DNS: every address a backend, resolved again |
//! | 2 | [`balance`] | weighted round robin, least connections, IP hash, consistent hash |
//! | 2 | [`simulate`] | the offline simulator comparing the algorithms |
//! | 3 | [`health`] | active and passive health checks |
//! | 3 | [`eligibility`], [`admin_state`], [`slow_start`] | which backends may take a request: health, drain, maint and weight set at run time, backups, panic, slow start |
//! | 4 | [`sticky`], [`stats`], [`report`], [`admin`] | cookie sessions, statistics pages |
//! | all | [`cli`], [`config`], [`settings`], [`startup`], [`error`] | flags, the configuration file, settings, wiring, error statuses |
//! | all | [`reload`], [`signals`], [`ctl`] | reload without a restart (SIGHUP, `POST /reload`), signals, the `loadbalancer ctl` client |
//! | all | [`access_log`], [`client_addr`] | one line per request; the client behind another proxy |
//! | all | [`limit`] | a backend's limit on requests in flight (`--backend-max-conns`), and the queue of those waiting for room |
//! | all | [`descriptors`], [`memory`], [`warnings`], [`plural`] | the file-descriptor budget, the heap in use and held, warnings limited to one a second, counts in words |
//! | — | [`demo`] | the demo backend the examples and tests run behind the balancer |
//!
//! # Reading one request
//!
//! Before the walk, `phases/phase1_rr.rs` reads the flags, builds a [`proxy::LoadBalancer`] with
//! round robin and hands it to [`startup::run`], which binds the port and serves. From `accept`
//! to the answer, one phase-1 request meets these files and, in each, these functions
//! (`scripts/walk.py` prints and counts them; `tests/walk.rs` keeps the walk short):
//!
//! 1. `server/mod.rs`: a client thread accepts a connection and serves it (`client_thread`,
//!    `serve_one`).
//! 2. `proxy/connection.rs`: the loop over the connection's requests; each is checked, a
//!    backend chosen and the request forwarded (`serve`, `handle`, `forward`, `next_attempt`,
//!    `choose`).
//! 3. `http/head.rs`: how a head is read and parsed (`read_request_head_until`, `read_head`,
//!    `find_head_end`, `parse_request_head`, `parse_request_into`, `wants_keep_alive`,
//!    `read_response_head`, `parse_response_head`, `parse_response_into`).
//! 4. `balance/round_robin.rs`: which backend (`pick`).
//! 5. `proxy/exchange.rs`: one try against that backend: a connection, the request sent, the
//!    response read and relayed (`try_backend`, `open_connection`, `connect`, `request_bytes`,
//!    `exchange`, `read_response`, `relay_response`, `client_response_head`, `release`).
//! 6. `backend.rs`: a pooled keep-alive connection taken and given back
//!    (`Backend::connection`, `connect`, `put_idle`).
//! 7. `proxy/request.rs`: the heads each side sees (`write_request_head`, `write_request_line`,
//!    `copy_end_to_end_fields`, `push_forwarded_fields`, `write_response_head`).
//! 8. `http/body.rs`: how the response body is framed and relayed (`response_body_length`,
//!    `relay_body`, `relay_exact`, `refill`).
//!
//! Side rooms a first reading skips, each entered in one line from the walk: how threads are
//! kept and reused (`server/pool.rs`, `server/socket.rs`, `server/drain.rs`), which backends
//! are candidates beside health ([`eligibility`]: drain, maintenance and weight set at run time,
//! backups, the panic threshold, slow start, room under a connection limit), the wait for room
//! (`proxy/queue.rs`, `wait_for_room`), HTTPS ([`tls`], [`stream`]), tunnels
//! (`proxy/tunnel.rs`), retries (`may_retry`, `resend_on_fresh`), what is refused and the error
//! answers (`proxy/checks.rs`, `proxy/outcome.rs`, `reject_head`,
//! `fail`), request bodies (a GET has none: `take_body_prefix`, `send_rest_of_body`), RFC
//! corners (interim responses, absolute-form targets, other HTTP versions in
//! `http/version.rs`), the read and write buffers (`http/buffer.rs`, [`http::Sink`]), the
//! hop-by-hop table (`http/hop_by_hop.rs`), counters, logs and passive health (`account`), the
//! queue of requests waiting for a backend connection (`idle_or_turn`), a backend's connection
//! limit and the queue of requests waiting for room under it (`wait_for_room` in
//! `proxy/queue.rs`, [`limit`]), whether the client's
//! connection stays open (`keeps_alive`), the access log and the client's address behind another
//! proxy (`proxy/access.rs`: `handle_logged` finds the client and wraps `handle`, and
//! `reject_logged` wraps `reject_head`, with a line each when `--access-log` is on), reload
//! (`busy` takes the latest backend set), and what phases 2-4 add (`--explain`, sticky
//! sessions). Constructors and functions whose name says all a first
//! reading needs (`ClientConnection::new`, `into_stream`, `content_length`) are not listed.
//!
//! The I/O is blocking `std::net` with one OS thread per client connection, a deliberate choice:
//! every step of a request can be read top to bottom, as in the chapter's Python.
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod admin_state;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod client_addr;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod descriptors;
pub mod dns;
pub mod eligibility;
pub mod error;
pub mod health;
pub mod http;
pub mod limit;
pub mod memory;
pub mod plural;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod server;
pub mod settings;
pub mod signals;
pub mod simulate;
pub mod slow_start;
pub mod startup;
pub mod stats;
pub mod sticky;
pub mod stream;
pub mod tls;
pub mod warnings;
