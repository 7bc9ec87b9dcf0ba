-- Provisioning: cloud credentials (sealed), deployments (each one a
-- persisted job with a lease), their event log (SSE), and the Terraform
-- state behind the HTTP backend (sealed, with its lock).

CREATE TABLE cloud_credentials (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    default_region TEXT,
    credentials_sealed TEXT NOT NULL,
    is_validated INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    deleted_at INTEGER
);
CREATE INDEX cloud_credentials_organization ON cloud_credentials (organization_id, id);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    provider TEXT NOT NULL,
    credential_id TEXT REFERENCES cloud_credentials (id),
    status TEXT NOT NULL,
    server_id TEXT,
    -- What the job knows (request, steps, outputs, errors), as JSON.
    record TEXT NOT NULL,
    -- The bootstrap token, sealed, while the deployment may still need to
    -- render its user-data again (resume after a restart); cleared after.
    bootstrap_token_sealed TEXT,
    claimed_by TEXT,
    lease_until INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    completed_at INTEGER,
    deleted_at INTEGER
);
CREATE INDEX deployments_organization ON deployments (organization_id, id);
CREATE INDEX deployments_status ON deployments (status, lease_until);

CREATE TABLE deployment_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX deployment_events_deployment ON deployment_events (deployment_id, seq);

CREATE TABLE terraform_states (
    deployment_id TEXT PRIMARY KEY REFERENCES deployments (id),
    state_sealed TEXT,
    lock_id TEXT,
    lock_info TEXT,
    updated_at INTEGER NOT NULL
);
