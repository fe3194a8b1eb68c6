-- What `syncer roles` prints: two login roles with the least each command needs. Run by an
-- administrator (a superuser, or a role with CREATEROLE that owns the source tables), once
-- before the first `syncer install` and once more after it: every statement is idempotent,
-- and the grants on objects install creates wait for them to exist. Blocks start with
-- "-- name --"; {placeholders} are quoted identifiers or literals (syncer/roles.py).

-- role_create --
-- {comment}
DO $syncer$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {role_literal}) THEN
        CREATE ROLE {role} LOGIN;
    END IF;
END $syncer$;
ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS {replication};

-- database_grant --
-- {comment}
DO $syncer$ BEGIN
    EXECUTE format('GRANT {privileges} ON DATABASE %I TO {role}', current_database());
END $syncer$;

-- extension_create --
-- pgvector is created once by an administrator: neither role may create extensions.
CREATE EXTENSION IF NOT EXISTS vector;

-- default_privileges --
-- Everything install creates (the syncer schema, its tables and sequences, side tables) is
-- owned by {install}; run gets the rows of those, and nothing of the user's tables.
ALTER DEFAULT PRIVILEGES FOR ROLE {install} GRANT USAGE ON SCHEMAS TO {run};
ALTER DEFAULT PRIVILEGES FOR ROLE {install} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {run};
ALTER DEFAULT PRIVILEGES FOR ROLE {install} GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {run};

-- schema_usage --
GRANT USAGE ON SCHEMA {schema} TO {install}, {run};

-- schema_create --
-- install creates the side table {table} in this schema.
GRANT CREATE ON SCHEMA {schema} TO {install};

-- table_owner_member --
-- install adds triggers, columns or a publication to {table}: PostgreSQL lets only its owner
-- do that, so {install} becomes a member of the owner role (never of a superuser).
DO $syncer$
DECLARE
    owner name := (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = {table_literal}::regclass);
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = owner) THEN
        RAISE EXCEPTION '% is owned by the superuser %: give it to an owner role first (ALTER TABLE % OWNER TO app_owner)',
            {table_literal}, owner, {table_literal};
    END IF;
    IF owner <> {install_literal} THEN
        EXECUTE format('GRANT %I TO {install}', owner);
    END IF;
END $syncer$;

-- table_select --
-- run reads the key and text of every row of {table} (the text is composed in SQL from the row).
GRANT SELECT ON {table} TO {run};

-- column_update --
-- run writes only the vector and its hash into {table}. The columns appear with install:
-- until then this says to run the script again.
DO $syncer$ BEGIN
    IF (SELECT count(*) FROM pg_attribute
        WHERE attrelid = {table_literal}::regclass AND attname IN ({column_literal}, {hash_literal})
          AND NOT attisdropped) = 2 THEN
        GRANT UPDATE ({column}, {hash_column}) ON {table} TO {run};
    ELSE
        RAISE NOTICE '% has no column % yet: run this script again after syncer install', {table_literal}, {column_literal};
    END IF;
END $syncer$;

-- syncer_grant --
-- Objects of the syncer schema created before the default privileges above existed (an
-- install run by another role, an older syncer) get the same grants.
DO $syncer$ BEGIN
    IF EXISTS (SELECT FROM pg_namespace WHERE nspname = 'syncer') THEN
        GRANT USAGE ON SCHEMA syncer TO {run};
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA syncer TO {run};
        GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA syncer TO {run};
    END IF;
END $syncer$;

-- row_lock_update --
-- The side table's writes lock the source rows FOR SHARE (a text update waits for the write,
-- so an older vector never lands after a newer one), and PostgreSQL allows a row lock only
-- with UPDATE on some column: run gets it on {column} alone, the least it can be given.
GRANT UPDATE ({column}) ON {table} TO {run};

-- inbox_maintain --
-- Trigger mode: workers VACUUM syncer.inbox as they empty it; MAINTAIN (PostgreSQL 17+) lets
-- run do that without owning it.
DO $syncer$ BEGIN
    IF current_setting('server_version_num')::int >= 170000
       AND to_regclass('syncer.inbox') IS NOT NULL THEN
        GRANT MAINTAIN ON syncer.inbox TO {run};
    ELSIF to_regclass('syncer.inbox') IS NULL THEN
        RAISE NOTICE 'syncer.inbox does not exist yet: run this script again after syncer install';
    END IF;
END $syncer$;
