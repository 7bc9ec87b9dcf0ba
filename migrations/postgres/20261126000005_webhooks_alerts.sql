-- Webhooks (secret sealed under the master key), their deliveries (each a
-- small persisted job with a lease) and every delivery attempt; alert rules,
-- the debounce clock of each (rule, server) condition, and alerts.

CREATE TABLE webhooks (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    url text NOT NULL,
    -- Array of event names or patterns (`*`, `infrastructure.*`).
    events jsonb NOT NULL,
    secret_sealed text NOT NULL,
    created_at timestamptz NOT NULL,
    deleted_at timestamptz
);
CREATE INDEX webhooks_organization ON webhooks (organization_id, id);

CREATE TABLE webhook_deliveries (
    id uuid PRIMARY KEY,
    webhook_id uuid NOT NULL REFERENCES webhooks (id),
    organization_id uuid NOT NULL,
    event text NOT NULL,
    -- The exact body that is signed and sent.
    body text NOT NULL,
    -- pending | delivered | failed
    status text NOT NULL,
    attempts bigint NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    claimed_by text,
    lease_until timestamptz,
    last_status_code bigint,
    last_error text,
    created_at timestamptz NOT NULL,
    completed_at timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);

CREATE TABLE webhook_delivery_attempts (
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id),
    attempt bigint NOT NULL,
    at timestamptz NOT NULL,
    status_code bigint,
    error text,
    duration_ms bigint NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE alert_rules (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    -- metric | health_failing | offline
    kind text NOT NULL,
    metric text,
    op text,
    threshold double precision,
    for_seconds bigint NOT NULL,
    severity text NOT NULL,
    -- {labels, server_ids}
    selector jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    deleted_at timestamptz
);
CREATE INDEX alert_rules_organization ON alert_rules (organization_id, id);

-- Since when a rule's condition has held for a server (cleared when it stops).
CREATE TABLE alert_conditions (
    rule_id uuid NOT NULL REFERENCES alert_rules (id),
    server_id uuid NOT NULL,
    since timestamptz NOT NULL,
    PRIMARY KEY (rule_id, server_id)
);

CREATE TABLE alerts (
    id uuid PRIMARY KEY,
    rule_id uuid NOT NULL REFERENCES alert_rules (id),
    rule_name text NOT NULL,
    -- The server's organization.
    organization_id uuid NOT NULL,
    server_id uuid NOT NULL,
    severity text NOT NULL,
    -- firing | resolved
    state text NOT NULL,
    value double precision,
    started_at timestamptz NOT NULL,
    resolved_at timestamptz
);
CREATE UNIQUE INDEX alerts_one_firing ON alerts (rule_id, server_id) WHERE state = 'firing';
CREATE INDEX alerts_organization ON alerts (organization_id, id);
