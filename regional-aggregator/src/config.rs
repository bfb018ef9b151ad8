//! The regional's configuration file: what it is called, where it listens, which rules it
//! enforces, its TLS identity, and where its counts live.
//!
//! ```yaml
//! node: regional-eu-1            # this node's name: a DNS name its certificate carries
//! region: eu                     # edges of other regions are refused
//! listen: 127.0.0.1:7401         # QUIC, for edges
//! metrics: 127.0.0.1:9401        # HTTP GET /metrics and /healthz; absent: not served
//! rules: rules.yaml              # relative paths are read from this file's directory
//! tls:
//!   ca: pki/ca.pem
//!   cert: pki/regional-eu-1.pem
//!   key: pki/regional-eu-1.key
//! redis:                         # absent: the in-memory store, for one regional alone
//!   url: redis://127.0.0.1:6379  # or `cluster: [redis://10.0.0.1:7000, ...]`
//!   timeout: 25ms                # one store call (+50µs per op in it); past it the breaker counts a failure
//!   failures: 5                  # failures in a row that open the breaker (calls that fail together count once)
//!   cooldown: 5s                 # open this long before a probe
//!   replicas: 1                  # regionals sharing this Redis: in an outage each decides
//!                                # in memory with 1/replicas of the region's partition
//! coordinator:                   # absent: this region owns every limit whole
//!   addr: 127.0.0.1:7500         # the coordinator's QUIC address (ip:port, or host:port
//!                                # resolved at every connect)
//!   name: coordinator-1          # the name its certificate carries
//!   report_interval: 1s          # demand reports; partitions follow within a few
//!   escalation_budget: 100ms     # how long an exact denial may wait for other regions' quota
//! threshold: 0.8                 # θ: grants stop at θ·P
//! hold: 100ms                    # how long an edge caches a denial caused by others' grants
//! ```
//!
//! [`Config::load`] reads and checks the file; every refusal is a [`ConfigError`] naming the
//! file and the field (or line and column), as rules files are refused. Only the fields above
//! exist: an unknown one is an error, so a typo cannot silently fall back to a default.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use shared::{
    ConfigError,
    config::{TlsFiles, optional_duration},
    net::{Address, is_dns_name},
    quota::Threshold,
};

use crate::{RegionalConfig, breaker::BreakerConfig, store::RedisTopology};

/// A checked configuration, paths resolved against the file's directory.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, as given.
    pub file: PathBuf,
    /// This node's name, unique among the region's replicas.
    pub node: String,
    /// The region it serves.
    pub region: String,
    /// The QUIC address edges connect to.
    pub listen: SocketAddr,
    /// Where `GET /metrics` is served over HTTP, or `None` for nowhere.
    pub metrics: Option<SocketAddr>,
    /// The rules file.
    pub rules: PathBuf,
    /// The deployment CA, this node's certificate and key.
    pub tls: TlsFiles,
    /// Redis, or `None` for the in-memory store.
    pub redis: Option<RedisConfig>,
    /// The global coordinator, or `None`: the region owns every limit whole.
    pub coordinator: Option<CoordinatorLink>,
    /// How decisions are made.
    pub regional: RegionalConfig,
}

/// Where the counts live when they live in Redis, and how the breaker guards it.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// One Redis or a cluster's seeds.
    pub topology: RedisTopology,
    /// The breaker: failures, cooldown, and the per-call timeout (four of which are Redis's
    /// connect and response timeout, [`BreakerConfig::write_back_timeout`]).
    pub breaker: BreakerConfig,
}

/// Where the coordinator is and how this regional talks to it.
#[derive(Clone, Debug)]
pub struct CoordinatorLink {
    /// Its QUIC address: `ip:port`, or `host:port` resolved at every connect.
    pub addr: Address,
    /// The name its certificate carries.
    pub name: String,
    /// How often demand is reported. Default 1 s.
    pub report_interval: Duration,
    /// How long an escalation may take before the request is denied. Default 100 ms.
    pub escalation_budget: Duration,
}

/// Default [`CoordinatorLink::report_interval`].
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`CoordinatorLink::escalation_budget`] (DESIGN §4).
pub const DEFAULT_ESCALATION_BUDGET: Duration = Duration::from_millis(100);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    addr: Address,
    name: String,
    #[serde(default, deserialize_with = "optional_duration")]
    report_interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    escalation_budget: Option<Duration>,
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: String,
    region: String,
    listen: SocketAddr,
    rules: PathBuf,
    tls: TlsFiles,
    #[serde(default)]
    metrics: Option<SocketAddr>,
    #[serde(default)]
    redis: Option<RawRedis>,
    #[serde(default)]
    coordinator: Option<RawCoordinator>,
    #[serde(default)]
    threshold: Option<f64>,
    #[serde(default, deserialize_with = "optional_duration")]
    hold: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    cluster: Option<Vec<String>>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    failures: Option<u32>,
    #[serde(default, deserialize_with = "optional_duration")]
    cooldown: Option<Duration>,
    #[serde(default)]
    replicas: Option<u32>,
}

impl Config {
    /// Reads and checks `path`. Relative paths inside it are taken from its directory, so a
    /// deployment directory can be moved whole.
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
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            file: file.clone(),
            field: field.to_owned(),
            reason,
        };
        if !is_dns_name(&raw.node) {
            return Err(invalid(
                "node",
                format!(
                    "{:?} is not a DNS name (letters, digits, '-' and '.'); edges check it \
                     against the certificate",
                    raw.node
                ),
            ));
        }
        if raw.region.is_empty() {
            return Err(invalid("region", "must not be empty".to_owned()));
        }
        let mut regional = RegionalConfig::default();
        if let Some(theta) = raw.threshold {
            regional.threshold = Threshold::from_fraction(theta).ok_or_else(|| {
                invalid(
                    "threshold",
                    format!("{theta} is not in (0, 1]; θ is the share of P handed out as grants"),
                )
            })?;
        }
        if let Some(hold) = raw.hold {
            regional.hold = hold.into();
        }
        let redis = raw.redis.map(|r| redis_config(r, &invalid)).transpose()?;
        let coordinator = raw
            .coordinator
            .map(|c| {
                if !is_dns_name(&c.name) {
                    return Err(invalid(
                        "coordinator.name",
                        format!("{:?} is not a DNS name", c.name),
                    ));
                }
                let report_interval = c.report_interval.unwrap_or(DEFAULT_REPORT_INTERVAL);
                if report_interval.is_zero() {
                    return Err(invalid(
                        "coordinator.report_interval",
                        "must be more than 0".to_owned(),
                    ));
                }
                Ok(CoordinatorLink {
                    addr: c.addr,
                    name: c.name,
                    report_interval,
                    escalation_budget: c.escalation_budget.unwrap_or(DEFAULT_ESCALATION_BUDGET),
                })
            })
            .transpose()?;
        regional.coordinated = coordinator.is_some();
        let dir = path.parent().unwrap_or(Path::new(""));
        Ok(Config {
            file: path.to_owned(),
            node: raw.node,
            region: raw.region,
            listen: raw.listen,
            metrics: raw.metrics,
            rules: dir.join(raw.rules),
            tls: raw.tls.relative_to(dir),
            redis,
            coordinator,
            regional,
        })
    }
}

impl Config {
    /// Keeps the counts in the Redis at `url` instead of what the file says (the breaker's
    /// settings stay the file's, or the defaults): the `--redis` flag.
    ///
    /// # Errors
    ///
    /// When `url` is not a Redis URL, saying why.
    pub fn use_redis(&mut self, url: &str) -> Result<(), String> {
        check_redis_url(url)?;
        let breaker = self.redis.take().map(|r| r.breaker).unwrap_or_default();
        self.redis = Some(RedisConfig {
            topology: RedisTopology::Single(url.to_owned()),
            breaker,
        });
        Ok(())
    }
}

fn redis_config(
    raw: RawRedis,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<RedisConfig, ConfigError> {
    let topology = match (raw.url, raw.cluster) {
        (Some(url), None) => {
            check_redis_url(&url).map_err(|r| invalid("redis.url", r))?;
            RedisTopology::Single(url)
        }
        (None, Some(seeds)) => {
            if seeds.is_empty() {
                return Err(invalid(
                    "redis.cluster",
                    "names no node; give at least one seed URL".to_owned(),
                ));
            }
            for (i, seed) in seeds.iter().enumerate() {
                check_redis_url(seed).map_err(|r| invalid(&format!("redis.cluster[{i}]"), r))?;
            }
            RedisTopology::Cluster(seeds)
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "redis",
                "has both `url` and `cluster`; a regional uses one Redis or one cluster".to_owned(),
            ));
        }
        (None, None) => {
            return Err(invalid(
                "redis",
                "needs `url` (one Redis) or `cluster` (seed URLs); leave `redis` out for the \
                 in-memory store"
                    .to_owned(),
            ));
        }
    };
    let mut breaker = BreakerConfig::default();
    if let Some(timeout) = raw.timeout {
        breaker.timeout = timeout;
    }
    if let Some(failures) = raw.failures {
        if failures == 0 {
            return Err(invalid("redis.failures", "must be at least 1".to_owned()));
        }
        breaker.failures = failures;
    }
    if let Some(cooldown) = raw.cooldown {
        breaker.cooldown = cooldown;
    }
    if let Some(replicas) = raw.replicas {
        if replicas == 0 {
            return Err(invalid(
                "redis.replicas",
                "must be at least 1 (this regional is one)".to_owned(),
            ));
        }
        breaker.replicas = replicas;
    }
    Ok(RedisConfig { topology, breaker })
}

/// Redis's own parser accepts only what it can connect to; ask it now rather than at the first
/// decision.
fn check_redis_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("{url:?} is not a Redis URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
node: regional-eu-1
region: eu
listen: 127.0.0.1:7401
metrics: 127.0.0.1:9401
rules: rules.yaml
tls: {ca: pki/ca.pem, cert: pki/r.pem, key: pki/r.key}
redis:
  url: redis://127.0.0.1:6379
  timeout: 40ms
  failures: 3
  cooldown: 5s
  replicas: 2
threshold: 0.5
hold: 200ms
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/rl/regional.yaml"), text)
    }

    #[test]
    fn reads_every_field_and_resolves_paths_from_the_file() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.node, "regional-eu-1");
        assert_eq!(c.region, "eu");
        assert_eq!(c.listen, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(c.metrics, Some("127.0.0.1:9401".parse().unwrap()));
        assert_eq!(c.rules, Path::new("/etc/rl/rules.yaml"));
        assert_eq!(c.tls.key, Path::new("/etc/rl/pki/r.key"));
        let redis = c.redis.unwrap();
        assert!(
            matches!(redis.topology, RedisTopology::Single(ref u) if u == "redis://127.0.0.1:6379")
        );
        assert_eq!(redis.breaker.timeout, Duration::from_millis(40));
        assert_eq!(redis.breaker.failures, 3);
        assert_eq!(redis.breaker.cooldown, Duration::from_secs(5));
        assert_eq!(redis.breaker.replicas, 2);
        assert_eq!(c.regional.threshold.ppm(), 500_000);
        assert_eq!(c.regional.hold, shared::Nanos::from_millis(200));
    }

    #[test]
    fn without_redis_the_defaults_apply() {
        let text = FULL.split("redis:").next().unwrap();
        let c = parse(text).unwrap();
        assert!(c.redis.is_none());
        let defaults = RegionalConfig::default();
        assert_eq!(c.regional.threshold, defaults.threshold);
        assert_eq!(c.regional.hold, defaults.hold);
    }

    #[test]
    fn the_coordinator_may_be_named_by_dns_and_a_bad_address_names_the_field() {
        let with = |addr: &str| {
            parse(&format!(
                "{FULL}coordinator: {{addr: \"{addr}\", name: coordinator-1}}\n"
            ))
        };
        let c = with("coordinator.rate-limiter.svc:7500").unwrap();
        let link = c.coordinator.unwrap();
        assert_eq!(link.addr.to_string(), "coordinator.rate-limiter.svc:7500");
        assert!(!link.addr.is_ipv6());
        let err = with("coordinator_1:7500").unwrap_err();
        assert_eq!(err.field(), Some("coordinator.addr"), "{err}");
        assert!(err.to_string().contains("coordinator_1:7500"), "{err}");
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("threshold: 0.5", "threshold: 1.5", "threshold"),
            ("cooldown: 5s", "cooldown: 5", "redis.cooldown"),
            ("failures: 3", "failures: 0", "redis.failures"),
            ("replicas: 2", "replicas: 0", "redis.replicas"),
            ("url: redis://127.0.0.1:6379", "url: http://x", "redis.url"),
            (
                "url: redis://127.0.0.1:6379",
                "url: redis://a\n  cluster: [redis://b]",
                "redis",
            ),
            ("node: regional-eu-1", "node: regional eu", "node"),
            ("listen: 127.0.0.1:7401", "listen: here", "listen"),
            ("metrics: 127.0.0.1:9401", "metrics: 9401", "metrics"),
            ("hold: 200ms", "hold: 200ms\nport: 1", "port"),
        ];
        for (from, to, field) in cases {
            let err = parse(&FULL.replace(from, to)).unwrap_err();
            assert_eq!(err.field(), Some(field), "{to}: {err}");
            assert!(
                err.to_string().starts_with("/etc/rl/regional.yaml: "),
                "{err}"
            );
        }
        let err = parse("node: [").unwrap_err();
        assert!(err.position().is_some(), "{err}");
    }
}
