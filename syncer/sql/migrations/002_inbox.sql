-- Version 2: capture triggers write to an unindexed inbox that workers move to the queue in
-- bulk; a sequence tells the triggers that a worker is awake (no NOTIFY needed then).
-- Idempotent, as schema.sql was when it upgraded version 1 in place: a database whose
-- recorded version lags its tables upgrades all the same.

-- Where the capture triggers put keys, inside the user's transaction. Built to make that
-- insert as cheap as an insert can be: no index, no identity, no defaults, no foreign key.
-- Workers move its rows to syncer.queue in bulk (inbox_move) and work from there.
CREATE TABLE IF NOT EXISTS syncer.inbox (
    pipeline text NOT NULL,
    key      jsonb NOT NULL
);
-- Every row is deleted soon after its insert, and each move scans the table: dead rows left
-- to pile up make every move slower. Workers VACUUM it as they go (capture.InboxMover);
-- autovacuum's thresholds are for a worker whose role may not.
ALTER TABLE syncer.inbox SET (autovacuum_vacuum_scale_factor = 0,
                              autovacuum_vacuum_threshold = 10000);

-- Until when (epoch seconds) some worker is awake and will look at the inbox again before
-- it sleeps; 0: none is. A sequence because setval is seen by every session at once,
-- outside transactions, and reading it takes no lock: the triggers read it to skip a
-- NOTIFY (and its commit-time lock) while a worker is draining anyway.
CREATE SEQUENCE IF NOT EXISTS syncer.awake_until MINVALUE 0 START 0;

-- Leases, retries and attempts are the worker's side of syncer.queue; users' writes never
-- touch it any more. An item is updated once (its claim), then deleted: room left on its
-- page makes the claim a HOT update, with no new index entries (about 2 µs less database
-- CPU an item).
ALTER TABLE syncer.queue SET (fillfactor = 50);
