-- Commands this branch relayed to a peer branch, mirrored here: the peer runs
-- them; a follower copies their status and output back (the `commands` table
-- only holds commands of this branch's own servers).

CREATE TABLE relayed_commands (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    branch_id TEXT NOT NULL,
    remote_server_id TEXT NOT NULL,
    remote_command_id TEXT NOT NULL,
    argv TEXT NOT NULL,
    timeout_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT,
    output BLOB NOT NULL DEFAULT x'',
    output_truncated INTEGER NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER
);
CREATE INDEX relayed_commands_status ON relayed_commands (status);
