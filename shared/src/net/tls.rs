//! Mutual TLS for QUIC: a node's [`Identity`] turned into quinn server and client configs.
//!
//! Both sides present a certificate and both verify the other's against the deployment CA
//! only (never the system's roots): the server with rustls's `WebPkiClientVerifier`, which
//! refuses a client without a certificate from the CA during the handshake (DESIGN §7,
//! untrusted peer), and the client with `WebPkiServerVerifier`, which also checks that the
//! server's certificate carries the name it dialled. TLS 1.3 only (QUIC requires it), one
//! ALPN protocol ([`ALPN`]), and the `ring` provider passed explicitly to every builder, so no
//! process-wide default provider has to be installed and nothing else in the process can
//! change ours.

use std::{fmt, fs, io, path::Path, sync::Arc, time::Duration};

use quinn::{
    IdleTimeout, TransportConfig, VarInt,
    crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig},
};
use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::net::pki::{Ca, NodeCert};

/// The ALPN protocol every link speaks: rate limiter, wire protocol family 1. A peer that
/// offers anything else fails the TLS handshake, so a stray HTTP/3 client never reaches the
/// frame decoder. Protocol versions inside the family are negotiated by `Hello`, not here.
pub const ALPN: &[u8] = b"rl/1";

/// How often an idle connection is pinged. Defaults to 1 s: well inside [`IDLE_TIMEOUT`], so a
/// live but quiet peer is never timed out, and a lost ping is retried several times first.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a connection may hear nothing from its peer before it is considered lost.
/// Defaults to 10 s. This is how fast a peer that vanished without closing (a crash, a cut
/// link) is noticed; a peer that closes, or an endpoint that shuts down, is noticed at once.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many request streams a peer may have open on one connection at once. 256: each is one
/// request in flight (one `SyncBatch` or `Acquire`), and each costs its receiver a task and up
/// to one frame of buffer, so this bounds what one peer can make a server hold.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// A node's credentials: the deployment CA to trust, and its own certificate and key, all PEM.
///
/// The same identity serves both directions: a regional presents it to its edges as a server
/// and to the coordinator as a client.
#[derive(Clone)]
pub struct Identity {
    /// The deployment CA's certificate(s), PEM: the only roots peers are verified against.
    pub ca_pem: String,
    /// This node's certificate, PEM, followed by any intermediates.
    pub cert_pem: String,
    /// This node's private key, PEM (PKCS#8, PKCS#1 or SEC1). Redacted in `Debug`.
    pub key_pem: String,
}

/// Why a TLS configuration could not be built from an [`Identity`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file, as given.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A file or field does not hold what it should: `what` is the file's path, or the
    /// [`Identity`] field when the PEM came from memory.
    #[error("{what}: {reason}")]
    Pem {
        /// The file's path, or `ca_pem`, `cert_pem`, `key_pem`.
        what: String,
        /// What is wrong (`no PEM certificate`, `no PEM private key`, ...).
        reason: String,
    },
    /// rustls refused the combination: typically a key that is not the certificate's, or a CA
    /// certificate webpki cannot use as a trust anchor.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificates could not make a client verifier.
    #[error("invalid CA for verifying peers: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration cannot carry QUIC (no TLS 1.3 cipher suite QUIC can start with).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

impl Identity {
    /// The identity of `node`, issued by `ca`: what a test or the `pki` tool hands a node.
    pub fn new(ca: &Ca, node: &NodeCert) -> Identity {
        Identity {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: node.cert_pem.clone(),
            key_pem: node.key_pem.clone(),
        }
    }

    /// Reads an identity from the three files a node's config names, and checks that each
    /// holds what it should, so that a wrong path or a swapped file is reported by name at
    /// start-up rather than as a failed handshake later.
    ///
    /// # Errors
    ///
    /// [`TlsError::Read`] when a file cannot be read, [`TlsError::Pem`] naming the file when
    /// it holds no certificate (`ca`, `cert`) or no private key (`key`).
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Identity, TlsError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let (ca, cert, key) = (ca.as_ref(), cert.as_ref(), key.as_ref());
        let identity = Identity {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        let name = |path: &Path| path.display().to_string();
        certificates(&identity.ca_pem, &name(ca))?;
        certificates(&identity.cert_pem, &name(cert))?;
        private_key(&identity.key_pem, &name(key))?;
        Ok(identity)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The server side of a link: presents `identity` and requires every client to present a
/// certificate the deployment CA issued. Which node the client claims to be is checked later,
/// against its `Hello` (see [`Peer::is_named`](crate::net::Peer::is_named)).
///
/// # Errors
///
/// [`TlsError`] when the identity's PEM is not usable (naming the field), or rustls refuses it.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(roots(identity)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(&identity.cert_pem, "cert_pem")?,
            private_key(&identity.key_pem, "key_pem")?,
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The client side of a link: presents `identity` and accepts only a server whose certificate
/// the deployment CA issued for the name the client dials (`Endpoint::connect`'s
/// `server_name`).
///
/// # Errors
///
/// [`TlsError`] when the identity's PEM is not usable (naming the field), or rustls refuses it.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        // webpki with the provider's algorithms, against these roots only.
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(
            certificates(&identity.cert_pem, "cert_pem")?,
            private_key(&identity.key_pem, "key_pem")?,
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The `ring` provider, built for each config rather than installed process-wide.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The transport settings both sides use.
fn transport() -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            // Milliseconds; the constant is 10 s, far inside a u32.
            u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
        ))))
        // Requests travel on bidirectional streams, one per request; both sides accept them
        // (a server pushes rule sets and partitions down on streams it opens). Nothing uses
        // unidirectional streams, so a peer may not open any.
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    Arc::new(transport)
}

/// The deployment CA as a root store holding nothing else.
fn roots(identity: &Identity) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(&identity.ca_pem, "ca_pem")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Every certificate in `pem`, at least one; `what` names the source in errors.
fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_owned(),
            reason: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_owned(),
            reason: "no PEM certificate in it".to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in `pem`; `what` names the source in errors.
fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: what.to_owned(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key in it".to_owned(),
            e => format!("unreadable PEM private key: {e}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        let ca = Ca::generate("test CA").unwrap();
        let node = ca.issue("edge-1", &["localhost"]).unwrap();
        Identity::new(&ca, &node)
    }

    #[test]
    fn configs_build_from_a_generated_identity() {
        let identity = identity();
        assert!(server_config(&identity).is_ok());
        assert!(client_config(&identity).is_ok());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let mut identity = identity();
        identity.key_pem = self::identity().key_pem;
        assert!(matches!(server_config(&identity), Err(TlsError::Rustls(_))));
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let identity = identity();
        let ca = dir.join("ca.pem");
        let cert = dir.join("edge-1.pem");
        let key = dir.join("edge-1.key");
        fs::write(&ca, &identity.ca_pem).unwrap();
        fs::write(&cert, &identity.cert_pem).unwrap();
        // The certificate where the key should be: a swapped file.
        fs::write(&key, &identity.cert_pem).unwrap();
        let err = Identity::from_files(&ca, &cert, &key)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&key.display().to_string()) && err.contains("no PEM private key"),
            "{err}"
        );
        let missing = dir.join("missing.pem");
        let err = Identity::from_files(&missing, &cert, &key)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
        fs::write(&key, &identity.key_pem).unwrap();
        let loaded = Identity::from_files(&ca, &cert, &key).unwrap();
        assert_eq!(loaded.cert_pem, identity.cert_pem);
        assert!(!format!("{loaded:?}").contains("PRIVATE KEY"), "redacted");
        fs::remove_dir_all(&dir).unwrap();
    }
}
