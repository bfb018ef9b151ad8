//! The binary's work, kept out of `main.rs` so it can be read and tested as a library: build
//! a regional from a [`Config`], serve edges until told to stop; check a configuration
//! without starting anything; make the deployment's certificates.
//!
//! Start-up reads everything it will need before it binds a socket (rules, TLS files, the
//! store's address), so a bad deployment fails at once with the file and field at fault, not
//! at the first edge's handshake.

use std::{
    fmt, fs,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
};

use shared::{
    Clock, ConfigError, RuleSet, SystemClock,
    net::{self, Ca, Identity, NetError, NetStats, PkiError, TlsError},
};

use crate::{
    Regional,
    breaker::GuardedStore,
    config::Config,
    server::EdgeService,
    store::{MemoryStore, RedisStore, RedisTopology, Store, StoreError},
    uplink::Uplink,
};

/// Why the regional could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration or the rules file was refused.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A TLS file is missing or does not hold what it should.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be bound.
    #[error("{0}")]
    Net(#[from] NetError),
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The Redis cluster did not answer (a single Redis may be down at start-up: the breaker
    /// handles it).
    #[error("redis: {0}")]
    Store(#[from] StoreError),
}

/// What a checked configuration describes, for `--validate` and the start-up log line.
#[derive(Debug)]
pub struct Summary {
    /// The node's name.
    pub node: String,
    /// Its region.
    pub region: String,
    /// Where it listens.
    pub listen: std::net::SocketAddr,
    /// Rules in the rules file.
    pub rules: usize,
    /// The rule set's version.
    pub version: u64,
    /// `memory`, `redis <url>` or `redis cluster <seeds>`.
    pub store: String,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} of region {}, QUIC on {}, {} rules (version {}), store: {}",
            self.node, self.region, self.listen, self.rules, self.version, self.store
        )
    }
}

/// A configuration with everything it names read and checked: what `run` starts from.
pub struct Checked {
    /// The configuration.
    pub config: Config,
    /// Its rules.
    pub rules: RuleSet,
    /// Its TLS identity, usable (rustls accepted it).
    pub identity: Identity,
}

impl Checked {
    /// What it describes.
    pub fn summary(&self) -> Summary {
        let store = match self.config.redis.as_ref().map(|r| &r.topology) {
            None => "memory".to_owned(),
            Some(RedisTopology::Single(url)) => format!("redis {}", redact(url)),
            Some(RedisTopology::Cluster(seeds)) => format!(
                "redis cluster {}",
                seeds
                    .iter()
                    .map(|s| redact(s))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        Summary {
            node: self.config.node.clone(),
            region: self.config.region.clone(),
            listen: self.config.listen,
            rules: self.rules.rules().len(),
            version: self.rules.version(),
            store,
        }
    }
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Reads the configuration at `path` and everything it names, without binding or
/// connecting anything: `--validate`, and the first step of [`run`]. `redis`, when given,
/// replaces the file's store with that Redis (the `--redis` flag).
///
/// # Errors
///
/// The first problem found, naming its file (and field, where there is one).
pub fn check(path: &Path, redis: Option<&str>) -> Result<Checked, StartError> {
    let mut config = Config::load(path)?;
    if let Some(url) = redis {
        config
            .use_redis(url)
            .map_err(|reason| ConfigError::Document {
                file: "--redis".to_owned(),
                reason,
            })?;
    }
    let rules = shared::process::load_rules(&config.rules)?;
    let identity = Identity::from_files(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    // Builds the rustls config, so a key that is not the certificate's is caught here.
    net::server_config(&identity)?;
    Ok(Checked {
        config,
        rules,
        identity,
    })
}

/// Serves edges as `checked` says until `shutdown` completes, then closes every connection.
///
/// # Errors
///
/// When the endpoint cannot be bound or a Redis cluster does not answer at start-up.
pub async fn run(checked: Checked, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let summary = checked.summary();
    let Checked {
        config,
        rules,
        identity,
    } = checked;
    let clock: Arc<dyn Clock + Send + Sync> = Arc::new(SystemClock);
    let (store, breaker): (Arc<dyn Store>, _) = match &config.redis {
        None => (Arc::new(MemoryStore::new()), None),
        Some(redis) => {
            // The breaker bounds each call by its own timeout; the client's is the backstop
            // for the write-back's larger calls (`write_back_timeout`).
            let primary =
                RedisStore::connect(&redis.topology, redis.breaker.write_back_timeout()).await?;
            let guarded = GuardedStore::new(
                Arc::new(primary),
                redis.breaker.clone(),
                clock.clone(),
                config.node.clone(),
            );
            (Arc::new(guarded.clone()), Some(guarded))
        }
    };
    let regional = Arc::new(Regional::new(config.regional.clone(), rules, store, clock));
    let service = Arc::new(EdgeService::new(
        regional.clone(),
        config.node.clone(),
        config.region.clone(),
    ));
    let net_stats = Arc::new(NetStats::default());
    let endpoint = net::server_endpoint(config.listen, &identity)?;
    let uplink = match &config.coordinator {
        None => None,
        Some(link) => {
            // Before the coordinator hears from this run: it carries on with what an earlier
            // run held.
            if let Err(e) = regional.restore_partitions().await {
                tracing::warn!(
                    error = %e,
                    "cannot read what this region held before it started; it holds nothing \
                     until the coordinator's push, and other regions' raises may begin early"
                );
            }
            let uplink = Uplink::new(
                regional.clone(),
                service.clone(),
                link.clone(),
                config.node.clone(),
                config.region.clone(),
            );
            regional.set_escalation(uplink.clone(), link.escalation_budget);
            let bind = net::Address::client_bind([&link.addr]);
            let client = net::client_endpoint(bind, &identity)?;
            Some((uplink.clone(), tokio::spawn(uplink.run(client))))
        }
    };
    let listen = endpoint.local_addr().unwrap_or(config.listen);
    // The metrics port is bound before the start-up line, so the line can name it.
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = match config.metrics {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            let registry = Arc::new(crate::metrics::registry(
                regional,
                breaker,
                net_stats.clone(),
                uplink.as_ref().map(|(u, _)| u.clone()),
            ));
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            tokio::spawn(shared::metrics::serve(listener, registry, stopped));
            Some(bound)
        }
    };
    match metrics {
        Some(metrics) => tracing::info!(%listen, %metrics, "{summary}"),
        None => tracing::info!(%listen, "{summary}"),
    }
    let serving = tokio::spawn(net::serve(endpoint.clone(), service, net_stats));
    shutdown.await;
    tracing::info!("shutting down: closing edge connections");
    let _ = stop_metrics.send(());
    endpoint.close(
        quinn::VarInt::from_u32(shared::wire::CloseCode::ShuttingDown.as_u32()),
        b"regional shutting down",
    );
    if let Some((_, link)) = uplink {
        link.abort();
    }
    let _ = serving.await;
    endpoint.wait_idle().await;
    Ok(())
}

/// Makes (or extends) a deployment's PKI in `dir`: the CA, reused when `dir` already holds
/// one, and a certificate for every node, each also valid for the names in `sans` (the
/// addresses peers dial it by, such as `localhost` or `127.0.0.1`). Returns the files written.
///
/// # Errors
///
/// A node name that is not a DNS name, an unreadable existing CA, or a file that cannot be
/// written, each named.
pub fn pki(dir: &Path, nodes: &[String], sans: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = if ca_pem.exists() && ca_key.exists() {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| PkiError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ca::from_pem(&read(&ca_pem)?, &read(&ca_key)?)?
    } else {
        Ca::generate("rate limiter deployment CA")?
    };
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let certs = nodes
        .iter()
        .map(|node| ca.issue(node, &sans))
        .collect::<Result<Vec<_>, _>>()?;
    net::write_pki(dir, &ca, &certs)
}
