-- Health: checks pushed to agents, the latest result of each check per
-- server (built-in checks too), and when a server's current session began.
-- Same tables and semantics as migrations/sqlite.

-- Set by mark_online; a session's end only marks the server offline while
-- it is still the session that began at this time (a newer session on
-- another replica keeps its server online).
ALTER TABLE servers ADD COLUMN online_since timestamptz;

CREATE TABLE health_checks (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('http', 'tcp', 'exec')),
    -- {url, expected_status, body_contains} | {address} | {argv}
    spec jsonb NOT NULL,
    interval_seconds bigint NOT NULL,
    timeout_seconds bigint NOT NULL,
    retries bigint NOT NULL,
    start_period_seconds bigint NOT NULL,
    -- {labels?, server_ids?}
    selector jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX health_checks_organization ON health_checks (organization_id, id);

CREATE TABLE health_results (
    server_id uuid NOT NULL REFERENCES servers (id),
    -- The pushed check's id, or `builtin:<name>`.
    check_id text NOT NULL,
    name text NOT NULL,
    status text NOT NULL,
    message text NOT NULL,
    consecutive_failures bigint NOT NULL,
    checked_at timestamptz NOT NULL,
    duration_ms bigint NOT NULL,
    seq bigint NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (server_id, check_id)
);
-- The registration-timeout sweep: connecting servers by age.
CREATE INDEX servers_connecting_created ON servers (created_at)
    WHERE status = 'connecting' AND deleted_at IS NULL;
