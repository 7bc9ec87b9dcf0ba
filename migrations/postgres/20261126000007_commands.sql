-- Commands relayed to agents: one row per (command, server). The environment
-- is sealed under the master key; it and stdin are cleared when the command
-- ends. Output is bounded by max_output_bytes (output_truncated says when
-- more was dropped). Replicas route commands with NOTIFY tether_commands.

CREATE TABLE commands (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    server_id uuid NOT NULL REFERENCES servers (id),
    argv jsonb NOT NULL,
    env_sealed text,
    stdin bytea,
    timeout_ms bigint NOT NULL,
    max_output_bytes bigint NOT NULL,
    status text NOT NULL,
    exit_code integer,
    signal integer,
    reason text,
    output bytea NOT NULL DEFAULT '\x'::bytea,
    output_truncated boolean NOT NULL DEFAULT false,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    claimed_by text,
    deliver_by timestamptz NOT NULL
);
CREATE INDEX commands_organization ON commands (organization_id, id);
CREATE INDEX commands_server_status ON commands (server_id, status);
CREATE INDEX commands_status_deliver_by ON commands (status, deliver_by);
