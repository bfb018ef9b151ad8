//! The real [`Upstream`]: one long-lived QUIC connection to the region's regional, with mutual
//! TLS, failover between the regional's addresses, and reconnection with backoff.
//!
//! # How a call flows
//!
//! A background task owns the connection's life: it dials an address, does the `Hello` /
//! `Welcome` handshake (`shared::net::connect`), publishes the connection, and waits for it
//! to end; then it moves on to the next address and dials again. Calls never wait for any of
//! that. `sync` and `acquire` look at the published connection: with none they fail at once
//! with [`UpstreamError::Unreachable`], so the agent's failure mode decides without spending
//! its timeout; with one they open a stream for the request (`shared::net::call`) and check
//! that the reply is the one the request expects. A call that finds the connection lost
//! unpublishes it at once, so the calls after it fail fast too while the task reconnects.
//!
//! # Rule sets pushed by the regional
//!
//! The regional also opens streams of its own on the edge's connection, to push a new rule
//! set. For every connection it establishes, the task starts `shared::net::answer` on it, which
//! reads each such stream's one message and writes back the reply of `Link::answer`:
//!
//! 1. A [`RuleSetPush`] whose version the agent already runs (or a newer one) is acknowledged
//!    at once with no error: pushes may be resent or overtaken.
//! 2. Otherwise the YAML is parsed and validated with the same code as the edge's own rules
//!    file ([`RuleSet::from_yaml`], stamped with the pushed version). A refused set is
//!    acknowledged with its located error and the running rules stay.
//! 3. An accepted set goes to [`Agent::set_rules`](crate::Agent::set_rules), which swaps it in
//!    for every later check, and is acknowledged with no error.
//!
//! Parsing and the swap run on a blocking thread, not on the runtime's workers. The agent is
//! reached through [`QuicUpstream::attach`]: the agent owns its upstream, so the upstream
//! holds only a weak handle back to it, which the embedder sets right after building the
//! agent. Every `Hello` names the version the agent runs when it is sent (before `attach`,
//! [`QuicConfig::rule_set_version`]), so a regional knows on each connection whether to push;
//! and how long the agent waits for an exact answer (its upstream timeout; before `attach`,
//! [`QuicConfig::answer_within`]), so a regional that escalates answers in time.
//! Anything but a `RuleSetPush` on such a stream is answered with an [`ErrorNotice`] of
//! [`CloseCode::UnexpectedMessage`].
//!
//! # Reconnecting
//!
//! The addresses are tried in order, moving to the next after every failed attempt and every
//! lost connection, so a regional replica that goes away hands its edges to the next one. A
//! round of attempts that all failed waits [`QuicConfig::backoff_min`], doubling each round up
//! to [`QuicConfig::backoff_max`]; a connection that was established resets it. A refusal
//! because the regional is shutting down moves to the next address at once. A refusal that no
//! retry can fix (wrong protocol version, role, region, or a certificate that does not name
//! this node) is a configuration error: it is logged at error level and retried at the
//! maximum backoff, so that fixing the regional's side is enough to recover.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use quinn::{Connection, Endpoint, VarInt};
use shared::{
    RuleSet,
    net::{self, Address, Identity as TlsIdentity, NetError, NetStats},
    wire::{
        Acquire, AcquireReply, CloseCode, ErrorNotice, Hello, Message, PROTOCOL_VERSION, Refusal,
        Role, RuleSetAck, RuleSetPush, SyncAck, SyncBatch,
    },
};
use thiserror::Error;
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::{
    Agent,
    agent::WeakAgent,
    config::DEFAULT_UPSTREAM_TIMEOUT,
    upstream::{Upstream, UpstreamError, UpstreamFuture},
};

/// The first pause after a round of failed connection attempts. Defaults to 100 ms.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// The longest pause between rounds of connection attempts. Defaults to 5 s.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long one connection attempt (QUIC, TLS and the `Hello`) may take. Defaults to 2 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How the edge reaches its regional. Build it with [`QuicConfig::new`], which fills in the
/// defaults, and change what you need.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// The regional's addresses (its replicas), tried in this order. At least one. A DNS
    /// name is resolved at every attempt.
    pub addresses: Vec<Address>,
    /// The DNS name the regional's certificate carries (`regional-eu-1`, `localhost`): TLS
    /// accepts the server only if the deployment CA issued its certificate for this name.
    pub server_name: String,
    /// This edge's certificate, key and the deployment CA.
    pub identity: TlsIdentity,
    /// This edge's node name, as its certificate carries it (the regional refuses a `Hello`
    /// whose name the certificate does not carry).
    pub node: String,
    /// This process's incarnation (DESIGN §4: counters are kept per node and incarnation).
    /// Defaults to the start time in nanoseconds since the epoch, which differs on every start.
    pub incarnation: u64,
    /// The region this edge belongs to; a regional of another region refuses it.
    pub region: String,
    /// The version of the rule set the edge enforces, sent in the `Hello` until an agent is
    /// [attached](QuicUpstream::attach); from then on every `Hello` names the version that
    /// agent runs. Set it to the version of the rules the agent is built with, so that the
    /// first `Hello` is right even when it goes out before `attach`. Defaults to 0 (none yet).
    pub rule_set_version: u64,
    /// How long the agent waits for an exact answer, sent in the `Hello` until an agent is
    /// attached (from then on, that agent's [`upstream_timeout`]): a regional that escalates
    /// a request answers within it. Defaults to [`DEFAULT_UPSTREAM_TIMEOUT`], the agent's own
    /// default.
    ///
    /// [`upstream_timeout`]: crate::AgentConfig::upstream_timeout
    /// [`DEFAULT_UPSTREAM_TIMEOUT`]: crate::DEFAULT_UPSTREAM_TIMEOUT
    pub answer_within: Duration,
    /// The pause after the first round of failed attempts; it doubles every round. Defaults
    /// to 100 ms. Must not be zero.
    pub backoff_min: Duration,
    /// The longest pause between rounds, and the pause after a refusal that only a
    /// configuration change can fix. Defaults to 5 s.
    pub backoff_max: Duration,
    /// How long one attempt may take before it counts as failed. Defaults to 2 s.
    ///
    /// A dead address (nothing listening, a host that is down) answers nothing at all over
    /// UDP, so this is what failover to the next address costs.
    pub connect_timeout: Duration,
}

impl QuicConfig {
    /// A config with every default, for the edge `node` of `region`, dialling the regional at
    /// `addresses` by `server_name`.
    pub fn new(
        addresses: impl IntoIterator<Item = impl Into<Address>>,
        server_name: impl Into<String>,
        identity: TlsIdentity,
        node: impl Into<String>,
        region: impl Into<String>,
    ) -> QuicConfig {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        QuicConfig {
            addresses: addresses.into_iter().map(Into::into).collect(),
            server_name: server_name.into(),
            identity,
            node: node.into(),
            incarnation: u64::try_from(started.as_nanos()).unwrap_or(u64::MAX),
            region: region.into(),
            rule_set_version: 0,
            answer_within: DEFAULT_UPSTREAM_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why a [`QuicUpstream`] could not be started.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QuicError {
    /// A setting is out of range; the message names it.
    #[error("invalid QUIC upstream config: {0}")]
    Config(&'static str),
    /// There is no tokio runtime to run the connection on.
    #[error("no tokio runtime: start the QUIC upstream inside one")]
    NoRuntime,
    /// The TLS identity is not usable, or the client socket could not be bound.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// The agent's [`Upstream`] over QUIC: one long-lived, mutually authenticated connection to
/// the region's regional, kept up by a background task.
///
/// Calls never wait for a connection: while there is none, `sync` and `acquire` fail at once
/// with [`UpstreamError::Unreachable`] and the agent's failure modes decide. A call that finds
/// the connection lost fails the same way and makes the calls after it fail fast too. The task
/// tries [`QuicConfig::addresses`] in order, moving to the next after every failed attempt or
/// lost connection, and backs off between rounds of failures from
/// [`QuicConfig::backoff_min`] to [`QuicConfig::backoff_max`]; a refusal no retry can fix
/// (wrong version, role, region, or a certificate that does not name this node) is logged at
/// error level and retried at the maximum backoff.
///
/// The regional may push rule sets on the connection; they are applied to the agent given to
/// [`attach`](QuicUpstream::attach) (see the module documentation).
///
/// Dropping it stops reconnecting and closes the connection with
/// [`CloseCode::ShuttingDown`].
pub struct QuicUpstream {
    link: Arc<Link>,
    endpoint: Endpoint,
    task: JoinHandle<()>,
}

impl QuicUpstream {
    /// Starts connecting to the regional on the current tokio runtime and returns at once,
    /// before any connection exists: calls fail with [`UpstreamError::Unreachable`] until the
    /// first handshake completes (see [`connected`](QuicUpstream::connected)).
    ///
    /// # Errors
    ///
    /// [`QuicError::Config`] for an empty address list or a zero or inverted backoff;
    /// [`QuicError::NoRuntime`] outside a tokio runtime; [`QuicError::Net`] when the identity
    /// is unusable or no UDP socket can be bound.
    pub fn connect(config: QuicConfig) -> Result<Arc<QuicUpstream>, QuicError> {
        check(&config)?;
        let runtime = Handle::try_current().map_err(|_| QuicError::NoRuntime)?;
        let bind = Address::client_bind(&config.addresses);
        let endpoint = net::client_endpoint(bind, &config.identity)?;
        let (state, _) = watch::channel(None);
        let link = Arc::new(Link {
            state,
            agent: OnceLock::new(),
            pushes: Arc::new(NetStats::default()),
        });
        let task = runtime.spawn(run(link.clone(), endpoint.clone(), config));
        Ok(Arc::new(QuicUpstream {
            link,
            endpoint,
            task,
        }))
    }

    /// Applies the rule sets the regional pushes to `agent` from now on, and names the version
    /// `agent` runs in every later `Hello`. Call it right after building the agent on this
    /// upstream. An upstream serves one agent: a second call changes nothing and returns
    /// false.
    ///
    /// Until it is called, pushes are refused with an error in their [`RuleSetAck`] (the
    /// regional pushes again on the next connection). The upstream does not keep `agent`
    /// alive: the agent owns the upstream, not the other way round.
    pub fn attach(&self, agent: &Agent) -> bool {
        self.link.agent.set(agent.downgrade()).is_ok()
    }

    /// What answering the regional's pushes has done: streams answered, and bad frames
    /// refused by close code.
    pub fn push_stats(&self) -> &NetStats {
        &self.link.pushes
    }

    /// The address of the regional the edge is connected to now, or `None` while it is not
    /// connected (calls then fail at once).
    pub fn connected_to(&self) -> Option<SocketAddr> {
        self.link.state.borrow().as_ref().map(|live| live.address)
    }

    /// Waits until the edge is connected and returns the regional's address. Waits forever
    /// if no regional accepts it: bound it with a timeout.
    pub async fn connected(&self) -> SocketAddr {
        let mut changes = self.link.state.subscribe();
        loop {
            if let Some(address) = self.connected_to() {
                return address;
            }
            // The sender lives in `self.link`, so this cannot fail while `self` is borrowed.
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for QuicUpstream {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint.close(
            VarInt::from_u32(CloseCode::ShuttingDown.as_u32()),
            b"edge shutting down",
        );
    }
}

impl Upstream for QuicUpstream {
    fn sync(&self, batch: SyncBatch) -> UpstreamFuture<SyncAck> {
        let Some(live) = self.link.live() else {
            return Box::pin(async { Err(not_connected()) });
        };
        let link = self.link.clone();
        Box::pin(async move {
            match link.call(&live, Message::SyncBatch(batch)).await? {
                Message::SyncAck(ack) => Ok(ack),
                other => Err(unexpected("sync_ack", &other)),
            }
        })
    }

    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply> {
        let Some(live) = self.link.live() else {
            return Box::pin(async { Err(not_connected()) });
        };
        let link = self.link.clone();
        let id = request.request_id;
        Box::pin(async move {
            match link.call(&live, Message::Acquire(request)).await? {
                Message::AcquireReply(reply) if reply.request_id == id => Ok(reply),
                Message::AcquireReply(reply) => Err(UpstreamError::Protocol(format!(
                    "the reply to acquire {id} answers acquire {}",
                    reply.request_id
                ))),
                other => Err(unexpected("acquire_reply", &other)),
            }
        })
    }
}

/// What the calls, the connection task and the push handler share: the connection, when
/// there is one, and the agent pushed rule sets go to, once attached.
struct Link {
    /// The published connection. A `watch` so that [`QuicUpstream::connected`] can wait for
    /// a change; its lock is held only to clone or replace the value, never across an await.
    state: watch::Sender<Option<Live>>,
    /// Set once by [`QuicUpstream::attach`].
    agent: OnceLock<WeakAgent>,
    /// Counters of the streams the regional opened (its pushes).
    pushes: Arc<NetStats>,
}

/// An established connection and where it goes.
#[derive(Clone)]
struct Live {
    conn: Connection,
    address: SocketAddr,
}

impl Link {
    fn live(&self) -> Option<Live> {
        self.state.borrow().clone()
    }

    /// Unpublishes `live` if it is still the published connection.
    fn lost(&self, live: &Live) {
        let id = live.conn.stable_id();
        self.state.send_if_modified(|state| {
            if state.as_ref().is_some_and(|l| l.conn.stable_id() == id) {
                *state = None;
                true
            } else {
                false
            }
        });
    }

    /// One request on `live`; an error notice from the regional becomes an error.
    async fn call(&self, live: &Live, request: Message) -> Result<Message, UpstreamError> {
        let reply = net::call(&live.conn, &request).await.map_err(|err| {
            if err.is_connection_lost() {
                // Fail the next calls at once; the task is already reconnecting.
                self.lost(live);
            }
            call_error(&err)
        })?;
        match reply {
            Message::Error(notice) => Err(notice_error(&notice)),
            reply => Ok(reply),
        }
    }

    /// The attached agent, if it is attached and alive.
    fn agent(&self) -> Option<Agent> {
        self.agent.get().and_then(WeakAgent::upgrade)
    }

    /// The rule-set version to name in a `Hello` now.
    fn rule_set_version(&self, configured: u64) -> u64 {
        self.agent()
            .map_or(configured, |agent| agent.rules().version())
    }

    /// How long the agent waits for an exact answer, to name in a `Hello` now, in ms.
    fn answer_within_ms(&self, configured: Duration) -> u32 {
        let within = self
            .agent()
            .map_or(configured, |agent| agent.config().upstream_timeout);
        // Rounded up: a wait under a millisecond is still a wait (0 would say none).
        u32::try_from(within.as_micros().div_ceil(1000)).unwrap_or(u32::MAX)
    }

    /// The reply to one message the regional sent on a stream it opened. Blocking: it may
    /// parse a rule set and walk the agent's keys.
    fn answer(&self, message: Message) -> Message {
        match message {
            Message::RuleSetPush(push) => self.take_rules(push).into(),
            other => ErrorNotice {
                code: CloseCode::UnexpectedMessage,
                message: format!("{} is not a push an edge takes", other.kind()),
            }
            .into(),
        }
    }

    /// Validates a pushed rule set and hands it to the agent; see the module documentation.
    fn take_rules(&self, push: RuleSetPush) -> RuleSetAck {
        let version = push.version;
        let Some(agent) = self.agent() else {
            warn!(
                version,
                "a rule set was pushed before an agent was attached"
            );
            return RuleSetAck {
                version,
                error: Some("this edge has no agent to apply rule sets to yet".into()),
            };
        };
        let running = agent.rules().version();
        if version <= running {
            debug!(
                version,
                running, "pushed rule set already in force or superseded"
            );
            return RuleSetAck {
                version,
                error: None,
            };
        }
        let error = match RuleSet::from_yaml(&format!("rule set version {version}"), &push.yaml) {
            Ok(rules) => {
                if agent.set_rules(rules.with_version(version)) {
                    info!(version, previous = running, "enforcing the pushed rule set");
                }
                None
            }
            Err(err) => {
                warn!(version, error = %err, "refused the pushed rule set; the running one stays");
                Some(err.to_string())
            }
        };
        RuleSetAck { version, error }
    }
}

/// Answers the regional's pushes on `conn` until it ends.
async fn answer_pushes(link: Arc<Link>, conn: Connection) {
    let stats = link.pushes.clone();
    let handler = move |message: Message| {
        let link = link.clone();
        async move {
            let kind = message.kind();
            tokio::task::spawn_blocking(move || link.answer(message))
                .await
                .unwrap_or_else(|err| {
                    error!(kind, error = %err, "answering a push failed");
                    ErrorNotice {
                        code: CloseCode::Internal,
                        message: format!("the edge failed answering {kind}"),
                    }
                    .into()
                })
        }
    };
    net::answer(conn, handler, stats).await;
}

/// The connection task: connect, publish and answer pushes, wait for the end, move on;
/// forever (until the upstream is dropped and aborts it).
async fn run(link: Arc<Link>, endpoint: Endpoint, config: QuicConfig) {
    let mut hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node: config.node.clone(),
        incarnation: config.incarnation,
        role: Role::Edge,
        region: config.region.clone(),
        rule_set_version: config.rule_set_version,
        answer_within_ms: 0,
    };
    let addresses = &config.addresses;
    let mut next = 0;
    let mut failed_in_round = 0;
    let mut backoff = config.backoff_min;
    loop {
        // `check` refused an empty list, so `next` always indexes it.
        let Some(configured) = addresses.get(next) else {
            return;
        };
        next = (next + 1) % addresses.len();
        hello.rule_set_version = link.rule_set_version(config.rule_set_version);
        hello.answer_within_ms = link.answer_within_ms(config.answer_within);
        let attempt = tokio::time::timeout(config.connect_timeout, async {
            let address = configured.resolve_for(&endpoint).await?;
            net::connect(&endpoint, address, &config.server_name, &hello)
                .await
                .map(|(conn, welcome)| (conn, welcome, address))
        })
        .await
        .unwrap_or(Err(NetError::Timeout));
        let error = match attempt {
            Ok((conn, welcome, address)) => {
                info!(%configured, %address, regional = %welcome.node, "connected to the regional");
                // For as long as the connection lives. A regional pushes as soon as it has
                // welcomed an edge on an older version; its stream waits until accepted.
                tokio::spawn(answer_pushes(link.clone(), conn.clone()));
                let live = Live { conn, address };
                link.state.send_replace(Some(live.clone()));
                let reason = live.conn.closed().await;
                link.lost(&live);
                warn!(%address, %reason, "connection to the regional lost");
                (failed_in_round, backoff) = (0, config.backoff_min);
                // A pause even after a good connection, so a regional that accepts and
                // closes at once cannot spin this loop.
                tokio::time::sleep(config.backoff_min).await;
                continue;
            }
            Err(error) => error,
        };
        if let NetError::Refused(refused) = &error {
            if refused.reason == Refusal::ShuttingDown {
                info!(address = %configured, "the regional is shutting down, trying the next address");
            } else {
                error!(
                    address = %configured, reason = ?refused.reason, message = %refused.message,
                    "the regional refused this edge: fix the configuration",
                );
                tokio::time::sleep(config.backoff_max).await;
                continue;
            }
        } else if failed_in_round == 0 {
            warn!(address = %configured, %error, "cannot connect to the regional");
        } else {
            debug!(address = %configured, %error, "cannot connect to the regional");
        }
        failed_in_round += 1;
        if failed_in_round >= addresses.len() {
            failed_in_round = 0;
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(config.backoff_max);
        }
    }
}

/// Refuses a config the task could not run with.
fn check(config: &QuicConfig) -> Result<(), QuicError> {
    if config.addresses.is_empty() {
        return Err(QuicError::Config(
            "addresses: at least one regional address",
        ));
    }
    if config.backoff_min.is_zero() || config.backoff_min > config.backoff_max {
        return Err(QuicError::Config(
            "backoff_min must be greater than zero and at most backoff_max",
        ));
    }
    if config.connect_timeout.is_zero() {
        return Err(QuicError::Config(
            "connect_timeout must be greater than zero",
        ));
    }
    Ok(())
}

fn not_connected() -> UpstreamError {
    UpstreamError::Unreachable("not connected to a regional".into())
}

fn unexpected(expected: &str, got: &Message) -> UpstreamError {
    UpstreamError::Protocol(format!(
        "expected {expected}, the regional sent {}",
        got.kind()
    ))
}

/// Transient or permanent, decided once (STYLE 16): the connection or the regional's own state
/// is worth retrying; a frame the regional refused, or a reply we cannot read, is a bug or a
/// version mismatch that retrying repeats.
fn call_error(err: &NetError) -> UpstreamError {
    match err {
        NetError::ConnectionLost(_) | NetError::Connect(_) => {
            UpstreamError::Unreachable(err.to_string())
        }
        NetError::Timeout => UpstreamError::Timeout,
        NetError::StreamClosed { .. } if err.peer_code().is_some_and(transient) => {
            UpstreamError::Unreachable(err.to_string())
        }
        _ => UpstreamError::Protocol(err.to_string()),
    }
}

/// An [`ErrorNotice`] the regional answered instead of a reply.
fn notice_error(notice: &ErrorNotice) -> UpstreamError {
    let text = format!("regional: {}: {}", notice.code.name(), notice.message);
    if transient(notice.code) {
        UpstreamError::Unreachable(text)
    } else {
        UpstreamError::Protocol(text)
    }
}

/// Codes that say nothing is wrong with what we sent: the regional is going away or failed
/// on its own side.
fn transient(code: CloseCode) -> bool {
    matches!(
        code,
        CloseCode::Normal | CloseCode::ShuttingDown | CloseCode::Internal
    )
}
