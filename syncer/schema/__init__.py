"""syncer's database objects.

- `names`: identifiers and literals quoted for SQL text, qualified table names parsed.
- `catalog`: what the database has: a table's columns, its unique keys, a pipeline's key.
- `render`: each pipeline's statements, rendered once with quoted identifiers (PipelineSQL).
- `migrations`: the numbered files in sql/migrations/, the runner, SCHEMA_VERSION.
- `install`: install, check and remove syncer's schema and each pipeline's objects.

Each target's own DDL and statements are the target's (syncer.targets).
"""
