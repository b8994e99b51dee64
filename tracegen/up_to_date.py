"""Whether a `trace gen` run has anything to do, decided before it starts an engine (which takes minutes): a rerun
of a finished command should end in seconds.

A run has nothing to do when, on the trees as the trace holds them, the expansion asks for no step whose prompt
fits the context the trace's engines recorded, and, with ``--routers``, no configuration misses a step or a score
and no scorer those routers read has a step left to score. When the trace does not record a context length (a new
trace, an engine that does not say), the run starts its engines as before.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tracegen.expand import Request, missing
from tracegen.growth import Tree
from tracestore.store import open_trace


def recorded_context(engine: dict | None) -> int | None:
    """The tokens a prompt plus its step may take on every engine, as trace.json's engine entry records it (one
    entry, or one per role)."""
    if not engine:
        return None
    entries = engine.values() if all(isinstance(value, dict) for value in engine.values()) else [engine]
    lengths = [entry.get("max_total_tokens") for entry in entries]
    return min(lengths) if lengths and all(isinstance(n, int) and n > 0 for n in lengths) else None


def _fits(trees: dict[tuple[str, int], Tree], context: int):
    def fits(request: Request) -> bool:
        tree = trees[(request.problem_id, request.world)]
        return len(tree.prompt_ids(request.parent_path)) < context

    return fits


def _unscored(root: Path, name: str, backend: str | None) -> int:
    """Steps of the trace that scorer ``name`` wants and has not scored (building the scorer starts no model)."""
    from tracegen.scoring import open_scorer

    scorer = open_scorer(root, name, backend=backend)
    trace = open_trace(root)
    done = trace.scan("scores").filter(pl.col("scorer") == scorer.signal).select("step_id")
    wanted = trace.scan("steps").filter(scorer.wants()).select("step_id")
    return wanted.join(done, on="step_id", how="anti").select(pl.len()).collect().item()


def nothing_to_do(root: Path, trees: dict[tuple[str, int], Tree], frontier: list[Request], options) -> bool:
    """Whether the run of ``options`` (tracegen.options.GenOptions) on the trace at ``root`` would generate and
    score nothing. ``frontier``: the steps the expansion asks for on ``trees``."""
    context = recorded_context(open_trace(root).manifest.get("engine"))
    if context is None:
        return False
    fits = _fits(trees, context)
    if any(fits(request) for request in frontier):
        return False
    if not options.routers:
        return True
    from replay.results import miss_list, router_scorer
    from replay.run import replay_trace

    roles = open_trace(root).manifest.roles
    scorers = {router_scorer(spec.router(), roles) for spec in options.routers} - {None}
    if any(_unscored(root, name, options.backend) for name in sorted(scorers)):
        return False
    for spec in options.routers:
        replayed = replay_trace(root, spec.router(), sweep=spec.sweep_values(), split="all")
        misses = [m for m in miss_list(replayed) if (m["problem_id"], m["world"]) in trees]
        if any(m["scorer"] is not None for m in misses):
            return False
        wanted = {Request(m["problem_id"], m["world"], m["path"], m["model"]) for m in misses}
        finals = {key: tree.is_final_map() for key, tree in trees.items()}
        if any(fits(request) for request in missing(finals, wanted, options.max_steps)):
            return False
    return True
