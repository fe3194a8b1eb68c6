"""syncer: keeps pgvector embeddings in sync with the rows they are computed from."""

__version__ = "0.1.0"
