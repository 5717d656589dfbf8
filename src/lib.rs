//! chatmesh: a real-time chat backend with gap-free per-room ordering.
//!
//! The same wire contract (`shared/API.md`) is served in every mode; each concern that differs
//! between modes sits behind one trait, chosen once at start in [`app`].
//!
//! # Layout
//! - [`config`]: typed settings from environment and flags, parsed once.
//! - [`domain`]: validated newtypes (`Username`, `MessageBody`, ...) and the API objects.
//! - [`error`]: the one error enum of the API, mapped once to HTTP and Socket.IO acks.
//! - [`store`]: the durable [`store::Store`] trait; one SQL store (SQLite, PostgreSQL) and MongoDB.
//! - [`sequencer`]: assigns per-room seqs; embedded mode group-commits into the store.
//! - [`fanout`]: delivers accepted messages to sockets, in seq order.
//! - [`history`]: reading messages (store; in cluster mode merged with Redis recent history).
//! - [`sync`]: cluster write-back from Redis Streams into the store.
//! - [`redis_io`]: Redis connections, key names, the send script; [`cluster`]: membership.
//! - [`revocation`]: leaves that every instance's sends see at once (cached memberships);
//!   [`sessions`]: revoked user tokens (logout, password change).
//! - [`ops`]: readiness and the cluster view per mode.
//! - [`service`]: the operations both REST and Socket.IO call (never branching on the mode).
//! - [`api`]: axum routes; [`realtime`]: the Socket.IO namespace; [`web`]: the chat page.
//! - [`internal`]: tokens instances present to each other's `/internal/v1` endpoints.
//! - [`auth`], [`ratelimit`], [`throttle`] (budgets shared by a deployment), [`metrics`],
//!   [`telemetry`]: cross-cutting pieces.
//! - [`state`]: what every handler shares ([`state::AppState`]).
//! - [`app`]: `Application::build` wires one mode and `run_until_stopped` serves it.
//! - [`listener`]: the accept loop in front of the router: TLS (reloaded on SIGHUP), connection
//!   caps and the slow-client timeouts.
//! - [`region`]: several regions active-active: forwarding to a room's home, replication.
//! - [`backup`]: `chatmesh backup` / `chatmesh restore` (streamed JSON Lines, any backend).

pub mod api;
pub mod app;
pub mod auth;
pub mod backup;
pub mod breaker;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod fanout;
pub mod history;
pub mod internal;
pub mod listener;
pub mod metrics;
pub mod ops;
pub mod presence;
pub mod ratelimit;
pub mod realtime;
pub mod redis_io;
pub mod region;
pub mod revocation;
pub mod sequencer;
pub mod service;
pub mod sessions;
pub mod sio;
pub mod state;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod throttle;
pub mod web;
