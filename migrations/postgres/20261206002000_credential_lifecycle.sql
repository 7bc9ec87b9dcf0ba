-- Credential lifecycle (issue 20): a credential's validation outcome is
-- kept (status, when, and what was wrong, never a credential value), and
-- credentials can be rotated (updated_at). The deployments of a credential
-- are looked up by credential to refuse deleting one still in use.

ALTER TABLE cloud_credentials ADD COLUMN validation_status text NOT NULL DEFAULT 'unvalidated';
ALTER TABLE cloud_credentials ADD COLUMN validated_at timestamptz;
ALTER TABLE cloud_credentials ADD COLUMN validation_error text;
ALTER TABLE cloud_credentials ADD COLUMN updated_at timestamptz;
-- A credential validated before this release: valid, at an unknown time.
UPDATE cloud_credentials SET validation_status = 'valid' WHERE is_validated;

CREATE INDEX deployments_credential ON deployments (credential_id, status);
