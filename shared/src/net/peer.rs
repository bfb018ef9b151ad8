//! Who is on the other end of a connection: the certificate TLS verified, and whether it names
//! the node the peer claims to be.
//!
//! TLS proves only that the client holds a certificate the deployment CA issued. Which node it
//! is comes from its `Hello`, and a `Hello` is just bytes: without a check, any node with any
//! certificate could claim another's name and write into its counters (DESIGN §4 keys every
//! edge's monotone counters by its name). So the server checks the claim against the verified
//! certificate with [`Peer::is_named`].
//!
//! The check is webpki's own name check (the one a client applies to the server it dials):
//! the certificate must carry the claimed name as a DNS subject alternative name, which
//! [`Ca::issue`](crate::net::Ca::issue) always writes. We deliberately do not read the common
//! name: it would take an X.509 parser, and TLS clients stopped trusting common names years
//! ago for the same reason, ambiguity. A certificate issued for `edge-eu-1` with the extra
//! name `localhost` can therefore claim either; the operator decides what a node may claim by
//! what the CA writes into its certificate.

use std::net::SocketAddr;

use rustls::{
    client::verify_server_name,
    pki_types::{CertificateDer, ServerName},
    server::ParsedCertificate,
};

/// The verified peer of a connection: its address and its end-entity certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    address: SocketAddr,
    certificate: CertificateDer<'static>,
}

impl Peer {
    /// The peer of `connection`, or `None` when it presented no certificate, which a server
    /// built by [`server_config`](crate::net::server_config) never lets happen.
    pub fn from_connection(connection: &quinn::Connection) -> Option<Peer> {
        let identity = connection.peer_identity()?;
        // quinn's rustls session hands the chain over as `Vec<CertificateDer>`, end entity
        // first; anything else means another crypto backend, and no certificate to trust.
        let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        let certificate = chain.into_iter().next()?;
        Some(Peer {
            address: connection.remote_address(),
            certificate,
        })
    }

    /// A peer from its parts, for tests of a service's `hello` without a connection.
    pub fn new(address: SocketAddr, certificate: CertificateDer<'static>) -> Peer {
        Peer {
            address,
            certificate,
        }
    }

    /// The peer's address, as seen by this side.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The peer's end-entity certificate, DER, as TLS verified it.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// Whether the certificate carries `node` as a DNS name, i.e. whether the peer may call
    /// itself `node`. False for anything that is not a DNS name (an IP address, an empty or
    /// malformed name), so a claim from the network can be passed in unchecked.
    pub fn is_named(&self, node: &str) -> bool {
        let Ok(name @ ServerName::DnsName(_)) = ServerName::try_from(node) else {
            return false;
        };
        let Ok(parsed) = ParsedCertificate::try_from(&self.certificate) else {
            return false;
        };
        verify_server_name(&parsed, &name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::net::Ca;

    fn peer(node: &str, extra: &[&str]) -> Peer {
        let ca = Ca::generate("test CA").unwrap();
        let cert = ca.issue(node, extra).unwrap();
        let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
        Peer::new(([127, 0, 0, 1], 1).into(), der)
    }

    #[test]
    fn a_peer_may_claim_the_names_its_certificate_carries_and_no_other() {
        let p = peer("edge-eu-1", &["localhost", "127.0.0.1"]);
        assert!(p.is_named("edge-eu-1"));
        assert!(p.is_named("EDGE-EU-1"), "DNS names compare without case");
        assert!(p.is_named("localhost"));
        for other in [
            "edge-eu-2",
            "edge-eu",
            "eu-1",
            "127.0.0.1",
            "",
            "edge eu 1",
            "*",
        ] {
            assert!(!p.is_named(other), "{other:?}");
        }
    }
}
