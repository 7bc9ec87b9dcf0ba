-- Provisioning governance: the monthly-cost quota (whole USD, catalog list
-- prices of running deployments) and the approval policy of an
-- organization (inherited from the nearest ancestor that has one).
-- Deployments keep their catalog size, cost, batch and approval in their
-- `record` document.

ALTER TABLE organizations ADD COLUMN max_monthly_cost_usd bigint;

CREATE TABLE approval_policies (
    organization_id uuid PRIMARY KEY REFERENCES organizations (id),
    -- 'always' or 'never' (then only the conditions below route to approval).
    require text NOT NULL,
    above_monthly_usd double precision,
    -- JSON arrays of names; empty: no condition.
    providers jsonb NOT NULL,
    regions jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);
