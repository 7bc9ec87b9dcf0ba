//! Provisioning: servers made with the real `terraform` binary that register
//! themselves. Templates embedded in the binary ([`templates`]), the
//! cloud-init user-data they all share ([`bootstrap`]), cloud credentials
//! ([`credentials`]), the agent binaries servers
//! download ([`agent_binaries`]), the
//! terraform process and its JSON event stream ([`runner`]), which of its
//! failures are worth retrying ([`failure`]) and the persisted
//! job that drives a deployment from `pending` to `completed` or `failed`
//! and back to `destroyed` ([`job`]).

pub mod agent_binaries;
pub mod bootstrap;
pub mod credentials;
pub mod failure;
pub mod job;
pub mod runner;
pub mod templates;
