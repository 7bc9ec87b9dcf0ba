//! What the agent measures: the host ([`system`]) and the containers of the
//! local Docker daemon ([`docker`]). Both collectors live as long as the
//! process and keep the previous sample, so rates (CPU %) are deltas between
//! two ticks.

pub mod docker;
pub mod system;
