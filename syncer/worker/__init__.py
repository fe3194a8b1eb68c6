"""The worker: per pipeline a claimer, a dispatcher, embedding tasks and writers joined by
bounded queues (runner.py); per process one capture side and one pool (process.py)."""

from syncer.worker.claimer import ProviderPaused
from syncer.worker.process import Worker
from syncer.worker.runner import PipelineRunner, window
from syncer.worker.writer import MAX_WRITE_ROWS

__all__ = ["MAX_WRITE_ROWS", "PipelineRunner", "ProviderPaused", "Worker", "window"]
