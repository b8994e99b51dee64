"""The decision process of `trace train policy` on a cached comb (two models in play): every train episode's
decisions, their costs and outcomes read off the trees (``replay.train_policy``'s module doc), and rollouts of a
policy over them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from replay.costs import CostModel, make_cost_model
from replay.data import ReplayData
from replay.routers.policy import normalise, raw_features
from replay.walk import Costs, walk_chains
from tracestore.errors import TraceError

VERIFIER = "verifier"
LARGE_TOKENS = "tokens"  # --cost tokens: the large model's generated tokens, not a cost model


@dataclass
class Episodes:
    """Every train (problem, world) as padded (E, T) arrays of decisions; T is the most decisions of any episode.
    Costs are in the cost model's units divided by ``cost_scale``."""

    problem_id: list[str]
    escalate: str  # the decision process: after or replace
    length: np.ndarray  # (E,) decisions: small chain steps - 1 (after) or small chain steps (replace)
    observed: np.ndarray  # (E, T) step row whose features decision t observes (small step t+1), -1 padding
    observation: np.ndarray  # (E, T, F) normalised observation of decision t
    base_cost: np.ndarray  # (E,) cost paid before the first decision: the first small step (after), 0 (replace)
    keep_cost: np.ndarray  # (E, T) cost of continuing at t: the next small step (after) or the kept draft (replace)
    escalate_cost: np.ndarray  # (E, T) cost of escalating at t: the large completion (replace: + the discarded draft)
    escalate_correct: np.ndarray  # (E, T) the path escalating at t ends correct
    escalate_success: np.ndarray  # (E, T) ... or every step kept on that path is verified
    small_correct: np.ndarray  # (E,) the all-small chain is correct
    small_success: np.ndarray  # (E,) ... or every step on it is verified
    large_right: np.ndarray  # (E,) the large model alone (the root's large chain) is correct
    large_alone_cost: np.ndarray  # (E,) cost of the large model alone (scaled: their mean is 1)
    cost_scale: float  # mean cost of the large model alone over the episodes, in the cost model's units
    cost_unit: str  # the cost model's unit (TFLOPs, USD, tokens)
    feature_mean: np.ndarray  # (F,) of the raw train observations
    feature_std: np.ndarray
    has_verifier: bool

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.keep_cost.shape[1]) < self.length[:, None]

    def best_coverage(self) -> float:
        """Coverage of the best possible policy: an episode is coverable when the large model alone is wrong, the
        all-small chain succeeds, or escalating at some decision does."""
        coverable = ~self.large_right | self.small_success | (self.escalate_success & self.valid).any(axis=1)
        return float(coverable.mean())


class _PerStep(CostModel):
    """Any per-step-row quantity, added up along a walk by the engine's cost bookkeeping."""

    name, unit = "per-step", ""

    def __init__(self, values: np.ndarray):
        self.values = values

    def step_costs(self, steps):
        return self.values, np.zeros(len(self.values))


def _chain_sums(data: ReplayData, starts: np.ndarray, role: str, values: np.ndarray):
    """Walk each start node's all-``role`` chain; (walk, sum of ``values`` over its steps). A miss is an error."""
    walk = walk_chains(data, Costs(data, _PerStep(values)), starts, data.roles.index(role))
    if walk.missed.any():
        node = data.node_names(walk.end_node[np.flatnonzero(walk.missed)[:1]])[0]
        raise TraceError(
            f"the trace lacks the {role} model's step at node {node!r} (and {int(walk.missed.sum()) - 1} "
            f"more), which a one-way escalation rollout needs: train policy needs a comb trace "
            f"(trace gen --expand comb) complete on the train split"
        )
    return walk, walk.total


def step_cost_units(data: ReplayData, hp, large: str | None = None) -> tuple[np.ndarray, str]:
    """(cost of each step row, unit): the replay cost model's decode + prefill cost, which is what `trace replay`
    adds up for a kept or a discarded step, or the ``large`` model's (default the largest's) generated tokens
    (``cost="tokens"``)."""
    if hp.cost == LARGE_TOKENS:
        large = data.steps["model"].to_numpy() == (large or data.roles[-1])
        return np.where(large, data.steps["n_gen_tokens"].to_numpy(), 0).astype(np.float64), "large tokens"
    model = make_cost_model(hp.cost, data.manifest, dict(hp.prices) or None, hp.latency_profile or None)
    costs = Costs(data, model)
    costs.check_priced(costs.step_total, (), "policy")
    return costs.step_total, model.unit


def comb_episodes(data: ReplayData, hp, roles: tuple[str, str] | None = None) -> Episodes:
    """Read every decision of every train episode out of the cached comb trees (no rollout touches the trace);
    ``roles``: (small, large), by default the trace's smallest and largest model."""
    tree, steps = data.tree, data.steps
    small_model, large_model = roles or (data.roles[0], data.roles[-1])
    small_role = data.roles.index(small_model)
    roots = data.roots["node"].to_numpy()
    small_walk, _ = _chain_sums(data, roots, small_model, np.zeros(steps.height))
    n_small = small_walk.kept[small_role]
    n_episodes, chain = len(roots), int(n_small.max())
    small_row = np.full((n_episodes, chain), -1, dtype=np.int64)  # small step j+1 of each chain
    node = roots.copy()
    for j in range(chain):
        going = j < n_small
        small_row[going, j] = tree.children[small_role, node[going]]
        node[going] = tree.step_child[small_row[going, j]]
    on_chain = small_row >= 0
    rows = np.arange(n_episodes)

    unit, cost_unit = step_cost_units(data, hp, large_model)
    verifier = data.scores_of(VERIFIER)["value"]
    has_verifier = bool(verifier.is_not_null().any())
    passes = (verifier.fill_null(0.0) >= 0.5).to_numpy()
    small_unit = np.where(on_chain, unit[np.maximum(small_row, 0)], 0.0)
    small_pass = np.where(on_chain, passes[np.maximum(small_row, 0)], True)
    passed_through = np.cumprod(small_pass, axis=1).astype(bool)  # small steps 1..j+1 all verified

    after = hp.escalate == "after"
    length = n_small - 1 if after else n_small.copy()
    horizon = max(int(length.max()), 1)
    valid = np.arange(horizon) < length[:, None]
    observed = np.where(valid, small_row[:, :horizon], -1)
    # escalation at decision t: the large model completes from node "s" * (t+1) (after) or "s" * t (replace)
    escalation_node = np.where(valid, (tree.step_child if after else tree.step_parent)[np.maximum(observed, 0)], -1)
    completion, completion_cost = _chain_sums(data, escalation_node[valid], large_model, unit)
    _, completion_unverified = _chain_sums(data, escalation_node[valid], large_model, (~passes).astype(np.float64))
    large_alone, large_alone_cost = _chain_sums(data, roots, large_model, unit)
    cost_scale = float(large_alone_cost.mean())
    if not cost_scale > 0:
        raise TraceError(f"the large model alone costs nothing on the train split ({hp.cost}): nothing to scale by")

    def grid(values, fill):
        out = np.full((n_episodes, horizon), fill, dtype=np.asarray(values).dtype)
        out[valid] = values
        return out

    observed_cost = np.where(valid, small_unit[:, :horizon], 0.0)
    if after:
        next_small = np.where(valid, np.pad(small_unit, ((0, 0), (0, 1)))[:, 1 : horizon + 1], 0.0)
        keep_cost, escalate_cost = next_small, grid(completion_cost, 0.0)
        prefix_verified = passed_through[:, :horizon]  # small steps 1..t+1 are kept
        base_cost = small_unit[:, 0]
    else:
        keep_cost, escalate_cost = observed_cost, observed_cost + grid(completion_cost, 0.0)
        prefix_verified = np.concatenate([np.ones((n_episodes, 1), bool), passed_through[:, : horizon - 1]], 1)
        base_cost = np.zeros(n_episodes)
    escalate_correct = grid(tree.step_correct[completion.final_step], False)
    escalate_verified = prefix_verified & grid(completion_unverified == 0, False) & valid & has_verifier
    small_correct = tree.step_correct[small_row[rows, n_small - 1]]
    small_verified = small_pass.all(axis=1) & has_verifier

    raw = raw_features(steps, data.problems, list(hp.features))[observed[valid]]
    known = np.isfinite(raw)  # a null feature (no math tokens, no difficulty) is left out and observed as 0
    count = np.maximum(known.sum(axis=0), 1)
    mean = np.where(known, raw, 0.0).sum(axis=0) / count
    std = np.sqrt(np.where(known, (raw - mean) ** 2, 0.0).sum(axis=0) / count)
    std = np.where(std > 0, std, 1.0)
    observation = np.zeros((n_episodes, horizon, raw.shape[1]))
    observation[valid] = normalise(raw, mean, std)
    return Episodes(
        problem_id=data.roots["problem_id"].to_list(),
        escalate=hp.escalate,
        length=length,
        observed=observed,
        observation=observation,
        base_cost=base_cost / cost_scale,
        keep_cost=keep_cost / cost_scale,
        escalate_cost=escalate_cost / cost_scale,
        escalate_correct=escalate_correct,
        escalate_success=escalate_correct | escalate_verified,
        small_correct=small_correct,
        small_success=small_correct | small_verified,
        large_right=tree.step_correct[large_alone.final_step],
        large_alone_cost=large_alone_cost / cost_scale,
        cost_scale=cost_scale,
        cost_unit=cost_unit,
        feature_mean=mean,
        feature_std=std,
        has_verifier=has_verifier,
    )


def expected_miss(episodes: Episodes, p_escalate: np.ndarray) -> np.ndarray:
    """Per episode, the probability that a policy escalating at decision t with probability p_escalate[:, t]
    leaves it uncovered (it escalates at the first decision where its draw says so). Exact: the comb holds the
    outcome of every escalation point."""
    p = np.where(episodes.valid, p_escalate, 0.0)
    no_escalation_before = np.cumprod(np.concatenate([np.ones((len(p), 1)), 1 - p[:, :-1]], axis=1), axis=1)
    keeps_all = np.prod(1 - p, axis=1)
    success = (no_escalation_before * p * episodes.escalate_success).sum(axis=1) + keeps_all * episodes.small_success
    return episodes.large_right * (1 - success)


@dataclass
class Rollout:
    """Episodes walked by one policy: what it did at each decision and how each episode ended."""

    episode: np.ndarray  # (B,) episode indices
    mask: np.ndarray  # (B, T) decisions taken
    action: np.ndarray  # (B, T) 1 = escalate (only ever at an episode's last decision)
    reward: np.ndarray  # (B, T) success, at the last decision
    cost: np.ndarray  # (B, T) scaled cost of what each decision's action wrote
    total_cost: np.ndarray  # (B,) base cost + the decisions' costs
    correct: np.ndarray  # (B,)
    covered: np.ndarray  # (B,)

    @classmethod
    def concat(cls, rollouts: list[Rollout]) -> Rollout:
        return cls(**{name: np.concatenate([getattr(r, name) for r in rollouts]) for name in vars(rollouts[0])})


def rollout(episodes: Episodes, index: np.ndarray, escalate: np.ndarray) -> Rollout:
    """Walk episodes ``index`` where ``escalate`` (B, T) says where the policy would escalate; it escalates at
    the first such decision, or continues to the end of the small chain. An episode without decisions (under
    ``after``, a first small step that is final) is the one-step small chain."""
    valid = episodes.valid[index]
    escalate = escalate & valid
    escalated = escalate.any(axis=1)
    end = np.where(escalated, escalate.argmax(axis=1), episodes.length[index] - 1)  # -1: no decision
    t = np.arange(valid.shape[1])
    mask = t <= end[:, None]
    action = (t == end[:, None]) & escalated[:, None]
    at = np.maximum(end, 0)
    correct = np.where(escalated, episodes.escalate_correct[index, at], episodes.small_correct[index])
    success = np.where(escalated, episodes.escalate_success[index, at], episodes.small_success[index])
    cost = np.where(action, episodes.escalate_cost[index], episodes.keep_cost[index]) * mask
    reward = np.zeros(mask.shape)
    decided = np.flatnonzero(end >= 0)
    reward[decided, end[decided]] = success[decided]
    covered = success | ~episodes.large_right[index]
    total = episodes.base_cost[index] + cost.sum(axis=1)
    return Rollout(index, mask, action.astype(np.int64), reward, cost, total, correct, covered)
