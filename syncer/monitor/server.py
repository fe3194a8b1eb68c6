"""The HTTP server of observe.listen: /metrics (Prometheus text), /healthz, /readyz."""

from __future__ import annotations

import errno

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from syncer.config import parse_listen
from syncer.errors import ListenError
from syncer.monitor.health import Health, Verdict


class Server:
    def __init__(self, listen: str, health: Health) -> None:
        self.listen = listen
        self.health = health
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        """Bind, or raise ListenError naming the address (before anything is claimed)."""
        host, port = parse_listen(self.listen)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as err:
            await self._runner.cleanup()
            why = "address already in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise ListenError(f"observe.listen {self.listen}: cannot listen: {why}") from None

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _req: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, _req: web.Request) -> web.Response:
        return _verdict(self.health.live(), "healthy")

    async def _readyz(self, _req: web.Request) -> web.Response:
        return _verdict(self.health.ready(), "ready")


def _verdict(v: Verdict, what: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(v.doc(what)),
        status=200 if v.ok else 503,
        content_type="application/json",
    )
