//! Sticky sessions (phase 4, "Cookie 기반 Sticky Session"): which backend each session belongs to.
//!
//! A session is named by a cookie holding a UUID v4. The [`SessionTable`] maps it to a backend,
//! bounded by `--max-sessions` (the least recently used session is evicted first) and forgetting
//! sessions idle longer than `--session-ttl`, so a flood of cookie-less clients cannot grow it.
//! The chapter's version kept an unbounded dict and read the cookie with a regex that could not
//! match its own hyphenated UUIDs; here the `Cookie` header is parsed as RFC 6265 §4.2 lays it out.
//!
//! With `--sticky-secret`, [`signed`] replaces the table: the cookie itself names the backend and
//! is signed, so that several balancers (or one restarted) agree without sharing a table.

pub mod signed;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::http::HeaderFields;

/// The cookie name used unless `--cookie-name` says otherwise.
pub const DEFAULT_COOKIE: &str = "SESSION_ID";

/// How sticky sessions are kept: in this balancer's table, or in signed cookies.
#[derive(Debug)]
pub enum Sticky {
    /// The chapter's way: a table of session ids, in this process only.
    Table(SessionTable),
    /// Stateless: the cookie names its backend and is signed (`--sticky-secret`).
    Signed(signed::SignedCookies),
}

/// Sessions and the backends they belong to, bounded in size and in idle time.
#[derive(Debug)]
pub struct SessionTable {
    cookie_name: String,
    ttl: Duration,
    max_sessions: usize,
    inner: Mutex<Sessions>,
}

/// The table itself: entries by id, and the same ids ordered by last use, so the least recently
/// used one (the first to expire and the first to evict) is found in O(log n).
#[derive(Debug, Default)]
struct Sessions {
    by_id: HashMap<u128, Entry>,
    by_use: BTreeMap<u64, u128>,
    /// Increases with every use; an entry's `stamp` is its key in `by_use`.
    clock: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    backend: usize,
    last_used: Instant,
    stamp: u64,
}

impl SessionTable {
    /// A table for the cookie `cookie_name`, forgetting sessions idle for `ttl` and holding at
    /// most `max_sessions` (at least one).
    pub fn new(cookie_name: &str, ttl: Duration, max_sessions: usize) -> Self {
        SessionTable {
            cookie_name: cookie_name.to_string(),
            ttl,
            max_sessions: max_sessions.max(1),
            inner: Mutex::new(Sessions::default()),
        }
    }

    /// The name of the session cookie.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// How many sessions the table holds now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most sessions the table holds.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// The backend of session `id`, if the table knows it and it has not expired; counts as a use.
    pub fn backend_of(&self, id: Uuid) -> Option<usize> {
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.expire(now, self.ttl);
        sessions.touch(id.as_u128(), now).map(|entry| entry.backend)
    }

    /// Remembers that session `id` belongs to `backend`, evicting the least recently used
    /// session when the table is full.
    pub fn remember(&self, id: Uuid, backend: usize) {
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.expire(now, self.ttl);
        sessions.insert(id.as_u128(), backend, now, self.max_sessions);
    }

    /// The session id a request carries in its cookie, if it carries a well-formed one.
    pub fn session_in(&self, headers: &HeaderFields) -> Option<Uuid> {
        cookie_values(headers, &self.cookie_name)
            .find_map(|value| std::str::from_utf8(value).ok()?.parse().ok())
    }

    /// The `Set-Cookie` value that gives a client session `id`.
    pub fn set_cookie(&self, id: Uuid) -> String {
        format!("{}={id}; Path=/; HttpOnly; SameSite=Lax", self.cookie_name)
    }

    /// Takes over the sessions of `old` (the table before a reload), each moved to its
    /// backend's new position by `new_index`; a session whose backend is gone is forgotten, so
    /// its next request is balanced anew (its session moves). The least recently used come
    /// first, so the newest sessions are the ones kept if this table is smaller.
    pub fn carry_over(&self, old: &SessionTable, new_index: impl Fn(usize) -> Option<usize>) {
        let entries: Vec<(u128, Entry)> = {
            let old = old.lock();
            old.by_use
                .values()
                .filter_map(|id| Some((*id, *old.by_id.get(id)?)))
                .collect()
        };
        let mut sessions = self.lock();
        for (id, entry) in entries {
            if let Some(backend) = new_index(entry.backend) {
                sessions.insert(id, backend, entry.last_used, self.max_sessions);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sessions> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sessions {
    /// Drops sessions idle for `ttl` or longer, oldest first, stopping at the first fresh one.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((&stamp, &id)) = self.by_use.first_key_value() {
            let idle = self.by_id.get(&id).map_or(Duration::MAX, |e| {
                now.saturating_duration_since(e.last_used)
            });
            if idle < ttl {
                return;
            }
            self.by_use.remove(&stamp);
            self.by_id.remove(&id);
        }
    }

    /// Marks session `id` as used now and returns it, if present.
    fn touch(&mut self, id: u128, now: Instant) -> Option<Entry> {
        let stamp = self.next_stamp();
        let entry = self.by_id.get_mut(&id)?;
        self.by_use.remove(&entry.stamp);
        self.by_use.insert(stamp, id);
        entry.stamp = stamp;
        entry.last_used = now;
        Some(*entry)
    }

    fn insert(&mut self, id: u128, backend: usize, now: Instant, max_sessions: usize) {
        let stamp = self.next_stamp();
        let entry = Entry {
            backend,
            last_used: now,
            stamp,
        };
        if let Some(old) = self.by_id.insert(id, entry) {
            self.by_use.remove(&old.stamp);
        }
        self.by_use.insert(stamp, id);
        while self.by_id.len() > max_sessions {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.by_id.remove(&oldest);
        }
    }

    fn next_stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// The values of every cookie called `name` across all `Cookie` header fields, in order.
///
/// RFC 6265 §4.2.1 writes cookies as `name=value` pairs separated by `; `; clients also send
/// several `Cookie` fields (HTTP/2 gateways split them), stray spaces, and values in double
/// quotes (§4.1.1), all of which are accepted here. Cookie names are case-sensitive.
pub fn cookie_values<'h>(
    headers: &'h HeaderFields,
    name: &'h str,
) -> impl Iterator<Item = &'h [u8]> {
    headers
        .values("cookie")
        .flat_map(|value| value.split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let equals = pair.iter().position(|&b| b == b'=')?;
            let (key, value) = (pair[..equals].trim_ascii(), pair[equals + 1..].trim_ascii());
            (key == name.as_bytes()).then(|| unquote(value))
        })
}

/// A cookie value without its surrounding double quotes, if it has them.
fn unquote(value: &[u8]) -> &[u8] {
    match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header fields with one `Cookie` field per value.
    fn cookies(values: &[&str]) -> HeaderFields {
        let pairs: Vec<(&str, &[u8])> = values.iter().map(|v| ("Cookie", v.as_bytes())).collect();
        HeaderFields::from_pairs(&pairs)
    }

    fn table(max: usize) -> SessionTable {
        SessionTable::new(DEFAULT_COOKIE, Duration::from_secs(60), max)
    }

    #[test]
    fn finds_the_session_among_other_cookies_and_fields() {
        let id = Uuid::new_v4();
        let sessions = table(10);
        let cases = [
            cookies(&[&format!("SESSION_ID={id}")]),
            cookies(&[&format!("a=1; SESSION_ID={id}; b=2")]),
            cookies(&[&format!("a=1;SESSION_ID = \"{id}\"  ;b=2")]),
            cookies(&["a=1; b", &format!("  SESSION_ID={id}")]),
            cookies(&["SESSION_ID=not-a-uuid", &format!("SESSION_ID={id}")]),
        ];
        for headers in cases {
            assert_eq!(sessions.session_in(&headers), Some(id), "{headers:?}");
        }
    }

    #[test]
    fn ignores_other_names_and_malformed_values() {
        let id = Uuid::new_v4();
        let sessions = table(10);
        let other_field = format!("SESSION_ID={id}");
        let cases = [
            cookies(&[&format!("session_id={id}")]),
            cookies(&[&format!("XSESSION_ID={id}")]),
            cookies(&["SESSION_ID=abc123"]),
            cookies(&["SESSION_ID"]),
            HeaderFields::from_pairs(&[("X-Cookie", other_field.as_bytes())]),
        ];
        for headers in cases {
            assert_eq!(sessions.session_in(&headers), None, "{headers:?}");
        }
    }

    #[test]
    fn remembers_and_moves_sessions() {
        let sessions = table(10);
        let id = Uuid::new_v4();
        assert_eq!(sessions.backend_of(id), None);
        sessions.remember(id, 2);
        assert_eq!(sessions.backend_of(id), Some(2));
        sessions.remember(id, 0);
        assert_eq!(sessions.backend_of(id), Some(0));
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn evicts_the_least_recently_used_when_full() {
        let sessions = table(3);
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for (i, &id) in ids[..3].iter().enumerate() {
            sessions.remember(id, i);
        }
        // Using the first session makes the second the least recently used.
        assert_eq!(sessions.backend_of(ids[0]), Some(0));
        sessions.remember(ids[3], 3);
        assert_eq!(sessions.len(), 3);
        assert_eq!(sessions.backend_of(ids[1]), None);
        assert_eq!(sessions.backend_of(ids[0]), Some(0));
        assert_eq!(sessions.backend_of(ids[3]), Some(3));
    }

    #[test]
    fn stays_bounded_under_a_flood() {
        let sessions = table(100);
        for i in 0..10_000 {
            sessions.remember(Uuid::new_v4(), i % 3);
        }
        assert_eq!(sessions.len(), 100);
        let inner = sessions.lock();
        assert_eq!(inner.by_use.len(), 100);
    }

    #[test]
    fn forgets_idle_sessions() {
        let sessions = SessionTable::new(DEFAULT_COOKIE, Duration::from_millis(30), 10);
        let id = Uuid::new_v4();
        sessions.remember(id, 1);
        assert_eq!(sessions.backend_of(id), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(sessions.backend_of(id), None);
        assert!(sessions.is_empty());
    }

    #[test]
    fn set_cookie_carries_the_attributes() {
        let sessions = SessionTable::new("SID", Duration::from_secs(1), 1);
        let id = Uuid::new_v4();
        assert_eq!(
            sessions.set_cookie(id),
            format!("SID={id}; Path=/; HttpOnly; SameSite=Lax")
        );
    }
}
