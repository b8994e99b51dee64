"""`trace score`: annotate a trace's steps with a scorer's values, resumable, with what each call cost.

The scores land in the ``scores`` table (step_id, scorer, value, detail, n_tokens_processed) and the
scorer's description (model, prompt; see ``tracegen.scorers``) in trace.json ``scorers.NAME``. That
entry is part of the cache key: scoring again with another model or prompt is refused, naming the
differing field, instead of mixing two scorers' values under one name. Steps already scored are
skipped, so an interrupted run is resumed by running it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tracegen.backends import check_backend
from tracegen.models import load_tokenizer, trace_model
from tracegen.prompts import prompt_token_ids
from tracegen.scorers import Item, Scorer, make_scorer
from tracestore.errors import TraceError
from tracestore.schema import first_difference, lookup_field
from tracestore.store import TraceWriter, open_trace


@dataclass
class ScoreSummary:
    scorer: str
    wanted: int
    new: int = 0
    seconds: float = 0.0


def run_score(
    root: str | Path,
    scorer_name: str,
    *,
    model: str | None = None,
    backend: str | None = None,
    preset: str | None = None,
    batch: int | None = None,
    progress: Callable | None = None,
) -> ScoreSummary:
    """Score every step of the trace at ``root`` that ``scorer_name`` scores and has not scored yet, asking with
    prompt preset ``preset`` (see ``open_scorer``)."""
    scorer = open_scorer(root, scorer_name, model=model, backend=backend, preset=preset)
    try:
        return score_pending(root, scorer, batch=batch, progress=progress)
    finally:
        scorer.close()


def open_scorer(
    root: str | Path,
    scorer_name: str,
    *,
    model: str | None = None,
    backend: str | None = None,
    preset: str | None = None,
    engines: dict | None = None,
) -> Scorer:
    """A scorer for the trace at ``root``, refused if the trace holds its scores made otherwise.

    ``preset``: its prompt preset; without one, the preset the trace's scores of this scorer were made with (a
    rerun resumes them), else the scorer's default. ``engines`` ({role: backend}) lends it engines already
    running for the trace's models.
    """
    check_backend(backend)
    trace = open_trace(root)
    scorer = make_scorer(scorer_name, trace.manifest, model=model, backend=backend, preset=preset)
    scorer.shared_engines = engines or {}
    scorer.trace_root = Path(root)  # where an API scorer stores its responses
    scorer.check()
    signal = scorer.signal
    recorded = trace.manifest.scorers.get(signal)
    recorded_preset = (recorded or {}).get("preset")
    if preset is None and isinstance(recorded_preset, dict) and recorded_preset.get("name") in scorer.presets:
        scorer.preset = recorded_preset["name"]
    if recorded is not None:
        entry = scorer.manifest_entry()
        differing = first_difference(recorded, entry)
        if differing:
            raise TraceError(
                f"{root} holds {signal} scores made with scorers.{signal}.{differing} = "
                f"{lookup_field(recorded, differing)!r}, but this run has {lookup_field(entry, differing)!r}; "
                "score into a copy of the trace, or with the recorded settings"
            )
    return scorer


def score_pending(
    root: str | Path,
    scorer: Scorer,
    *,
    batch: int | None = None,
    progress: Callable | None = None,
    wait: bool = False,
) -> ScoreSummary:
    """Score the steps of the trace at ``root`` that ``scorer`` wants and has not scored yet.

    ``wait``: wait for the trace's writer lock instead of refusing (a run that scores between its own
    rounds, whose other shards may be scoring too)."""
    started = time.perf_counter()
    if batch is not None and batch < 1:
        raise TraceError(f"--batch must be at least 1, got {batch}")
    trace = open_trace(root)
    with TraceWriter(root, None, writer_id=f"score_{scorer.signal.replace('@', '_at_')}", wait=wait) as writer:
        done = writer.done_score_ids(scorer.signal)
        steps = (
            trace.scan("steps")
            .select("step_id", "problem_id", "world", "path", "model", "text", "is_final", "answer")
            .collect()
        )
        wanted = steps.filter(scorer.wants()).sort("step_id")
        todo = wanted.filter(~pl.col("step_id").is_in(list(done)))
        summary = ScoreSummary(scorer=scorer.signal, wanted=wanted.height)
        report = progress or (lambda **_: None)
        items = _items(trace, steps, todo) if todo.height else []
        if todo.height:
            scorer.start()
        described = writer.manifest.scorers
        if (
            scorer.signal not in described
        ):  # only once the scorer's model has loaded: a failed start leaves trace.json as it was
            entry = scorer.manifest_entry()
            writer.edit_manifest(lambda stored: {"scorers": {**stored.scorers, scorer.signal: entry}})
        report(stage="start", total=wanted.height, done=wanted.height - todo.height)
        size = batch or scorer.default_batch
        for first in range(0, len(items), size):
            chunk = items[first : first + size]
            scores = scorer.score(chunk)
            writer.append_scores(
                [
                    {
                        "step_id": item.step_id,
                        "scorer": scorer.signal,
                        "value": score.value,
                        "detail": score.detail,
                        "n_tokens_processed": score.n_tokens_processed,
                    }
                    for item, score in zip(chunk, scores)
                ]
            )
            summary.new += len(chunk)
            report(stage="batch", n=len(chunk))
    summary.seconds = time.perf_counter() - started
    return summary


def _items(trace, steps: pl.DataFrame, todo: pl.DataFrame) -> list[Item]:
    """The steps to score with their paths' texts and token ids, and their problems' questions."""
    problems = {
        row["problem_id"]: row
        for row in trace.scan("problems").select("problem_id", "question", "reference").collect().iter_rows(named=True)
    }
    by_id = {row["step_id"]: row for row in steps.iter_rows(named=True)}
    needed = set()
    for row in todo.iter_rows(named=True):
        needed.update(_path_ids(row))
    tokens = dict(
        trace.scan("tokens")
        .select("step_id", "token_ids")
        .filter(pl.col("step_id").is_in(list(needed)))
        .collect()
        .iter_rows()
    )
    tokenizer = load_tokenizer(trace_model(trace.manifest, trace.manifest.roles[0]))
    prompts: dict[str, list[int]] = {}
    items = []
    for row in todo.iter_rows(named=True):
        path_ids = _path_ids(row)
        absent = [step_id for step_id in path_ids if step_id not in by_id or step_id not in tokens]
        if absent:
            raise TraceError(
                f"{trace.root}: step {row['step_id']!r} needs step {absent[0]!r}, which the trace lacks; "
                "run `trace validate`"
            )
        problem = problems.get(row["problem_id"])
        if problem is None:
            raise TraceError(
                f"{trace.root}: step {row['step_id']!r} belongs to problem {row['problem_id']!r}, "
                "which the problems table lacks; run `trace validate`"
            )
        if row["problem_id"] not in prompts:
            prompts[row["problem_id"]] = prompt_token_ids(tokenizer, problem["question"])
        prefix = list(prompts[row["problem_id"]])
        for step_id in path_ids[:-1]:
            prefix += list(tokens[step_id])
        items.append(
            Item(
                step_id=row["step_id"],
                problem_id=row["problem_id"],
                question=problem["question"],
                reference=problem["reference"],
                role=row["model"],
                path=row["path"],
                step_texts=[by_id[step_id]["text"] for step_id in path_ids],
                prefix_ids=prefix,
                step_ids=list(tokens[row["step_id"]]),
                is_final=row["is_final"],
                answer=row["answer"],
            )
        )
    return items


def _path_ids(row: dict) -> list[str]:
    """step_ids of every step on a step's path, root first, the step itself last."""
    base = f"{row['problem_id']}/{row['world']}/"
    return [base + row["path"][:end] for end in range(1, len(row["path"]) + 1)]
