"""The walk kernel: advance walk states through the indexed trees until a final step or a miss.

A walk state is one (problem, world, configuration) triple; all states advance together one solution step per
iteration, with numpy, so a sweep over a threshold costs one walk over problems x configurations rather than
one walk per configuration. Routers walk with ``walk_steps`` (a model chosen per step, or a draft kept or
discarded per step) or ``walk_chains`` (one model's whole solution).

The kernel never invents a step: when a router needs a (node, model) step, or a scorer's score of a draft,
that the trace lacks, the walk of that state stops there and records a **miss**.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from replay.costs import CostModel
from replay.data import ReplayData
from tracestore.errors import TraceError


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

    def check_priced(self, total: np.ndarray, decode: np.ndarray, router: str) -> None:
        """TraceError if a walk paid for something its cost model gave no number for (NaN: a latency profile
        without a role the router used), naming the role (``decode``: the walks' costs by role)."""
        if self.model is None or not np.isnan(total).any():
            return
        roles = [role for role, by_role in zip(self.data.roles, decode) if np.isnan(by_role).any()]
        if not roles:  # only discarded drafts went unpriced: name the roles without a cost
            unpriced = self.data.steps["model"].filter(pl.Series(np.isnan(self.step_total)))
            roles = sorted(set(unpriced.to_list()))
        explain = getattr(self.model, "unpriced", None)
        if explain is not None:
            raise TraceError(explain(roles, router))
        raise TraceError(f"cost model {self.model.name} gives no cost for the {roles[0]} steps router {router} used")

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
