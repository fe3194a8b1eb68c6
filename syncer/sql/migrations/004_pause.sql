-- Version 4: pause and resume (`syncer pause`, `syncer resume`). The state lives here, so
-- every replica honours it: each reads it on a NOTIFY of the control channel and on its
-- poll. A paused pipeline keeps capturing; its workers claim nothing.
-- (003 is another branch's; the runner applies whichever of them a database lacks.)
ALTER TABLE syncer.pipelines
    ADD COLUMN IF NOT EXISTS paused_at timestamptz,
    ADD COLUMN IF NOT EXISTS paused_by text;
