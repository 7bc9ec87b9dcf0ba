//! Commands run on agents: queueing, fan-out, dispatch over QUIC, output and
//! statuses, cross-replica routing (being written).
