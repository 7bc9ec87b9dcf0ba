-- Tether control plane schema, PostgreSQL flavour.
-- Same tables and semantics as migrations/sqlite; ids are uuid, times
-- timestamptz (UTC), JSON is jsonb, counters bigint.

CREATE TABLE instance (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    branch_id uuid NOT NULL,
    branch_name text NOT NULL,
    root_organization_id uuid NOT NULL,
    ca_cert_pem text NOT NULL,
    ca_key_sealed text NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE organizations (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    parent_id uuid REFERENCES organizations (id),
    max_servers bigint,
    max_cpu_cores bigint,
    max_memory_gb bigint,
    created_at timestamptz NOT NULL,
    deleted_at timestamptz,
    CHECK (parent_id IS DISTINCT FROM id)
);
-- Tree walks only follow live organizations.
CREATE INDEX organizations_parent ON organizations (parent_id) WHERE deleted_at IS NULL;

CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    scopes text[] NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX api_tokens_organization ON api_tokens (organization_id);

CREATE TABLE enrollment_tokens (
    id uuid PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    server_name text,
    labels jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    deployment_id uuid,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    server_id uuid,
    CHECK ((used_at IS NULL) = (server_id IS NULL))
);
-- Unredeemed tokens, for expiry sweeps.
CREATE INDEX enrollment_tokens_pending ON enrollment_tokens (expires_at) WHERE used_at IS NULL;

CREATE TABLE servers (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    hostname text NOT NULL,
    labels jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    status text NOT NULL CHECK (status IN ('connecting', 'online', 'offline', 'timeout')),
    status_reason text,
    agent_version text,
    facts jsonb NOT NULL DEFAULT '{}',
    deployment_id uuid,
    created_at timestamptz NOT NULL,
    last_seen_at timestamptz,
    deleted_at timestamptz
);
-- Listings: live servers of a set of organizations, in id order.
CREATE INDEX servers_organization ON servers (organization_id, id) WHERE deleted_at IS NULL;
-- The silence sweep: live online servers by last contact.
CREATE INDEX servers_online_last_seen ON servers (last_seen_at)
    WHERE status = 'online' AND deleted_at IS NULL;

CREATE TABLE certificates (
    serial text PRIMARY KEY,
    server_id uuid NOT NULL REFERENCES servers (id),
    not_before timestamptz NOT NULL,
    not_after timestamptz NOT NULL,
    issued_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX certificates_server ON certificates (server_id);

CREATE TABLE audit_log (
    seq bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    at timestamptz NOT NULL,
    actor text NOT NULL,
    organization_id uuid,
    action text NOT NULL,
    target text,
    source_ip text,
    outcome text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_organization ON audit_log (organization_id, seq);
CREATE INDEX audit_log_unscoped ON audit_log (seq) WHERE organization_id IS NULL;
CREATE INDEX audit_log_at ON audit_log (at);

-- The audit log is append-only: rows cannot be changed or removed, not even
-- by the control plane's own database role.
CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
