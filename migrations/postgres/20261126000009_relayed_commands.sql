-- Commands this branch relayed to a peer branch, mirrored here: the peer runs
-- them; a follower copies their status and output back (the `commands` table
-- only holds commands of this branch's own servers).

CREATE TABLE relayed_commands (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    branch_id uuid NOT NULL,
    remote_server_id uuid NOT NULL,
    remote_command_id text NOT NULL,
    argv jsonb NOT NULL,
    timeout_ms bigint NOT NULL,
    status text NOT NULL,
    exit_code integer,
    reason text,
    output bytea NOT NULL DEFAULT '\x'::bytea,
    output_truncated boolean NOT NULL DEFAULT false,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX relayed_commands_status ON relayed_commands (status);
