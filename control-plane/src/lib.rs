//! Weir's control plane: the gRPC API and its JSON gateway ([`service`],
//! [`server`]), the scheduler that places publishers and viewers on media
//! nodes ([`scheduler`]), the coordinators ([`coordinator`]: in-process, the
//! embedded default of `weir dev`, and etcd, for clusters), the token issuer ([`tokens`]),
//! the business store ([`store`]: users, rooms, follows, wallets with their
//! double-entry ledger, gifts and the gift outbox, on SQLite or
//! PostgreSQL), the config center ([`config_center`]), leader election for
//! singleton workers ([`election`], [`workers`]) among which the outbox
//! relay ([`outbox`]) that publishes gift events to the room bus through
//! [`bus`] (NATS JetStream), rollout weights per node version
//! ([`rollout`]), CDN health and failover ([`cdn`]), and the client library
//! of `weir ctl` ([`ctl`]).

pub mod bus;
pub mod cdn;
pub mod config_center;
pub mod coordinator;
pub mod ctl;
pub mod election;
pub mod outbox;
pub mod rollout;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod store;
pub mod tokens;
pub mod workers;

pub use coordinator::{EtcdConfig, EtcdCoordinator, LocalCoordinator};
pub use server::{RenderMetrics, router, serve, serve_shared, serve_with};
pub use service::{ApiError, ConfigError, ControlConfig, ControlState};
pub use tokens::TokenIssuer;
