//! The `edge-agent` binary's configuration file: who this edge is, where it answers HTTP, which
//! rules it enforces, how it reaches its regional, and how it reads a client's identity.
//!
//! ```yaml
//! node: edge-eu-1                # this node's name: a DNS name its certificate carries
//! region: eu                     # the regional refuses edges of other regions
//! listen: 127.0.0.1:8080         # HTTP: POST /v1/check, GET /healthz, GET /readyz
//! rules: rules.yaml              # relative paths are read from this file's directory
//! regional:
//!   addresses: [127.0.0.1:7401]  # the region's regional replicas, tried in order (ip:port or
//!                                # host:port; a name is resolved at every connect)
//!   name: regional-eu-1          # the name their certificates carry
//! tls:
//!   ca: pki/ca.pem
//!   cert: pki/edge-eu-1.pem
//!   key: pki/edge-eu-1.key
//! identity:                      # all optional; the defaults shown
//!   user_id_header: x-user-id
//!   api_key_header: x-api-key
//!   tier_header: x-tier
//!   trusted_proxies: []          # addresses or CIDR blocks whose X-Forwarded-For is believed
//! flush_interval: 100ms          # counts go to the regional this often
//! timeout: 50ms                  # the longest a decision waits for the regional
//! threshold: 0.8                 # θ: above θ·P a key takes the exact path
//! proxy:                         # optional: reverse-proxy mode (absent: other paths are 404)
//!   upstream: http://127.0.0.1:3000  # plain HTTP/1.1; every path but the four above goes here
//!   connect_timeout: 1s          # the longest a new connection to it may take
//!   timeout: 30s                 # the longest it may stay silent (headers, or mid-body)
//! ```
//!
//! With `proxy:` set, every request that is not `/v1/check`, `/healthz`, `/readyz` or
//! `/metrics` is decided from its own method, path and headers and then forwarded to the
//! upstream (allowed) or answered `429` (denied); see [`crate::proxy`].
//!
//! [`Settings::load`] reads and checks the file; every refusal is a [`ConfigError`] naming the
//! file and the field, as rules files are refused. Unknown fields are errors.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use shared::{
    ConfigError,
    config::{TlsFiles, optional_duration},
    net::Address,
    quota::Threshold,
};

use crate::{AgentConfig, IdentityConfig, proxy::ProxyConfig};

/// A checked configuration, paths resolved against the file's directory.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The file it came from.
    pub file: PathBuf,
    /// This node's name.
    pub node: String,
    /// Its region.
    pub region: String,
    /// The HTTP address.
    pub listen: SocketAddr,
    /// The rules file.
    pub rules: PathBuf,
    /// The regional's replicas.
    pub regional_addresses: Vec<Address>,
    /// The name the regional's certificates carry.
    pub regional_name: String,
    /// The deployment CA, this node's certificate and key.
    pub tls: TlsFiles,
    /// How a client's identity is read.
    pub identity: IdentityConfig,
    /// The agent's knobs.
    pub agent: AgentConfig,
    /// Reverse-proxy mode, when configured.
    pub proxy: Option<ProxyConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    node: String,
    region: String,
    listen: SocketAddr,
    rules: PathBuf,
    regional: RawRegional,
    tls: TlsFiles,
    #[serde(default)]
    identity: Option<RawIdentity>,
    #[serde(default, deserialize_with = "optional_duration")]
    flush_interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    threshold: Option<f64>,
    #[serde(default)]
    proxy: Option<RawProxy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    upstream: String,
    #[serde(default, deserialize_with = "optional_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegional {
    addresses: Vec<Address>,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    user_id_header: Option<String>,
    #[serde(default)]
    api_key_header: Option<String>,
    #[serde(default)]
    tier_header: Option<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

impl Settings {
    /// Reads and checks `path`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the file and the field (or the line and column).
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Settings::parse(path, &shared::process::read_file(path)?)
    }

    /// [`load`](Settings::load) from text already read; `path` names it and anchors relative
    /// paths.
    ///
    /// # Errors
    ///
    /// As [`load`](Settings::load).
    pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let file = path.display().to_string();
        let raw: RawSettings = shared::config::from_yaml(&file, text)?;
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            file: file.clone(),
            field: field.to_owned(),
            reason,
        };
        if raw.regional.addresses.is_empty() {
            return Err(invalid(
                "regional.addresses",
                "names no address; give at least one regional replica".to_owned(),
            ));
        }
        let mut agent = AgentConfig::default();
        if let Some(every) = raw.flush_interval {
            agent.flush_interval = every;
        }
        if let Some(timeout) = raw.timeout {
            agent.upstream_timeout = timeout;
        }
        if let Some(theta) = raw.threshold {
            agent.near_limit_threshold = Threshold::from_fraction(theta).ok_or_else(|| {
                invalid(
                    "threshold",
                    format!("{theta} is not in (0, 1]; θ is the share of P handed out as grants"),
                )
            })?;
        }
        let mut identity = IdentityConfig::default();
        if let Some(raw) = raw.identity {
            if let Some(h) = raw.user_id_header {
                identity.user_id_header = h;
            }
            if let Some(h) = raw.api_key_header {
                identity.api_key_header = h;
            }
            if let Some(h) = raw.tier_header {
                identity.tier_header = h;
            }
            identity.trusted_proxies = IdentityConfig::parse_trusted_proxies(&raw.trusted_proxies)
                .map_err(|e| {
                    invalid(
                        &format!("identity.trusted_proxies[{}]", e.index()),
                        e.to_string(),
                    )
                })?;
        }
        let proxy = match raw.proxy {
            None => None,
            Some(raw) => {
                let mut proxy = ProxyConfig::new(&raw.upstream)
                    .map_err(|e| invalid("proxy.upstream", e.to_string()))?;
                if let Some(connect) = raw.connect_timeout {
                    proxy.connect_timeout = connect;
                }
                if let Some(timeout) = raw.timeout {
                    proxy.timeout = timeout;
                }
                Some(proxy)
            }
        };
        let dir = path.parent().unwrap_or(Path::new(""));
        Ok(Settings {
            file: path.to_owned(),
            node: raw.node,
            region: raw.region,
            listen: raw.listen,
            rules: dir.join(raw.rules),
            regional_addresses: raw.regional.addresses,
            regional_name: raw.regional.name,
            tls: raw.tls.relative_to(dir),
            identity,
            agent,
            proxy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
node: edge-eu-1
region: eu
listen: 127.0.0.1:8080
rules: rules.yaml
regional: {addresses: [127.0.0.1:7401, 127.0.0.1:7402], name: regional-eu-1}
tls: {ca: pki/ca.pem, cert: pki/e.pem, key: pki/e.key}
identity: {user_id_header: x-user, trusted_proxies: [10.0.0.0/8]}
flush_interval: 250ms
timeout: 20ms
threshold: 0.9
proxy:
  upstream: http://127.0.0.1:3000
  connect_timeout: 200ms
  timeout: 5s
";

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(Path::new("/etc/rl/edge.yaml"), text)
    }

    #[test]
    fn reads_every_field() {
        let s = parse(FULL).unwrap();
        assert_eq!(s.node, "edge-eu-1");
        assert_eq!(s.regional_addresses.len(), 2);
        assert_eq!(s.regional_name, "regional-eu-1");
        assert_eq!(s.rules, Path::new("/etc/rl/rules.yaml"));
        assert_eq!(s.tls.cert, Path::new("/etc/rl/pki/e.pem"));
        assert_eq!(s.identity.user_id_header, "x-user");
        assert_eq!(s.identity.api_key_header, "x-api-key", "default kept");
        assert!(s.identity.is_trusted_proxy("10.1.2.3".parse().unwrap()));
        assert_eq!(s.agent.flush_interval, Duration::from_millis(250));
        assert_eq!(s.agent.upstream_timeout, Duration::from_millis(20));
        assert_eq!(s.agent.near_limit_threshold.ppm(), 900_000);
        let proxy = s.proxy.expect("proxy: is set");
        assert_eq!(proxy.upstream.as_str(), "127.0.0.1:3000");
        assert_eq!(proxy.connect_timeout, Duration::from_millis(200));
        assert_eq!(proxy.timeout, Duration::from_secs(5));
    }

    #[test]
    fn proxy_is_optional_and_its_timeouts_default() {
        let (start, end) = (FULL.find("proxy:").unwrap(), FULL.len());
        let without = parse(&FULL.replace(&FULL[start..end], "")).unwrap();
        assert!(without.proxy.is_none());
        let minimal = FULL.replace(
            &FULL[start..end],
            "proxy:\n  upstream: http://localhost:80\n",
        );
        let proxy = parse(&minimal).unwrap().proxy.unwrap();
        assert_eq!(proxy.upstream.as_str(), "localhost:80");
        assert_eq!(proxy.connect_timeout, crate::proxy::DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(proxy.timeout, crate::proxy::DEFAULT_TIMEOUT);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("threshold: 0.9", "threshold: 0", "threshold"),
            ("timeout: 20ms", "timeout: 20", "timeout"),
            (
                "[10.0.0.0/8]",
                "[10.0.0.1/8]",
                "identity.trusted_proxies[0]",
            ),
            (
                "[127.0.0.1:7401, 127.0.0.1:7402]",
                "[]",
                "regional.addresses",
            ),
            (
                "[127.0.0.1:7401, 127.0.0.1:7402]",
                "[here]",
                "regional.addresses[0]",
            ),
            (
                "threshold: 0.9",
                "threshold: 0.9\nthreshhold: 1",
                "threshhold",
            ),
            (
                "http://127.0.0.1:3000",
                "https://127.0.0.1:3000",
                "proxy.upstream",
            ),
            (
                "http://127.0.0.1:3000",
                "http://127.0.0.1:3000/app",
                "proxy.upstream",
            ),
            ("timeout: 5s", "timeout: 0s", "proxy.timeout"),
            (
                "connect_timeout: 200ms",
                "connect_timeout: 1",
                "proxy.connect_timeout",
            ),
            ("timeout: 5s", "timeout: 5s\n  retries: 3", "proxy.retries"),
        ];
        for (from, to, field) in cases {
            let err = parse(&FULL.replace(from, to)).unwrap_err();
            assert_eq!(err.field(), Some(field), "{to}: {err}");
            assert!(err.to_string().starts_with("/etc/rl/edge.yaml: "), "{err}");
        }
    }
}
