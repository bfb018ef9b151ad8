//! The `edge-agent` binary's work, kept out of `main.rs`: check a configuration and everything
//! it names; run the agent behind the HTTP API until told to stop.
//!
//! Start-up reads the rules and the TLS files before binding anything, so a bad deployment
//! fails at once with the file and field at fault. The regional need not be up: the QUIC
//! client dials in the background, and until it answers each rule's failure mode decides.
//!
//! The rules file gives the rules the edge starts with. From then on the regional may push
//! newer versions on the QUIC connection; the agent is attached to its upstream
//! ([`QuicUpstream::attach`]), so a pushed rule set that validates is enforced from the next
//! check on, and one that does not is refused with its located error while the running rules
//! stay. The configuration and rules files are watched ([`reload`]): on `SIGHUP` or a change
//! on disk they are read and checked again, and what may change while running is applied.
//!
//! With a `proxy:` section the same HTTP listener also forwards every other path to the
//! configured upstream ([`crate::proxy`]); the upstream is not dialed at start-up, so it may
//! come up after the edge (until then those requests are `502`).

use std::{fmt, future::Future, net::SocketAddr, path::Path, sync::Arc};

use shared::{
    ConfigError, RuleSet,
    net::{Identity, TlsError},
};

use crate::{
    Agent, BuildError, QuicConfig, QuicError, QuicUpstream,
    http::{self, Api},
    reload::{self, Seen},
    settings::Settings,
};

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration or the rules file was refused.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A TLS file is missing or does not hold what it should.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The QUIC client could not be set up.
    #[error("{0}")]
    Quic(#[from] QuicError),
    /// The agent could not be built.
    #[error("{0}")]
    Agent(#[from] BuildError),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A configuration with everything it names read and checked.
pub struct Checked {
    /// The configuration.
    pub settings: Settings,
    /// Its rules.
    pub rules: RuleSet,
    /// Its TLS identity, usable.
    pub identity: Identity,
    /// The texts read, from which a reload starts.
    seen: Seen,
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        let regional: Vec<String> = s.regional_addresses.iter().map(|a| a.to_string()).collect();
        write!(
            f,
            "node {} of region {}, HTTP on {}, regional {} at {}, {} rules (version {})",
            s.node,
            s.region,
            s.listen,
            s.regional_name,
            regional.join(","),
            self.rules.rules().len(),
            self.rules.version()
        )?;
        if let Some(proxy) = &s.proxy {
            write!(f, ", proxying other paths to http://{}", proxy.upstream)?;
        }
        Ok(())
    }
}

/// Reads the configuration at `path` and everything it names, binding and dialing nothing.
///
/// # Errors
///
/// The first problem found, naming its file (and field, where there is one).
pub fn check(path: &Path) -> Result<Checked, StartError> {
    let read = reload::read(path);
    let (settings, rules, identity) = read.result?;
    let seen = read.seen;
    Ok(Checked {
        settings,
        rules,
        identity,
        seen,
    })
}

/// Runs the agent and its HTTP API as `checked` says until `shutdown` completes.
///
/// # Errors
///
/// When the HTTP address cannot be bound or the QUIC client cannot be set up.
pub async fn run(checked: Checked, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let hangup = reload::hangup();
    let summary = checked.to_string();
    let Checked {
        settings,
        rules,
        identity,
        seen,
    } = checked;
    let upstream = QuicUpstream::connect(QuicConfig {
        rule_set_version: rules.version(),
        answer_within: settings.agent.upstream_timeout,
        ..QuicConfig::new(
            settings.regional_addresses.clone(),
            settings.regional_name.clone(),
            identity,
            settings.node.clone(),
            settings.region.clone(),
        )
    })?;
    let agent = Arc::new(Agent::builder(settings.agent.clone(), rules, upstream.clone()).build()?);
    upstream.attach(&agent);
    let sync = agent.spawn_sync_loop();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.listen,
            source,
        })?;
    let listen = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(%listen, "{summary}");
    let api = Arc::new(Api::new(
        agent.clone(),
        upstream,
        settings.identity.clone(),
        settings.proxy.clone(),
    ));
    let watch = tokio::spawn(reload::watch(
        settings.file.clone(),
        settings,
        seen,
        api.clone(),
        hangup,
    ));
    http::serve(listener, api, shutdown).await;
    tracing::info!("shutting down: sending the last counts to the regional");
    watch.abort();
    sync.abort();
    if let Err(e) = agent.flush().await {
        tracing::warn!(error = %e, "the last counts could not be sent");
    }
    Ok(())
}
