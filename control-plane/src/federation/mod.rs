//! Branch federation: peering, trust, inventory, heartbeats and the
//! cross-branch relay (being written).
