"""Processes and their cost: the syncer as a watched subprocess (RSS sampled, CPU read from
the kernel at exit) and CPU meters for PostgreSQL, the fake server and the whole machine."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.harness import REPO, Harness

RSS_SAMPLE_S = 0.02
_MB = 1024 * 1024


@dataclass(frozen=True)
class ProcessUsage:
    wall_s: float
    cpu_s: float  # user + system, from wait4's rusage: exact, whatever the sampling missed
    # Sampled with psutil, the process and its children. Not ru_maxrss: Linux carries it
    # over from the parent across fork and exec, so it would report the benchmark's size.
    peak_rss_mb: float
    returncode: int


class Watched:
    """A subprocess whose RSS is sampled in a thread; stderr goes to a file, never a pipe
    (a chatty child could block on a full pipe)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command, self.env, self.log_path = command, env, log_path
        self.peak_rss = 0
        # (epoch seconds, CPU seconds of the process): its CPU over any part of the run.
        self.cpu_samples: list[tuple[float, float]] = []
        self._stop_sampling = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    def start(self) -> Watched:
        with self.log_path.open("wb") as log:
            self._started = time.perf_counter()
            self._proc = subprocess.Popen(
                self.command, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        threading.Thread(target=self._sample, args=(self._proc.pid,), daemon=True).start()
        return self

    def _sample(self, pid: int) -> None:
        while not self._stop_sampling.is_set():
            try:
                proc = psutil.Process(pid)
                rss = proc.memory_info().rss
                rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
                t = proc.cpu_times()
                self.cpu_samples.append((time.time(), t.user + t.system))
            except psutil.Error:
                return  # gone, or a zombie: nothing more to sample
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(RSS_SAMPLE_S)

    def terminate(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> ProcessUsage:
        """Wait for the exit (killing the process past the timeout) and read its rusage."""
        assert self._proc is not None
        deadline = time.perf_counter() + timeout_s
        while True:
            pid, status, usage = os.wait4(self._proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                self._proc.kill()
                deadline = float("inf")
            time.sleep(0.005)
        wall_s = time.perf_counter() - self._started
        self._stop_sampling.set()
        self._proc.returncode = os.waitstatus_to_exitcode(status)
        return ProcessUsage(
            wall_s,
            usage.ru_utime + usage.ru_stime,
            self.peak_rss / _MB,
            self._proc.returncode,
        )

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the process used between two epoch times (nearest samples, 20 ms)."""

        def at(when: float) -> float:
            return min(self.cpu_samples, key=lambda s: abs(s[0] - when))[1]

        return at(end) - at(start) if self.cpu_samples else float("nan")

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class CpuSnapshot:
    postgres_s: float
    fake_s: float
    bench_s: float
    machine_busy_s: float


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during a run, by whom; `other` is everyone else on the machine
    (other agents, noise): large values mean the figures of that run are suspect."""

    postgres_s: float
    fake_s: float
    bench_s: float
    other_s: float


def cpu_snapshot(h: Harness) -> CpuSnapshot:
    times = psutil.cpu_times()
    busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSnapshot(
        postgres_cpu_s(h.postmaster_pid),
        float(h.fake.stats()["cpu_s"]),
        own.ru_utime + own.ru_stime,
        busy,
    )


def cpu_use(before: CpuSnapshot, after: CpuSnapshot, syncer_cpu_s: float) -> CpuUse:
    pg = after.postgres_s - before.postgres_s
    fake = after.fake_s - before.fake_s
    bench = after.bench_s - before.bench_s
    other = after.machine_busy_s - before.machine_busy_s - pg - fake - bench - syncer_cpu_s
    return CpuUse(pg, fake, bench, max(0.0, other))


def postgres_cpu_s(postmaster_pid: int) -> float:
    """The postmaster, its live backends, and the backends that already exited (the kernel
    adds those to the postmaster's children times when it reaps them). Take it when no
    backend is exiting (see `backends_settled`): one reaped between the two reads below
    would be counted in neither."""
    master = psutil.Process(postmaster_pid)
    t = master.cpu_times()
    total: float = t.user + t.system + t.children_user + t.children_system
    for child in master.children():
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system
    return total


def backend_count(postmaster_pid: int) -> int:
    return len(psutil.Process(postmaster_pid).children())


def backends_settled(postmaster_pid: int, count: int, timeout_s: float = 5.0) -> None:
    """Wait until the postmaster is back to `count` children: the backends of the clients
    that just left have exited and been reaped."""
    deadline = time.monotonic() + timeout_s
    while backend_count(postmaster_pid) > count and time.monotonic() < deadline:
        time.sleep(0.005)
