-- Commands relayed to agents: one row per (command, server). The environment
-- is sealed under the master key; it and stdin are cleared when the command
-- ends. Output is bounded by max_output_bytes (output_truncated says when
-- more was dropped).

CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    server_id TEXT NOT NULL REFERENCES servers (id),
    argv TEXT NOT NULL,
    env_sealed TEXT,
    stdin BLOB,
    timeout_ms INTEGER NOT NULL,
    max_output_bytes INTEGER NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    output BLOB NOT NULL DEFAULT x'',
    output_truncated INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    claimed_by TEXT,
    deliver_by INTEGER NOT NULL
);
CREATE INDEX commands_organization ON commands (organization_id, id);
CREATE INDEX commands_server_status ON commands (server_id, status);
CREATE INDEX commands_status_deliver_by ON commands (status, deliver_by);
