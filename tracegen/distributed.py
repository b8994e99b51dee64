"""`trace gen --ray`: grow one trace with N Ray actors, each a shard of the problems.

Each worker is a Ray actor that owns its engines (on the GPUs or CPUs Ray gives it) and runs `run_gen`
on shard i of N -- the stable hash partition of `--shard`, so a Ray run and hand-started `--shard i/N`
runs are interchangeable and resume each other -- with its rounds, closure rounds and scorers, writing
its Parquet parts into the one trace directory under its own writer id (``shard{i}of{N}``).

trace.json: every change a writer makes to it (creating it, the engine, expansions, scorers) is a
read-merge-write under the trace's manifest lock (tracestore.lock.manifest_lock), so the workers -- like
hand-started shards -- take turns and never lose each other's updates; a command whose settings differ
from the trace's is refused by the first worker that opens it, and the driver reports that refusal.

Faults: a worker whose process dies is restarted by Ray (``max_restarts``) and its run retried
(``max_task_retries``); `run_gen` resumes from the parts that worker already wrote, exactly as a
rerun of a killed `trace gen` does. A killed driver takes its workers with it; rerunning the command
resumes every shard the same way.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tracegen.growth import GenSummary
from tracegen.options import GenOptions, RayOptions
from tracestore.errors import TraceError

MAX_RESTARTS = 3  # restarts of a dead worker process (and retries of its run) before the run fails
POLL_SECONDS = 0.5  # how often the driver asks the workers how far they are


@dataclass
class WorkerProgress:
    """How far one worker is: its shard's problems, those still growing, and what it wrote."""

    problems: int = 0
    pending: int = 0
    steps: int = 0
    tokens: int = 0
    rounds: int = 0
    seconds: float = 0.0


@dataclass
class DistributedSummary:
    """Totals over the workers, and each worker's own summary (its throughput in tokens/s)."""

    out: str
    workers: list[GenSummary] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> int:
        return sum(summary.problems for summary in self.workers)

    @property
    def new_steps(self) -> int:
        return sum(summary.new_steps for summary in self.workers)

    @property
    def new_gen_tokens(self) -> int:
        return sum(summary.new_gen_tokens for summary in self.workers)


def connect(address: str, workers: int, cpus_per_worker: float):
    """Start a local Ray instance (``address`` "local") or join the cluster at ``address`` ("auto": the one
    this machine belongs to). A local instance gets the CPUs the workers ask for (at least all of them)."""
    try:
        import ray
    except ImportError:
        raise TraceError('--ray needs Ray: pip install ".[ray]"') from None
    if ray.is_initialized():
        return ray
    try:
        if address == "local":
            import os

            ray.init(num_cpus=max(os.cpu_count() or 1, int(workers * cpus_per_worker)), include_dashboard=False)
        else:
            ray.init(address=address)
    except ConnectionError as error:
        raise TraceError(f"cannot reach the Ray cluster at {address}: {error}") from None
    return ray


def shard_options(options: GenOptions, index: int, workers: int) -> GenOptions:
    return dataclasses.replace(options, shard=f"{index}/{workers}")


class _Worker:
    """A Ray actor: one shard of the problems, grown by ``run_gen`` with engines of its own."""

    def __init__(self):
        self._progress = WorkerProgress()
        self._lock = threading.Lock()
        self._started = time.perf_counter()

    def run(self, options: GenOptions) -> GenSummary:
        def report(stage: str, **info) -> None:
            if stage not in ("round", "done"):
                return
            summary = info["summary"]
            with self._lock:
                self._progress = WorkerProgress(
                    problems=summary.problems,
                    pending=len({request.problem_id for request in info["requests"]}),
                    steps=summary.new_steps,
                    tokens=summary.new_gen_tokens,
                    rounds=summary.rounds,
                    seconds=time.perf_counter() - self._started,
                )

        return _run_gen(options, report)

    def progress(self) -> WorkerProgress:
        with self._lock:
            return self._progress

    def pid(self) -> int:
        import os

        return os.getpid()


def _run_gen(options: GenOptions, report: Callable) -> GenSummary:
    from tracegen.gen import run_gen

    return run_gen(options, report)


def start_workers(ray, workers: int, gpus_per_worker: float, cpus_per_worker: float) -> list:
    """``workers`` actors, each holding ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs, restarted by
    Ray when their process dies. Two calls may run on one at once: the run, and the driver's progress polls."""
    actor = ray.remote(_Worker).options(
        num_gpus=gpus_per_worker,
        num_cpus=cpus_per_worker,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
        max_concurrency=2,
    )
    return [actor.remote() for _ in range(workers)]


def run_distributed(
    options: GenOptions,
    *,
    address: str = "local",
    workers: int = RayOptions.workers,
    gpus_per_worker: float = RayOptions.gpus_per_worker,
    cpus_per_worker: float = RayOptions.cpus_per_worker,
    progress: Callable[[list[WorkerProgress]], None] | None = None,
    on_start: Callable[[list], None] | None = None,
) -> DistributedSummary:
    """Grow the trace of ``options`` with ``workers`` Ray actors (shard i of ``workers`` each); see the module.

    ``progress(per_worker)`` is called every POLL_SECONDS with each worker's WorkerProgress; ``on_start(actors)``
    once the actors exist (tests use it to kill one)."""
    if options.shard is not None:
        raise TraceError("--ray shards the problems itself; leave out --shard")
    if workers < 1:
        raise TraceError(f"--workers must be at least 1, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise TraceError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    started = time.perf_counter()
    ray = connect(address, workers, cpus_per_worker)
    actors = start_workers(ray, workers, gpus_per_worker, cpus_per_worker)
    if on_start is not None:
        on_start(actors)
    runs = [actor.run.remote(shard_options(options, i, workers)) for i, actor in enumerate(actors)]
    summary = DistributedSummary(out=str(options.out))
    pending = list(runs)
    latest = [WorkerProgress() for _ in actors]
    while pending:
        _, pending = ray.wait(pending, timeout=POLL_SECONDS, num_returns=len(pending))
        if progress is not None:
            for i, actor in enumerate(actors):
                try:
                    latest[i] = ray.get(actor.progress.remote(), timeout=POLL_SECONDS)
                except Exception:  # a worker being restarted answers nothing; keep what it said last
                    pass
            progress(latest)
    try:
        summary.workers = ray.get(runs)
    except ray.exceptions.RayError as error:
        raise _worker_failure(error) from None
    finally:
        for actor in actors:
            ray.kill(actor)
    summary.seconds = time.perf_counter() - started
    return summary


def _worker_failure(error: Exception) -> TraceError:
    """One line for a failed worker: its own TraceError as it is, another exception of its own by type and
    message (Ray's first line names only the actor), or Ray's message when the worker process died."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, TraceError):
        return cause
    if isinstance(cause, Exception):
        return TraceError(f"a Ray worker failed: {type(cause).__name__}: {_one_line(cause)}")
    return TraceError(f"a Ray worker failed: {_one_line(error)}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class RayProgress:
    """One rich progress bar over all workers: problems finished, steps and generated tokens/s."""

    def __init__(self, console=None):
        from tracegen.progress import counted_bar

        self._progress = counted_bar(console, eta=False)
        self._task = None
        self._started = time.perf_counter()

    def __enter__(self) -> RayProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, workers: list[WorkerProgress]) -> None:
        problems = sum(worker.problems for worker in workers)
        if self._task is None:
            self._task = self._progress.add_task("problems (all workers)", total=problems or None, info="")
        steps = sum(worker.steps for worker in workers)
        rate = sum(worker.tokens for worker in workers) / max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(
            self._task,
            total=problems or None,
            completed=problems - sum(worker.pending for worker in workers),
            info=f"{len(workers)} workers, {steps:,} steps, {rate:,.0f} tok/s",
        )


def run_on_ray(options: GenOptions, ray_options: RayOptions, console):
    """`trace gen --ray`: run_distributed with one aggregate progress bar."""
    with RayProgress(console) as progress:
        return run_distributed(
            options,
            address=ray_options.address,
            workers=ray_options.workers,
            gpus_per_worker=ray_options.gpus_per_worker,
            cpus_per_worker=ray_options.cpus_per_worker,
            progress=progress,
        )


def print_summary(console, summary: DistributedSummary) -> None:
    """Totals, then each worker's problems, steps and throughput."""
    from rich.markup import escape

    console.print(
        f"[green]done[/] {escape(summary.out)}: {summary.problems:,} problems, {summary.new_steps:,} new steps, "
        f"{summary.new_gen_tokens:,} generated tokens by {len(summary.workers)} Ray workers, {summary.seconds:.1f}s",
        highlight=False,
    )
    for index, worker in enumerate(summary.workers):
        rate = worker.new_gen_tokens / worker.seconds if worker.seconds else 0.0
        console.print(
            f"  worker {index} (shard {index}/{len(summary.workers)}): {worker.problems:,} problems, "
            f"{worker.new_steps:,} steps, {worker.new_gen_tokens:,} tokens in {worker.rounds} rounds, "
            f"{worker.seconds:.1f}s, {rate:,.0f} tok/s",
            highlight=False,
        )
