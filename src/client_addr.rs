//! Who the client is, when another proxy stands between it and the balancer.
//!
//! Behind an L4 balancer or a keepalived pair that terminates TCP, every connection comes from
//! the same address, so IP hash would send everyone to one backend and `X-Forwarded-For`, the
//! access log and the statistics would name the wrong client. Two ways tell the balancer who
//! really called, decided here and read from one place by everything that names the client:
//!
//! - `--accept-proxy`: each connection starts with a PROXY protocol header (version 1, a text
//!   line, or version 2, binary; HAProxy's specification, `proxy-protocol.txt`), read once per
//!   connection before anything else, TLS included. Its source address is the client's.
//! - `--trusted-proxy CIDR`: when the peer is one of these, the client is read per request from
//!   `X-Forwarded-For`, walking from the right past trusted addresses, as nginx's
//!   `real_ip_recursive on` does. A peer that is not trusted cannot choose its address.
//!
//! Sending the PROXY protocol on to backends is not done: it names one client per connection,
//! and pooled keep-alive connections to a backend carry many clients' requests.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::http::HeaderFields;

/// The PROXY protocol version 2 signature, the first 12 bytes of its header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 line, `\r\n` included (the specification's 107 bytes).
const V1_MAX: usize = 107;

/// The most bytes of addresses and TLVs a version 2 header may announce here. The addresses
/// take 216 bytes at most; the rest is room for the TLVs load balancers add.
const V2_MAX_BODY: usize = 2048;

/// A block of addresses such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a block of
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or a bare `ADDR`, naming the input in the error.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("'{text}' is not an address or a CIDR block (10.0.0.0/8, ::1/128)");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is in this block. An IPv4 address written as IPv6 (`::ffff:10.0.0.1`)
    /// counts as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Whether the first `prefix` bits of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    a & mask == b & mask
}

/// How the balancer finds its clients' addresses: the settings of `--accept-proxy` and
/// `--trusted-proxy`, and the count of connections refused for a bad PROXY header.
#[derive(Debug, Default)]
pub struct ClientAddresses {
    accept_proxy: bool,
    trusted: Vec<Cidr>,
    rejected: AtomicU64,
}

impl ClientAddresses {
    /// Addresses as `--accept-proxy` (`accept_proxy`) and `--trusted-proxy` (`trusted`) say.
    pub fn new(accept_proxy: bool, trusted: &[Cidr]) -> Self {
        ClientAddresses {
            accept_proxy,
            trusted: trusted.to_vec(),
            rejected: AtomicU64::new(0),
        }
    }

    /// Connections closed because they did not start with a valid PROXY header.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The client's address for a connection from `peer`: with `--accept-proxy`, the source
    /// its PROXY header names (or `peer` for a header that names none, as a health check's
    /// `LOCAL` does), read within `deadline`; without, `peer`. `None`: no valid header came,
    /// and the connection is to be closed (it is counted and logged at debug level).
    pub fn of_connection(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Option<SocketAddr> {
        if !self.accept_proxy {
            return Some(peer);
        }
        match read_proxy_header(stream, deadline) {
            Ok(source) => Some(source.unwrap_or(peer)),
            Err(err) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                log::debug!("client {peer}: closed: no valid PROXY protocol header: {err}");
                None
            }
        }
    }

    /// The client's address for one request that came over a connection from `connection`:
    /// when that is a trusted proxy, the rightmost address of `X-Forwarded-For` that is not
    /// trusted itself (or the leftmost, when all are); otherwise `connection`.
    pub fn of_request(&self, connection: IpAddr, fields: &HeaderFields) -> IpAddr {
        if !self.is_trusted(connection) {
            return connection;
        }
        let mut client = connection;
        let fields: Vec<&[u8]> = fields.values("x-forwarded-for").collect();
        for hop in fields
            .iter()
            .rev()
            .flat_map(|field| field.rsplit(|&b| b == b','))
        {
            // An entry that is not an address ends the walk: what lies left of it cannot be
            // told apart from what a client made up.
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    /// Whether `ip` is a `--trusted-proxy`.
    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|cidr| cidr.contains(ip))
    }
}

/// One `X-Forwarded-For` entry as an address: `1.2.3.4`, `2001:db8::1`, and with a port,
/// `1.2.3.4:5678` or `[2001:db8::1]:5678`.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

/// Why a connection's PROXY header was refused.
#[derive(Debug)]
pub enum HeaderError {
    /// Reading failed, or the client closed or went quiet before the header was complete.
    Io(io::Error),
    /// The bytes are not a PROXY header, or not a valid one.
    Invalid(&'static str),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Io(err) => write!(f, "reading it: {err}"),
            HeaderError::Invalid(why) => f.write_str(why),
        }
    }
}

impl From<io::Error> for HeaderError {
    fn from(err: io::Error) -> Self {
        HeaderError::Io(err)
    }
}

/// Reads a PROXY header from the start of `stream`, and not a byte more: what follows is the
/// client's TLS handshake or its request. Version 1 starts with `P`, version 2 with `\r`, so
/// the first byte tells them apart. `Ok(None)`: a valid header that names no client (`LOCAL`,
/// `UNKNOWN`, or an address family other than TCP over IPv4 or IPv6).
pub fn read_proxy_header(
    stream: &TcpStream,
    deadline: Instant,
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut first = [0u8; 1];
    read_exact(stream, &mut first, deadline)?;
    match first[0] {
        b'P' => read_v1(stream, deadline),
        b'\r' => read_v2(stream, deadline),
        _ => Err(HeaderError::Invalid(
            "the connection does not start with one",
        )),
    }
}

/// Reads the rest of a version 1 line (after its `P`). The line's end is found by peeking, so
/// that the bytes after it stay unread; bytes peeked without the end are taken, and the next
/// peek waits for more, so a header split across packets is read without spinning.
fn read_v1(mut stream: &TcpStream, deadline: Instant) -> Result<Option<SocketAddr>, HeaderError> {
    let mut line = vec![b'P'];
    let mut peeked = [0u8; V1_MAX];
    loop {
        check_deadline(deadline)?;
        let room = V1_MAX - line.len();
        let n = stream.peek(&mut peeked[..room])?;
        if n == 0 {
            return Err(HeaderError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let end = peeked[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |i| i + 1);
        stream.read_exact(&mut peeked[..take])?;
        line.extend_from_slice(&peeked[..take]);
        if end.is_some() {
            return parse_v1(&line).map_err(HeaderError::Invalid);
        }
        if line.len() >= V1_MAX {
            return Err(HeaderError::Invalid(
                "a version 1 line longer than 107 bytes",
            ));
        }
    }
}

/// Reads the rest of a version 2 header (after its first byte): 15 more bytes of fixed part,
/// then as many as its length field says.
fn read_v2(stream: &TcpStream, deadline: Instant) -> Result<Option<SocketAddr>, HeaderError> {
    let mut fixed = [0u8; 16];
    fixed[0] = b'\r';
    read_exact(stream, &mut fixed[1..], deadline)?;
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if fixed[..12] != V2_SIGNATURE {
        return Err(HeaderError::Invalid(
            "the connection does not start with one",
        ));
    }
    // A wrong version or command is refused before its body is waited for.
    if fixed[12] >> 4 != 2 || fixed[12] & 0x0f > 1 {
        return Err(HeaderError::Invalid(
            "a version 2 header of another version or command",
        ));
    }
    if length > V2_MAX_BODY {
        return Err(HeaderError::Invalid("a version 2 header longer than 2 KiB"));
    }
    let mut body = vec![0u8; length];
    read_exact(stream, &mut body, deadline)?;
    parse_v2(&fixed, &body).map_err(HeaderError::Invalid)
}

/// `read_exact`, checking `deadline` between reads (each read is bounded by the socket's
/// timeout).
fn read_exact(
    mut stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), HeaderError> {
    let mut filled = 0;
    while filled < buf.len() {
        check_deadline(deadline)?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(HeaderError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

fn check_deadline(deadline: Instant) -> Result<(), HeaderError> {
    if Instant::now() >= deadline {
        return Err(HeaderError::Io(io::ErrorKind::TimedOut.into()));
    }
    Ok(())
}

/// A version 1 line, `PROXY TCP4 SRC DST SPORT DPORT\r\n` (or `TCP6`, or `UNKNOWN` and
/// anything up to the end of the line).
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, &'static str> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or("a version 1 line not ending in CRLF")?;
    let line = std::str::from_utf8(line).map_err(|_| "a version 1 line that is not text")?;
    let mut words = line.split(' ');
    if words.next() != Some("PROXY") {
        return Err("the connection does not start with one");
    }
    let family = words.next().ok_or("a version 1 line without a protocol")?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = words.collect();
    let [source, _destination, source_port, _destination_port] = fields[..] else {
        return Err("a version 1 line without its four fields");
    };
    let ip: IpAddr = match family {
        "TCP4" => source.parse::<Ipv4Addr>().map(IpAddr::V4),
        "TCP6" => source.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => return Err("a version 1 protocol other than TCP4, TCP6 or UNKNOWN"),
    }
    .map_err(|_| "a version 1 source address that does not match its protocol")?;
    // Ports are decimal without leading zeros, as the specification writes them.
    let port: u16 = source_port
        .parse()
        .ok()
        .filter(|_| !source_port.starts_with('0') || source_port == "0")
        .ok_or("a version 1 source port that is not a port")?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// A version 2 header: the 16-byte fixed part, then `body` (addresses, then TLVs, ignored).
pub fn parse_v2(fixed: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, &'static str> {
    if fixed[..12] != V2_SIGNATURE {
        return Err("the connection does not start with one");
    }
    if fixed[12] >> 4 != 2 {
        return Err("a version 2 signature with another version");
    }
    match fixed[12] & 0x0f {
        // LOCAL: the proxy's own connection (a health check); the peer is the client.
        0 => return Ok(None),
        1 => {}
        _ => return Err("a version 2 command other than LOCAL or PROXY"),
    }
    // The high nibble is the address family, the low one the transport (TCP or UDP).
    match fixed[13] >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        2 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().map_err(|_| "short address")?;
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        1 | 2 => Err("a version 2 header too short for its addresses"),
        // UNSPEC or UNIX: no IP address to name.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        Cidr::parse(text).unwrap()
    }

    #[test]
    fn blocks_hold_the_addresses_of_their_prefix() {
        assert!(cidr("10.0.0.0/8").contains("10.200.3.4".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("127.0.0.1").contains("127.0.0.1".parse().unwrap()));
        assert!(!cidr("127.0.0.1").contains("127.0.0.2".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(cidr("2001:db8::/32").contains("2001:db8:1::1".parse().unwrap()));
        assert!(!cidr("2001:db8::/32").contains("10.0.0.1".parse().unwrap()));
        assert!(cidr("10.0.0.0/8").contains("::ffff:10.0.0.1".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "host/8",
            "10.0.0.0/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    fn client(addresses: &ClientAddresses, peer: &str, forwarded: &[&str]) -> String {
        let pairs: Vec<(&str, &[u8])> = forwarded
            .iter()
            .map(|value| ("X-Forwarded-For", value.as_bytes()))
            .collect();
        let fields = HeaderFields::from_pairs(&pairs);
        addresses
            .of_request(peer.parse().unwrap(), &fields)
            .to_string()
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_peers_only() {
        let trusted = [cidr("10.0.0.0/8"), cidr("127.0.0.1")];
        let addresses = ClientAddresses::new(false, &trusted);
        // An untrusted peer's field is not believed.
        assert_eq!(client(&addresses, "192.0.2.1", &["1.1.1.1"]), "192.0.2.1");
        // From the right, past trusted hops, to the first one that is not.
        let chain = ["6.6.6.6, 1.1.1.1, 10.0.0.2", "10.0.0.3"];
        assert_eq!(client(&addresses, "127.0.0.1", &chain), "1.1.1.1");
        // Every hop trusted: the leftmost.
        assert_eq!(
            client(&addresses, "10.0.0.9", &["10.1.1.1, 10.0.0.2"]),
            "10.1.1.1"
        );
        // No field, or garbage before anything untrusted: the last address found.
        assert_eq!(client(&addresses, "10.0.0.9", &[]), "10.0.0.9");
        assert_eq!(
            client(&addresses, "10.0.0.9", &["1.1.1.1, junk"]),
            "10.0.0.9"
        );
        assert_eq!(
            client(&addresses, "10.0.0.9", &["[2001:db8::1]:443"]),
            "2001:db8::1"
        );
        assert_eq!(client(&addresses, "10.0.0.9", &["1.2.3.4:5678"]), "1.2.3.4");
    }

    #[test]
    fn version_1_lines_name_the_source() {
        let parsed = parse_v1(b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n");
        assert_eq!(parsed, Ok(Some("192.0.2.7:56324".parse().unwrap())));
        let parsed = parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 443\r\n");
        assert_eq!(parsed, Ok(Some("[2001:db8::7]:56324".parse().unwrap())));
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(None));
        assert_eq!(parse_v1(b"PROXY UNKNOWN whatever follows\r\n"), Ok(None));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 080 443\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> [u8; 16] {
        let mut fixed = [0u8; 16];
        fixed[..12].copy_from_slice(&V2_SIGNATURE);
        fixed[12] = 0x20 | command;
        fixed[13] = family;
        fixed[14..].copy_from_slice(&(body.len() as u16).to_be_bytes());
        fixed
    }

    #[test]
    fn version_2_headers_name_the_source() {
        let body = [192, 0, 2, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb];
        assert_eq!(
            parse_v2(&v2(1, 0x11, &body), &body),
            Ok(Some("192.0.2.7:56324".parse().unwrap()))
        );
        let mut body6 = [0u8; 36];
        body6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body6[32..34].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse_v2(&v2(1, 0x21, &body6), &body6),
            Ok(Some("[2001:db8::7]:80".parse().unwrap()))
        );
        assert_eq!(parse_v2(&v2(0, 0x00, &[]), &[]), Ok(None));
        assert!(parse_v2(&v2(1, 0x11, &body[..8]), &body[..8]).is_err());
        let mut other_version = v2(1, 0x11, &body);
        other_version[12] = 0x11;
        assert!(parse_v2(&other_version, &body).is_err());
    }
}
