//! Health of servers: results reported by agents, checks pushed to them,
//! connection states and offline detection (being written).
