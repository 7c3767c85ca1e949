//! HTTPS: the certificates and the TLS configuration of the `--tls-listen` listener.
//!
//! TLS ends at the balancer, as with nginx, HAProxy or Caddy: requests that came over HTTPS go on
//! to the backends as plain HTTP/1.1, marked `X-Forwarded-Proto: https`. The configuration is
//! `rustls`' default (TLS 1.2 and 1.3, its own list of safe cipher suites) with the `ring` crypto
//! provider, which builds with a C compiler alone. ALPN offers `http/1.1` only: HTTP/2 is out of
//! scope. Each `--tls-cert`/`--tls-key` pair is one certificate chain; with several, the client's
//! SNI name picks the first that covers it, and the first pair is the default.
//!
//! Everything that can be wrong with the files is found at start-up and reported in one line that
//! names the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::error::StartError;

/// One certificate chain with its key, as given by a `--tls-cert`/`--tls-key` pair.
pub struct Certificate {
    /// The certificate file, for messages.
    pub path: PathBuf,
    /// The chain (end-entity first) and the key that signs for it.
    pub key: Arc<CertifiedKey>,
}

/// Reads a `--tls-cert` file (a PEM chain, end-entity certificate first) and its `--tls-key`
/// file (a PEM private key), and checks that the key belongs to the certificate.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Certificate, StartError> {
    let cert_error =
        |why: &dyn fmt::Display| StartError(format!("--tls-cert {}: {why}", cert_path.display()));
    let key_error =
        |why: &dyn fmt::Display| StartError(format!("--tls-key {}: {why}", key_path.display()));
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|err| cert_error(&pem_error(err, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| cert_error(&pem_error(err, "certificate")))?;
    if chain.is_empty() {
        return Err(cert_error(&"no PEM certificate in the file"));
    }
    // An expired certificate is refused by every client, but starting anyway lets the plain
    // listener and the statistics go on while a new one is fetched.
    if let Some(not_after) = not_after(&chain[0]) {
        if not_after.unix < unix_now() {
            log::warn!(
                "--tls-cert {}: the certificate expired on {}; clients will refuse it",
                cert_path.display(),
                not_after.text
            );
        }
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|err| key_error(&pem_error(err, "private key")))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|err| {
        let why = match err {
            rustls::Error::InconsistentKeys(_) => "does not match".to_string(),
            other => format!("cannot be used ({other}) with"),
        };
        key_error(&format!("the key {why} --tls-cert {}", cert_path.display()))
    })?;
    Ok(Certificate {
        path: cert_path.to_path_buf(),
        key: Arc::new(certified),
    })
}

/// What went wrong reading a PEM file that should hold a `what`, in a few words.
fn pem_error(err: pem::Error, what: &str) -> String {
    match err {
        pem::Error::Io(err) => err.to_string(),
        pem::Error::NoItemsFound => format!("no PEM {what} in the file"),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Each of `certs` with the key in the same position (`--tls-cert`, `--tls-key`), read and
/// checked: at start-up, and again by a reload.
pub fn load_all(certs: &[PathBuf], keys: &[PathBuf]) -> Result<Vec<Certificate>, StartError> {
    if certs.is_empty() {
        return Err(StartError(
            "--tls-listen needs a certificate: --tls-cert FILE --tls-key FILE".to_string(),
        ));
    }
    if certs.len() != keys.len() {
        return Err(StartError(format!(
            "{} --tls-cert but {} --tls-key: give one key per certificate, in the same order",
            certs.len(),
            keys.len()
        )));
    }
    certs
        .iter()
        .zip(keys)
        .map(|(cert, key)| load(cert, key))
        .collect()
}

/// The crypto provider: `ring`, whatever else is compiled in.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The server configuration for `certificates` (at least one; the first is the default).
pub fn server_config(certificates: Vec<Certificate>) -> Result<Arc<ServerConfig>, StartError> {
    server_config_with_store(certificates).map(|(config, _)| config)
}

/// The server configuration for `certificates`, and the store that holds them, through which
/// a reload replaces them: new handshakes get the new ones, open connections keep theirs.
pub fn server_config_with_store(
    certificates: Vec<Certificate>,
) -> Result<(Arc<ServerConfig>, Arc<Certificates>), StartError> {
    let store = Arc::new(Certificates::new(certificates));
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|err| StartError(format!("TLS: {err}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ByServerName {
            keys: Arc::clone(&store),
        }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption spares a returning client the key exchange and the certificate. Tickets (TLS 1.2
    // and 1.3) carry the session encrypted under a key that rotates every six hours, so they cost
    // the server no memory; TLS 1.2 clients that do not take tickets resume by session id, from a
    // bounded table in memory (about 200 bytes a session).
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|err| StartError(format!("TLS: {err}")))?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_IDS);
    Ok((Arc::new(config), store))
}

/// The certificates the HTTPS listener shows, replaced as one by a reload. Each handshake reads
/// the current list once (an `ArcSwap` load, a few nanoseconds).
#[derive(Debug)]
pub struct Certificates(arc_swap::ArcSwap<Vec<Arc<CertifiedKey>>>);

impl Certificates {
    fn new(certificates: Vec<Certificate>) -> Self {
        Certificates(arc_swap::ArcSwap::from_pointee(keys_of(certificates)))
    }

    /// From the next handshake on, `certificates` are shown (the first is the default).
    pub fn replace(&self, certificates: Vec<Certificate>) {
        self.0.store(Arc::new(keys_of(certificates)));
    }
}

fn keys_of(certificates: Vec<Certificate>) -> Vec<Arc<CertifiedKey>> {
    certificates.into_iter().map(|c| c.key).collect()
}

/// TLS 1.2 sessions kept for resumption by id; the oldest go first.
const SESSION_IDS: usize = 4096;

/// Picks a certificate by the name the client asked for (SNI): the first whose names cover it,
/// else the first certificate.
#[derive(Debug)]
struct ByServerName {
    keys: Arc<Certificates>,
}

impl ByServerName {
    /// Whether `key`'s end-entity certificate is valid for `name`.
    fn covers(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
        let Some(der) = key.cert.first() else {
            return false;
        };
        webpki::EndEntityCert::try_from(der)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(name))
            .is_ok()
    }
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.0.load();
        // With one certificate there is nothing to choose, and no certificate to parse per
        // handshake.
        if keys.len() > 1 {
            if let Some(name) = hello
                .server_name()
                .and_then(|name| ServerName::try_from(name).ok())
            {
                if let Some(key) = keys.iter().find(|key| Self::covers(key, &name)) {
                    return Some(Arc::clone(key));
                }
            }
        }
        keys.first().cloned()
    }
}

/// A self-signed certificate (ECDSA P-256) for `localhost` and `127.0.0.1`, for `--demo` without
/// `--tls-cert`; its PEM is written to `path` so that clients can be told to trust it.
pub fn self_signed(path: &Path) -> Result<Certificate, StartError> {
    let failed =
        |err: rcgen::Error| StartError(format!("--demo: cannot make a certificate: {err}"));
    let key_pair = rcgen::KeyPair::generate().map_err(failed)?;
    let generated = demo_certificate_params()
        .map_err(failed)?
        .self_signed(&key_pair)
        .map_err(failed)?;
    std::fs::write(path, generated.pem())
        .map_err(|err| StartError(format!("--demo: {}: {err}", path.display())))?;
    let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    let chain = vec![generated.der().clone()];
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|err| StartError(format!("--demo: {err}")))?;
    Ok(Certificate {
        path: path.to_path_buf(),
        key: Arc::new(certified),
    })
}

/// How long the demo certificate is valid: a demo is restarted long before, and a short life is
/// what browsers and scanners expect of a certificate today.
const DEMO_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The demo certificate's fields, made as scanners and RFC 5280 expect: a random positive serial
/// number (§4.1.2.2), `localhost` and `127.0.0.1` as subject alternative names (a DNS name and an
/// IP address), subject and authority key identifiers (§4.2.1.1-2), valid from an hour ago (for
/// clocks a little behind) for [`DEMO_VALIDITY`].
fn demo_certificate_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "loadbalancer --demo");
    // Sixteen random bytes, the first kept between 0x01 and 0x7f: a positive number of a fixed
    // length, well under the 20 bytes allowed.
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] = (serial[0] & 0x7f).max(1);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + DEMO_VALIDITY;
    Ok(params)
}

/// When a certificate stops being valid: seconds since 1970 and the date as written in it.
#[derive(Debug, PartialEq)]
pub struct NotAfter {
    /// Seconds since 1970-01-01 UTC.
    pub unix: i64,
    /// `YYYY-MM-DD HH:MM:SS UTC`.
    pub text: String,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The `notAfter` time of an X.509 certificate, or `None` when the DER does not hold one where
/// RFC 5280 §4.1 puts it: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, … } … }`.
/// `rustls` and `webpki` check validity but do not expose it, and a full X.509 parser is a heavy
/// dependency for one field, so this walks the few DER elements before it.
pub fn not_after(der: &[u8]) -> Option<NotAfter> {
    const SEQUENCE: u8 = 0x30;
    let (tag, certificate, _) = der_element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_element(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // The explicit version, when present, comes first with tag [0].
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (tag, validity, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, after_not_before) = der_element(validity)?;
    let (tag, time, _) = der_element(after_not_before)?;
    parse_time(tag, time)
}

/// One DER element at the start of `input`: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, &rest[count..])
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 0x18).
fn parse_time(tag: u8, time: &[u8]) -> Option<NotAfter> {
    let text = std::str::from_utf8(time).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        // RFC 5280 §4.1.2.5.1: two-digit years 50–99 are 19xx, 00–49 are 20xx.
        (0x17, 12) => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let unix = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(NotAfter {
        unix,
        text: format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC"),
    })
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn not_after_is_read_from_utc_and_generalized_times() {
        // rcgen writes UTCTime up to 2049 and GeneralizedTime from 2050 (RFC 5280 §4.1.2.5).
        let cases = [
            ((2001, 2, 3), 981_158_400),
            ((2049, 12, 31), 2_524_521_600),
            ((2051, 1, 1), 2_556_144_000),
        ];
        for (date, unix) in cases {
            let read = not_after(&certificate(date)).expect("a notAfter");
            assert_eq!(read.unix, unix, "{date:?}");
            assert_eq!(
                read.text,
                format!("{:04}-{:02}-{:02} 00:00:00 UTC", date.0, date.1, date.2)
            );
        }
    }

    #[test]
    fn anything_else_has_no_not_after() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        let whole = certificate((2030, 1, 1));
        for cut in [1, 10, 100, 200] {
            assert_eq!(not_after(&whole[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse_time(0x17, b"301301000000Z"), None);
        assert_eq!(parse_time(0x18, b"2030010100000Z"), None);
    }

    /// The elements of a DER `SEQUENCE`'s contents, as (tag, contents).
    fn elements(mut input: &[u8]) -> Vec<(u8, &[u8])> {
        let mut found = Vec::new();
        while !input.is_empty() {
            let (tag, contents, rest) = der_element(input).expect("a DER element");
            found.push((tag, contents));
            input = rest;
        }
        found
    }

    #[test]
    fn the_demo_certificate_is_well_formed() {
        let dir = std::env::temp_dir().join(format!("lb-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certificate = self_signed(&dir.join("demo.pem")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let der = certificate.key.cert[0].as_ref();
        let (_, whole, _) = der_element(der).unwrap();
        let (_, tbs, _) = der_element(whole).unwrap();
        let fields = elements(tbs);
        // version [0], serialNumber, signature, issuer, validity, subject, key, extensions [3].
        assert_eq!(fields[0].0, 0xa0, "an explicit version");
        let (tag, serial) = fields[1];
        assert_eq!(tag, 0x02, "the serial number is an INTEGER");
        assert!(serial[0] < 0x80, "positive: {serial:02x?}");
        assert!(serial.iter().any(|&b| b != 0), "not zero");
        assert!(serial.len() <= 20);
        let validity = elements(fields[4].1);
        let from = parse_time(validity[0].0, validity[0].1).unwrap();
        let until = parse_time(validity[1].0, validity[1].1).unwrap();
        let days = (until.unix - from.unix) / 86_400;
        assert!((1..=31).contains(&days), "valid for {days} days");
        assert!(from.unix <= unix_now() && unix_now() < until.unix);
        let (tag, extensions) = *fields.last().unwrap();
        assert_eq!(tag, 0xa3, "extensions");
        let (_, extensions, _) = der_element(extensions).unwrap();
        let oids: Vec<&[u8]> = elements(extensions)
            .iter()
            .map(|(_, extension)| elements(extension)[0].1)
            .collect();
        for (name, oid) in [
            ("subject key identifier", [0x55, 0x1d, 0x0e]),
            ("authority key identifier", [0x55, 0x1d, 0x23]),
            ("subject alternative names", [0x55, 0x1d, 0x11]),
        ] {
            assert!(oids.contains(&&oid[..]), "{name} missing: {oids:02x?}");
        }
        // Both names are covered: the DNS name and the IP address.
        let end_entity = webpki::EndEntityCert::try_from(&certificate.key.cert[0]).unwrap();
        for name in ["localhost", "127.0.0.1"] {
            let name = ServerName::try_from(name).unwrap();
            assert!(end_entity.verify_is_valid_for_subject_name(&name).is_ok());
        }
        // Two certificates made one after the other have different serial numbers.
        let again = self_signed(
            &std::env::temp_dir().join(format!("lb-tls-test-{}.pem", std::process::id())),
        )
        .unwrap();
        let _ = std::fs::remove_file(&again.path);
        let (_, whole, _) = der_element(again.key.cert[0].as_ref()).unwrap();
        let (_, tbs, _) = der_element(whole).unwrap();
        assert_ne!(elements(tbs)[1].1, serial);
    }

    #[test]
    fn days_are_counted_from_1970() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }
}
