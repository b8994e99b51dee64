"""Progress bars (rich) for the long phase-one commands: `trace gen` and `trace score`.

Each is a context manager and a callable that the library calls as ``progress(stage=..., **info)``.
"""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tracegen.expand import Request
from tracegen.growth import GenSummary


def counted_bar(console=None, *, info: bool = True, eta: bool = True) -> Progress:
    """The bar phase one shows: description, bar, done/total, an info text (``task.fields[info]``), elapsed
    time and ETA."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn())
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console)


class GenProgress:
    """A rich progress bar for ``run_gen``: problems finished, steps, generated tokens/s, ETA."""

    def __init__(self, console=None):
        self._progress = counted_bar(console)
        self._tasks: dict[str, int] = {}
        self._gen_started: float | None = None

    def __enter__(self) -> GenProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, stage: str, **info) -> None:
        if stage == "hidden-plan":
            for line in info["plan"].reasons:
                self._print(f"hidden states to store: {line}")
            for line in info["plan"].warnings:
                self._print(f"warning: {line}", style="yellow")
        elif stage == "memory-plan":
            for line in info["plan"].lines():
                self._print(line)
        elif stage == "hidden":
            self._tasks[f"hidden-{info['role']}"] = self._progress.add_task(
                f"hidden states ({info['role']})", total=info["total"], info=""
            )
        elif stage == "hidden-batch":
            self._progress.advance(self._tasks[f"hidden-{info['role']}"], info["n"])
        elif stage == "api-start":
            key = f"api-{info['role']}"
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(f"{info['role']} API", total=0, info="")
            task = self._progress.tasks[self._tasks[key]]
            self._progress.update(self._tasks[key], total=(task.total or 0) + info["total"])
        elif stage == "api-response":
            spend = info["spend"]
            self._progress.update(
                self._tasks[f"api-{info['role']}"],
                advance=1,
                info=(
                    f"{spend.prompt_tokens:,} prompt ({spend.cached_tokens:,} cached) + {spend.completion_tokens:,} "
                    f"completion tokens, ${spend.usd:.4f}, {spend.retries} retries, {spend.stored} from the trace"
                ),
            )
        elif stage in ("round", "done"):
            self._show_round(info["requests"], info["summary"])

    def _print(self, line: str, style: str | None = None) -> None:
        self._progress.console.print(line, style=style, markup=False, highlight=False)

    def _show_round(self, requests: list[Request], summary: GenSummary) -> None:
        now = time.perf_counter()
        if self._gen_started is None:
            self._gen_started = now
            self._tasks["gen"] = self._progress.add_task("problems", total=summary.problems, info="")
        pending = {r.problem_id for r in requests}
        rate = summary.new_gen_tokens / max(now - self._gen_started, 1e-9)
        self._progress.update(
            self._tasks["gen"],
            completed=summary.problems - len(pending),
            info=f"round {summary.rounds}, {summary.new_steps:,} steps, {rate:,.0f} tok/s, {len(requests):,} queued",
        )


class ScoreProgress:
    """A rich progress bar for ``run_score``: steps scored of those the scorer wants, ETA. It appears once the
    trace and scorer are checked, so that an error prints alone."""

    def __init__(self, label: str, console=None):
        self._label = label
        self._progress = counted_bar(console, info=False)

    def __enter__(self) -> ScoreProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._progress.task_ids:
            self._progress.stop()

    def __call__(self, stage: str, **info) -> None:
        if stage == "start":
            self._progress.start()
            self._progress.add_task(f"{self._label} scores", total=info["total"], completed=info["done"])
        else:
            self._progress.advance(self._progress.task_ids[0], info["n"])
