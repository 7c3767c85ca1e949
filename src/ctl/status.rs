//! A backend as the control API describes it, and what `ctl` prints from it: the `list` table,
//! the line of a state or weight change, and the words for what a drain still waits for.

use std::fmt::{self, Write as _};

use serde_json::Value;

use crate::plural;

/// One backend as `GET /backends` and the writes describe it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BackendStatus {
    /// `HOST:PORT`, as the statistics page shows it.
    pub(super) name: String,
    /// `ready`, `drain` or `maint`: what the operator asked for.
    pub(super) admin_state: String,
    /// What the health checks say.
    pub(super) healthy: bool,
    /// The weight in use, which a `weight` command may have changed.
    pub(super) weight: u64,
    /// The weight the flags or the configuration file gave.
    pub(super) configured_weight: u64,
    /// Requests in flight on it, tunnels included.
    pub(super) in_flight: u64,
    /// Open WebSocket (or other `Upgrade`) tunnels.
    pub(super) tunnels: u64,
}

impl BackendStatus {
    /// Reads one backend object of the control API's JSON; the error names the missing field.
    pub(super) fn from_json(json: &Value) -> Result<BackendStatus, String> {
        let text = |key: &str| {
            json.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("no text '{key}' in {json}"))
        };
        let number = |key: &str| {
            json.get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("no number '{key}' in {json}"))
        };
        Ok(BackendStatus {
            name: text("name")?,
            admin_state: text("admin_state")?,
            healthy: json
                .get("healthy")
                .and_then(Value::as_bool)
                .ok_or_else(|| format!("no true or false 'healthy' in {json}"))?,
            weight: number("weight")?,
            configured_weight: number("configured_weight")?,
            in_flight: number("in_flight")?,
            tunnels: number("tunnels")?,
        })
    }

    /// The weight in use, with the configured one beside it when an operator changed it.
    fn weight_text(&self) -> String {
        if self.weight == self.configured_weight {
            self.weight.to_string()
        } else {
            format!("{} (configured {})", self.weight, self.configured_weight)
        }
    }
}

/// The backends as a table under a header line, each column as wide as its widest cell, like
/// `ps` or `kubectl get`: plain text that lines up in a terminal and splits on spaces in a script.
pub(super) fn table(backends: &[BackendStatus]) -> String {
    let header = ["NAME", "STATE", "HEALTH", "WEIGHT", "IN FLIGHT", "TUNNELS"].map(String::from);
    let rows: Vec<[String; 6]> = backends
        .iter()
        .map(|b| {
            [
                b.name.clone(),
                b.admin_state.clone(),
                (if b.healthy { "up" } else { "DOWN" }).to_string(),
                b.weight_text(),
                b.in_flight.to_string(),
                b.tunnels.to_string(),
            ]
        })
        .collect();
    let all: Vec<&[String; 6]> = std::iter::once(&header).chain(&rows).collect();
    let widths: Vec<usize> = (0..6)
        .map(|column| all.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in all {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What a `ready`, `drain` or `maint` command changed, printed as `NAME: ready -> drain`.
pub(super) struct StateChange {
    /// The backend.
    pub(super) name: String,
    /// Its state before the command.
    pub(super) previous: String,
    /// Its state now.
    pub(super) now: String,
}

impl fmt::Display for StateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.previous == self.now {
            write!(f, "{}: {} (unchanged)", self.name, self.now)
        } else {
            write!(f, "{}: {} -> {}", self.name, self.previous, self.now)
        }
    }
}

/// The line of a `weight` command, `NAME: weight 1 -> 0`, with the configured weight when the
/// new one differs from it (an operator may want to set it back).
pub(super) fn weight_change(old: u64, new: &BackendStatus) -> String {
    let mut line = if old == new.weight {
        format!("{}: weight {old} (unchanged)", new.name)
    } else {
        format!("{}: weight {old} -> {}", new.name, new.weight)
    };
    if new.weight != new.configured_weight {
        let _ = write!(line, " (configured {})", new.configured_weight);
    }
    line
}

/// What is open on a backend, which a drain waits to see end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Open {
    /// Requests in flight, tunnels included (the control API counts a tunnel as the request
    /// that opened it).
    requests: u64,
    /// Open tunnels.
    tunnels: u64,
}

impl Open {
    /// What is open on `backend`.
    pub(super) fn on(backend: &BackendStatus) -> Open {
        Open {
            requests: backend.in_flight,
            tunnels: backend.tunnels,
        }
    }

    /// Whether nothing is: the backend can be stopped without cutting a client off.
    pub(super) fn is_nothing(&self) -> bool {
        self.requests == 0 && self.tunnels == 0
    }
}

/// `3 requests in flight, 1 tunnel open`; `nothing in flight, no tunnel open`.
impl fmt::Display for Open {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.requests {
            0 => f.write_str("nothing in flight")?,
            n => write!(f, "{} in flight", plural::count(n, "request"))?,
        }
        match self.tunnels {
            0 => f.write_str(", no tunnel open"),
            n => write!(f, ", {} open", plural::count(n, "tunnel")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend(name: &str, state: &str, weights: (u64, u64), open: (u64, u64)) -> BackendStatus {
        BackendStatus::from_json(&json!({
            "name": name, "admin_state": state, "healthy": state != "maint",
            "weight": weights.0, "configured_weight": weights.1,
            "in_flight": open.0, "tunnels": open.1,
        }))
        .unwrap()
    }

    #[test]
    fn the_list_is_an_aligned_table() {
        let backends = [
            backend("127.0.0.1:8001", "ready", (1, 1), (0, 0)),
            backend("[::1]:8002", "drain", (0, 3), (12, 1)),
            backend("app.internal:80", "maint", (2, 2), (0, 0)),
        ];
        let expected = "\
NAME             STATE  HEALTH  WEIGHT            IN FLIGHT  TUNNELS
127.0.0.1:8001   ready  up      1                 0          0
[::1]:8002       drain  up      0 (configured 3)  12         1
app.internal:80  maint  DOWN    2                 0          0
";
        assert_eq!(table(&backends), expected);
        assert_eq!(
            table(&[]),
            "NAME  STATE  HEALTH  WEIGHT  IN FLIGHT  TUNNELS\n"
        );
    }

    #[test]
    fn a_backend_with_a_missing_field_is_refused_by_name() {
        let mut json = json!({
            "name": "b:1", "admin_state": "ready", "healthy": true, "weight": 1,
            "configured_weight": 1, "in_flight": 0,
        });
        let why = BackendStatus::from_json(&json).unwrap_err();
        assert!(why.contains("'tunnels'"), "{why}");
        json["tunnels"] = json!(-1);
        assert!(BackendStatus::from_json(&json).is_err());
        json["tunnels"] = json!(0);
        json["healthy"] = json!("yes");
        let why = BackendStatus::from_json(&json).unwrap_err();
        assert!(why.contains("'healthy'"), "{why}");
    }

    #[test]
    fn what_is_open_agrees_with_its_numbers() {
        let open = |requests, tunnels| Open { requests, tunnels }.to_string();
        assert_eq!(open(0, 0), "nothing in flight, no tunnel open");
        assert_eq!(open(1, 0), "1 request in flight, no tunnel open");
        assert_eq!(open(3, 1), "3 requests in flight, 1 tunnel open");
        assert_eq!(open(2, 2), "2 requests in flight, 2 tunnels open");
        assert!(Open::on(&backend("b:1", "drain", (1, 1), (0, 0))).is_nothing());
        assert!(!Open::on(&backend("b:1", "drain", (1, 1), (0, 1))).is_nothing());
    }

    #[test]
    fn changes_read_as_before_and_after() {
        let change = |previous: &str, now: &str| {
            StateChange {
                name: "127.0.0.1:8001".into(),
                previous: previous.into(),
                now: now.into(),
            }
            .to_string()
        };
        assert_eq!(change("ready", "drain"), "127.0.0.1:8001: ready -> drain");
        assert_eq!(
            change("maint", "maint"),
            "127.0.0.1:8001: maint (unchanged)"
        );
        let after = |weights| backend("b:1", "ready", weights, (0, 0));
        assert_eq!(
            weight_change(1, &after((0, 1))),
            "b:1: weight 1 -> 0 (configured 1)"
        );
        assert_eq!(weight_change(0, &after((3, 3))), "b:1: weight 0 -> 3");
        assert_eq!(
            weight_change(3, &after((3, 3))),
            "b:1: weight 3 (unchanged)"
        );
    }
}
