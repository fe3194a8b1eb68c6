-- What install and uninstall run on syncer's own schema (the migrations are in
-- migrations/, each target's DDL in targets/). Blocks start with "-- name --".

-- install_lock --
-- One installer at a time; the lock ends with the transaction.
SELECT pg_advisory_xact_lock(hashtext('syncer.install'));

-- schema_version_get --
SELECT max(version) FROM syncer.schema_version;

-- schema_versions_get --
SELECT version FROM syncer.schema_version;

-- schema_version_record --
INSERT INTO syncer.schema_version (version) VALUES ($1);

-- schema_drop --
DROP SCHEMA IF EXISTS syncer CASCADE;

-- pipeline_created --
-- What install created per pipeline (a vector column, a side table), for uninstall.
SELECT name, created_column, created_table FROM syncer.pipelines ORDER BY name;
