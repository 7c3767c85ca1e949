//! Backends named by DNS, over real sockets: every address a name resolves to is a backend;
//! addresses appearing and disappearing add and drain backends (through a resolver the test
//! scripts); `localhost` end to end; a name that does not resolve yet answers 503.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use common::{backends_hit, count, eventually, get, stats_json, Balancer, DemoBackend, WAIT};
use lb::balance::RoundRobin;
use lb::cli::CommonArgs;
use lb::dns::{Resolver, ScriptedResolver};
use lb::proxy::LoadBalancer;
use lb::reload::{Rebuild, Reloader};
use lb::server::Server;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    common: CommonArgs,
}

/// The flags for `app:PORT`, resolved by `resolver`, resolved again every 50 ms.
fn app_flags(port: u16, resolver: &Arc<ScriptedResolver>) -> CommonArgs {
    let backend = format!("app:{port}");
    let mut flags = Flags::try_parse_from([
        "lb",
        "--backend",
        &backend,
        "--listen",
        "127.0.0.1:0",
        "--resolve-interval",
        "50ms",
    ])
    .unwrap()
    .common;
    flags.resolver = Resolver(resolver.clone());
    flags
}

fn build(args: &CommonArgs) -> LoadBalancer {
    LoadBalancer::new(
        args.backends(&[1, 1, 1]),
        Box::new(RoundRobin::new()),
        args.settings(),
    )
}

/// A demo backend named `name` on `ip:port`.
fn demo_on(ip: &str, port: u16, name: &str) -> lb::demo::DemoBackend {
    let listener = TcpListener::bind((ip, port)).unwrap();
    lb::demo::start(listener, name.to_string(), Duration::ZERO).unwrap()
}

#[test]
fn addresses_appearing_and_disappearing_add_and_drain_backends() {
    // Two backends on the same port of two loopback addresses, as two replicas of one service.
    let first = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = first.local_addr().unwrap().port();
    let _a = lb::demo::start(first, "a".to_string(), Duration::ZERO).unwrap();
    let _b = demo_on("127.0.0.3", port, "b");
    let resolver = Arc::new(ScriptedResolver::default());
    resolver.answer("app", &["127.0.0.2"]);

    let args = app_flags(port, &resolver);
    let lb = Arc::new(build(&args));
    let script = Arc::clone(&resolver);
    let rebuild: Rebuild = Box::new(move || {
        let args = app_flags(port, &script);
        Ok((build(&args), args))
    });
    let reloader = Arc::new(Reloader::new(rebuild, args.clone()));
    reloader.install(&lb);
    let server = Server::bind(lb.startup_settings()).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let shutdown = server.shutdown_handle().unwrap();
    let serving = {
        let lb = Arc::clone(&lb);
        thread::spawn(move || server.serve(lb))
    };
    reloader.watch_names(&lb).unwrap();

    assert_eq!(backends_hit(addr, 3), ["a", "a", "a"]);
    let names: Vec<String> = lb.backends().iter().map(|b| b.name().to_string()).collect();
    assert_eq!(names, [format!("app:{port} (127.0.0.2)")]);

    resolver.answer("app", &["127.0.0.2", "127.0.0.3"]);
    assert!(eventually(WAIT, || lb.backends().len() == 2));
    let hits = count(&backends_hit(addr, 4));
    assert_eq!((hits.get("a"), hits.get("b")), (Some(&2), Some(&2)));
    let kept = Arc::clone(&lb.backends()[0]);
    assert!(
        kept.stats().requests() >= 5,
        "the kept backend kept its statistics"
    );

    resolver.answer("app", &["127.0.0.3"]);
    assert!(eventually(WAIT, || lb.backends().len() == 1));
    assert_eq!(backends_hit(addr, 3), ["b", "b", "b"]);
    let (applied, refused) = lb.stats().reloads().counts();
    assert_eq!((applied, refused), (2, 0));
    let last = lb.stats().reloads().last().unwrap();
    assert!(
        last.message
            .contains(&format!("removed app:{port} (127.0.0.2)")),
        "{}",
        last.message
    );

    // The name stops resolving: its backends stay (a resolver out for a moment must not empty
    // the list), and the statistics say the name waits for DNS.
    resolver.answer("app", &[]);
    assert!(eventually(WAIT, || lb.stats().unresolved() == [format!("app:{port}")]));
    assert_eq!(
        lb.backends().len(),
        1,
        "a resolver failing keeps the last addresses"
    );
    assert_eq!(backends_hit(addr, 2), ["b", "b"]);

    shutdown.shutdown();
    reloader.stop_checks();
    serving.join().unwrap();
}

#[test]
fn localhost_is_every_address_it_resolves_to_end_to_end() {
    let backend = DemoBackend::start("local");
    let port = backend.addr.port();
    let spec = format!("localhost:{port}");
    let lb = Balancer::start(
        env!("CARGO_BIN_EXE_loadbalancer"),
        &[
            "--backend",
            &spec,
            "--admin",
            "127.0.0.1:0",
            "--health-check",
            "none",
        ],
    );
    // Where localhost is also ::1, nothing listens there: that try fails before any byte went
    // out and the request goes on to 127.0.0.1.
    for _ in 0..4 {
        let response = get(lb.addr, "/");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-backend"), Some("local"));
    }
    let stats = stats_json(&lb);
    let names: Vec<&str> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&format!("{spec} (127.0.0.1)").as_str()),
        "{names:?}"
    );
}

#[test]
fn a_name_that_does_not_resolve_yet_starts_the_balancer_with_503s() {
    let lb = Balancer::start(
        env!("CARGO_BIN_EXE_loadbalancer"),
        &[
            "--backend",
            "not-yet.invalid:8000",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    assert!(lb
        .log()
        .contains("backend not-yet.invalid:8000 does not resolve"));
    let response = get(lb.addr, "/");
    assert_eq!(response.status, 503);
    assert!(response.header("retry-after").is_some());
    let stats = stats_json(&lb);
    assert_eq!(stats["unresolved"][0], "not-yet.invalid:8000");
    assert!(get(lb.admin.unwrap(), "/stats")
        .text()
        .contains("waiting for DNS"));
}
