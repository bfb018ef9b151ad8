//! The regional's QUIC service for edges: `shared::net::serve` does the transport (mutual
//! TLS, the handshake's generic checks, one frame per stream, bad frames closed with their
//! code); this module decides who may connect and routes each request to the [`Regional`].
//!
//! An edge is admitted when it says it is an edge of this region. Its counters are filed
//! under [`EdgeId::of`] its node name and incarnation, which every replica computes the same
//! way, so an edge may fail over between replicas mid-window and its counts stay one edge's.
//! Connected edges are `n` in the grant math while their connection lives.

use std::sync::Arc;

use shared::{
    net::{Peer, Service},
    quota::EdgeId,
    wire::{
        CloseCode, ErrorNotice, Hello, Message, PROTOCOL_VERSION, Refusal, Refused, Role, Welcome,
    },
};

use crate::Regional;

/// Edges' link to this regional.
pub struct EdgeService {
    regional: Arc<Regional>,
    node: String,
    region: String,
}

/// One connected edge. It counts in `n` from its `Welcome` until the session is dropped,
/// which happens however the connection ends (even when the `Welcome` never got out).
pub struct EdgeSession {
    /// Its node name, as its certificate proves.
    pub node: String,
    /// Where its counters are filed.
    pub edge: EdgeId,
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
        }
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
                .acquire(session.edge, &request)
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

    fn closed(&self, session: &EdgeSession) {
        tracing::info!(edge = %session.node, "edge disconnected");
    }
}
