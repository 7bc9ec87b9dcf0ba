-- What a command runs is stored once per submission: every per-server
-- command of a fan-out refers to one command_requests row and keeps no copy.
-- argv is kept (the API shows it); the environment and stdin are sealed
-- under the master key (contexts command/<request id>/env and
-- command/<request id>/stdin) and cleared once no command of the request is
-- queued or running.

CREATE TABLE command_requests (
    id TEXT PRIMARY KEY,
    argv TEXT NOT NULL,
    env_sealed TEXT,
    stdin_sealed TEXT,
    created_at INTEGER NOT NULL
);

-- Existing commands become requests of their own, under the same id, so a
-- sealed environment keeps its sealing context.
INSERT INTO command_requests (id, argv, env_sealed, stdin_sealed, created_at)
    SELECT id, argv, env_sealed, NULL, created_at FROM commands;
ALTER TABLE commands ADD COLUMN request_id TEXT REFERENCES command_requests (id);
UPDATE commands SET request_id = id;

-- stdin was stored in clear: it is not carried over. A command still queued
-- with stdin is given up (submit it again); a running one already has it.
UPDATE commands
    SET status = 'undeliverable',
        finished_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
        reason = 'queued before an upgrade that seals stdin; submit it again'
    WHERE status = 'queued' AND stdin IS NOT NULL;
UPDATE command_requests SET env_sealed = NULL
    WHERE id IN (SELECT id FROM commands WHERE status NOT IN ('queued', 'running'));

ALTER TABLE commands DROP COLUMN argv;
ALTER TABLE commands DROP COLUMN env_sealed;
ALTER TABLE commands DROP COLUMN stdin;
CREATE INDEX commands_request_status ON commands (request_id, status);
