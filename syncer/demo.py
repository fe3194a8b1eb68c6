"""`syncer demo`: an embedded PostgreSQL, a local embedder, a sample table, live sync."""

from __future__ import annotations

import click


@click.command()
def demo() -> None:
    """Show syncer keeping a sample table's vectors in sync (embedded PostgreSQL)."""
    raise click.ClickException("not written yet")
