//! Tether control plane: the HTTP API, the QUIC gateway agents connect to,
//! the store, and the PKI that enrolls agents.
//!
//! * [`alerts`] — the alert engine (metric, offline and health rules).
//! * [`api`] — axum routers, error model, authenticated caller, extractors.
//! * [`app`] — the wiring: start sequence, every background loop (one list,
//!   `spawn_loops`), shutdown.
//! * [`auth`] — API tokens (JWT) and scopes.
//! * [`catalog`] — the instance catalog: sizes and list prices, cost
//!   estimates, nearest matches.
//! * [`commands`] — commands run on agents, and those live on this replica.
//! * [`config`] — `tether serve` settings.
//! * [`context`] — `ControlPlane`, the shared state, over leaf state types.
//! * [`enrollment`] — enrollment tokens (mint, hash, issue) and failure log.
//! * [`events`] — emitting an event to the alert engine and the webhooks.
//! * [`federation`] — branch peering, inter-branch calls and relays.
//! * [`fsutil`] — private files and directories.
//! * [`gateway`] — QUIC endpoint: enrollment, sessions, session registry,
//!   liveness and connection states.
//! * [`health`] — health checks as the control plane runs them.
//! * [`health_pushes`] — health-check push state (a field of `ControlPlane`).
//! * [`pki`] — the branch CA as the gateway uses it.
//! * [`provision`] — deployments through terraform.
//! * [`quickstart`] — `tether quickstart`.
//! * [`quota`] — quota checks along the organization tree.
//! * [`rate_limit`] — fixed-window request counters.
//! * [`rotate`] — master key loading and rotation.
//! * [`secrets`] — master key and sealing of secrets at rest.
//! * [`store`] — the storage trait and its database implementations.
//! * [`telemetry`] — metric rollups and retention.
//! * [`webhooks`] — webhook deliveries and their worker.
//!
//! Architecture invariant: this crate never links sysinfo or bollard (those
//! belong to the agent), and keeps every secret out of logs and responses.

pub mod alerts;
pub mod api;
pub mod app;
pub mod approval;
pub mod auth;
pub mod catalog;
pub mod commands;
pub mod config;
pub mod context;
pub mod enrollment;
pub mod events;
pub mod federation;
pub mod fsutil;
pub mod gateway;
pub mod health;
pub mod health_pushes;
pub mod pki;
pub mod provision;
pub mod quickstart;
pub mod quota;
pub mod rate_limit;
pub mod rotate;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod webhooks;
