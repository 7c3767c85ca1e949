//! Signed sticky cookies: the session's backend written into the cookie itself, signed with
//! HMAC-SHA256, so that any balancer holding the same secret routes it without a table.
//!
//! The cookie value is `v1.<backend id>.<expiry>.<signature>`: the backend id is the first 8 hex
//! digits of SHA-256 over the backend's resolved address (`127.0.0.1:8001`), as nginx's `sticky
//! cookie` hashes the address rather than the backend's position in the list; the expiry is in
//! Unix seconds; the signature is the HMAC-SHA256 of everything before it, in hex. Two instances
//! with the same secret and backends issue and accept the same cookies, and a restart forgets
//! nothing. A client can read which backend its cookie names, but cannot forge one.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::cookie_values;
use crate::http::HeaderFields;

/// The shortest secret accepted: 16 bytes, as a 128-bit key is the least HMAC-SHA256 needs
/// to resist guessing offline from one cookie.
pub const MIN_SECRET_LEN: usize = 16;

/// The version prefix of the cookie format, so that a later format can be told apart.
const VERSION: &str = "v1";

/// The secret of `--sticky-secret`. Its `Debug` does not show it, so that it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret given on the command line or in `LB_STICKY_SECRET`.
    pub fn new(text: &str) -> Self {
        Secret(text.to_string())
    }

    /// How long it is, in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

/// A backend's name in a signed cookie: 32 bits of SHA-256 over its resolved address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendId(u32);

impl BackendId {
    /// The id of the backend at `addr`. Every instance resolving the same address agrees on it,
    /// whatever the backend's position in the list.
    pub fn of(addr: SocketAddr) -> Self {
        let digest = Sha256::digest(addr.to_string().as_bytes());
        BackendId(u32::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]))
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// What a request's signed cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A valid cookie naming backend number `backend`, expiring at `expires` (Unix seconds).
    Valid {
        /// The backend's index in the list.
        backend: usize,
        /// When the cookie stops being honoured.
        expires: u64,
    },
    /// No usable cookie: the request is balanced as a new session.
    Rejected(Rejection),
}

/// Why a cookie was not honoured; each is treated as no cookie at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The request carries no session cookie.
    Missing,
    /// The value is not `v1.<id>.<expiry>.<signature>`.
    Malformed,
    /// The signature does not match: edited, or signed with another secret.
    BadSignature,
    /// The expiry has passed.
    Expired,
    /// The signature is good but no backend of this list has that id.
    UnknownBackend,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Missing => "no session cookie",
            Rejection::Malformed => "malformed cookie",
            Rejection::BadSignature => "bad signature",
            Rejection::Expired => "expired cookie",
            Rejection::UnknownBackend => "cookie names no backend of this list",
        })
    }
}

/// Issues and checks signed session cookies for one list of backends.
pub struct SignedCookies {
    cookie_name: String,
    ttl: Duration,
    /// The key, ready to be cloned for each signature (cheaper than keying it again).
    mac: Hmac<Sha256>,
    /// Each backend's id, by its index in the list.
    ids: Vec<BackendId>,
}

impl fmt::Debug for SignedCookies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCookies")
            .field("cookie_name", &self.cookie_name)
            .field("ttl", &self.ttl)
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

impl SignedCookies {
    /// Signed cookies named `cookie_name`, valid for `ttl` after they are issued, for the
    /// backends at `addrs` (in the balancer's order). The secret's length is checked by the
    /// caller (see [`MIN_SECRET_LEN`]); HMAC takes a key of any length.
    pub fn new(cookie_name: &str, ttl: Duration, secret: &Secret, addrs: &[SocketAddr]) -> Self {
        SignedCookies {
            cookie_name: cookie_name.to_string(),
            // A cookie lives at least a second: its expiry is in whole seconds.
            ttl: ttl.max(Duration::from_secs(1)),
            mac: Hmac::new_from_slice(secret.0.as_bytes()).expect("HMAC takes keys of any length"),
            ids: addrs.iter().map(|&addr| BackendId::of(addr)).collect(),
        }
    }

    /// The name of the session cookie.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// The id the cookie of backend number `backend` carries.
    pub fn id_of(&self, backend: usize) -> BackendId {
        self.ids[backend]
    }

    /// What the request's cookies say, now. With several cookies of the name, the first valid
    /// one counts; with none valid, the first one's rejection is reported.
    pub fn check(&self, headers: &HeaderFields) -> Verdict {
        self.check_at(headers, unix_now())
    }

    /// [`check`](Self::check) at `now` (Unix seconds).
    pub fn check_at(&self, headers: &HeaderFields, now: u64) -> Verdict {
        let mut first_rejection = None;
        for value in cookie_values(headers, &self.cookie_name) {
            match self.verify(value, now) {
                Ok((backend, expires)) => return Verdict::Valid { backend, expires },
                Err(why) => {
                    first_rejection.get_or_insert(why);
                }
            }
        }
        Verdict::Rejected(first_rejection.unwrap_or(Rejection::Missing))
    }

    /// Whether a valid cookie expiring at `expires` should be replaced by a fresh one: once an
    /// eighth of its lifetime has passed. A session then ends after between 7/8 of the TTL and
    /// the TTL without a request, close to the table's "TTL after the last use", while a busy
    /// client gets a new cookie at most eight times per TTL rather than on every response.
    pub fn needs_renewal(&self, expires: u64, now: u64) -> bool {
        let ttl = self.ttl.as_secs();
        expires.saturating_sub(now) < ttl - ttl / 8
    }

    /// [`needs_renewal`](Self::needs_renewal) now.
    pub fn needs_renewal_now(&self, expires: u64) -> bool {
        self.needs_renewal(expires, unix_now())
    }

    /// The `Set-Cookie` value naming backend number `backend`, valid for the TTL from now.
    pub fn set_cookie(&self, backend: usize) -> String {
        self.set_cookie_at(backend, unix_now())
    }

    /// [`set_cookie`](Self::set_cookie) as issued at `now` (Unix seconds).
    pub fn set_cookie_at(&self, backend: usize, now: u64) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Lax",
            self.cookie_name,
            self.value(backend, now + self.ttl.as_secs())
        )
    }

    /// The cookie value naming backend number `backend`, expiring at `expires`.
    fn value(&self, backend: usize, expires: u64) -> String {
        let signed = format!("{VERSION}.{}.{expires}", self.ids[backend]);
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        let signature = hex(&mac.finalize().into_bytes());
        format!("{signed}.{signature}")
    }

    /// Checks one cookie value: its form, then its signature (before anything it says is
    /// believed), then its expiry and backend.
    fn verify(&self, value: &[u8], now: u64) -> Result<(usize, u64), Rejection> {
        let text = std::str::from_utf8(value).map_err(|_| Rejection::Malformed)?;
        let (signed, signature) = text.rsplit_once('.').ok_or(Rejection::Malformed)?;
        let mut parts = signed.split('.');
        let (Some(VERSION), Some(id), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Rejection::Malformed);
        };
        let id = (id.len() == 8)
            .then(|| u32::from_str_radix(id, 16).ok())
            .flatten()
            .filter(|_| id.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(Rejection::Malformed)?;
        let expires: u64 = Some(expires)
            .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|e| e.parse().ok())
            .ok_or(Rejection::Malformed)?;
        let signature = unhex(signature).ok_or(Rejection::Malformed)?;
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        // `verify_slice` compares in constant time, so the time a wrong guess takes says
        // nothing about how many of its bytes were right.
        mac.verify_slice(&signature)
            .map_err(|_| Rejection::BadSignature)?;
        if expires <= now {
            return Err(Rejection::Expired);
        }
        let backend = self
            .ids
            .iter()
            .position(|&known| known == BackendId(id))
            .ok_or(Rejection::UnknownBackend)?;
        Ok((backend, expires))
    }
}

/// Seconds since the Unix epoch (0 if the clock is set before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lowercase hex text, as [`hex`] writes it; `None` for anything else, so that a
/// signature has exactly one spelling.
fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn addrs() -> Vec<SocketAddr> {
        ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    fn cookies(secret: &str) -> SignedCookies {
        SignedCookies::new(
            "SESSION_ID",
            Duration::from_secs(800),
            &Secret::new(secret),
            &addrs(),
        )
    }

    /// The request headers of a client sending back the cookie of a `Set-Cookie` value.
    fn sent_back(set_cookie: &str) -> HeaderFields {
        let pair = set_cookie.split(';').next().unwrap().to_string();
        HeaderFields::from_pairs(&[("Cookie", pair.as_bytes())])
    }

    fn value_of(set_cookie: &str) -> String {
        let pair = set_cookie.split(';').next().unwrap();
        pair.split_once('=').unwrap().1.to_string()
    }

    #[test]
    fn a_cookie_names_its_backend_and_expiry() {
        let signed = cookies("a secret of sixteen+ bytes");
        let set = signed.set_cookie_at(1, NOW);
        let value = value_of(&set);
        let parts: Vec<&str> = value.split('.').collect();
        assert_eq!(parts.len(), 4, "{value}");
        assert_eq!(parts[0], "v1");
        assert_eq!(parts[1], BackendId::of(addrs()[1]).to_string());
        assert_eq!(parts[2], (NOW + 800).to_string());
        assert_eq!(parts[3].len(), 64);
        assert!(set.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{set}");
        assert_eq!(
            signed.check_at(&sent_back(&set), NOW + 1),
            Verdict::Valid {
                backend: 1,
                expires: NOW + 800
            }
        );
    }

    #[test]
    fn another_instance_with_the_same_secret_agrees() {
        let set = cookies("shared secret, 16 bytes or more").set_cookie_at(2, NOW);
        let other = cookies("shared secret, 16 bytes or more");
        assert!(matches!(
            other.check_at(&sent_back(&set), NOW),
            Verdict::Valid { backend: 2, .. }
        ));
    }

    #[test]
    fn ids_follow_the_address_not_the_position() {
        let set = cookies("same secret everywhere!!").set_cookie_at(0, NOW);
        let mut reordered = addrs();
        reordered.reverse();
        let other = SignedCookies::new(
            "SESSION_ID",
            Duration::from_secs(800),
            &Secret::new("same secret everywhere!!"),
            &reordered,
        );
        assert!(matches!(
            other.check_at(&sent_back(&set), NOW),
            Verdict::Valid { backend: 2, .. }
        ));
        // A list without that backend does not know the id.
        let fewer = SignedCookies::new(
            "SESSION_ID",
            Duration::from_secs(800),
            &Secret::new("same secret everywhere!!"),
            &addrs()[1..],
        );
        assert_eq!(
            fewer.check_at(&sent_back(&set), NOW),
            Verdict::Rejected(Rejection::UnknownBackend)
        );
    }

    #[test]
    fn another_secret_or_any_edit_is_refused() {
        let signed = cookies("the right secret, long enough");
        let set = signed.set_cookie_at(0, NOW);
        let other = cookies("another secret, long enough!!");
        assert_eq!(
            other.check_at(&sent_back(&set), NOW),
            Verdict::Rejected(Rejection::BadSignature)
        );
        // Every single-character edit of the value is refused, wherever it is.
        let value = value_of(&set);
        for i in 0..value.len() {
            let mut edited = value.clone().into_bytes();
            edited[i] = match edited[i] {
                b'.' => b'0',
                b'0' => b'1',
                _ => b'0',
            };
            let edited = String::from_utf8(edited).unwrap();
            let headers = sent_back(&format!("SESSION_ID={edited}"));
            assert!(
                matches!(signed.check_at(&headers, NOW), Verdict::Rejected(_)),
                "{edited} accepted"
            );
        }
    }

    #[test]
    fn a_cookie_naming_another_backend_cannot_be_made_without_the_secret() {
        let signed = cookies("the right secret, long enough");
        let value = value_of(&signed.set_cookie_at(0, NOW));
        let forged = value.replacen(
            &BackendId::of(addrs()[0]).to_string(),
            &BackendId::of(addrs()[1]).to_string(),
            1,
        );
        assert_eq!(
            signed.check_at(&sent_back(&format!("SESSION_ID={forged}")), NOW),
            Verdict::Rejected(Rejection::BadSignature)
        );
    }

    #[test]
    fn expired_and_malformed_cookies_are_refused() {
        let signed = cookies("the right secret, long enough");
        let set = signed.set_cookie_at(0, NOW);
        assert_eq!(
            signed.check_at(&sent_back(&set), NOW + 800),
            Verdict::Rejected(Rejection::Expired)
        );
        for value in [
            "",
            "v1",
            "v2.00000000.1.00",
            "v1.xyz.1.00",
            "v1.0000000g.1.00",
            "v1.00000000.-1.00",
            "v1.00000000.1.0",
            "v1.00000000.1.zz",
            "v1.00000000.1.2.00",
        ] {
            let headers = sent_back(&format!("SESSION_ID={value}"));
            assert_eq!(
                signed.check_at(&headers, NOW),
                Verdict::Rejected(Rejection::Malformed),
                "{value}"
            );
        }
        assert_eq!(
            signed.check_at(&HeaderFields::from_pairs(&[]), NOW),
            Verdict::Rejected(Rejection::Missing)
        );
    }

    #[test]
    fn the_first_valid_cookie_counts() {
        let signed = cookies("the right secret, long enough");
        let good = value_of(&signed.set_cookie_at(2, NOW));
        let headers = HeaderFields::from_pairs(&[(
            "Cookie",
            format!("SESSION_ID=junk; other=1; SESSION_ID=\"{good}\"").as_bytes(),
        )]);
        assert!(matches!(
            signed.check_at(&headers, NOW),
            Verdict::Valid { backend: 2, .. }
        ));
    }

    #[test]
    fn renewal_comes_after_an_eighth_of_the_lifetime() {
        let signed = cookies("the right secret, long enough");
        let expires = NOW + 800;
        assert!(!signed.needs_renewal(expires, NOW));
        assert!(!signed.needs_renewal(expires, NOW + 100));
        assert!(signed.needs_renewal(expires, NOW + 101));
    }

    #[test]
    fn the_secret_stays_out_of_debug_output() {
        let secret = Secret::new("do not print me, ever");
        assert_eq!(format!("{secret:?}"), "Secret(hidden)");
        let signed = SignedCookies::new("S", Duration::from_secs(1), &secret, &addrs());
        assert!(!format!("{signed:?}").contains("do not print"));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(unhex("000fff"), Some(vec![0, 15, 255]));
        assert_eq!(unhex("000fFF"), None);
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("+f"), None);
    }
}
