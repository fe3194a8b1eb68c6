-- Version 3: two lanes, one waiting item per key and lane, one dead letter per key.
-- Idempotent, like 002: a database whose recorded version lags its tables upgrades all the same.
--
-- Lanes: 0 live (what capture saw: a user's edit), 1 bulk (backfill, install's backfill,
-- replay-dlq, a model switch). Claims serve live first and keep bulk a share
-- ([worker] bulk_share), so an edit never waits behind a million-row backfill.
--
-- One item per (pipeline, key, lane): a key captured again while its item waits is folded
-- into it (ON CONFLICT DO NOTHING); captured again while its item is being worked on, the
-- item is marked dirty, and finishing it puts it back instead of deleting it (the worker
-- may have read the text before this change). The index is not partial, so a claim, which
-- changes no indexed column, stays a HOT update.

ALTER TABLE syncer.queue
    ADD COLUMN IF NOT EXISTS lane  smallint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS dirty boolean NOT NULL DEFAULT false;

-- Duplicates of older versions (install then backfill queued every key twice): keep the
-- oldest of each key, marked dirty if it is leased (a later one may hold a newer change).
WITH ranked AS (
    SELECT id, first_value(id) OVER w AS keep, count(*) OVER w AS n
    FROM syncer.queue
    WINDOW w AS (PARTITION BY pipeline, key ORDER BY id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
), kept AS (
    UPDATE syncer.queue q SET dirty = true
    FROM ranked r WHERE q.id = r.id AND r.id = r.keep AND r.n > 1 AND q.leased_by IS NOT NULL
)
DELETE FROM syncer.queue q USING ranked r WHERE q.id = r.id AND r.id <> r.keep;

CREATE UNIQUE INDEX IF NOT EXISTS queue_pipeline_key_lane ON syncer.queue (pipeline, key, lane);
-- Claims read each lane in id order.
CREATE INDEX IF NOT EXISTS queue_pipeline_lane_id ON syncer.queue (pipeline, lane, id);
DROP INDEX IF EXISTS syncer.queue_pipeline_id;

-- One dead letter per key: a key that fails again updates it.
ALTER TABLE syncer.dead_letters ADD COLUMN IF NOT EXISTS times_failed integer NOT NULL DEFAULT 1;
WITH ranked AS (
    SELECT id, first_value(id) OVER w AS keep, count(*) OVER w AS n,
           min(first_failed_at) OVER w AS first_at
    FROM syncer.dead_letters
    WINDOW w AS (PARTITION BY pipeline, key ORDER BY id DESC
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
), kept AS (
    UPDATE syncer.dead_letters d SET times_failed = r.n, first_failed_at = r.first_at
    FROM ranked r WHERE d.id = r.id AND r.id = r.keep
)
DELETE FROM syncer.dead_letters d USING ranked r WHERE d.id = r.id AND r.id <> r.keep;
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_pipeline_key ON syncer.dead_letters (pipeline, key);

-- Settings later version-2 installs had and earlier ones may lack (re-asserted here).
ALTER TABLE syncer.queue SET (fillfactor = 50);
ALTER TABLE syncer.inbox SET (autovacuum_vacuum_scale_factor = 0,
                              autovacuum_vacuum_threshold = 10000);
