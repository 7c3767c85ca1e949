//! The value parsers behind the flags: plain functions, each error naming the offending input,
//! unit-tested in `cli/mod.rs`. clap calls them as each flag is read, and the configuration file's
//! values go through the same ones.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::sticky::signed::Secret;

/// Parses `--sticky-secret`. Its length is checked at start-up rather than here, because clap
/// would repeat a refused value in its error message.
pub fn parse_secret(text: &str) -> Result<Secret, String> {
    Ok(Secret::new(text))
}

/// One `--backend HOST:PORT[=WEIGHT]` flag: a literal address, or a name resolved later (at
/// start-up, by each reload and every `--resolve-interval`).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    /// The address as the user wrote it, used in logs and statistics.
    pub name: String,
    /// The socket address when the user wrote an IP address; `None` for a name.
    pub addr: Option<SocketAddr>,
    /// The host part: an IP address or a name.
    pub host: String,
    /// The port.
    pub port: u16,
    /// Relative share of traffic for weighted algorithms; at least 1.
    pub weight: u32,
    /// The backend's own connection limit (`max_conns` in its table of the configuration
    /// file), which wins over `--backend-max-conns`.
    pub max_conns: Option<u32>,
}

/// How the configuration file writes a backend's `max_conns` after its address and weight:
/// `app:8000=3,max_conns=4`. The command line accepts it too, but documents only
/// `HOST:PORT[=WEIGHT]`: a per-backend limit is the file's feature.
const MAX_CONNS_SUFFIX: &str = ",max_conns=";

/// The statistics listener's address, or none when `--admin off`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdminAddr(pub Option<SocketAddr>);

/// Parses `HOST:PORT[=WEIGHT]`; the weight defaults to 1 and must not be 0. A backend table of
/// the configuration file with `max_conns` adds `,max_conns=N`.
///
/// ```
/// use lb::cli::parse_backend_spec;
///
/// let spec = parse_backend_spec("127.0.0.1:8001=5").unwrap();
/// assert_eq!((spec.port, spec.weight, spec.max_conns), (8001, 5, None));
/// assert_eq!(parse_backend_spec("app:8000").unwrap().addr, None, "a name, resolved later");
/// assert!(parse_backend_spec("127.0.0.1:8001=0").is_err());
/// let spec = parse_backend_spec("127.0.0.1:8001=5,max_conns=4").unwrap();
/// assert_eq!((spec.weight, spec.max_conns), (5, Some(4)));
/// ```
pub fn parse_backend_spec(text: &str) -> Result<BackendSpec, String> {
    let (text, max_conns) = match text.split_once(MAX_CONNS_SUFFIX) {
        Some((text, max)) => {
            let max = parse_count(max).map_err(|why| format!("max_conns: {why}"))?;
            (text, Some(max))
        }
        None => (text, None),
    };
    let (address, weight) = match text.split_once('=') {
        Some((address, weight)) => {
            let weight: u32 = weight
                .parse()
                .map_err(|_| format!("weight '{weight}' is not a whole number"))?;
            if weight == 0 {
                return Err("weight must be at least 1".to_string());
            }
            (address, weight)
        }
        None => (text, 1),
    };
    let not_an_address = || format!("'{address}' is not a HOST:PORT address");
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(BackendSpec {
            name: address.to_string(),
            addr: Some(addr),
            host: addr.ip().to_string(),
            port: addr.port(),
            weight,
            max_conns,
        });
    }
    let (host, port) = address.rsplit_once(':').ok_or_else(not_an_address)?;
    let port: u16 = port.parse().map_err(|_| not_an_address())?;
    // A name: letters, digits, `-`, `_` and dots (an IPv6 address goes in brackets).
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if host.is_empty() || !host.chars().all(is_name_char) {
        return Err(not_an_address());
    }
    Ok(BackendSpec {
        name: address.to_string(),
        addr: None,
        host: host.to_string(),
        port,
        weight,
        max_conns,
    })
}

/// Parses `HOST:PORT` (a literal IP or a name that resolves) into one socket address.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let not_an_address = || format!("'{text}' is not a HOST:PORT address");
    if !text.contains(':') {
        return Err(not_an_address());
    }
    text.to_socket_addrs()
        .map_err(|_| not_an_address())?
        .next()
        .ok_or_else(not_an_address)
}

/// The plain listener's address, or none when `--listen off` (HTTPS only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListenAddr(pub Option<SocketAddr>);

/// Parses `--listen`: an address, or `off` (no plain listener).
pub fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        Ok(ListenAddr(None))
    } else {
        parse_addr(text).map(|addr| ListenAddr(Some(addr)))
    }
}

/// Parses `--admin`: an address, or `off`.
pub fn parse_admin(text: &str) -> Result<AdminAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        Ok(AdminAddr(None))
    } else {
        parse_addr(text).map(|addr| AdminAddr(Some(addr)))
    }
}

/// Parses a duration: `500ms`, `5s`, `1m`, `1h`, or a bare number of seconds.
///
/// ```
/// use std::time::Duration;
/// use lb::cli::parse_duration;
///
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
/// assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit_ms) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (text, 1_000)
    };
    // Only digits: `u64::from_str` would also take a leading `+`.
    let number: u64 = Some(number)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!("'{text}' is not a duration (try 500ms, 5s, 1m, 1h or a number of seconds)")
        })?;
    number
        .checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("'{text}' is too long a duration"))
}

/// Parses a duration that must not be zero (a zero health interval would probe in a busy loop).
pub fn parse_nonzero_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("'{text}' must be longer than zero")),
        duration => Ok(duration),
    }
}

/// Parses a count of at least 1, such as `--rise` or `--max-fails`.
pub fn parse_count(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{text}' is not a whole number of at least 1")),
    }
}

/// Parses `--health-path`: an absolute path, as it goes on the request line.
pub fn parse_health_path(text: &str) -> Result<String, String> {
    if text.starts_with('/') && !text.contains(|c: char| c.is_whitespace() || c.is_control()) {
        Ok(text.to_string())
    } else {
        Err(format!("'{text}' is not a path starting with /"))
    }
}

/// Parses a cookie name: an RFC 9110 token (letters, digits and ``!#$%&'*+-.^_`|~``).
pub fn parse_cookie_name(text: &str) -> Result<String, String> {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !text.is_empty() && text.chars().all(is_token_char) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "'{text}' is not a cookie name (letters, digits, - and _)"
        ))
    }
}

/// Parses a whole number of at least 1.
pub fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{text}' is not a whole number of at least 1")),
    }
}
