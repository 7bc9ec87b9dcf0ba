//! Tether control plane: the HTTP API, the QUIC gateway agents connect to,
//! the store, and the PKI that enrolls agents.
//!
//! * [`app`] — start sequence and shared state of a running control plane.
//! * [`api`] — axum routers, error model, authenticated caller.
//! * [`gateway`] — QUIC endpoint: enrollment, sessions, session registry.
//! * [`store`] — the storage trait and its database implementations.
//! * [`auth`] — API tokens (JWT) and scopes.
//! * [`pki`] — the branch CA as the gateway uses it.
//! * [`secrets`] — master key and sealing of secrets at rest.
//! * [`config`] — `tether serve` settings.
//! * [`quickstart`] — `tether quickstart`.
//!
//! Architecture invariant: this crate never links sysinfo or bollard (those
//! belong to the agent), and keeps every secret out of logs and responses.

pub mod alerts;
pub mod api;
pub mod app;
pub mod auth;
pub mod commands;
pub mod config;
pub mod federation;
pub mod fsutil;
pub mod gateway;
pub mod health;
pub mod pki;
pub mod provision;
pub mod quickstart;
pub mod quota;
pub mod rotate;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod webhooks;
