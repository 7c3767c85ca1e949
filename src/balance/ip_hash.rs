//! IP hash (phase 2): the client's IP address decides its backend, so a client keeps talking to
//! the same server (a simple form of session persistence) without any cookie or table.
//!
//! As in the chapter, the key is the MD5 of the IP address as text, read as one 128-bit number,
//! modulo the number of backends: the same computation as Python's
//! `int(hashlib.md5(ip.encode()).hexdigest(), 16) % len(backends)`, so the two agree on every
//! client. Modulo hashing moves most clients when the number of backends changes; consistent
//! hashing (`consistent_hash`) is the cure, and `loadbalancer simulate` shows the difference.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use md5::{Digest, Md5};

use super::{Balancer, Pick, Request};
use crate::backend::Backend;

/// IP hash: MD5 of the client IP modulo the number of backends, moving on to the next backend
/// when that one is unavailable.
#[derive(Debug, Default)]
pub struct IpHash;

impl IpHash {
    /// An IP-hash balancer. It has no state: the same IP and the same backend list always give
    /// the same backend, across restarts too.
    pub fn new() -> Self {
        IpHash
    }
}

/// The MD5 digest of the IP address as text (`127.0.0.2`). An IPv4 client seen through an IPv6
/// socket (`::ffff:127.0.0.2`) hashes as the IPv4 address it is.
pub(crate) fn md5_of_ip(ip: IpAddr) -> [u8; 16] {
    let mut text = [0u8; 64];
    let length = write_ip(ip.to_canonical(), &mut text);
    Md5::digest(&text[..length]).into()
}

/// Writes `ip` as text into `buffer` (an IPv6 address takes at most 39 bytes) and returns the
/// length. This runs on every request: IPv4 addresses are written by hand, which is several
/// times faster than the formatting machinery and needs no allocation.
fn write_ip(ip: IpAddr, buffer: &mut [u8; 64]) -> usize {
    let IpAddr::V4(v4) = ip else {
        let mut cursor = std::io::Cursor::new(&mut buffer[..]);
        let _ = write!(cursor, "{ip}");
        return usize::try_from(cursor.position()).unwrap_or(0);
    };
    let mut length = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buffer[length] = b'.';
            length += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for digit in &digits[skip..] {
            buffer[length] = b'0' + digit;
            length += 1;
        }
    }
    length
}

impl Balancer for IpHash {
    fn name(&self) -> &'static str {
        "ip-hash"
    }

    /// A client keeps its backend: at the backend's connection limit it waits in its queue,
    /// and slow start does not move it.
    fn chooses_freely(&self) -> bool {
        false
    }

    fn pick(
        &self,
        backends: &[Arc<Backend>],
        request: &Request,
        is_candidate: &dyn Fn(usize) -> bool,
    ) -> Option<Pick> {
        let count = backends.len();
        if count == 0 {
            return None;
        }
        let digest = md5_of_ip(request.client_ip);
        let hashed = (u128::from_be_bytes(digest) % count as u128) as usize;
        // nginx's ip_hash also moves on when the hashed backend is down. Walking to the next one
        // in order (rather than rehashing over the backends that are left) moves only the
        // clients of the unavailable backend; everyone else stays where they were.
        let index = (0..count)
            .map(|step| (hashed + step) % count)
            .find(|&i| is_candidate(i))?;
        let reason = if request.explain {
            explain(backends, request.client_ip, &digest, hashed, index)
        } else {
            String::new()
        };
        Some(Pick { index, reason })
    }
}

/// One line with the digest, the remainder, and where the request went.
fn explain(
    backends: &[Arc<Backend>],
    ip: IpAddr,
    digest: &[u8; 16],
    hashed: usize,
    index: usize,
) -> String {
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    let count = backends.len();
    let mut line = format!(
        "ip-hash: md5(\"{}\") = {hex}, mod {count} = {hashed} -> {}",
        ip.to_canonical(),
        backends[hashed].name()
    );
    if index != hashed {
        let skipped: Vec<&str> = (0..count)
            .map(|step| (hashed + step) % count)
            .take_while(|&i| i != index)
            .map(|i| backends[i].name())
            .collect();
        line.push_str(&format!(
            " unavailable, moved on to the next: {} (skipped {})",
            backends[index].name(),
            skipped.join(", ")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::{backends, request_from};

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn pick(balancer: &IpHash, all: &[Arc<Backend>], client: IpAddr) -> usize {
        balancer
            .pick(all, &request_from(client, false), &|_| true)
            .unwrap()
            .index
    }

    #[test]
    fn agrees_with_the_chapters_python() {
        // int(hashlib.md5(ip.encode()).hexdigest(), 16) % 3, computed in Python.
        let all = backends(&[1, 1, 1]);
        let cases = [("127.0.0.1", 0), ("127.0.0.2", 2), ("10.0.0.1", 0)];
        for (client, expected) in cases {
            let client: IpAddr = client.parse().unwrap();
            assert_eq!(pick(&IpHash::new(), &all, client), expected, "{client}");
        }
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(pick(&IpHash::new(), &all, mapped), 2);
    }

    #[test]
    fn addresses_are_hashed_as_their_usual_text() {
        let mut buffer = [0u8; 64];
        for text in [
            "0.0.0.0",
            "10.20.30.40",
            "192.168.100.255",
            "::1",
            "2001:db8::8:800:200c:417a",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let length = write_ip(ip, &mut buffer);
            assert_eq!(&buffer[..length], text.as_bytes());
        }
    }

    #[test]
    fn the_same_ip_lands_on_the_same_backend_across_restarts() {
        let all = backends(&[1, 1, 1, 1]);
        let before: Vec<usize> = (0..200)
            .map(|n| pick(&IpHash::new(), &all, ip(n)))
            .collect();
        let running = IpHash::new();
        for _ in 0..3 {
            let again: Vec<usize> = (0..200).map(|n| pick(&running, &all, ip(n))).collect();
            assert_eq!(again, before);
        }
        // Every backend gets some of the 200 clients.
        assert!((0..4).all(|b| before.contains(&b)));
    }

    #[test]
    fn only_the_clients_of_an_unavailable_backend_move() {
        let all = backends(&[1, 1, 1]);
        let balancer = IpHash::new();
        for n in 0..300 {
            let client = request_from(ip(n), false);
            let home = balancer.pick(&all, &client, &|_| true).unwrap().index;
            let now = balancer.pick(&all, &client, &|i| i != 1).unwrap().index;
            let expected = if home == 1 { 2 } else { home };
            assert_eq!(now, expected, "client {}", ip(n));
        }
        assert!(balancer
            .pick(&all, &request_from(ip(1), false), &|_| false)
            .is_none());
    }

    #[test]
    fn explains_with_the_hash_and_the_remainder() {
        let all = backends(&[1, 1, 1]);
        let client = request_from("127.0.0.2".parse().unwrap(), true);
        let pick = IpHash::new().pick(&all, &client, &|_| true).unwrap();
        assert_eq!(
            pick.reason,
            "ip-hash: md5(\"127.0.0.2\") = ab416c39d509e72c5a0a7451a45bc65e, mod 3 = 2 -> b2"
        );
        let moved = IpHash::new().pick(&all, &client, &|i| i != 2).unwrap();
        assert_eq!(moved.index, 0);
        assert!(moved
            .reason
            .ends_with("-> b2 unavailable, moved on to the next: b0 (skipped b2)"));
    }
}
