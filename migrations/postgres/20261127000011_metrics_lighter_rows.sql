-- Cheaper raw points (issue 4, store cost per report).
--
-- * No foreign key from metrics to servers: the check ran per inserted row
--   (a lookup and a KEY SHARE lock on the server's row). Points are only
--   written for a server whose session was admitted against its row, and
--   servers are never deleted (revocation keeps the row).
-- * The per-core, disk and network lists as `json` instead of `jsonb`: they
--   are only ever read back whole, and `json` stores the text it was given
--   after checking it, where `jsonb` parses it into its binary form.
ALTER TABLE metrics DROP CONSTRAINT IF EXISTS metrics_server_id_fkey;
ALTER TABLE metrics
    ALTER COLUMN cpu_per_core DROP DEFAULT,
    ALTER COLUMN disks DROP DEFAULT,
    ALTER COLUMN networks DROP DEFAULT;
ALTER TABLE metrics
    ALTER COLUMN cpu_per_core TYPE json USING cpu_per_core::json,
    ALTER COLUMN disks TYPE json USING disks::json,
    ALTER COLUMN networks TYPE json USING networks::json;
ALTER TABLE metrics
    ALTER COLUMN cpu_per_core SET DEFAULT '[]',
    ALTER COLUMN disks SET DEFAULT '[]',
    ALTER COLUMN networks SET DEFAULT '[]';
-- * `received_at` (the rollup job's window) grows with the table, and `ts`
--   (retention) nearly so: BRIN indexes (a summary per block range) answer
--   those range scans for a fraction of a B-tree's upkeep per inserted row.
DROP INDEX IF EXISTS metrics_received;
DROP INDEX IF EXISTS metrics_ts;
CREATE INDEX metrics_received ON metrics USING brin (received_at) WITH (autosummarize = on);
CREATE INDEX metrics_ts ON metrics USING brin (ts) WITH (autosummarize = on);
