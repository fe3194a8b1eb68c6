-- Version 4: pause and resume (`syncer pause`, `syncer resume`). The state lives here, so
-- every replica honours it: each reads it on a NOTIFY of the control channel and on its
-- poll. A paused pipeline keeps capturing; its workers claim nothing.
-- (003 is another branch's; the runner applies whichever of them a database lacks.)
ALTER TABLE syncer.pipelines
    ADD COLUMN IF NOT EXISTS paused_at timestamptz,
    ADD COLUMN IF NOT EXISTS paused_by text;

-- When a vector of the pipeline was last committed (each process records its own, at most
-- every few seconds: no write on the hot path), for `syncer status`.
ALTER TABLE syncer.pipelines ADD COLUMN IF NOT EXISTS last_write_at timestamptz;

-- The processes running, by worker id, each seen every few seconds: `status` lists those
-- seen in the last 30 s (`--require-runner`).
CREATE TABLE IF NOT EXISTS syncer.runners (
    worker_id text PRIMARY KEY,
    pipelines text[] NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);
