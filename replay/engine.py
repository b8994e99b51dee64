"""The replay engine: walk cached (problem, world) step trees for a router, on a CPU, with no model.

The tree of every (problem, world) is indexed once into integer arrays (node ids, the child step
of each node per model role). A walk state is one (problem, world, configuration) triple; all
states advance together one solution step per iteration, with numpy, so a sweep over a threshold
costs one walk over problems x configurations rather than one walk per configuration.

The engine never invents a step: when a router needs a (node, model) step, or a scorer's score
of a draft, that the trace lacks, the walk of that state stops there and records a **miss**,
which `miss_list` returns for `trace gen --expand closure` (and online replay) to fill.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from replay.costs import A_OVER_C_SCALE, CostModel, Price, make_cost_model
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, SPLITS, assign_splits
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.grades import graded_steps
from tracestore.outputs import check_output_file
from tracestore.remote import RemoteTrace
from tracestore.schema import Manifest
from tracestore.store import Trace, empty_frame, open_trace


@dataclass(frozen=True)
class TreeIndex:
    """The trees as integer arrays: node ids (positions in the sorted node keys) and step rows."""

    children: np.ndarray  # (n_roles, n_nodes): the step row continuing the node by that role, -1 if not cached
    step_parent: np.ndarray  # node each step row continues
    step_child: np.ndarray  # node each step row creates
    step_role: np.ndarray  # role index of each step row
    step_final: np.ndarray
    step_correct: np.ndarray  # False for non-final steps


class ReplayData:
    """What a replay reads from a trace: steps (no text), problems, scores and hidden states on
    demand, and an integer index of the tree nodes of every (problem, world) to replay.

    The roots replayed are every problem of ``problems`` times every world in ``worlds`` (default:
    0..W-1 for the manifest's ``worlds`` = W, else the worlds the steps hold); a root without cached
    steps is walked like any other and misses at once.
    """

    def __init__(
        self,
        manifest: Mapping,
        steps: pl.DataFrame,
        problems: pl.DataFrame,
        *,
        scores: pl.LazyFrame | pl.DataFrame | None = None,
        hidden: pl.LazyFrame | pl.DataFrame | None = None,
        worlds: list[int] | None = None,
    ):
        self.manifest = Manifest(manifest)
        self.roles = self.manifest.roles
        self.steps = steps.drop("text", strict=False)
        self.problems = problems
        if worlds is None:
            recorded = self.manifest.worlds
            worlds = range(recorded) if recorded is not None else sorted(self.steps["world"].unique()) or [0]
        self.worlds = [int(world) for world in worlds]
        self.scores = (scores if scores is not None else empty_frame("scores")).lazy()
        self.hidden = (hidden if hidden is not None else empty_frame("hidden")).lazy()
        self._scores_by_scorer: dict[str, pl.DataFrame] = {}

    @classmethod
    def from_trace(cls, trace: Trace, grades: str | None = None) -> ReplayData:
        """The trace's steps graded by grade set ``grades`` (default: the steps' own grades)."""
        steps = graded_steps(trace, trace.scan("steps").drop("text").collect(), grades)
        problems = trace.scan("problems").select("problem_id", "meta").collect()
        return cls(trace.manifest, steps, problems, scores=trace.scan("scores"), hidden=trace.scan("hidden"))

    def subset(self, problem_ids: list[str]) -> ReplayData:
        """The same trace restricted to ``problem_ids`` (index rebuilt lazily)."""
        keep = pl.col("problem_id").is_in(pl.Series(problem_ids, dtype=pl.String).implode())
        return ReplayData(
            self.manifest,
            self.steps.filter(keep),
            self.problems.filter(keep),
            scores=self.scores,
            hidden=self.hidden,
            worlds=self.worlds,
        )

    def role_index(self, role: str, router: str) -> int:
        if role not in self.roles:
            raise TraceError(
                f"router {router} needs a {role!r} model, but the trace's models are {', '.join(self.roles)}"
            )
        return self.roles.index(role)

    # ------------------------------------------------------------------ tree index

    @cached_property
    def _root_rows(self) -> pl.DataFrame:
        """One row per replayed (problem, world), problem-major."""
        return self.problems.select("problem_id").join(
            pl.DataFrame({"world": self.worlds}, schema={"world": pl.Int32}), how="cross"
        )

    @cached_property
    def _node_index(self) -> tuple[pl.DataFrame, np.ndarray]:
        """(problem_id, world, path) of every node, a node's id being its row, and the node each step row
        continues. The nodes are the roots (problem-major), then the node each step row creates (row i
        creates node n_roots + i), then parents no step row creates. Built with one hash join, not by
        sorting string keys, so it costs time linear in the steps."""
        key = ["problem_id", "world", "path"]
        world = pl.col("world").cast(pl.Int32)
        created = self.steps.select("problem_id", world, "path")
        nodes = pl.concat([self._root_rows.with_columns(path=pl.lit("", dtype=pl.String)), created])
        parents = self.steps.select("problem_id", world, path=pl.col("parent_path"))
        numbered = nodes.with_row_index("node")
        found = parents.join(numbered, on=key, how="left", maintain_order="left")
        if found.height != parents.height:  # a node stored twice: `tree` names the steps that repeat it
            first = numbered.unique(key, keep="first", maintain_order=True)
            found = parents.join(first, on=key, how="left", maintain_order="left")
        orphans = found.filter(pl.col("node").is_null()).select(key).unique(maintain_order=True)
        if orphans.height:
            numbered = orphans.with_row_index("orphan", offset=nodes.height)
            found = found.join(numbered, on=key, how="left", maintain_order="left").with_columns(
                node=pl.coalesce("node", "orphan")
            )
            nodes = pl.concat([nodes, orphans])
        return nodes, found["node"].to_numpy().astype(np.int64)

    @property
    def _nodes(self) -> pl.DataFrame:
        return self._node_index[0]

    @cached_property
    def roots(self) -> pl.DataFrame:
        """problem_id, world and root node id of every replayed (problem, world), problem-major."""
        return self._root_rows.with_columns(node=pl.int_range(pl.len(), dtype=pl.Int64))

    @cached_property
    def node_path(self) -> np.ndarray:
        """The path string of every node id."""
        return self._nodes["path"].to_numpy()

    @cached_property
    def node_path_series(self) -> pl.Series:
        """The path of every node id, as one contiguous Polars series: gathers without Python objects, several
        times faster than from the chunks of the steps the nodes share their columns with."""
        return self._nodes["path"].rechunk()

    @cached_property
    def final_values(self) -> pl.DataFrame:
        """answer and correct of every step row, contiguous: what the outcomes gather at each walk's final step."""
        return self.steps.select("answer", "correct").rechunk()

    def node_names(self, nodes: np.ndarray) -> list[str]:
        """``problem_id/world/path`` of each node (the step_id its creating step has)."""
        picked = self._nodes[np.asarray(nodes, dtype=np.int64)]
        return picked.select(pl.concat_str("problem_id", pl.col("world").cast(pl.String), "path", separator="/"))[
            :, 0
        ].to_list()

    @cached_property
    def tree(self) -> TreeIndex:
        steps = self.steps
        unknown = sorted(set(steps["model"].unique().to_list()) - set(self.roles))
        if unknown:
            raise TraceError(f"steps use model role(s) {', '.join(unknown)} that trace.json's models do not list")
        graded = steps.filter(pl.col("is_final") & pl.col("correct").is_null())
        if graded.height:
            raise TraceError(f"step {graded['step_id'][0]!r} is final but has no graded 'correct' value")
        nodes, parent = self._node_index
        role = steps["model"].replace_strict({r: i for i, r in enumerate(self.roles)}, return_dtype=pl.Int64)
        role = role.to_numpy()
        rows = np.arange(steps.height)
        children = np.full((len(self.roles), nodes.height), -1, dtype=np.int64)
        children[role, parent] = rows
        overwritten = np.flatnonzero(children[role, parent] != rows)  # a later row took the same (node, model)
        if overwritten.size:
            first = overwritten[0]
            ids = steps["step_id"].gather([first, children[role[first], parent[first]]]).to_list()
            raise TraceError(f"steps {ids[0]!r} and {ids[1]!r} continue the same node with the same model")
        return TreeIndex(
            children=children,
            step_parent=parent,
            step_child=self._root_rows.height + rows,
            step_role=role,
            step_final=steps["is_final"].to_numpy(),
            step_correct=steps["correct"].fill_null(False).to_numpy(),
        )

    # ------------------------------------------------------------------ scores

    def scores_of(self, scorer: str) -> pl.DataFrame:
        """The scores of ``scorer`` aligned to the step rows: value, detail, n_tokens_processed (null where
        the step has no score)."""
        if scorer not in self._scores_by_scorer:
            rows = (
                self.scores.filter(pl.col("scorer") == scorer)
                .select("step_id", "value", "detail", "n_tokens_processed")
                .collect()
            )
            twice = rows.filter(pl.col("step_id").is_duplicated())
            if twice.height:
                raise TraceError(f"step {twice['step_id'][0]!r} has more than one {scorer!r} score")
            aligned = self.steps.select("step_id").join(rows, on="step_id", how="left", maintain_order="left")
            self._scores_by_scorer[scorer] = aligned.drop("step_id")
        return self._scores_by_scorer[scorer]


class Costs:
    """Per-step-row decode and prefill cost under one cost model (zeros without one), and scorer costs."""

    def __init__(self, data: ReplayData, model: CostModel | None):
        self.data = data
        self.model = model
        if model is None:
            self.decode = self.prefill = np.zeros(data.steps.height)
        else:
            self.decode, self.prefill = model.step_costs(data.steps)
        self.step_total = self.decode + self.prefill
        self._scorer: dict[str, np.ndarray] = {}
        self._once: dict = {}

    def once(self, key, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()``, computed on the first call with ``key`` only: a replay walks its states in blocks, each
        with this same Costs, so what a router derives from the whole trace (its draft signal) is derived once
        per replay rather than once per block."""
        if key not in self._once:
            self._once[key] = compute()
        return self._once[key]

    def scorer(self, name: str) -> np.ndarray:
        """Cost of scoring each step row with scorer ``name``; NaN where the trace has no such score."""
        if name not in self._scorer:
            tokens = self.data.scores_of(name)["n_tokens_processed"]
            present = tokens.is_not_null().to_numpy()
            cost = np.full(len(tokens), np.nan)
            if self.model is None:
                cost[present] = 0.0
            else:
                roles = self.data.steps["model"].filter(pl.Series(present)).to_numpy()
                cost[present] = self.model.scorer_costs(name, tokens.drop_nulls().to_numpy(), roles)
            self._scorer[name] = cost
        return self._scorer[name]


# ---------------------------------------------------------------------- walks


@dataclass
class Walk:
    """What each walked state did: cost by bucket, steps kept by role, where it ended, and its miss."""

    decode: np.ndarray  # (n_roles, S) decode cost of kept steps, by the role that wrote them
    kept: np.ndarray  # (n_roles, S) kept steps by role
    prefill: np.ndarray  # (S,) prefill cost of kept steps
    discarded: np.ndarray  # (S,) full cost of drafts that were written and thrown away
    n_discarded: np.ndarray  # (S,)
    scorer: np.ndarray  # (S,) scorer calls
    final_step: np.ndarray  # (S,) step row that ended the solution, -1 if none
    end_node: np.ndarray  # (S,) final node, or the node where the walk missed
    miss_role: np.ndarray  # (S,) role index of the missing step (or of the unscored draft); -1 = no miss
    miss_scorer: np.ndarray  # (S,) the miss is the router scorer's score of the step (end_node, miss_role)

    @classmethod
    def empty(cls, n_roles: int, n_states: int) -> Walk:
        return cls(
            decode=np.zeros((n_roles, n_states)),
            kept=np.zeros((n_roles, n_states), dtype=np.int64),
            prefill=np.zeros(n_states),
            discarded=np.zeros(n_states),
            n_discarded=np.zeros(n_states, dtype=np.int64),
            scorer=np.zeros(n_states),
            final_step=np.full(n_states, -1, dtype=np.int64),
            end_node=np.full(n_states, -1, dtype=np.int64),
            miss_role=np.full(n_states, -1, dtype=np.int64),
            miss_scorer=np.zeros(n_states, dtype=bool),
        )

    def take(self, index: np.ndarray) -> Walk:
        return Walk(**{name: value[..., index] for name, value in vars(self).items()})

    @property
    def total(self) -> np.ndarray:
        return self.decode.sum(axis=0) + self.prefill + self.discarded + self.scorer

    @property
    def missed(self) -> np.ndarray:
        return self.miss_role >= 0


ESCALATE_MODES = ("after", "replace")


@dataclass(frozen=True)
class DraftRule:
    """How a draft-and-verify router decides whether to keep the small model's draft at each node (on a
    trace of K models, "small" is the drafting role and "large" the target of ``roles``).

    ``roles`` may name a chain of more than two models, smallest first (STEER's m0 -> m1 -> m2): a step that
    the model at one hop writes in place of a rejected draft, or after an escalation, is judged in turn
    (by ``signal`` of its own step row) unless that model is the chain's last, and its rejection hands over
    to the next model of the chain the same way. With two roles this is the draft-and-target rule above.

    ``signal`` holds one number per step row (NaN where the router has none); ``accept`` maps the
    drafts' signals and the states' parameter values to keep (True) or reject (False). With ``scorer``,
    each judged draft needs that scorer's score (its absence is a miss) and pays for a scorer call.

    What a rejection does:

    - ``one_way=False`` (RSD, SpecReason, STEER ``mode=step``): the draft is discarded (paid for, in
      ``discarded``) and the large model writes that one step; the small model drafts the next one.
    - ``one_way=True, escalate="replace"``: the draft is discarded (paid for) and the large model writes
      that step and every later one, undrafted and unjudged.
    - ``one_way=True, escalate="after"``: the draft is kept (paid for as a kept small step) and the large
      model writes every *later* step, undrafted and unjudged. A final draft is kept without being
      judged: the solution is finished, there is nothing left to escalate (and no score is needed).
    """

    signal: np.ndarray
    accept: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]
    one_way: bool
    scorer: str | None = None
    escalate: str = "replace"
    roles: tuple[str, ...] | None = None  # (drafting role, ..., target role); default the smallest and largest model

    def __post_init__(self):
        if self.escalate not in ESCALATE_MODES:
            raise ValueError(f"escalate must be one of {', '.join(ESCALATE_MODES)}, got {self.escalate!r}")
        if self.escalate == "after" and not self.one_way:
            raise ValueError('escalate="after" needs a one-way rule')

    @property
    def keeps_trigger(self) -> bool:
        """Whether the draft that triggers escalation is kept (escalate=after)."""
        return self.one_way and self.escalate == "after"


def walk_steps(
    data: ReplayData,
    costs: Costs,
    starts: np.ndarray,
    params: dict[str, np.ndarray],
    *,
    choose: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray] | None = None,
    draft_rule: DraftRule | None = None,
    router: str = "router",
) -> Walk:
    """Walk every state from its start node until a final step or a miss.

    Exactly one of ``choose`` (the role index that writes the next step, from the current nodes and
    parameter values of the active states) and ``draft_rule`` (small drafts, the router keeps or discards)
    drives the walk. ``params`` holds one array per parameter, aligned with ``starts``.
    """
    if (choose is None) == (draft_rule is None):
        raise ValueError("walk_steps needs exactly one of choose and draft_rule")
    n_states = len(starts)
    n_roles = len(data.roles)
    walk = Walk.empty(n_roles, n_states)
    tree = data.tree
    children, step_child, step_final, step_role = tree.children, tree.step_child, tree.step_final, tree.step_role
    scorer_cost = None
    if draft_rule is not None:
        chain_roles = draft_rule.roles or (data.roles[0], data.roles[-1])
        chain = np.array([data.role_index(role, router) for role in chain_roles], dtype=np.int64)
        last_hop = len(chain) - 1
        if draft_rule.scorer:
            scorer_cost = costs.scorer(draft_rule.scorer)
    # The kept steps' costs are added up as the walk takes them, by (role, state), so the work stays within the
    # trees being walked (a pass over every node of the trace beforehand falls out of the CPU's caches at scale).
    decode = walk.decode.reshape(-1)
    kept = walk.kept.reshape(-1)
    # The active states and, aligned with them, their current nodes and chain position (the model of the
    # draft rule's chain that writes next; one-way: the escalations so far): kept compact (filtered
    # together) rather than gathered from and scattered back to full-size arrays.
    active = np.arange(n_states)
    here = starts.astype(np.int64)
    hop = np.zeros(n_states, dtype=np.int64)

    def stop_missing(lost: np.ndarray, role: np.ndarray, scorer: bool = False) -> None:
        walk.end_node[active[lost]] = here[lost]
        walk.miss_role[active[lost]] = role[lost]
        walk.miss_scorer[active[lost]] = scorer

    while active.size:
        if draft_rule is None:
            role = np.asarray(choose(here, {k: v[active] for k, v in params.items()}), dtype=np.int64)
            judged = None
        else:
            if not draft_rule.one_way:
                hop[:] = 0  # every step is drafted by the chain's first model
            role = chain[hop]
            judged = hop < last_hop  # the chain's last model is never judged
        step = children[role, here]
        cached = step >= 0
        if not cached.all():
            stop_missing(~cached, role)
            active, here, role, step, hop = (a[cached] for a in (active, here, role, step, hop))
            judged = judged if judged is None else judged[cached]

        if draft_rule is not None and draft_rule.keeps_trigger:
            judged &= ~step_final[step]  # a final draft is kept unjudged: nothing left to escalate
        while judged is not None and judged.any():
            # the judged states, as a slice (views, no copies) when all of them are, as they mostly are
            drafts = slice(None) if judged.all() else np.flatnonzero(judged)
            if scorer_cost is not None:
                call_cost = scorer_cost[step[drafts]]
                unscored = np.isnan(call_cost)
                if unscored.any():
                    drafts = np.arange(active.size)[drafts]
                    lost = np.zeros(active.size, dtype=bool)
                    lost[drafts[unscored]] = True
                    stop_missing(lost, role, scorer=True)
                    walk.scorer[active[drafts[~unscored]]] += call_cost[~unscored]
                    scored = ~lost
                    active, here, role, step, hop, judged = (a[scored] for a in (active, here, role, step, hop, judged))
                    drafts = np.flatnonzero(judged)
                else:
                    walk.scorer[active[drafts]] += call_cost
            draft_states = active[drafts]
            accepted = np.asarray(
                draft_rule.accept(draft_rule.signal[step[drafts]], {k: v[draft_states] for k, v in params.items()}),
                dtype=bool,
            )
            judged = None
            if not accepted.all():
                rejected = np.flatnonzero(~accepted) if isinstance(drafts, slice) else drafts[~accepted]
                hop[rejected] += 1
                if not draft_rule.keeps_trigger:  # else the triggering draft stays; the next model takes over next
                    walk.discarded[active[rejected]] += costs.step_total[step[rejected]]
                    walk.n_discarded[active[rejected]] += 1
                    role[rejected] = chain[hop[rejected]]
                    step[rejected] = children[role[rejected], here[rejected]]
                    rewritten = np.zeros(active.size, dtype=bool)
                    rewritten[rejected] = True
                    cached = step >= 0
                    if not cached.all():
                        stop_missing(~cached, role)
                        active, here, role, step, hop, rewritten = (
                            a[cached] for a in (active, here, role, step, hop, rewritten)
                        )
                    judged = rewritten & (hop < last_hop)  # a rewritten step is judged too, unless by the last model

        flat = step_role[step] * n_states + active
        decode[flat] += costs.decode[step]
        kept[flat] += 1
        walk.prefill[active] += costs.prefill[step]
        here = step_child[step]
        final = step_final[step]
        if final.any():
            walk.final_step[active[final]] = step[final]
            walk.end_node[active[final]] = here[final]
            going = ~final
            active, here, hop = active[going], here[going], hop[going]
    return walk


def walk_chains(data: ReplayData, costs: Costs, starts: np.ndarray, role: int) -> Walk:
    """Every state's solution written by one model alone from its start node."""
    return walk_steps(data, costs, starts, {}, choose=lambda nodes, _: np.full(len(nodes), role))


# ---------------------------------------------------------------------- sweeps and replay


# At most this many configurations unless the user raises it (`--max-configs`): a sweep such as
# tau=0:1:1e-9 would otherwise allocate until the kernel kills the process.
DEFAULT_MAX_CONFIGS = 20_000
# Walk states (problem x world x configuration) walked at once: a larger grid is walked in blocks of roots, each
# with every configuration. Small enough that a block's working arrays stay in the CPU's caches and its working
# memory is a small part of a replay's peak (a million states per chunk cost ~300 MB and 1.5x the time per state).
CHUNK_STATES = 131_072
# Peak memory per walk state, for the estimate a refusal names: measured replaying RSD sweeps of 0.2M-2M
# states on the toy demo trace, 450-670 bytes (the outcomes keep ~135; the rest is working copies).
BYTES_PER_STATE = 600
# Memory per configuration besides its walk states (its parameters, their JSON, its summary row): measured
# replaying random sweeps of 20k-200k configurations on a 6-walk trace, ~930 bytes.
BYTES_PER_CONFIG = 1_000
# A replay of more walk states than this does not hold its outcomes in memory: configurations are walked in
# blocks of at most STREAM_BLOCK_STATES states, each block's outcomes appended to a Parquet file. What stays
# is each configuration's summary row and misses: measured on 1M-2M configurations of random on a 6-walk
# trace, ~225 bytes a configuration.
STREAM_STATES = 4_000_000
STREAM_BLOCK_STATES = 524_288
BYTES_PER_STREAMED_CONFIG = 300


def sweep_memory(n_configs: int, n_walks: int = 1) -> int:
    """Bytes a replay of ``n_configs`` configurations of ``n_walks`` walks each needs at its peak, estimated
    (its outcomes streamed to disk beyond STREAM_STATES walk states)."""
    states = n_configs * n_walks
    if states > STREAM_STATES:
        return n_configs * BYTES_PER_STREAMED_CONFIG + STREAM_BLOCK_STATES * BYTES_PER_STATE
    return n_configs * BYTES_PER_CONFIG + states * BYTES_PER_STATE


def available_memory() -> int | None:
    """Bytes of memory the system can give a process now without swapping (Linux's MemAvailable, else the
    free pages), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gigabytes(n_bytes: int) -> str:
    gigabytes = n_bytes / 1e9
    return f"{gigabytes:,.0f} GB" if gigabytes >= 100 else f"{gigabytes:.3g} GB"


def check_memory(what: str, needed: int) -> None:
    """Refuse a run estimated to need more memory than is available, naming both (``what`` says what it is)."""
    available = available_memory()
    if available is not None and needed > available:
        raise TraceError(
            f"{what} needs about {_gigabytes(needed)} of memory, but {_gigabytes(available)} is available; use "
            "coarser steps, or pass --no-memory-check to run it anyway"
        )


def parse_param(text: str) -> tuple[str, str]:
    """Split ``k=v``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise TraceError(f"--param must look like name=value, got {text!r}")
    return name.strip(), value.strip()


def parse_sweep(text: str, max_configs: int = DEFAULT_MAX_CONFIGS, memory_check: bool = True) -> tuple[str, np.ndarray]:
    """``tau=0:1:0.01`` (start:stop:step, stop included) or ``tau=0.3,0.5,0.7`` -> (name, values).
    A range of more than ``max_configs`` values, or (``memory_check``) one whose configurations alone would
    need more memory than is available, is refused before it is built."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    usage = f"--sweep must look like name=start:stop:step (step > 0, stop >= start) or name=v1,v2,..., got {text!r}"
    if not sep or not name:
        raise TraceError(usage)
    try:
        if ":" in value:
            start, stop, step = (float(part) for part in value.split(":"))
            if not np.isfinite([start, stop, step]).all() or step <= 0 or stop < start:
                raise ValueError
            steps = (stop - start) / step
            count = int(np.floor(steps + 1e-9 * max(1.0, steps))) + 1  # stop included despite rounding
            if count > max_configs:
                raise TraceError(
                    f"--sweep {text} has {count:,} values (at least {_gigabytes(sweep_memory(count))} of memory); "
                    f"at most {max_configs:,} configurations run (use a coarser step, or raise --max-configs)"
                )
            if memory_check:
                check_memory(f"--sweep {text} ({count:,} values)", sweep_memory(count))
            values = np.round(start + step * np.arange(count), 12)
        else:
            values = np.array([float(part) for part in value.split(",")])
    except ValueError:
        raise TraceError(usage) from None
    return name, values


@dataclass(frozen=True)
class Configs:
    """The configurations of one replay: the router's parameters, and each sweepable one's value in every
    configuration as an array (a configuration's full dict is built when asked for, a block at a time)."""

    base: dict
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 1

    @property
    def params(self) -> list[dict]:
        columns = {name: values.tolist() for name, values in self.values.items()}
        return [{**self.base, **{name: column[i] for name, column in columns.items()}} for i in range(len(self))]

    def take(self, index: slice) -> Configs:
        return Configs(self.base, {name: values[index] for name, values in self.values.items()})


def check_sweep(router, sweep: dict[str, np.ndarray]) -> None:
    """Refuse a sweep of a parameter the router cannot sweep, or a value outside the parameter's domain
    (needs no fitted router, so it runs before fitting)."""
    unknown = sorted(set(sweep) - set(router.sweepable))
    if unknown:
        allowed = ", ".join(router.sweepable) or "none"
        raise TraceError(f"router {router.name} cannot sweep {', '.join(unknown)}; sweepable: {allowed}")
    for name, values in sweep.items():
        router.check_values(name, values, "--sweep")


def _grid_size(sweep: dict[str, np.ndarray], n_walks: int | None) -> tuple[int, str]:
    """The number of configurations of a grid, and its size in words (in walk states too, given the
    ``n_walks`` walked per configuration)."""
    sizes = [len(values) for values in sweep.values()]
    n_configs = math.prod(sizes)
    size = f"{' x '.join(map(str, sizes))} = {n_configs:,} configurations"
    if n_walks is not None:
        size += f" x {n_walks:,} walks = {n_configs * n_walks:,} walk states"
    return n_configs, size


def check_grid_size(sweep: dict[str, np.ndarray], max_configs: int, n_walks: int | None = None) -> None:
    """Refuse a grid of more than ``max_configs`` configurations, naming its size and memory."""
    n_configs, size = _grid_size(sweep, n_walks)
    if n_configs > max_configs:
        memory = _gigabytes(sweep_memory(n_configs, n_walks or 1))
        raise TraceError(
            f"--sweep gives {size} ({'about' if n_walks else 'at least'} {memory}); at most {max_configs:,} "
            "configurations run (use coarser steps, or raise --max-configs)"
        )


def check_sweep_memory(sweep: dict[str, np.ndarray], n_walks: int) -> None:
    """Refuse a sweep estimated to need more memory than is available (before anything is built)."""
    if sweep:
        n_configs, size = _grid_size(sweep, n_walks)
        check_memory(f"--sweep's {size}", sweep_memory(n_configs, n_walks))


def sweep_configs(
    router, sweep: dict[str, np.ndarray] | None, max_configs: int = DEFAULT_MAX_CONFIGS, n_walks: int | None = None
) -> Configs:
    """The router's own configuration, or the grid of every swept parameter (others fixed); see check_sweep
    and check_grid_size."""
    base = {**router.get_params(), **router.decision_params()}
    sweep = sweep or {}
    check_sweep(router, sweep)
    check_grid_size(sweep, max_configs, n_walks)
    names = list(router.sweepable)
    grids = [np.asarray(sweep.get(name, [base[name]]), dtype=float) for name in names]
    axes = np.meshgrid(*grids, indexing="ij") if names else []  # the last parameter varies fastest
    return Configs(base, {name: axis.reshape(-1) for name, axis in zip(names, axes)})


class ReplayResult:
    """Per-(problem, world, configuration) outcomes, the misses, and the roles of the trace.

    The outcomes of a replay of more than STREAM_STATES walk states are not held in memory: they are in the
    Parquet file ``outcomes_file`` (in the temp folder, deleted with the result), their summary computed as
    they were written; ``outcomes`` reads them when asked for."""

    def __init__(
        self,
        outcomes: pl.DataFrame | None,
        roles: list[str],
        cost_unit: str,
        misses: pl.DataFrame,
        *,
        outcomes_file: Path | None = None,
        summary: pl.DataFrame | None = None,
    ):
        self._outcomes = outcomes
        self.roles = roles
        self.cost_unit = cost_unit
        self.misses = misses
        self.outcomes_file = outcomes_file
        self._summary = summary
        if outcomes_file is not None:
            weakref.finalize(self, outcomes_file.unlink, missing_ok=True)

    @property
    def outcomes(self) -> pl.DataFrame:
        return self._outcomes if self._outcomes is not None else pl.read_parquet(self.outcomes_file)

    @outcomes.setter
    def outcomes(self, outcomes: pl.DataFrame) -> None:
        self._outcomes = outcomes

    @property
    def n_outcomes(self) -> int:
        return self._outcomes.height if self._outcomes is not None else pq.read_metadata(self.outcomes_file).num_rows

    def summary(self) -> pl.DataFrame:
        return self._summary if self._summary is not None else summarize(self._outcomes, self.roles)

    def write_outcomes(self, path: str | os.PathLike, *, force: bool = False) -> None:
        """Write the outcomes to Parquet as ``write_outcomes`` does (streamed ones copied from their file)."""
        if self.outcomes_file is None:
            write_outcomes(self._outcomes, path, force=force)
        else:
            path = check_output_file(path, force=force)
            write_atomic(path, lambda temp: shutil.copyfile(self.outcomes_file, temp))


def replay(
    data: ReplayData,
    router,
    cost_model: CostModel,
    sweep: dict[str, np.ndarray] | None = None,
    max_configs: int = DEFAULT_MAX_CONFIGS,
) -> ReplayResult:
    """Replay a fitted ``router`` over every root of ``data``, for one configuration or a whole sweep
    (at most ``max_configs`` configurations, walked CHUNK_STATES walk states at a time).

    Outcomes: one row per (configuration, problem, world) with router, params (JSON, swept values
    filled in), config, problem_id, world, path (the final node, or where the walk missed), answer
    and correct (null after a miss), cost = cost_<role> (decoding of kept steps, per role) +
    cost_prefill + cost_discarded (drafts thrown away) + cost_scorer, n_<role> kept steps,
    n_discarded, misses (0 or 1: a walk stops at its first miss), cost_model, cost_unit and cost_convention
    (how the cost model counts, in words).
    """
    configs, walked = _walk_configs(data, router, cost_model, sweep, max_configs)
    return _result(OutcomeSource.of(data), router, cost_model, configs, walked)


def _walk_configs(
    data: ReplayData, router, cost_model: CostModel, sweep: dict[str, np.ndarray] | None, max_configs: int
) -> tuple[Configs, Walked]:
    """Walk every root of ``data`` with every configuration of the sweep (see ``replay``)."""
    router.check_fitted()
    configs = sweep_configs(router, sweep, max_configs, data.roots.height)
    # the costs' per-step arrays go before the outcomes' columns are built: a lower peak
    return configs, _walk(data, router, Costs(data, cost_model), configs)


def _walk(data: ReplayData, router, costs: Costs, configs: Configs) -> Walked:
    """Walk every root of ``data`` with every one of ``configs``."""
    n_roots, n_configs = data.roots.height, len(configs)
    n_nodes = data.tree.children.shape[1]
    walked = Walked(len(data.roles), n_configs, n_roots, np.int32 if n_nodes < 2**31 else np.int64)
    root_nodes = data.roots["node"].to_numpy()
    # A block of roots with every configuration at a time: the walk touches only those roots' trees, which
    # stay in the CPU's caches, so a state costs the same however large the trace.
    block = max(1, CHUNK_STATES // max(n_configs, 1))
    for first in range(0, n_roots, block):
        roots = slice(first, min(first + block, n_roots))
        starts = np.tile(root_nodes[roots], n_configs)
        params = {name: np.repeat(values, len(starts) // n_configs) for name, values in configs.values.items()}
        walked.put(roots, router.walk(data, costs, starts, params))
    return walked


@dataclass(frozen=True)
class OutcomeSource:
    """What the outcomes read from a replay's data once its walks are done: the roots, each node's path, each
    step row's answer and correct, the roles. Taken out of the data, so that a caller done with the data can
    free its steps, scores and index before the outcomes' columns are built (a lower peak)."""

    roots: pl.DataFrame
    node_path: pl.Series
    final_values: pl.DataFrame
    roles: list[str]

    @classmethod
    def of(cls, data: ReplayData) -> OutcomeSource:
        return cls(data.roots.select("problem_id", "world"), data.node_path_series, data.final_values, data.roles)


def _result(source: OutcomeSource, router, cost_model: CostModel, configs: Configs, walked: Walked) -> ReplayResult:
    outcomes = _outcomes(source, router, cost_model, configs, walked)
    return ReplayResult(
        outcomes=outcomes,
        roles=source.roles,
        cost_unit=cost_model.unit,
        misses=_misses(source.roles, router, outcomes, walked),
    )


class Walked:
    """What every state of a replay did, configuration-major (state = config x n_roots + root), filled in
    blocks of roots by ``put``: the outcomes' numeric columns, and where each walk ended."""

    def __init__(self, n_roles: int, n_configs: int, n_roots: int, index_dtype: type = np.int64):
        self.n_configs, self.n_roots = n_configs, n_roots
        n_states = n_configs * n_roots
        self.cost = np.zeros(n_states)
        self.decode = np.zeros((n_roles, n_states))
        self.prefill = np.zeros(n_states)
        self.discarded = np.zeros(n_states)
        self.scorer = np.zeros(n_states)
        self.kept = np.zeros((n_roles, n_states), dtype=np.int32)
        self.n_discarded = np.zeros(n_states, dtype=np.int32)
        self.final_step = np.zeros(n_states, dtype=index_dtype)
        self.end_node = np.zeros(n_states, dtype=index_dtype)
        self.miss_role = np.zeros(n_states, dtype=np.int8)  # at most 10 roles
        self.miss_scorer = np.zeros(n_states, dtype=bool)

    def put(self, roots: slice, walk: Walk) -> None:
        """The walk of roots ``roots`` with every configuration, its states configuration-major."""
        for name, value in (("cost", walk.total), *vars(walk).items()):
            target = getattr(self, name)
            grid = target.reshape(*target.shape[:-1], self.n_configs, self.n_roots)
            grid[..., roots] = value.reshape(*value.shape[:-1], self.n_configs, -1)


def _outcomes(source: OutcomeSource, router, cost_model: CostModel, configs: Configs, walked: Walked) -> pl.DataFrame:
    n_roots, n_configs = source.roots.height, len(configs)
    state_config = np.repeat(np.arange(n_configs, dtype=np.int32), n_roots)
    params_json = pl.Series([json.dumps(p, sort_keys=True) for p in configs.params], dtype=pl.String)
    final = pl.Series(np.ma.masked_array(walked.final_step, walked.final_step < 0))
    return pl.DataFrame(
        {
            "params": params_json.gather(state_config),
            "config": state_config,
            "problem_id": pl.concat([source.roots["problem_id"]] * n_configs, rechunk=True),
            "world": pl.concat([source.roots["world"].cast(pl.Int32)] * n_configs, rechunk=True),
            "path": source.node_path.gather(walked.end_node),
            **source.final_values.select(pl.all().gather(final)).to_dict(),
            "cost": walked.cost,
            **{f"cost_{role}": walked.decode[i] for i, role in enumerate(source.roles)},
            "cost_prefill": walked.prefill,
            "cost_discarded": walked.discarded,
            "cost_scorer": walked.scorer,
            **{f"n_{role}": walked.kept[i] for i, role in enumerate(source.roles)},
            "n_discarded": walked.n_discarded,
            "misses": (walked.miss_role >= 0).astype(np.int32),
        },
        schema_overrides={"problem_id": pl.String, "world": pl.Int32, "path": pl.String},
    ).select(
        pl.lit(router.name, dtype=pl.String).alias("router"),
        pl.all(),
        cost_model=pl.lit(cost_model.name, dtype=pl.String),
        cost_unit=pl.lit(cost_model.unit, dtype=pl.String),
        cost_convention=pl.lit(cost_model.convention, dtype=pl.String),
    )


def _misses(roles: list[str], router, outcomes: pl.DataFrame, walked: Walked) -> pl.DataFrame:
    missed = np.flatnonzero(walked.miss_role >= 0)
    return pl.DataFrame(
        {
            "problem_id": outcomes["problem_id"].gather(missed),
            "world": outcomes["world"].gather(missed),
            "path": outcomes["path"].gather(missed),
            "model": pl.Series(roles, dtype=pl.String).gather(walked.miss_role[missed]),
            "scorer": pl.Series([router_scorer(router, roles)], dtype=pl.String)
            .new_from_index(0, missed.size)
            .set(pl.Series(~walked.miss_scorer[missed]), None),
            "config": outcomes["config"].gather(missed),
        }
    )


def miss_list(result: ReplayResult) -> list[dict]:
    """The distinct missing items of a replay, as records for closure and online generation:
    ``{"problem_id", "world", "path", "model", "scorer", "n_configs"}`` -- the step ``model`` would
    write at node ``path`` of (problem_id, world), or, when ``scorer`` is set, that scorer's score of
    the cached step at (path, model). ``n_configs`` counts the configurations that needed it."""
    grouped = (
        result.misses.group_by("problem_id", "world", "path", "model", "scorer")
        .agg(n_configs=pl.col("config").n_unique())
        .sort("problem_id", "world", "path", "model", "scorer", nulls_last=False)
    )
    return grouped.to_dicts()


def summarize(outcomes: pl.DataFrame, roles: list[str]) -> pl.DataFrame:
    """One row per configuration: accuracy and mean cost over the walks that finished, A/C, the share
    of kept steps written by the largest model, and the number of walks that missed."""
    steps = pl.sum_horizontal(pl.col(f"n_{role}") for role in roles)
    done = pl.col("misses") == 0
    return (
        outcomes.group_by("router", "config", "params", maintain_order=True)
        .agg(
            n=pl.len(),
            misses=pl.col("misses").sum(),
            accuracy=pl.col("correct").cast(pl.Float64).mean(),
            cost=pl.col("cost").filter(done).mean(),
            large_steps=pl.col(f"n_{roles[-1]}").filter(done).sum(),
            all_steps=steps.filter(done).sum(),
        )
        .with_columns(large_share=pl.when(pl.col("all_steps") > 0).then(pl.col("large_steps") / pl.col("all_steps")))
        .drop("large_steps", "all_steps")
        .with_columns(a_over_c=A_OVER_C_SCALE * pl.col("accuracy") / pl.col("cost"))
        .sort("config")
    )


# ---------------------------------------------------------------------- from a trace directory


def router_scorer(router, roles: list[str]) -> str | None:
    """The scorer ``router`` reads on a trace with model ``roles`` (None: none)."""
    scorer_for = getattr(router, "scorer_for", None)
    return scorer_for(roles) if scorer_for is not None else getattr(router, "scorer", None)


def split_frame(problem_ids: list[str], seed: int, fractions: tuple[float, float, float]) -> pl.DataFrame:
    return pl.DataFrame(
        {"problem_id": problem_ids, "split": assign_splits(problem_ids, seed, fractions)},
        schema={"problem_id": pl.String, "split": pl.String},
    )


def replay_trace(
    trace: str | os.PathLike | Trace | RemoteTrace,
    router,
    *,
    sweep: dict[str, np.ndarray] | None = None,
    split: str = "test",
    cost: str = "flops",
    prices: dict[str, Price] | None = None,
    worlds: list[int] | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_configs: int = DEFAULT_MAX_CONFIGS,
    grades: str | None = None,
    memory_check: bool = True,
) -> ReplayResult:
    """Open a trace (or take one opened: at a URL, ``open_trace(uri, timeout=...)``), fit ``router`` on its train
    split, replay it on ``split`` (or ``all``), its final steps graded by grade set ``grades`` (default: the
    steps' own). The sweep is checked (parameters, domains, grid size, and with ``memory_check`` its memory
    estimate against the memory available) before anything is fitted."""
    if split not in (*SPLITS, "all"):
        raise TraceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}, all")
    router.check_params()
    check_sweep(router, sweep or {})
    trace = trace if isinstance(trace, (Trace, RemoteTrace)) else open_trace(trace)
    root = trace.root
    scorer = router_scorer(router, trace.manifest.roles)
    if scorer and scorer not in trace.manifest.scorers:
        _, _, asked = scorer.partition("@")
        whose = f" (the {asked} model's own verdicts)" if asked else ""
        raise TraceError(
            f"router {router.name} reads {scorer} scores{whose}, which {root} does not have; "
            f"run `trace score {root} --scorer {scorer}` first"
        )
    cost_model = make_cost_model(cost, trace.manifest, prices)
    data = ReplayData.from_trace(trace, grades)
    if worlds is not None:
        absent = sorted(set(worlds) - set(data.worlds))
        if absent:
            raise TraceError(
                f"{root} has no world(s) {', '.join(map(str, absent))}; it has {', '.join(map(str, data.worlds))}"
            )
        data = ReplayData(
            data.manifest, data.steps, data.problems, scores=data.scores, hidden=data.hidden, worlds=worlds
        )
    splits = split_frame(data.problems["problem_id"].to_list(), split_seed, fractions)
    ids_of = {name: splits.filter(pl.col("split") == name)["problem_id"].to_list() for name in SPLITS}
    evaluated = data if split == "all" else data.subset(ids_of[split])
    if evaluated.problems.height == 0:
        raise TraceError(f"split {split!r} of {root} holds no problems (fractions {fractions}, seed {split_seed})")
    n_roots = evaluated.roots.height
    check_grid_size(sweep or {}, max_configs, n_roots)
    if memory_check:
        check_sweep_memory(sweep or {}, n_roots)
    router.fit(data.subset(ids_of["train"]))
    scores_lost = bool(scorer) and data.scores_of(scorer)["value"].is_null().all()
    root_split = evaluated.roots["problem_id"].replace_strict(splits["problem_id"], splits["split"], default=None)

    def check_scores(walked: Walked) -> None:
        if scores_lost and walked.miss_scorer[walked.miss_role >= 0].any():
            raise TraceError(
                f"router {router.name} reads {scorer} scores, but {root} holds none, although trace.json lists the "
                f"scorer (the scores were lost); run `trace score {root} --scorer {scorer}`"
            )

    def with_split(outcomes: pl.DataFrame) -> pl.DataFrame:
        # The outcomes are configuration-major (each configuration's rows are the roots in order), so each root's
        # split, looked up once, is repeated per configuration: no lookup per outcome row, no intermediate column.
        return outcomes.with_columns(  # the outcomes are not copied
            split=pl.concat([root_split] * (outcomes.height // n_roots), rechunk=True),
            split_seed=pl.lit(split_seed, dtype=pl.Int64),
            split_fractions=pl.lit(",".join(str(f) for f in fractions)),
        )

    if math.prod(len(values) for values in (sweep or {}).values()) * n_roots > STREAM_STATES:
        router.check_fitted()
        configs = sweep_configs(router, sweep, max_configs, n_roots)
        return _replay_streamed(evaluated, router, cost_model, configs, with_split, check_scores)
    configs, walked = _walk_configs(evaluated, router, cost_model, sweep, max_configs)
    check_scores(walked)
    source = OutcomeSource.of(evaluated)
    del data, evaluated  # the trace's steps, scores and index are freed before the outcomes are built: a lower peak
    result = _result(source, router, cost_model, configs, walked)
    del source, walked
    result.outcomes = with_split(result.outcomes)
    return result


def _replay_streamed(
    data: ReplayData,
    router,
    cost_model: CostModel,
    configs: Configs,
    finish: Callable[[pl.DataFrame], pl.DataFrame],
    check: Callable[[Walked], None],
) -> ReplayResult:
    """A replay too large to hold (see STREAM_STATES): the configurations walked in blocks of at most
    STREAM_BLOCK_STATES walk states, each block's outcomes (completed by ``finish``) appended to a Parquet file
    in the temp folder, its summary and misses kept."""
    source = OutcomeSource.of(data)
    costs = Costs(data, cost_model)
    per_block = max(1, STREAM_BLOCK_STATES // data.roots.height)
    handle, name = tempfile.mkstemp(prefix="trace-outcomes-", suffix=".parquet")
    os.close(handle)
    path = Path(name)
    summaries, misses = [], []

    def blocks() -> Iterator[pa.Table]:
        for first in range(0, len(configs), per_block):
            block = configs.take(slice(first, first + per_block))
            walked = _walk(data, router, costs, block)
            check(walked)
            part = _result(source, router, cost_model, block, walked)
            outcomes = finish(part.outcomes.with_columns(pl.col("config") + first))
            summaries.append(summarize(outcomes, source.roles))
            misses.append(part.misses.with_columns(pl.col("config") + first))
            yield outcomes.to_arrow()

    try:
        parts = blocks()
        head = next(parts)
        with pq.ParquetWriter(path, head.schema, compression="zstd") as writer:
            writer.write_table(head)
            for outcomes in parts:
                writer.write_table(outcomes)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReplayResult(
        None, source.roles, cost_model.unit, pl.concat(misses), outcomes_file=path, summary=pl.concat(summaries)
    )


def write_outcomes(outcomes: pl.DataFrame, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write outcomes to Parquet atomically (a temp file renamed over ``path``; an existing file is replaced
    only with ``force``)."""
    path = check_output_file(path, force=force)
    write_atomic(path, lambda temp: outcomes.write_parquet(temp, compression="zstd"))
