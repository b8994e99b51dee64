"""Grow what routers need: `trace gen --expand closure --routers FILE` and online runs
(`trace gen --expand online --routers FILE`).

Closure replays every listed router configuration on the trace, generates all the (node, model)
steps they needed but the trace lacked as one batch per model, scores the new steps with the
scorers those routers read, and repeats until no configuration misses anything (or the token
budget is spent). An online run is the same loop for one configuration on an empty trace: each
round the router's walks stop where the next step is not generated yet, and exactly those steps
are generated, so the trace ends up holding the steps the router took, with the seeds a cached
trace uses for the same nodes.

The comb that closure starts from already holds every path of the one-way routers (``policy`` and
``steer mode=switch``, with ``escalate=after`` and ``escalate=replace`` alike: the all-small chain and the
all-large completion from every node on it), so listing them adds no steps; draft-and-replace routers
(RSD, SpecReason, STEER ``mode=step``) need the nodes off the comb that closure grows.

Router file (TOML), one table per router configuration::

    [[router]]
    name = "rsd"
    sweep = ["tau=0:1:0.1"]          # optional, as `trace replay --sweep`

    [[router]]
    name = "specreason"
    params = {score = "expected"}    # optional, as `trace replay --param`
    sweep = ["tau=0:9:1"]

    [[router]]
    name = "my_router.py:MinLogprob"  # your own router, as `trace replay --router` takes it;
    sweep = ["theta=-3:0:0.5"]        # a relative file is found next to this file
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomllib

from replay.registry import anchor_reference
from tracegen.expand import Request, missing
from tracestore.errors import TraceError

ROUTER_KEYS = {"name", "params", "sweep"}


@dataclass(frozen=True)
class RouterSpec:
    """One router configuration (or sweep) to replay: what `trace replay --router --param --sweep` takes."""

    name: str
    params: dict = field(default_factory=dict)
    sweep: tuple[str, ...] = ()

    def router(self):
        from replay.routers import make_router

        return make_router(self.name, **self.params)

    def sweep_values(self) -> dict[str, np.ndarray]:
        from replay.params import parse_sweeps

        return parse_sweeps(self.sweep)

    def manifest_entry(self) -> dict:
        return {"router": self.name, "params": dict(self.params), "sweep": list(self.sweep)}


def load_router_specs(path: str | Path) -> list[RouterSpec]:
    """Parse and check a router file (every router and parameter is checked before anything runs)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"router file {path} does not exist")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TraceError(f"router file {path} is not valid TOML: {error}") from None
    tables = document.get("router")
    if not isinstance(tables, list) or not tables or set(document) - {"router"}:
        raise TraceError(f"router file {path} must hold one or more [[router]] tables and nothing else")
    specs = []
    for index, table in enumerate(tables, 1):
        where = f"{path}, router {index}"
        unknown = sorted(set(table) - ROUTER_KEYS)
        if unknown or "name" not in table:
            raise TraceError(
                f"{where}: a [[router]] has a name and optional params and sweep"
                + (f"; unknown key(s) {', '.join(unknown)}" if unknown else "; name is missing")
            )
        sweep = table.get("sweep", [])
        sweep = [sweep] if isinstance(sweep, str) else sweep
        params = table.get("params", {})
        if not isinstance(params, dict) or not all(isinstance(s, str) for s in sweep):
            raise TraceError(f"{where}: params must be a table and sweep a string or a list of strings")
        name = anchor_reference(str(table["name"]), path.parent)
        spec = RouterSpec(name, {str(k): str(v) for k, v in params.items()}, tuple(sweep))
        try:
            from replay.params import DEFAULT_MAX_CONFIGS, check_grid_size, check_sweep

            sweep = spec.sweep_values()
            check_sweep(spec.router(), sweep)
            check_grid_size(sweep, DEFAULT_MAX_CONFIGS)
        except TraceError as error:
            raise TraceError(f"{where}: {error}") from None
        specs.append(spec)
    return specs


@dataclass
class ClosureResult:
    rounds: int = 0
    remaining_misses: int = 0  # distinct misses left (budget spent, or steps that cannot be grown)
    budget_spent: bool = False


def close_over(
    root: Path,
    specs: list[RouterSpec],
    *,
    trees: dict,
    max_steps: int,
    fits: Callable[[Request], bool],
    generate: Callable[[list[Request]], None],
    score: Callable[[set[str]], int],
    spent_tokens: Callable[[], int],
    budget_tokens: int | None,
    report: Callable,
) -> ClosureResult:
    """Replay ``specs`` on the trace at ``root``, grow and score what they miss; repeat until nothing is missing.

    ``trees`` maps this run's (problem_id, world) to its in-memory tree (only their misses are grown);
    ``generate`` grows a batch of requests, ``score(scorer names)`` scores every unscored step those
    scorers want and returns how many it scored.
    """
    from replay.results import miss_list, router_scorer
    from replay.run import replay_trace
    from tracestore.store import open_trace

    result = ClosureResult()
    roles = open_trace(root).manifest.roles
    scorers = {router_scorer(spec.router(), roles) for spec in specs} - {None}
    if scorers:
        score(scorers)  # what is there already; also records the scorers in trace.json, which replay's costs read
    while True:
        misses = []
        for spec in specs:
            replayed = replay_trace(root, spec.router(), sweep=spec.sweep_values(), split="all")
            misses += [m for m in miss_list(replayed) if (m["problem_id"], m["world"]) in trees]
        wanted = {Request(m["problem_id"], m["world"], m["path"], m["model"]) for m in misses if m["scorer"] is None}
        requests = [
            r for r in missing({key: tree.is_final_map() for key, tree in trees.items()}, wanted, max_steps) if fits(r)
        ]
        unscored = {m["scorer"] for m in misses if m["scorer"] is not None}
        result.remaining_misses = len(
            {(m["problem_id"], m["world"], m["path"], m["model"], m["scorer"]) for m in misses}
        )
        report(stage="closure", misses=result.remaining_misses, requests=len(requests))
        if budget_tokens is not None and spent_tokens() >= budget_tokens and (requests or unscored):
            result.budget_spent = True
            return result
        if requests:
            generate(requests)
        scored = score(scorers) if (requests or unscored) and scorers else 0
        if not requests and not scored:
            return result  # nothing missing, or only what cannot be grown (a full context, max_steps)
        result.rounds += 1
