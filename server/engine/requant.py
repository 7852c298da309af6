"""Admin requantization jobs: build a model at other settings on the side, then swap it in.

One job at a time. The job thread calibrates (or loads from the cache) and loads the new model
while the engine keeps serving the old one; the swap happens between engine steps, requests in
flight finish on the model they started with, and the old weights are released when its last
request ends. A failed job leaves the old model serving and keeps its error for `GET`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from server.engine.engine import Engine
from server.engine.runner import ModelRunner

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed"]
#: Builds a runner for the given settings, reporting (layer, layers) progress.
RunnerFactory = Callable[[dict[str, Any], Callable[[int, int], None]], ModelRunner]


class JobConflict(Exception):
    """A requantization job is already running."""


@dataclass
class Job:
    id: str
    settings: dict[str, Any]
    state: JobState = "queued"
    layer: int = 0
    layers: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None


class Requantizer:
    def __init__(self, engine: Engine, factory: RunnerFactory) -> None:
        self.engine = engine
        self.factory = factory
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._running: Job | None = None

    def submit(self, settings: dict[str, Any]) -> Job:
        """Start a job (raises JobConflict while another runs)."""
        with self._lock:
            if self._running is not None:
                raise JobConflict(f"job {self._running.id} is still {self._running.state}")
            job = Job(f"rq-{next(self._ids)}", settings)
            self.jobs[job.id] = job
            self._running = job
        threads = torch.get_num_threads()  # per OS thread in OpenMP: pass it on
        threading.Thread(
            target=self._run, args=(job, threads), name=f"veq-{job.id}", daemon=True
        ).start()
        return job

    def _progress(self, job: Job) -> Callable[[int, int], None]:
        def update(layer: int, layers: int) -> None:
            job.layer, job.layers = layer, layers

        return update

    def _run(self, job: Job, threads: int) -> None:
        torch.set_num_threads(threads)
        job.state = "running"
        job.started = time.time()
        try:
            runner = self.factory(job.settings, self._progress(job))
            self.engine.swap(runner)
            job.state = "succeeded"
        except Exception as exc:  # reported through the job, the old model keeps serving
            log.exception("requantization job %s failed", job.id)
            job.state = "failed"
            job.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        finally:
            job.finished = time.time()
            with self._lock:
                self._running = None
