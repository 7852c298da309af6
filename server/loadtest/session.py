"""One `veq bench` run: every setting in turn, measured the same way, reported as it goes.

Owns `BenchOptions` (the load and where the report goes), `Setting` (a running server's URL,
or a `ServeSpec` to spawn), `SettingResult` (one setting's target, load report and stats
samples) and `run_bench`: per setting, spawn if asked, probe, warm up, run the load with a
progress bar while `/admin/stats` is sampled, read the final stats, stop a spawned server, and
rewrite the report files. Ctrl-C at any point (spawning, warm-up, load) stops the run, keeps
what was measured, marks it interrupted and writes the partial report; `run_bench` then
returns normally with `interrupted=True`. User-facing failures raise `BenchError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from server.loadtest.load import LoadConfig, LoadReport, RequestResult, run_load
from server.loadtest.probe import BenchError, StatsSampler, Target, probe
from server.loadtest.spawn import ServeSpec, spawn_server


@dataclass(frozen=True)
class BenchOptions:
    """The load every setting gets, and the run's knobs."""

    out: Path
    concurrency: int = 8
    requests: int | None = None
    duration: float | None = 60.0
    max_tokens: int = 32
    stream: bool = True
    ignore_eos: bool = False
    seed: int = 0
    model: str | None = None  # the model id to request (default: the first listed)
    api_key: str | None = None
    admin_key: str | None = None  # for --url/--compare; spawned servers get their own
    warmup: int = 2
    sample_interval: float = 1.0
    ready_timeout: float = 1800.0
    progress: bool = True
    command: str = ""  # the command line, for the report

    def load_config(self, url: str, model: str) -> LoadConfig:
        return LoadConfig(
            url,
            concurrency=self.concurrency,
            requests=self.requests,
            duration=None if self.requests is not None else self.duration,
            max_tokens=self.max_tokens,
            stream=self.stream,
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            model=model,
            api_key=self.api_key,
        )


@dataclass(frozen=True)
class Setting:
    """A server to measure: an existing URL, or a spec to spawn."""

    url: str | None = None
    spawn: ServeSpec | None = None

    def name(self) -> str:
        if self.spawn is not None:
            return f"bits={self.spawn.bits}"
        return str(self.url)


@dataclass
class SettingResult:
    """Everything measured on one setting."""

    target: Target
    load: LoadReport
    sampler: StatsSampler | None
    stats_before: dict[str, Any] | None = None
    stats_after: dict[str, Any] | None = None
    spawned: bool = False
    warmup_s: float = 0.0

    @property
    def stats(self) -> dict[str, Any] | None:
        """The freshest full `/admin/stats` answer."""
        return (
            self.stats_after
            or (self.sampler.last if self.sampler else None)
            or (self.stats_before or self.target.stats)
        )


@dataclass
class BenchResult:
    options: BenchOptions
    settings: list[SettingResult] = field(default_factory=list)
    interrupted: bool = False
    started: float = field(default_factory=time.time)
    failed: str | None = None  # the error that stopped the run, if any


#: Called with the result so far after every setting and at the end (the report writer).
Writer = Callable[[BenchResult], None]


@contextlib.contextmanager
def _server(
    setting: Setting, opts: BenchOptions, index: int
) -> Iterator[tuple[str, str | None, bool]]:
    """(url, admin key, spawned) of a setting, spawning and stopping its server if asked."""
    if setting.spawn is None:
        assert setting.url is not None
        yield setting.url.rstrip("/"), opts.admin_key, False
        return
    log = opts.out / f"serve-{index}-w{setting.spawn.bits}.log"
    print(f"veq bench: starting veq serve {' '.join(setting.spawn.args())}", file=sys.stderr)
    with spawn_server(setting.spawn, log, opts.ready_timeout) as server:
        yield server.url, server.admin_key, True


def _warm_up(target: Target, opts: BenchOptions) -> None:
    if opts.warmup <= 0:
        return
    cfg = replace(
        opts.load_config(target.url, target.model),
        requests=opts.warmup,
        duration=None,
        concurrency=min(opts.warmup, opts.concurrency),
        max_tokens=min(4, opts.max_tokens),
        seed=opts.seed + 10_000,
    )
    report = asyncio.run(run_load(cfg))
    if report.results and not any(r.ok for r in report.results):
        bad = report.results[0]
        status = f"HTTP {bad.status}" if bad.status else "no response"
        raise BenchError(f"{target.url}: every warm-up request failed ({status}: {bad.error})")


def _progress(label: str, opts: BenchOptions) -> tuple[Callable[[RequestResult], None], tqdm]:
    bar = tqdm(
        total=opts.requests,
        desc=label,
        unit="req",
        file=sys.stderr,
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    failed = 0

    def update(result: RequestResult) -> None:
        nonlocal failed
        failed += not result.ok
        bar.update(1)
        if failed:
            bar.set_postfix(errors=failed, refresh=False)

    return update, bar


async def _measure(
    cfg: LoadConfig,
    report: LoadReport,
    sampler: StatsSampler | None,
    on_result: Callable[[RequestResult], None],
) -> None:
    task = asyncio.create_task(sampler.run()) if sampler else None
    try:
        await run_load(cfg, report, on_result)
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _run_setting(
    setting: Setting, index: int, opts: BenchOptions, result: BenchResult
) -> SettingResult:
    """Measure one setting; appends to `result` as soon as the load starts (so an interrupt
    keeps it). Raises KeyboardInterrupt after recording what it has."""
    with _server(setting, opts, index) as (url, admin_key, spawned):
        target = probe(url, opts.api_key, admin_key, opts.model)
        if admin_key is None:
            print(
                f"veq bench: no --admin-key: {url} memory figures come from /v1/models only",
                file=sys.stderr,
            )
        taken = {s.target.label for s in result.settings}
        if target.label in taken:
            target.label += f" @{url.split('://', 1)[-1]}"
        t0 = time.perf_counter()
        _warm_up(target, opts)
        warmup_s = time.perf_counter() - t0
        cfg = opts.load_config(url, target.model)
        sampler = StatsSampler(url, admin_key, opts.sample_interval) if admin_key else None
        one = SettingResult(target, LoadReport(cfg), sampler, spawned=spawned, warmup_s=warmup_s)
        result.settings.append(one)
        one.stats_before = sampler.sample_now() if sampler else None
        on_result, bar = _progress(target.label, opts)
        try:
            asyncio.run(_measure(cfg, one.load, sampler, on_result))
        except KeyboardInterrupt:
            one.load.interrupted = True
            if one.load.wall_s == 0 and one.load.started is not None:
                one.load.wall_s = time.perf_counter() - one.load.started
            raise
        finally:
            bar.close()
            # The server is still up (a spawned one runs in its own session): read the end.
            if sampler is not None:
                one.stats_after = sampler.sample_now()
        return one


def run_bench(settings: list[Setting], opts: BenchOptions, write: Writer) -> BenchResult:
    """Measure every setting in order; `write` is called after each and at the end.

    Returns the result (`interrupted` after Ctrl-C, with the partial measurements). A
    BenchError stops the run after writing what was measured, then propagates.
    """
    result = BenchResult(opts)
    try:
        for index, setting in enumerate(settings):
            _run_setting(setting, index, opts, result)
            write(result)
    except KeyboardInterrupt:
        result.interrupted = True
    except BenchError as exc:
        result.failed = str(exc)
        if result.settings:
            write(result)
        raise
    write(result)
    return result
