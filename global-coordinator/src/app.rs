//! The `global-coordinator` binary's work, kept out of `main.rs`: check a configuration and
//! everything it names; open the durable state and serve the admin API until told to stop.

use std::{fmt, future::Future, net::SocketAddr, path::Path, sync::Arc};

use shared::{ConfigError, RuleSet, net::Identity};

use crate::{
    admin::Admin,
    config::Config,
    coordinator::{Coordinator, LoadError},
    link::{Links, RegionalService},
};

/// The environment variable that holds the admin token, over the config's `token_file`.
pub const TOKEN_ENV: &str = "COORDINATOR_TOKEN";

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration or the rules file was refused.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The durable state could not be opened.
    #[error("{0}")]
    State(#[from] LoadError),
    /// A TLS file is missing or does not hold what it should.
    #[error("{0}")]
    Tls(#[from] shared::net::TlsError),
    /// The QUIC endpoint could not be bound.
    #[error("{0}")]
    Net(#[from] shared::net::NetError),
    /// The admin address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A configuration with its token read and its rules checked.
pub struct Checked {
    /// The configuration.
    pub config: Config,
    /// The admin token (never printed).
    pub token: String,
    /// The first rule set, read only while there is no state file yet.
    pub first_rules: Option<RuleSet>,
    /// The TLS identity regionals see, when the link is configured.
    pub identity: Option<Identity>,
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let regions: Vec<&str> = c.regions.iter().map(|r| r.name.as_str()).collect();
        write!(
            f,
            "node {}, admin API on {}, regions {}, state {}",
            c.node,
            c.admin,
            regions.join(","),
            c.state.display()
        )
    }
}

/// Reads the configuration at `path`, the admin token (`COORDINATOR_TOKEN` when `env_token`
/// is given, else the token file) and the first rules file, binding nothing.
///
/// # Errors
///
/// The first problem found, naming its file and field.
pub fn check(path: &Path, env_token: Option<String>) -> Result<Checked, StartError> {
    let config = Config::load(path)?;
    let token = match (env_token, &config.token_file) {
        (Some(token), _) => token,
        (None, Some(file)) => shared::process::read_file(file)?.trim().to_owned(),
        (None, None) => {
            return Err(ConfigError::Invalid {
                file: path.display().to_string(),
                field: "token_file".into(),
                reason: format!(
                    "is missing and {TOKEN_ENV} is not set: the admin API needs a token"
                ),
            }
            .into());
        }
    };
    if token.len() < 16 {
        return Err(ConfigError::Document {
            file: config
                .token_file
                .as_ref()
                .map_or(TOKEN_ENV.to_owned(), |f| f.display().to_string()),
            reason: "the admin token is shorter than 16 characters".into(),
        }
        .into());
    }
    let first_rules = if config.state.exists() {
        None
    } else {
        Some(shared::process::load_rules(&config.rules)?)
    };
    let identity = match &config.link {
        None => None,
        Some(link) => {
            let identity = Identity::from_files(&link.tls.ca, &link.tls.cert, &link.tls.key)?;
            shared::net::server_config(&identity)?;
            Some(identity)
        }
    };
    Ok(Checked {
        config,
        token,
        first_rules,
        identity,
    })
}

/// Opens the state and serves the admin API until `shutdown` completes.
///
/// # Errors
///
/// When the state cannot be opened or the address cannot be bound.
pub async fn run(checked: Checked, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let summary = checked.to_string();
    let Checked {
        config,
        token,
        first_rules,
        identity,
    } = checked;
    // Without a state file the rules file is the start; read in `check`, or now if a state
    // file seen there has gone since.
    let coordinator = Arc::new(Coordinator::open(
        &config.state,
        config.regions.clone(),
        || first_rules.map_or_else(|| shared::process::load_rules(&config.rules), Ok),
    )?);
    let listener = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin,
            source,
        })?;
    let admin_addr = listener.local_addr().unwrap_or(config.admin);
    let links = Links::new(
        coordinator.clone(),
        config.node.clone(),
        Arc::new(shared::SystemClock),
    );
    let endpoint = match (&config.link, &identity) {
        (Some(link), Some(identity)) => {
            let endpoint = shared::net::server_endpoint(link.listen, identity)?;
            let bound = endpoint.local_addr().unwrap_or(link.listen);
            let service = Arc::new(RegionalService::new(links.clone()));
            tokio::spawn(shared::net::serve(
                endpoint.clone(),
                service,
                Arc::new(shared::net::NetStats::default()),
            ));
            Some((endpoint, bound))
        }
        _ => None,
    };
    // Without regionals there is no demand to follow and nobody to push to.
    let ticking = endpoint
        .is_some()
        .then(|| tokio::spawn(links.clone().run(config.rebalance_interval)));
    let rules = coordinator.rules();
    match &endpoint {
        Some((_, quic)) => tracing::info!(
            admin = %admin_addr,
            %quic,
            rule_set_version = rules.version(),
            rules = rules.rules().len(),
            "{summary}"
        ),
        None => tracing::info!(
            admin = %admin_addr,
            rule_set_version = rules.version(),
            rules = rules.rules().len(),
            "{summary}"
        ),
    }
    let admin = Arc::new(Admin::new(coordinator, links, token));
    let handler = move |_peer, request| {
        let admin = admin.clone();
        async move { admin.handle(request).await }
    };
    shared::http::serve(listener, handler, shutdown).await;
    if let Some(ticking) = ticking {
        ticking.abort();
    }
    if let Some((endpoint, _)) = endpoint {
        endpoint.close(
            quinn::VarInt::from_u32(shared::wire::CloseCode::ShuttingDown.as_u32()),
            b"coordinator shutting down",
        );
        endpoint.wait_idle().await;
    }
    tracing::info!("shut down");
    Ok(())
}
