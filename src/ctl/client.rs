//! The requests `ctl` sends to the admin listener, and what a failure says.
//!
//! Each is one blocking `ureq` call bounded by [`REQUEST_TIMEOUT`], connecting included: the
//! admin listener answers one request per connection and closes it, so a client has nothing to
//! keep open between two. ureq 2 returns an error status (4xx, 5xx) as an `Err` holding the
//! response, whose JSON body says why; that becomes [`CtlError::Refused`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::status::{BackendStatus, Open, StateChange};
use crate::http::percent;

/// How long one request to the admin listener may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The most characters of an unexpected answer quoted in an error message.
const QUOTE_CHARS: usize = 120;

/// Why a `ctl` command failed; each is one line on standard error and exit code 1.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum CtlError {
    /// No connection to the admin listener, or no whole answer from it in time.
    Unreachable { admin: SocketAddr, why: String },
    /// The balancer answered an error status with the control API's JSON error: its message,
    /// and for an unknown backend the names it knows.
    Refused {
        status: u16,
        message: String,
        known: Vec<String>,
    },
    /// The backend is not among those `GET /backends` lists.
    NotListed { name: String, known: Vec<String> },
    /// An answer that is not the control API's JSON: a balancer older than this client, or
    /// something else listening on the port.
    Unexpected { status: u16, why: String },
    /// `drain --wait` waited its whole timeout and the backend still has something open.
    StillOpen {
        name: String,
        open: Open,
        waited: Duration,
    },
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Unreachable { admin, why } => write!(
                f,
                "cannot reach the admin listener at {admin}: {why} (is the balancer running? \
                 give its admin address with --admin)"
            ),
            CtlError::Refused {
                status,
                message,
                known,
            } => {
                write!(f, "{message} (HTTP {status})")?;
                // 403 is the answer to a missing or wrong token, whatever the message says.
                if *status == 403 {
                    f.write_str(
                        "; a write may need the balancer's admin token: --token T or \
                         LB_ADMIN_TOKEN",
                    )?;
                }
                write_known(f, known)
            }
            CtlError::NotListed { name, known } => {
                write!(f, "no backend named {name}")?;
                write_known(f, known)
            }
            CtlError::Unexpected { status, why } => write!(
                f,
                "unexpected answer from the admin listener (HTTP {status}): {why}; is the \
                 balancer older than `loadbalancer ctl`?"
            ),
            CtlError::StillOpen { name, open, waited } => write!(
                f,
                "{name} is not drained after {}: {open}",
                duration_text(*waited)
            ),
        }
    }
}

/// `; known backends: A, B` after an error about a backend's name, when there are any.
fn write_known(f: &mut fmt::Formatter<'_>, known: &[String]) -> fmt::Result {
    if known.is_empty() {
        Ok(())
    } else {
        write!(f, "; known backends: {}", known.join(", "))
    }
}

/// A duration as `--timeout` takes it: `500ms`, `60s`.
fn duration_text(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// The admin listener's control API, one blocking request at a time.
pub(super) struct AdminClient {
    admin: SocketAddr,
    /// The `Authorization` field's value, when there is a token.
    authorization: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client of the admin listener at `admin`, sending `token` (if any) with every request.
    pub(super) fn new(admin: SocketAddr, token: Option<&str>) -> AdminClient {
        let agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .redirects(0)
            .user_agent(concat!("loadbalancer-ctl/", env!("CARGO_PKG_VERSION")))
            .build();
        AdminClient {
            admin,
            // An empty LB_ADMIN_TOKEN is taken as none rather than as an empty token.
            authorization: token
                .filter(|token| !token.is_empty())
                .map(|token| format!("Bearer {token}")),
            agent,
        }
    }

    /// `GET /backends`: every backend.
    pub(super) fn backends(&self) -> Result<Vec<BackendStatus>, CtlError> {
        let json = self.send(self.agent.get(&self.url("/backends")), None)?;
        let unexpected = |why: String| CtlError::Unexpected { status: 200, why };
        json.get("backends")
            .and_then(Value::as_array)
            .ok_or_else(|| unexpected(format!("no 'backends' list in {json}")))?
            .iter()
            .map(|backend| BackendStatus::from_json(backend).map_err(unexpected))
            .collect()
    }

    /// The backend named `name`, as `GET /backends` lists it.
    pub(super) fn backend(&self, name: &str) -> Result<BackendStatus, CtlError> {
        let backends = self.backends()?;
        let known = backends.iter().map(|b| b.name.clone()).collect();
        backends
            .into_iter()
            .find(|b| b.name == name)
            .ok_or_else(|| CtlError::NotListed {
                name: name.to_string(),
                known,
            })
    }

    /// `POST /backends/{name}/{state}`: the backend's state before and after.
    pub(super) fn set_state(&self, name: &str, state: &str) -> Result<StateChange, CtlError> {
        let url = self.url(&format!("/backends/{}/{state}", percent::encode_name(name)));
        let (previous, now) = self.change(self.agent.post(&url), b"", "previous_state")?;
        Ok(StateChange {
            name: now.name,
            previous: previous.as_str().unwrap_or_default().to_string(),
            now: now.admin_state,
        })
    }

    /// `POST /backends/{name}/weight` with the form body `weight=N`: the weight before, and
    /// the backend afterwards.
    pub(super) fn set_weight(
        &self,
        name: &str,
        weight: u32,
    ) -> Result<(u64, BackendStatus), CtlError> {
        let url = self.url(&format!("/backends/{}/weight", percent::encode_name(name)));
        let request = self
            .agent
            .post(&url)
            .set("Content-Type", "application/x-www-form-urlencoded");
        let body = format!("weight={weight}");
        let (previous, now) = self.change(request, body.as_bytes(), "previous_weight")?;
        Ok((previous.as_u64().unwrap_or_default(), now))
    }

    /// Sends a write with `body`: the answer's `previous` field (a string or a number, never
    /// null) and the backend afterwards.
    fn change(
        &self,
        request: ureq::Request,
        body: &[u8],
        previous: &str,
    ) -> Result<(Value, BackendStatus), CtlError> {
        let json = self.send(request, Some(body))?;
        let unexpected = |why: String| CtlError::Unexpected { status: 200, why };
        let now = BackendStatus::from_json(&json).map_err(unexpected)?;
        match json.get(previous) {
            Some(value) if value.is_string() || value.is_u64() => Ok((value.clone(), now)),
            _ => Err(unexpected(format!("no '{previous}' in {json}"))),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Sends `request` (with `body`, for a POST) and reads its JSON answer; an error status
    /// becomes the error its body states.
    fn send(&self, request: ureq::Request, body: Option<&[u8]>) -> Result<Value, CtlError> {
        let request = match &self.authorization {
            Some(value) => request.set("Authorization", value),
            None => request,
        };
        // A body, even an empty one, goes with its Content-Length (RFC 9112 section 6.3).
        let answer = match body {
            Some(body) => request.send_bytes(body),
            None => request.call(),
        };
        match answer {
            Ok(response) => {
                let text = self.body_of(response)?;
                serde_json::from_str(&text).map_err(|_| CtlError::Unexpected {
                    status: 200,
                    why: quote(&text),
                })
            }
            Err(ureq::Error::Status(status, response)) => {
                Err(error_answer(status, &self.body_of(response)?))
            }
            Err(ureq::Error::Transport(transport)) => Err(CtlError::Unreachable {
                admin: self.admin,
                why: transport_failure(&transport),
            }),
        }
    }

    /// The body of an answer as text (ureq reads at most 10 MB of it).
    fn body_of(&self, response: ureq::Response) -> Result<String, CtlError> {
        response.into_string().map_err(|err| CtlError::Unreachable {
            admin: self.admin,
            why: format!("the answer broke off: {err}"),
        })
    }
}

/// The error an error status's body states: the control API's `{"error": ..., "known": [...]}`,
/// or, when the body is something else, that body quoted.
fn error_answer(status: u16, body: &str) -> CtlError {
    let json: Value = serde_json::from_str(body).unwrap_or_default();
    let Some(message) = json.get("error").and_then(Value::as_str) else {
        return CtlError::Unexpected {
            status,
            why: quote(body),
        };
    };
    let known = json
        .get("known")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    CtlError::Refused {
        status,
        message: message.to_string(),
        known,
    }
}

/// The first line of an unexpected answer, shortened, in quotes.
fn quote(body: &str) -> String {
    let line = body.lines().next().unwrap_or_default().trim();
    let short: String = line.chars().take(QUOTE_CHARS).collect();
    if short.len() < line.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

/// Why no answer came, the way an operator says it: refused, no answer in time, reset.
fn transport_failure(transport: &ureq::Transport) -> String {
    let mut source = std::error::Error::source(transport);
    while let Some(err) = source {
        if let Some(io_err) = err.downcast_ref::<io::Error>() {
            return match io_err.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".into(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                    format!("no answer within {}", duration_text(REQUEST_TIMEOUT))
                }
                io::ErrorKind::ConnectionReset => "connection reset".into(),
                _ => io_err.to_string(),
            };
        }
        source = err.source();
    }
    transport.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn an_error_answer_says_the_servers_why() {
        let unknown = error_answer(
            404,
            r#"{"error": "no backend 127.0.0.1:9", "known": ["127.0.0.1:8001", "127.0.0.1:8002"]}"#,
        );
        assert_eq!(
            unknown.to_string(),
            "no backend 127.0.0.1:9 (HTTP 404); known backends: 127.0.0.1:8001, 127.0.0.1:8002"
        );
        let bad = error_answer(400, r#"{"error": "weight must be 0 to 256"}"#);
        assert_eq!(bad.to_string(), "weight must be 0 to 256 (HTTP 400)");
        let refused = error_answer(403, r#"{"error": "missing token"}"#).to_string();
        assert_eq!(
            refused,
            "missing token (HTTP 403); a write may need the balancer's admin token: --token T \
             or LB_ADMIN_TOKEN"
        );
    }

    #[test]
    fn an_answer_that_is_not_the_apis_json_is_quoted() {
        // The admin listener of a balancer without the control API answers in plain text.
        let old = error_answer(404, "not found: try /stats\n").to_string();
        assert!(
            old.contains(r#"(HTTP 404): "not found: try /stats""#),
            "{old}"
        );
        let long = error_answer(502, &"x".repeat(500)).to_string();
        let shortened = format!("{:?}...", "x".repeat(QUOTE_CHARS));
        assert!(long.contains(&shortened), "{long}");
        let no_message = error_answer(500, r#"{"result": "error"}"#);
        assert!(matches!(
            no_message,
            CtlError::Unexpected { status: 500, .. }
        ));
    }

    #[test]
    fn a_drain_that_timed_out_says_what_is_open() {
        let json = serde_json::json!({
            "name": "127.0.0.1:8001", "admin_state": "drain", "healthy": true, "weight": 1,
            "configured_weight": 1, "in_flight": 1, "tunnels": 0,
        });
        let still = CtlError::StillOpen {
            name: "127.0.0.1:8001".into(),
            open: Open::on(&BackendStatus::from_json(&json).unwrap()),
            waited: Duration::from_millis(500),
        };
        assert_eq!(
            still.to_string(),
            "127.0.0.1:8001 is not drained after 500ms: 1 request in flight, no tunnel open"
        );
        assert_eq!(duration_text(Duration::from_secs(60)), "60s");
    }

    #[test]
    fn nothing_listening_is_unreachable_with_a_hint() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let text = AdminClient::new(addr, None)
            .backends()
            .unwrap_err()
            .to_string();
        let expected = format!("cannot reach the admin listener at {addr}: connection refused");
        assert!(text.starts_with(&expected), "{text}");
        assert!(text.contains("--admin"), "{text}");
    }
}
