//! The coordinator's configuration file: what it is called, where operators reach it, where
//! its durable state lives, the rules it starts from, and the regions it partitions limits
//! across.
//!
//! ```yaml
//! node: coordinator-1            # this node's name (a DNS name)
//! admin: 127.0.0.1:9000          # HTTP: the admin API (bearer token), GET /metrics, /healthz
//! token_file: admin.token        # the admin API's bearer token; COORDINATOR_TOKEN overrides
//! state: state/coordinator.json  # rules, pins and partitions, rewritten atomically
//! rules: rules.yaml              # the first rule set, read only while no state file exists
//! listen: 127.0.0.1:7500         # QUIC, for regionals; absent (with tls): no regional link
//! tls:                           # the deployment CA, and this node's certificate and key
//!   ca: pki/ca.pem
//!   cert: pki/coordinator-1.pem
//!   key: pki/coordinator-1.key
//! rebalance_interval: 1s         # how often shares follow demand and partitions are pushed
//! regions:                       # the regions limits are partitioned across
//!   - { name: eu, floor: 0.1 }   # floor: the least share a region keeps, whatever its demand
//!   - { name: us }               # floor defaults to 0.1
//! ```
//!
//! [`Config::load`] reads and checks the file; every refusal is a [`ConfigError`] naming the
//! file and the field. Relative paths are read from the file's directory. Unknown fields are
//! errors.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use shared::{ConfigError, config::TlsFiles};

/// The floor a region gets when its entry names none: a tenth of every limit.
pub const DEFAULT_FLOOR: f64 = 0.1;

/// A checked configuration, paths resolved against the file's directory.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// This node's name.
    pub node: String,
    /// The admin API's address.
    pub admin: SocketAddr,
    /// The file holding the admin API's bearer token.
    pub token_file: Option<PathBuf>,
    /// The durable state file.
    pub state: PathBuf,
    /// The rules file the first start reads.
    pub rules: PathBuf,
    /// The regions, in the file's order.
    pub regions: Vec<RegionConfig>,
    /// The regionals' QUIC link, when configured.
    pub link: Option<LinkConfig>,
    /// How often shares follow demand and partitions are pushed.
    pub rebalance_interval: Duration,
}

/// Where regionals connect, with what identity.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The QUIC address.
    pub listen: SocketAddr,
    /// The deployment CA, this node's certificate and key.
    pub tls: TlsFiles,
}

/// Default [`Config::rebalance_interval`].
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(1);

/// One region limits are partitioned across.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionConfig {
    /// Its name, as its regionals' configs spell it.
    pub name: String,
    /// The least share of every limit it keeps, in parts per million.
    pub floor_ppm: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: String,
    admin: SocketAddr,
    #[serde(default)]
    token_file: Option<PathBuf>,
    state: PathBuf,
    rules: PathBuf,
    regions: Vec<RawRegion>,
    #[serde(default)]
    listen: Option<SocketAddr>,
    #[serde(default)]
    tls: Option<TlsFiles>,
    #[serde(default, deserialize_with = "shared::config::optional_duration")]
    rebalance_interval: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    #[serde(default)]
    floor: Option<f64>,
}

impl Config {
    /// Reads and checks `path`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the file and the field (or the line and column).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(path, &shared::process::read_file(path)?)
    }

    /// [`load`](Config::load) from text already read; `path` names it and anchors relative
    /// paths.
    ///
    /// # Errors
    ///
    /// As [`load`](Config::load).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = shared::config::from_yaml(&file, text)?;
        let invalid = |field: String, reason: String| ConfigError::Invalid {
            file: file.clone(),
            field,
            reason,
        };
        if raw.node.is_empty() {
            return Err(invalid("node".into(), "must not be empty".into()));
        }
        if raw.regions.is_empty() {
            return Err(invalid(
                "regions".into(),
                "names no region; list every region whose regionals report here".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut regions = Vec::with_capacity(raw.regions.len());
        let mut floors = 0u64;
        for (i, r) in raw.regions.into_iter().enumerate() {
            if r.name.is_empty() {
                return Err(invalid(
                    format!("regions[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if !seen.insert(r.name.clone()) {
                return Err(invalid(
                    format!("regions[{i}].name"),
                    format!("{:?} is listed twice", r.name),
                ));
            }
            let floor = r.floor.unwrap_or(DEFAULT_FLOOR);
            if !(0.0..=1.0).contains(&floor) {
                return Err(invalid(
                    format!("regions[{i}].floor"),
                    format!("{floor} is not in [0, 1]; it is a share of every limit"),
                ));
            }
            let floor_ppm = (floor * 1e6).round() as u32;
            floors += u64::from(floor_ppm);
            regions.push(RegionConfig {
                name: r.name,
                floor_ppm,
            });
        }
        if floors > 1_000_000 {
            return Err(invalid(
                "regions".into(),
                format!(
                    "the floors add up to {}, more than the whole limit",
                    floors as f64 / 1e6
                ),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let link = match (raw.listen, raw.tls) {
            (None, None) => None,
            (Some(listen), Some(tls)) => Some(LinkConfig {
                listen,
                tls: tls.relative_to(dir),
            }),
            (Some(_), None) => {
                return Err(invalid(
                    "tls".into(),
                    "is missing: regionals connect over mutual TLS".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "listen".into(),
                    "is missing: where do regionals connect?".into(),
                ));
            }
        };
        let rebalance_interval = raw.rebalance_interval.unwrap_or(DEFAULT_REBALANCE_INTERVAL);
        if rebalance_interval.is_zero() {
            return Err(invalid(
                "rebalance_interval".into(),
                "must be more than 0".into(),
            ));
        }
        Ok(Config {
            file: path.to_owned(),
            node: raw.node,
            admin: raw.admin,
            token_file: raw.token_file.map(|t| dir.join(t)),
            state: dir.join(raw.state),
            rules: dir.join(raw.rules),
            regions,
            link,
            rebalance_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
node: coordinator-1
admin: 127.0.0.1:7500
token_file: admin.token
state: state/c.json
rules: rules.yaml
regions:
  - { name: eu, floor: 0.2 }
  - { name: us }
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/rl/coordinator.yaml"), text)
    }

    #[test]
    fn reads_every_field() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.admin, "127.0.0.1:7500".parse().unwrap());
        assert_eq!(c.state, Path::new("/etc/rl/state/c.json"));
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new("/etc/rl/admin.token"))
        );
        assert_eq!(
            c.regions,
            [
                RegionConfig {
                    name: "eu".into(),
                    floor_ppm: 200_000
                },
                RegionConfig {
                    name: "us".into(),
                    floor_ppm: 100_000
                }
            ]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        for (from, to, field) in [
            ("floor: 0.2", "floor: 1.2", "regions[0].floor"),
            ("{ name: us }", "{ name: eu }", "regions[1].name"),
            ("floor: 0.2", "floor: 0.95", "regions"),
            ("admin: 127.0.0.1:7500", "admin: 7500", "admin"),
            ("rules: rules.yaml", "rules: rules.yaml\nport: 1", "port"),
        ] {
            let err = parse(&FULL.replace(from, to)).unwrap_err();
            assert_eq!(err.field(), Some(field), "{to}: {err}");
        }
    }
}
