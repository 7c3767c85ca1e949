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

/// The crypto provider: `ring`, whatever else is compiled in.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The server configuration for `certificates` (at least one; the first is the default).
pub fn server_config(certificates: Vec<Certificate>) -> Result<Arc<ServerConfig>, StartError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|err| StartError(format!("TLS: {err}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ByServerName::new(certificates)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Picks a certificate by the name the client asked for (SNI): the first whose names cover it,
/// else the first certificate.
#[derive(Debug)]
struct ByServerName {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ByServerName {
    fn new(certificates: Vec<Certificate>) -> Self {
        ByServerName {
            keys: certificates.into_iter().map(|c| c.key).collect(),
        }
    }

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
        // With one certificate there is nothing to choose, and no certificate to parse per
        // handshake.
        if self.keys.len() > 1 {
            if let Some(name) = hello
                .server_name()
                .and_then(|name| ServerName::try_from(name).ok())
            {
                if let Some(key) = self.keys.iter().find(|key| Self::covers(key, &name)) {
                    return Some(Arc::clone(key));
                }
            }
        }
        self.keys.first().cloned()
    }
}

/// A self-signed certificate (ECDSA P-256) for `localhost` and `127.0.0.1`, for `--demo` without
/// `--tls-cert`; its PEM is written to `path` so that clients can be told to trust it.
pub fn self_signed(path: &Path) -> Result<Certificate, StartError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|err| StartError(format!("--demo: cannot make a certificate: {err}")))?;
    std::fs::write(path, generated.cert.pem())
        .map_err(|err| StartError(format!("--demo: {}: {err}", path.display())))?;
    let key = PrivateKeyDer::Pkcs8(generated.key_pair.serialize_der().into());
    let chain = vec![generated.cert.der().clone()];
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|err| StartError(format!("--demo: {err}")))?;
    Ok(Certificate {
        path: path.to_path_buf(),
        key: Arc::new(certified),
    })
}
