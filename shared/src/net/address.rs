//! A peer's address as an operator writes it: `ip:port`, or `host:port` with a DNS name that
//! is resolved at every connect attempt, so a name follows its records (a Kubernetes Service,
//! a failover record) without a restart.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

use crate::net::NetError;

/// `ip:port` (`127.0.0.1:7401`, `[::1]:7401`) or `host:port` (`regional.eu.svc:7401`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// An IP address: used as is.
    Ip(SocketAddr),
    /// A DNS name and a port: resolved when connecting.
    Name {
        /// The name, as written (validated as a DNS name).
        host: String,
        /// The port.
        port: u16,
    },
}

/// Why a string is not an [`Address`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not an address: {reason} (expected ip:port or host:port, e.g. 10.0.0.7:7401 or regional.eu.svc:7401)"
)]
pub struct AddressError {
    input: String,
    reason: &'static str,
}

impl Address {
    /// An IPv6 literal: the client socket must be IPv6 to reach it.
    pub fn is_ipv6(&self) -> bool {
        matches!(self, Address::Ip(a) if a.is_ipv6())
    }

    /// Where a client socket that dials `addresses` binds: IPv6 when one of them is an IPv6
    /// literal, IPv4 otherwise (names then resolve to IPv4 addresses, see
    /// [`resolve_for`](Address::resolve_for)).
    pub fn client_bind<'a>(addresses: impl IntoIterator<Item = &'a Address>) -> SocketAddr {
        if addresses.into_iter().any(Address::is_ipv6) {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        }
    }

    /// [`resolve`](Address::resolve) for the family `endpoint`'s socket speaks.
    ///
    /// # Errors
    ///
    /// As [`resolve`](Address::resolve).
    pub async fn resolve_for(&self, endpoint: &quinn::Endpoint) -> Result<SocketAddr, NetError> {
        let ipv6 = endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
        self.resolve(ipv6).await
    }

    /// The socket address to connect to now, of the family the client socket speaks
    /// (`ipv6`); a name's first such record.
    ///
    /// # Errors
    ///
    /// The name does not resolve, or resolves to no address of that family; the message names
    /// the address.
    pub async fn resolve(&self, ipv6: bool) -> Result<SocketAddr, NetError> {
        match self {
            Address::Ip(a) => Ok(*a),
            Address::Name { host, port } => {
                let found = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| NetError::Resolve(format!("cannot resolve {self}: {e}")))?;
                let mut any = false;
                for a in found {
                    any = true;
                    if a.is_ipv6() == ipv6 {
                        return Ok(a);
                    }
                }
                Err(NetError::Resolve(if any {
                    format!(
                        "{self} resolves to no {} address",
                        if ipv6 { "IPv6" } else { "IPv4" }
                    )
                } else {
                    format!("{self} resolves to no address")
                }))
            }
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Address, AddressError> {
        let fail = |reason| AddressError {
            input: s.to_owned(),
            reason,
        };
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Address::Ip(a));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| fail("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| fail("the port is not a number from 0 to 65535"))?;
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') || host.contains(':') {
            return Err(fail("an IPv6 address needs brackets: [::1]:7401"));
        }
        // A fully qualified name may end with the root's dot.
        if !is_dns_name(host.strip_suffix('.').unwrap_or(host)) {
            return Err(fail(
                "the host is neither an IP address nor a DNS name (letters, digits, '-' and '.')",
            ));
        }
        Ok(Address::Name {
            host: host.to_owned(),
            port,
        })
    }
}

/// An RFC 1123 host name, as certificates carry node names: dot-separated labels of 1–63
/// letters, digits and inner hyphens, at most 253 bytes.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(a) => a.fmt(f),
            Address::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        Address::Ip(a)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_and_names_parse_and_print_as_written() {
        for (input, want) in [
            (
                "127.0.0.1:7401",
                Address::Ip(SocketAddr::from(([127, 0, 0, 1], 7401))),
            ),
            (
                "[::1]:7401",
                Address::Ip("[::1]:7401".parse().expect("an IPv6 socket address")),
            ),
            (
                "regional.eu.svc.cluster.local:7401",
                Address::Name {
                    host: "regional.eu.svc.cluster.local".into(),
                    port: 7401,
                },
            ),
            (
                "localhost:1",
                Address::Name {
                    host: "localhost".into(),
                    port: 1,
                },
            ),
        ] {
            let a: Address = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(a, want);
            assert_eq!(a.to_string(), input);
        }
    }

    #[test]
    fn bad_addresses_are_refused_with_the_reason() {
        for (input, reason) in [
            ("regional", "no port"),
            ("regional:http", "port"),
            ("regional:70000", "port"),
            ("::1:7401", "brackets"),
            ("bad_name:7401", "DNS name"),
            ("-lead.example:7401", "DNS name"),
            ("a..b:7401", "DNS name"),
            (":7401", "DNS name"),
        ] {
            let err = input.parse::<Address>().expect_err(input).to_string();
            assert!(err.contains(reason), "{input}: {err}");
            assert!(err.contains(input), "{input}: names the input: {err}");
        }
    }

    #[test]
    fn a_name_resolves_to_the_family_asked_for() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(resolves());
    }

    async fn resolves() {
        let a: Address = "localhost:7401".parse().expect("a name");
        let v4 = a
            .resolve(false)
            .await
            .expect("localhost has an IPv4 address");
        assert_eq!(v4, SocketAddr::from(([127, 0, 0, 1], 7401)));
        let ip: Address = "10.1.2.3:9".parse().expect("an IP");
        assert_eq!(
            ip.resolve(false).await.expect("an IP needs no lookup"),
            SocketAddr::from(([10, 1, 2, 3], 9))
        );
        let missing: Address = "no-such-host.invalid:1".parse().expect("a name");
        let err = missing
            .resolve(false)
            .await
            .expect_err("does not resolve")
            .to_string();
        assert!(err.contains("no-such-host.invalid:1"), "{err}");
    }
}
