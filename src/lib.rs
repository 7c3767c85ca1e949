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
//! | 2 | [`balance`] | weighted round robin, least connections, IP hash, consistent hash |
//! | 2 | [`simulate`] | the offline simulator comparing the algorithms |
//! | 3 | [`health`] | active and passive health checks |
//! | 4 | [`sticky`], [`stats`], [`report`], [`admin`] | cookie sessions, statistics pages |
//! | all | [`cli`], [`settings`], [`startup`], [`error`] | flags, settings, wiring and Ctrl-C, error statuses |
//! | all | [`access_log`], [`client_addr`] | one line per request; the client behind another proxy |
//! | all | [`descriptors`], [`warnings`], [`plural`] | the file-descriptor budget, warnings limited to one a second, counts in words |
//! | — | [`demo`] | the demo backend the examples and tests run behind the balancer |
//!
//! # Reading one request
//!
//! One phase-1 request, from `accept` to the backend's answer, file by file:
//!
//! 1. `phases/phase1_rr.rs`: the flags, a [`proxy::LoadBalancer`] with round robin, and
//!    [`startup::run`], which binds the port and serves.
//! 2. `server/mod.rs`: a client thread accepts the connection and serves it
//!    (`client_thread` -> `serve_one`).
//! 3. `proxy/connection.rs`: [`proxy::ClientConnection`] reads each request head and forwards
//!    it (`serve` -> `handle` -> `forward`).
//! 4. `http/head.rs`: how a head is read (`read_request_head_until`, `read_head`).
//! 5. `proxy/request.rs`: the request checked (`check_request`) and rewritten for the backend
//!    (`write_request_head`).
//! 6. `balance/round_robin.rs`: which backend (`pick`).
//! 7. `proxy/exchange.rs`: one try against that backend: a connection, the request sent, the
//!    response read and relayed (`try_backend` -> `exchange` -> `read_response` ->
//!    `relay_response`).
//! 8. `backend.rs`: a pooled keep-alive connection taken and given back (`connection`,
//!    `put_idle`).
//! 9. `http/body.rs`: how a body is framed and relayed (`response_body_length`, `relay_body`).
//!
//! Side rooms a first reading skips: how threads are kept and reused (`server/pool.rs`,
//! `server/socket.rs`, `server/drain.rs`), HTTPS ([`tls`], [`stream`]), tunnels
//! (`proxy/tunnel.rs`), retries (`next_attempt` and `may_retry` in `proxy/connection.rs`), the
//! read buffer (`http/buffer.rs`), and what phases 2-4 add.
//!
//! The I/O is blocking `std::net` with one OS thread per client connection, a deliberate choice:
//! every step of a request can be read top to bottom, as in the chapter's Python.
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod client_addr;
pub mod demo;
pub mod descriptors;
pub mod error;
pub mod health;
pub mod http;
pub mod plural;
pub mod proxy;
pub mod report;
pub mod server;
pub mod settings;
pub mod simulate;
pub mod startup;
pub mod stats;
pub mod sticky;
pub mod stream;
pub mod tls;
pub mod warnings;
