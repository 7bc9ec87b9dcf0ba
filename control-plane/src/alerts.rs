//! Alert rules evaluated against incoming metrics, health and connection
//! state; firing and resolved alerts (being written).
