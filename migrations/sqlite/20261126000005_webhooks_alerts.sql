-- Webhooks (secret sealed under the master key), their deliveries (each a
-- small persisted job with a lease) and every delivery attempt; alert rules,
-- the debounce clock of each (rule, server) condition, and alerts.

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    url TEXT NOT NULL,
    -- JSON array of event names or patterns (`*`, `infrastructure.*`).
    events TEXT NOT NULL,
    secret_sealed TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX webhooks_organization ON webhooks (organization_id, id);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL REFERENCES webhooks (id),
    organization_id TEXT NOT NULL,
    event TEXT NOT NULL,
    -- The exact body that is signed and sent.
    body TEXT NOT NULL,
    -- pending | delivered | failed
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    claimed_by TEXT,
    lease_until INTEGER,
    last_status_code INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    completed_at INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);

CREATE TABLE webhook_delivery_attempts (
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id),
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    status_code INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE alert_rules (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    -- metric | health_failing | offline
    kind TEXT NOT NULL,
    metric TEXT,
    op TEXT,
    threshold REAL,
    for_seconds INTEGER NOT NULL,
    severity TEXT NOT NULL,
    -- JSON {labels, server_ids}
    selector TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX alert_rules_organization ON alert_rules (organization_id, id);

-- Since when a rule's condition has held for a server (cleared when it stops).
CREATE TABLE alert_conditions (
    rule_id TEXT NOT NULL REFERENCES alert_rules (id),
    server_id TEXT NOT NULL,
    since INTEGER NOT NULL,
    PRIMARY KEY (rule_id, server_id)
);

CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL REFERENCES alert_rules (id),
    rule_name TEXT NOT NULL,
    -- The server's organization.
    organization_id TEXT NOT NULL,
    server_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    -- firing | resolved
    state TEXT NOT NULL,
    value REAL,
    started_at INTEGER NOT NULL,
    resolved_at INTEGER
);
CREATE UNIQUE INDEX alerts_one_firing ON alerts (rule_id, server_id) WHERE state = 'firing';
CREATE INDEX alerts_organization ON alerts (organization_id, id);
