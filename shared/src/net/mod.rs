//! The transport every tier shares: QUIC with mutual TLS from a deployment CA (DESIGN §5).
//!
//! This is the one module of `shared` that does I/O, and it exists only with the `net`
//! feature: the sans-IO core (rules, algorithms, quota, the frame codec) stays free of tokio,
//! sockets and files, and a crate that only needs the vocabulary does not build quinn. It sits
//! here rather than in a tier because three tiers speak it and must agree on it exactly: the
//! edge dials its regional, the regional serves edges and dials the coordinator, the
//! coordinator serves regionals.
//!
//! # How a request flows
//!
//! A client tier binds an endpoint ([`client_endpoint`]) and [`connect`]s: TLS 1.3 with both
//! sides' certificates checked against the deployment CA ([`tls`]), then a [`Hello`] on the
//! connection's first stream, answered by a [`Welcome`] or a [`Refused`]. The connection then
//! lives as long as both sides do, kept alive by pings and declared lost after
//! [`IDLE_TIMEOUT`] of silence. Each request is a [`call`]: a new bidirectional stream, one
//! frame each way ([`frame`]). The server side runs [`serve`] with its tier's [`Service`],
//! which accepts connections, does the handshake's generic checks (protocol version, the
//! claimed node name against the certificate, [`Peer::is_named`]), and serves every stream in
//! its own task, closing a stream whose frame does not decode with that error's
//! [`CloseCode`] and counting it ([`NetStats`]).
//!
//! # Example
//!
//! A regional that answers every request with an empty `SyncAck`, and an edge that greets it
//! and makes one call, with certificates from a fresh CA:
//!
//! ```
//! use std::sync::Arc;
//!
//! use shared::net::{self, Ca, Identity, NetStats, Peer, Service};
//! use shared::wire::{
//!     Hello, Message, PROTOCOL_VERSION, Refused, Role, SyncAck, SyncBatch, Welcome,
//! };
//!
//! struct Regional;
//!
//! impl Service for Regional {
//!     type Session = String; // the edge's node name
//!
//!     fn hello(&self, _: &Peer, hello: &Hello) -> Result<(String, Welcome), Refused> {
//!         let welcome = Welcome {
//!             protocol_version: PROTOCOL_VERSION,
//!             node: "regional-eu-1".into(),
//!             role: Role::Regional,
//!             region: "eu".into(),
//!             rule_set_version: 0,
//!         };
//!         Ok((hello.node.clone(), welcome))
//!     }
//!
//!     async fn handle(&self, _: &Arc<String>, _: Message) -> Message {
//!         SyncAck { entries: vec![], hot_keys: vec![], partitions: vec![], recalls: vec![] }.into()
//!     }
//! }
//!
//! # let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # runtime.block_on(async {
//! let ca = Ca::generate("example CA")?;
//! let regional = Identity::new(&ca, &ca.issue("regional-eu-1", &[])?);
//! let edge = Identity::new(&ca, &ca.issue("edge-eu-1", &[])?);
//!
//! let server = net::server_endpoint("127.0.0.1:0".parse()?, &regional)?;
//! let addr = server.local_addr()?;
//! tokio::spawn(net::serve(server, Arc::new(Regional), Arc::new(NetStats::default())));
//!
//! let client = net::client_endpoint("0.0.0.0:0".parse()?, &edge)?;
//! let hello = Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     node: "edge-eu-1".into(), // must be a name in the edge's certificate
//!     incarnation: 1,
//!     role: Role::Edge,
//!     region: "eu".into(),
//!     rule_set_version: 0,
//!     answer_within_ms: 50,
//! };
//! let (conn, welcome) = net::connect(&client, addr, "regional-eu-1", &hello).await?;
//! assert_eq!(welcome.node, "regional-eu-1");
//! let reply = net::call(&conn, &SyncBatch { entries: vec![] }.into()).await?;
//! assert!(matches!(reply, Message::SyncAck(_)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layout
//!
//! - [`pki`]: the deployment CA, node certificates, and the files operators deploy.
//! - [`tls`]: [`Identity`] and the quinn server and client configs, transport settings.
//! - `peer`: [`Peer`], the verified certificate behind a connection, and the node-name check.
//! - [`frame`]: messages on streams: [`write_message`], [`read_message`], [`call`].
//! - `server`: [`serve`], the [`Service`] trait, [`NetStats`], [`server_endpoint`], and
//!   [`answer`], the client's side of streams the server opens (pushes down the tree).
//! - `client`: [`client_endpoint`] and [`connect`].
//! - `error`: [`NetError`].
//!
//! [`Hello`]: crate::wire::Hello
//! [`Welcome`]: crate::wire::Welcome
//! [`Refused`]: crate::wire::Refused
//! [`CloseCode`]: crate::wire::CloseCode

mod address;
mod client;
mod error;
pub mod frame;
mod peer;
pub mod pki;
mod server;
pub mod tls;

pub use self::{
    address::{Address, AddressError, is_dns_name},
    client::{client_endpoint, connect},
    error::NetError,
    frame::{call, call_within, push_rule_set, read_message, write_message},
    peer::Peer,
    pki::{Ca, NodeCert, PkiError, write_pki},
    server::{HANDSHAKE_TIMEOUT, NetStats, Service, answer, serve, server_endpoint},
    tls::{
        ALPN, IDLE_TIMEOUT, Identity, KEEP_ALIVE_INTERVAL, MAX_CONCURRENT_STREAMS, TlsError,
        client_config, server_config,
    },
};
