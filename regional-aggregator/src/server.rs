//! The regional's QUIC service for edges: `shared::net::serve` does the transport (mutual
//! TLS, the handshake's generic checks, one frame per stream, bad frames closed with their
//! code); this module decides who may connect and routes each request to the [`Regional`].
//!
//! An edge is admitted when it says it is an edge of this region. Its counters are filed
//! under [`EdgeId::of`] its node name and incarnation, which every replica computes the same
//! way, so an edge may fail over between replicas mid-window and its counts stay one edge's.
//! Connected edges are `n` in the grant math while their connection lives.
//!
//! A new rule set flows down through here: [`EdgeService::push_rules`] sends it to every
//! connected edge on a stream the regional opens, and an edge whose `Hello` names an older
//! version than the regional runs gets the current one as soon as it is welcomed.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use quinn::Connection;
use shared::{
    net::{self, Peer, Service},
    quota::EdgeId,
    wire::{
        CloseCode, ErrorNotice, Hello, Message, PROTOCOL_VERSION, Refusal, Refused, Role,
        RuleSetPush, Welcome,
    },
};

use crate::Regional;

/// Edges' link to this regional.
pub struct EdgeService {
    regional: Arc<Regional>,
    node: String,
    region: String,
    next_session: AtomicU64,
    /// Connected edges by session: name, counter identity, connection (for pushes).
    connections: Mutex<HashMap<u64, (String, EdgeId, Connection)>>,
}

/// How long a push to one edge may take before it is given up (the edge gets the rule set
/// again when it reconnects, from its `Hello`).
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// One connected edge. It counts in `n` from its `Welcome` until the session is dropped,
/// which happens however the connection ends (even when the `Welcome` never got out).
pub struct EdgeSession {
    /// Its node name, as its certificate proves.
    pub node: String,
    /// Where its counters are filed.
    pub edge: EdgeId,
    /// The rule-set version its `Hello` named.
    pub rule_set_version: u64,
    /// How long it waits for an exact answer, as its `Hello` said (`None`: it did not say).
    pub answer_within: Option<Duration>,
    id: u64,
    regional: Arc<Regional>,
}

impl Drop for EdgeSession {
    fn drop(&mut self) {
        self.regional.edge_disconnected();
    }
}

impl EdgeService {
    /// Serves `regional` as node `node` of region `region`.
    pub fn new(
        regional: Arc<Regional>,
        node: impl Into<String>,
        region: impl Into<String>,
    ) -> EdgeService {
        EdgeService {
            regional,
            node: node.into(),
            region: region.into(),
            next_session: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
        }
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, EdgeId, Connection)>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connected edges' names by counter identity, for the debug view.
    pub fn names(&self) -> HashMap<EdgeId, String> {
        self.connections()
            .values()
            .map(|(name, id, _)| (*id, name.clone()))
            .collect()
    }

    /// Sends `push` to every connected edge, at once, and logs each refusal. Returns how many
    /// edges now run it.
    pub async fn push_rules(&self, push: &RuleSetPush) -> usize {
        let targets: Vec<(String, Connection)> = self
            .connections()
            .values()
            .map(|(name, _, conn)| (name.clone(), conn.clone()))
            .collect();
        let message = Message::from(push.clone());
        let calls = targets.iter().map(|(name, conn)| {
            let message = &message;
            async move { (name, net::push_rule_set(conn, message, PUSH_TIMEOUT).await) }
        });
        let mut accepted = 0;
        for (name, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Ok(()) => accepted += 1,
                Err(reason) => tracing::warn!(
                    edge = %name, version = push.version, %reason, "edge did not take the rule set"
                ),
            }
        }
        accepted
    }
}

fn refuse(reason: Refusal, message: String) -> Refused {
    Refused { reason, message }
}

impl Service for EdgeService {
    type Session = EdgeSession;

    fn hello(&self, _: &Peer, hello: &Hello) -> Result<(EdgeSession, Welcome), Refused> {
        if hello.role != Role::Edge {
            return Err(refuse(
                Refusal::WrongRole,
                format!(
                    "{} connected as {:?}; a regional serves edges",
                    hello.node, hello.role
                ),
            ));
        }
        if hello.region != self.region {
            return Err(refuse(
                Refusal::WrongRegion,
                format!(
                    "{} is an edge of region {:?}; this regional serves {:?}",
                    hello.node, hello.region, self.region
                ),
            ));
        }
        self.regional.edge_connected();
        tracing::info!(edge = %hello.node, incarnation = hello.incarnation, "edge connected");
        let session = EdgeSession {
            node: hello.node.clone(),
            edge: EdgeId::of(&hello.node, hello.incarnation),
            rule_set_version: hello.rule_set_version,
            answer_within: (hello.answer_within_ms > 0)
                .then(|| Duration::from_millis(u64::from(hello.answer_within_ms))),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            regional: self.regional.clone(),
        };
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            node: self.node.clone(),
            role: Role::Regional,
            region: self.region.clone(),
            rule_set_version: self.regional.rules().version(),
        };
        Ok((session, welcome))
    }

    async fn handle(&self, session: &Arc<EdgeSession>, message: Message) -> Message {
        let answer = match message {
            Message::SyncBatch(batch) => self
                .regional
                .sync(session.edge, batch)
                .await
                .map(Message::from),
            Message::Acquire(request) => self
                .regional
                .acquire_within(session.edge, &request, session.answer_within)
                .await
                .map(Message::from),
            other => {
                return Message::Error(ErrorNotice {
                    code: CloseCode::UnexpectedMessage,
                    message: format!("{} is not a request an edge sends", other.kind()),
                });
            }
        };
        answer.unwrap_or_else(|e| {
            // The store failed outright (the breaker answers from memory when it is merely
            // away): the edge falls back to its failure mode and retries.
            Message::Error(ErrorNotice {
                code: CloseCode::Internal,
                message: e.to_string(),
            })
        })
    }

    fn connected(&self, session: &Arc<EdgeSession>, connection: &Connection) {
        self.connections().insert(
            session.id,
            (session.node.clone(), session.edge, connection.clone()),
        );
        let rules = self.regional.rules();
        if session.rule_set_version < rules.version() {
            let (conn, node) = (connection.clone(), session.node.clone());
            let message = Message::from(RuleSetPush::of(&rules));
            tokio::spawn(async move {
                if let Err(reason) = net::push_rule_set(&conn, &message, PUSH_TIMEOUT).await {
                    tracing::warn!(edge = %node, %reason, "edge did not take the rule set");
                }
            });
        }
    }

    fn closed(&self, session: &EdgeSession) {
        self.connections().remove(&session.id);
        tracing::info!(edge = %session.node, "edge disconnected");
    }
}
