-- Health: checks pushed to agents, the latest result of each check per
-- server (built-in checks too), and when a server's current session began.

-- Set by mark_online; a session's end only marks the server offline while
-- it is still the session that began at this time (a newer session on
-- another replica keeps its server online).
ALTER TABLE servers ADD COLUMN online_since INTEGER;

CREATE TABLE health_checks (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('http', 'tcp', 'exec')),
    -- {url, expected_status, body_contains} | {address} | {argv}
    spec TEXT NOT NULL,
    interval_seconds INTEGER NOT NULL,
    timeout_seconds INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    start_period_seconds INTEGER NOT NULL,
    -- {labels?, server_ids?}
    selector TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX health_checks_organization ON health_checks (organization_id, id);

CREATE TABLE health_results (
    server_id TEXT NOT NULL REFERENCES servers (id),
    -- The pushed check's id, or `builtin:<name>`.
    check_id TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    checked_at INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (server_id, check_id)
);
