"""Whether a `trace gen` run has anything to do, decided before it starts an engine (which takes minutes): a rerun
of a finished command should end in seconds.

A run has nothing to do when, on the trees as the trace holds them, the expansion asks for no step whose prompt
fits the context the trace's engines recorded, and, with ``--routers``, no configuration misses a step or a score
and no scorer those routers read has a step left to score. When the trace does not record a context length (a new
trace, an engine that does not say), the run starts its engines as before.

A closure that found nothing missing leaves its key (``closure_key``) in ``DIR/logs/closed.json``: a rerun with
the same key (the same routers, --max-steps and trees, and the same part files of the tables replays read) does
not replay the routers again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from tracegen.engine_logs import LOG_FOLDER
from tracegen.expand import Request, missing
from tracegen.growth import Tree
from tracestore.atomic import write_atomic
from tracestore.store import open_trace

CLOSED_FILE = "closed.json"  # in DIR/logs/: the key of the last closure found to miss nothing
CLOSURE_TABLES = ("steps", "scores", "grades")  # what a replay of the routers reads


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


def closure_key(root: Path, options, trees: dict) -> str:
    """What the verdict "the routers miss nothing" rests on: the routers' configurations, --max-steps, the run's
    trees, and the part files of the tables a replay reads (names and sizes: every write adds a part)."""
    parts = sorted(
        [table, path.name, path.stat().st_size]
        for table in CLOSURE_TABLES
        for path in [*(root / table).glob("*.parquet"), *root.glob(f"{table}.parquet")]
    )
    payload = {
        "routers": [spec.manifest_entry() for spec in options.routers],
        "max_steps": options.max_steps,
        "trees": sorted(f"{problem_id}/{world}" for problem_id, world in trees),
        "parts": parts,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def remember_closed(root: Path, options, trees: dict) -> None:
    """Record that the routers of ``options`` miss nothing they can grow on the trace as it is now."""
    (root / LOG_FOLDER).mkdir(exist_ok=True)
    write_atomic(root / LOG_FOLDER / CLOSED_FILE, json.dumps({"key": closure_key(root, options, trees)}).encode())


def _known_closed(root: Path, options, trees: dict) -> bool:
    try:
        return json.loads((root / LOG_FOLDER / CLOSED_FILE).read_text())["key"] == closure_key(root, options, trees)
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
    if _known_closed(root, options, trees):
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
    remember_closed(root, options, trees)
    return True
