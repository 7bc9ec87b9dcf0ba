-- Credential lifecycle (issue 20): a credential's validation outcome is
-- kept (status, when, and what was wrong, never a credential value), and
-- credentials can be rotated (updated_at). The deployments of a credential
-- are looked up by credential to refuse deleting one still in use.

ALTER TABLE cloud_credentials ADD COLUMN validation_status TEXT NOT NULL DEFAULT 'unvalidated';
ALTER TABLE cloud_credentials ADD COLUMN validated_at INTEGER;
ALTER TABLE cloud_credentials ADD COLUMN validation_error TEXT;
ALTER TABLE cloud_credentials ADD COLUMN updated_at INTEGER;
-- A credential validated before this release: valid, at an unknown time.
UPDATE cloud_credentials SET validation_status = 'valid' WHERE is_validated = 1;

CREATE INDEX deployments_credential ON deployments (credential_id, status);
