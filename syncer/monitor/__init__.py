"""What an operator sees of a running process: `/metrics`, `/healthz` and `/readyz` over
HTTP (server), the liveness and readiness checks behind them (health), the periodic sample
of the queue that feeds the queue gauges (sampler), and the event loop's lag (loop).

observe holds the events and their subscribers; this package only produces the samples
and serves what the subscribers recorded.
"""

from __future__ import annotations

from syncer.monitor.health import Health
from syncer.monitor.loop import LoopWatch
from syncer.monitor.monitor import Monitor
from syncer.monitor.sampler import Sampler
from syncer.monitor.server import Server

__all__ = ["Health", "LoopWatch", "Monitor", "Sampler", "Server"]
