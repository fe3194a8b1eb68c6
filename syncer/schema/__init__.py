"""syncer's database objects.

- `render`: each pipeline's statements, rendered once with quoted identifiers (PipelineSQL).
- `catalog`: what the database has: a table's columns, its unique keys, a pipeline's key.
- `migrations`: the numbered files in sql/migrations/ and the runner that applies them.
- `install`: install, check and remove syncer's schema and each pipeline's objects.

Identifiers from the config reach a statement only through `quote` (psycopg.sql).
"""
