//! Run-time control of the backends: `GET /backends` lists them, and
//! `POST /backends/{name}/ready|drain|maint` and `POST /backends/{name}/weight` change one (see
//! [`crate::eligibility`] for what each state lets in). `{name}` is the backend's name as the
//! statistics page shows it (`127.0.0.1:8001`), percent-encoded where needed; its address
//! (`10.0.0.3:8000` for `app:8000 (10.0.0.3)`) names it too.
//!
//! Each change is one atomic store, so a request sees the backend before or after it, never
//! half-changed; it is logged and becomes an event of the backend on the statistics page.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::admin_state::{self, AdminState};
use crate::backend::Backend;
use crate::http::percent;
use crate::proxy::LoadBalancer;
use crate::stats::events::EventKind;

/// An answer of the API: a status and a JSON body.
pub(super) type Answer = (u16, Value);

/// `GET /backends`: every backend with its state, weight and what is open on it.
pub(super) fn list(lb: &LoadBalancer) -> Answer {
    let backends: Vec<Value> = lb.backends().iter().map(|b| describe(b)).collect();
    (200, json!({ "backends": backends }))
}

/// One backend as the API shows it.
pub(super) fn describe(backend: &Backend) -> Value {
    json!({
        "name": backend.name(),
        "address": backend.addr().to_string(),
        "admin_state": backend.admin_state().name(),
        "healthy": backend.is_healthy(),
        "weight": backend.weight(),
        "configured_weight": backend.configured_weight(),
        "in_flight": backend.stats().active(),
        "tunnels": backend.stats().tunnels().active(),
        "max_conns": backend.limit().max(),
        "queue": backend.limit().queue_length(),
    })
}

/// A write to `/backends/{name}/{action}` (`rest` is what follows `/backends/`), with the
/// `weight` the query or the form gave, from `who`.
pub(super) fn change(lb: &LoadBalancer, rest: &str, weight: Option<&str>, who: IpAddr) -> Answer {
    let Some((encoded, action)) = rest.rsplit_once('/') else {
        return bad("POST /backends/{name}/ready, drain, maint or weight".to_string());
    };
    let backends = lb.backends();
    let Some(backend) = find(&backends, encoded) else {
        let known: Vec<&str> = backends.iter().map(|b| b.name()).collect();
        let error = format!("no backend named '{}'", percent::decode(encoded));
        return (404, json!({ "error": error, "known": known }));
    };
    if action == "weight" {
        let Some(text) = weight else {
            return bad("send weight=N in the body or the query, N from 0 to 256".to_string());
        };
        return match admin_state::parse_weight(text) {
            Ok(weight) => set_weight(lb, backend, weight, who),
            Err(why) => bad(why),
        };
    }
    match action.parse::<AdminState>() {
        Ok(state) => set_state(backend, state, who),
        Err(_) => bad(format!(
            "unknown action '{action}': ready, drain, maint or weight"
        )),
    }
}

fn bad(error: String) -> Answer {
    (400, json!({ "error": error }))
}

/// The backend `encoded` names: by its name, or by its address.
fn find<'b>(backends: &'b [Arc<Backend>], encoded: &str) -> Option<&'b Arc<Backend>> {
    let name = percent::decode(encoded);
    backends
        .iter()
        .find(|b| b.name() == name)
        .or_else(|| backends.iter().find(|b| b.addr().to_string() == name))
}

fn set_state(backend: &Backend, state: AdminState, who: IpAddr) -> Answer {
    let before = backend.set_admin_state(state);
    if before != state {
        let out = match state {
            AdminState::Ready => (backend.weight() > 0).then_some(false),
            AdminState::Drain | AdminState::Maint => Some(true),
        };
        let message = format!("{} set to {state} from {who}", backend.name());
        record(backend, message, out);
    }
    let mut answer = describe(backend);
    answer["previous_state"] = json!(before.name());
    (200, answer)
}

fn set_weight(lb: &LoadBalancer, backend: &Backend, weight: u32, who: IpAddr) -> Answer {
    let before = backend.weight();
    backend.set_run_time_weight(weight);
    if before == 0 && weight > 0 {
        // Back into rotation: with --slow-start, gradually.
        backend.ramp().start();
    }
    if before != weight {
        let set = lb.snapshot();
        set.balancer().weights_changed(set.backends());
        let ready = backend.admin_state() == AdminState::Ready;
        let out = match (before, weight) {
            (_, 0) => Some(true),
            (0, _) => ready.then_some(false),
            _ => None,
        };
        let message = format!(
            "weight of {} {before} -> {weight} from {who}",
            backend.name()
        );
        record(backend, message, out);
    }
    let mut answer = describe(backend);
    answer["previous_weight"] = json!(before);
    (200, answer)
}

/// Logs a change and makes it an event of the backend; `out` says whether it took the backend
/// out of rotation or put it back (the page's charts shade the time out).
fn record(backend: &Backend, message: String, out: Option<bool>) {
    log::info!("{message}");
    let kind = EventKind::Admin { out };
    backend.stats().push_event(backend.name(), kind, message);
}

/// The value of `name` in a query or form body (`a=1&b=2`), decoded.
pub(super) fn field(fields: &str, name: &str) -> Option<String> {
    fields
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| percent::decode(key) == name)
        .map(|(_, value)| percent::decode(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_fields_are_percent_decoded() {
        assert_eq!(percent::decode("%5B%3A%3A1%5D:8001"), "[::1]:8001");
        assert_eq!(
            percent::decode("app:8000%20(10.0.0.3)"),
            "app:8000 (10.0.0.3)"
        );
        assert_eq!(percent::decode("a+b%zz%4"), "a b%zz%4");
        assert_eq!(
            field("weight=3&token=a%2Bb", "token").as_deref(),
            Some("a+b")
        );
        assert_eq!(field("weight=3", "weight").as_deref(), Some("3"));
        assert_eq!(field("weights=3", "weight"), None);
    }
}
