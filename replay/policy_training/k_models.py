"""`trace train policy` with K > 2 models in play: the action space of Si, Lee, Bastani 2026 §3.1, continue with
the current model M_k or escalate to any M_j, j > k (one-way), trained as the two-model policy is
(``replay.train_policy``'s module doc: rollouts under pi, V-trace critics toward the thresholded_states policy
S_{pi,kappa}, a CPO step under the exact miscoverage of S, kappa by eq. (5)); deployed as the router replays it
(``replay.routers.policy``: the largest model whose pi >= kappa, else continue).

An episode is no longer a chain of decisions with a terminal escalation: escalating to a middle model starts
that model's chain, on which the policy decides again. So the decisions of the train episodes are read off the
cache as a graph of states: a state is (the step the policy observes, the current model), and each action leads
to the next state or ends the episode with a known outcome and a known cost. Decisions and costs are the
two-model ones per model: ``after``, decide after each non-final step of the current model (continue = the
current model's next step; escalate to M_j = M_j's next step, or, for the largest model, its completion);
``replace``, decide on each draft (continue = keep it; escalate = discard it, paid for, and M_j drafts the
same step, or the largest model completes from there).

An action whose continuation the trace does not hold (the completion of M_j from that node is not cached in
full) is masked out of the action set at that observation: pi is renormalised over the actions the cache can
play out, in rollouts, in S, in the exact miscoverage and in the CPO surrogates. On a comb this masks the second
escalation (M_0 -> M_1 -> M_2: the comb holds the completions only from nodes of chains that start at the
root); after `trace gen --expand closure` has grown what a replay of the policy missed, retraining sees those
actions too. The deployed policy does not know the cache: where it takes a masked action the replay reports a
miss, which closure grows.

The covering event uses the largest model in play: R_M is M_{K-1} alone from the root; costs are scaled by its
mean cost (as the two-model trainer does with the large model).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from replay.data import ReplayData
from replay.mlp import MLP, Adam
from replay.policy_training.episodes import VERIFIER, step_cost_units
from replay.policy_training.results import finish_training
from replay.policy_training.update import (
    PolicyTerms,
    cpo_step,
    critic_update,
    kappa_step_size,
    kappa_update,
    log_row,
)
from replay.policy_walk import allowed_actions, deployed_action
from replay.routers.policy import normalise, policy_probabilities, raw_features, with_role
from tracestore.errors import TraceError


@dataclass
class StateGraph:
    """Every decision of every train episode: N states, K actions, E episodes; costs scaled by ``cost_scale``."""

    problem_id: list[str]
    escalate: str
    roles: list[str]
    start: np.ndarray  # (E,) first state, -1 when the episode has no decision
    start_correct: np.ndarray  # (E,) outcome of an episode without decisions
    start_success: np.ndarray
    base_cost: np.ndarray  # (E,) paid before the first decision (after: the first step)
    episode: np.ndarray  # (N,)
    depth: np.ndarray  # (N,) decisions before this one in its episode
    role: np.ndarray  # (N,) position of the current model in ``roles``
    observation: np.ndarray  # (N, F + K) normalised features and the one-hot of the current model
    allowed: np.ndarray  # (N, K) open (a larger model or continue) and played out by the cache
    next_state: np.ndarray  # (N, K) the state an action leads to, -1 if it ends the episode (or is not allowed)
    cost: np.ndarray  # (N, K) scaled cost of what the action writes (and, replace, discards)
    correct: np.ndarray  # (N, K) an action that ends the episode: the answer is correct
    success: np.ndarray  # (N, K) ... or every kept step is verified
    large_right: np.ndarray  # (E,) the largest model in play alone is correct
    cost_scale: float
    cost_unit: str
    feature_mean: np.ndarray
    feature_std: np.ndarray
    has_verifier: bool

    @property
    def horizon(self) -> int:
        return int(self.depth.max()) + 1 if self.depth.size else 1

    def episode_success(self, value: np.ndarray) -> np.ndarray:
        """(E,) from per-state success values: the start state's, or the outcome without decisions."""
        return np.where(self.start >= 0, value[np.maximum(self.start, 0)], self.start_success)

    def backward(self, combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """Per-state values, deepest states first: ``combine(states, outcome (n, K))`` with outcome = the next
        state's value or the action's success where it ends the episode."""
        value = np.zeros(len(self.depth))
        for level in reversed(range(self.horizon)):
            states = np.flatnonzero(self.depth == level)
            after = self.next_state[states]
            outcome = np.where(after >= 0, value[np.maximum(after, 0)], self.success[states])
            value[states] = combine(states, outcome)
        return value

    def best_coverage(self) -> float:
        value = self.backward(lambda states, outcome: np.where(self.allowed[states], outcome, 0.0).max(axis=1))
        return float((~self.large_right | (self.episode_success(value) > 0)).mean())


def build_states(data: ReplayData, roles: list[str], hp, unit: np.ndarray, cost_unit: str) -> StateGraph:
    """The state graph of every train episode, read off the cached trees."""
    tree = data.tree
    children, step_child = tree.children, tree.step_child
    final, right = tree.step_final, tree.step_correct
    n_roles, top = len(roles), len(roles) - 1
    role_row = [data.roles.index(role) for role in roles]
    verifier = data.scores_of(VERIFIER)["value"]
    has_verifier = bool(verifier.is_not_null().any())
    passes = (verifier.fill_null(0.0) >= 0.5).to_numpy()
    after = hp.escalate == "after"

    def walk(node: int, position: int) -> tuple[list[int], int]:
        """(step rows of model ``roles[position]``'s completion from ``node``, -1) or (rows so far, the node
        where the trace lacks its next step)."""
        rows = []
        while True:
            row = int(children[role_row[position], node])
            if row < 0:
                return rows, node
            rows.append(row)
            if final[row]:
                return rows, -1
            node = int(step_child[row])

    def chain(node: int, position: int) -> list[int] | None:
        rows, missing = walk(node, position)
        return None if missing >= 0 else rows

    def needed(node: int, position: int, what: str) -> list[int]:
        rows, missing = walk(node, position)
        if missing >= 0:
            raise TraceError(
                f"the trace lacks the {roles[position]} model's step at node "
                f"{data.node_names(np.array([missing]))[0]!r}, which {what} needs: train policy needs a comb trace "
                f"(trace gen --expand comb) complete on the train split"
            )
        return rows

    states: dict[str, list] = {key: [] for key in ("episode", "depth", "role", "row", "allowed", "next", "cost")}
    states.update(correct=[], success=[])
    outcome_keys = ("next", "cost", "correct", "success")

    def add(episode: int, depth: int, position: int, row: int) -> int:
        index = len(states["episode"])
        for key, value in (("episode", episode), ("depth", depth), ("role", position), ("row", row)):
            states[key].append(value)
        states["allowed"].append(allowed_actions(np.array(position), n_roles).copy())
        for key in outcome_keys:
            states[key].append([-1 if key == "next" else 0] * n_roles)
        return index

    def end(index: int, action: int, cost: float, rows: list[int], verified: bool) -> None:
        states["cost"][index][action] = cost
        states["correct"][index][action] = bool(right[rows[-1]])
        states["success"][index][action] = bool(right[rows[-1]]) or (verified and has_verifier)

    def decide_after(episode: int, depth: int, position: int, row: int, verified: bool) -> int:
        """The decision after ``row`` (non-final, by model ``position``), all its steps so far ``verified``."""
        index = add(episode, depth, position, row)
        node = int(step_child[row])
        for action in range(n_roles):
            writer = position if action == 0 else action
            if not states["allowed"][index][action]:
                continue
            rows = chain(node, writer) if action else needed(node, writer, "a rollout")
            if rows is None:
                states["allowed"][index][action] = False
                continue
            if writer == top or final[rows[0]]:
                end(index, action, float(unit[rows].sum()), rows, verified and bool(passes[rows].all()))
            else:
                states["cost"][index][action] = float(unit[rows[0]])
                states["next"][index][action] = decide_after(
                    episode, depth + 1, writer, rows[0], verified and bool(passes[rows[0]])
                )
        return index

    def decide_replace(episode: int, depth: int, position: int, node: int, verified: bool) -> int:
        """The decision on model ``position``'s draft at ``node``, the kept steps before it ``verified``."""
        draft = needed(node, position, "a rollout")[0]
        index = add(episode, depth, position, draft)
        for action in range(n_roles):
            if not states["allowed"][index][action]:
                continue
            if action == 0:
                if final[draft]:
                    end(index, 0, float(unit[draft]), [draft], verified and bool(passes[draft]))
                else:
                    states["cost"][index][0] = float(unit[draft])
                    states["next"][index][0] = decide_replace(
                        episode, depth + 1, position, int(step_child[draft]), verified and bool(passes[draft])
                    )
                continue
            rows = chain(node, action)
            if rows is None:
                states["allowed"][index][action] = False
            elif action == top:
                end(index, action, float(unit[draft] + unit[rows].sum()), rows, verified and bool(passes[rows].all()))
            else:
                states["cost"][index][action] = float(unit[draft])
                states["next"][index][action] = decide_replace(episode, depth + 1, action, node, verified)
        return index

    roots = data.roots["node"].to_numpy()
    n_episodes = len(roots)
    start = np.full(n_episodes, -1, dtype=np.int64)
    start_correct = np.zeros(n_episodes, dtype=bool)
    start_success = np.zeros(n_episodes, dtype=bool)
    base_cost = np.zeros(n_episodes)
    large_right = np.zeros(n_episodes, dtype=bool)
    large_alone_cost = np.zeros(n_episodes)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # one frame per decision of the deepest path
    try:
        for episode, root in enumerate(roots):
            largest = needed(int(root), top, f"the {roles[top]} model alone (the covering event)")
            large_right[episode] = bool(right[largest[-1]])
            large_alone_cost[episode] = float(unit[largest].sum())
            first = needed(int(root), 0, "a rollout")
            if not after:
                start[episode] = decide_replace(episode, 0, 0, int(root), True)
            elif final[first[0]]:
                base_cost[episode] = unit[first[0]]
                start_correct[episode] = bool(right[first[0]])
                start_success[episode] = start_correct[episode] or (bool(passes[first[0]]) and has_verifier)
            else:
                base_cost[episode] = unit[first[0]]
                start[episode] = decide_after(episode, 0, 0, first[0], bool(passes[first[0]]))
    finally:
        sys.setrecursionlimit(limit)
    if not states["episode"]:
        raise TraceError(
            f"no decisions to learn from: every chain of {roles[0]} in the train split ends at its first step, and "
            f"escalate={hp.escalate} decides only after a non-final one"
        )
    cost_scale = float(large_alone_cost.mean())
    if not cost_scale > 0:
        raise TraceError(
            f"the {roles[top]} model alone costs nothing on the train split ({hp.cost}): nothing to scale by"
        )

    observed = np.array(states["row"], dtype=np.int64)
    raw = raw_features(data.steps, data.problems, list(hp.features))[observed]
    known = np.isfinite(raw)
    count = np.maximum(known.sum(axis=0), 1)
    mean = np.where(known, raw, 0.0).sum(axis=0) / count
    std = np.sqrt(np.where(known, (raw - mean) ** 2, 0.0).sum(axis=0) / count)
    std = np.where(std > 0, std, 1.0)
    role = np.array(states["role"], dtype=np.int64)
    return StateGraph(
        problem_id=data.roots["problem_id"].to_list(),
        escalate=hp.escalate,
        roles=list(roles),
        start=start,
        start_correct=start_correct,
        start_success=start_success,
        base_cost=base_cost / cost_scale,
        episode=np.array(states["episode"], dtype=np.int64),
        depth=np.array(states["depth"], dtype=np.int64),
        role=role,
        observation=with_role(normalise(raw, mean, std), role, n_roles),
        allowed=np.array(states["allowed"], dtype=bool),
        next_state=np.array(states["next"], dtype=np.int64),
        cost=np.array(states["cost"], dtype=np.float64) / cost_scale,
        correct=np.array(states["correct"], dtype=bool),
        success=np.array(states["success"], dtype=bool),
        large_right=large_right,
        cost_scale=cost_scale,
        cost_unit=cost_unit,
        feature_mean=mean,
        feature_std=std,
        has_verifier=has_verifier,
    )


@dataclass
class Walked:
    """Episodes walked by one policy, padded to the graph's horizon: the fields of ``episodes.Rollout`` and
    the state of each decision."""

    episode: np.ndarray  # (B,)
    state: np.ndarray  # (B, T) -1 padding
    mask: np.ndarray  # (B, T)
    action: np.ndarray  # (B, T)
    reward: np.ndarray  # (B, T) success, at the decision that ended the episode
    cost: np.ndarray  # (B, T)
    total_cost: np.ndarray  # (B,)
    correct: np.ndarray  # (B,)
    covered: np.ndarray  # (B,)

    @classmethod
    def concat(cls, walks: list[Walked]) -> Walked:
        return cls(**{name: np.concatenate([getattr(w, name) for w in walks]) for name in vars(walks[0])})


def walk_states(graph: StateGraph, index: np.ndarray, choose: Callable[[np.ndarray, int], np.ndarray]) -> Walked:
    """Walk episodes ``index``; ``choose(states, t)`` gives the action at each state reached at decision t."""
    n, horizon = len(index), graph.horizon
    state = np.full((n, horizon), -1, dtype=np.int64)
    action = np.zeros((n, horizon), dtype=np.int64)
    reward = np.zeros((n, horizon))
    cost = np.zeros((n, horizon))
    correct = graph.start_correct[index].copy()
    success = graph.start_success[index].copy()
    here = graph.start[index].copy()
    for t in range(horizon):
        going = np.flatnonzero(here >= 0)
        if not going.size:
            break
        at = here[going]
        taken = choose(at, t)
        state[going, t], action[going, t] = at, taken
        cost[going, t] = graph.cost[at, taken]
        after = graph.next_state[at, taken]
        ended = after < 0
        reward[going[ended], t] = graph.success[at[ended], taken[ended]]
        correct[going[ended]] = graph.correct[at[ended], taken[ended]]
        success[going[ended]] = graph.success[at[ended], taken[ended]]
        here[going] = after
    mask = state >= 0
    covered = success | ~graph.large_right[index]
    total = graph.base_cost[index] + cost.sum(axis=1)
    return Walked(index, state, mask, action, reward, cost, total, correct, covered)


def sample_actions(probability: np.ndarray, allowed: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Draw one action per row of ``probability`` (zero where not allowed) by inverse CDF at ``uniform``."""
    action = (uniform[:, None] >= np.cumsum(probability, axis=1)).sum(axis=1)
    action = np.minimum(action, probability.shape[1] - 1)
    last_allowed = probability.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1)
    return np.where(allowed[np.arange(len(action)), action], action, last_allowed)


def thresholded_states(probability: np.ndarray, allowed: np.ndarray, kappa: float) -> np.ndarray:
    """S_{pi,kappa}(a | o) = 1{pi(a|o) >= kappa} / #{a' : pi(a'|o) >= kappa} over the allowed actions; continue
    when none passes (as the two-model S and eq. (6))."""
    passing = allowed & (probability >= kappa)
    count = passing.sum(axis=-1, keepdims=True)
    keep_going = np.zeros(probability.shape)
    keep_going[..., 0] = 1.0
    return np.where(count > 0, passing / np.maximum(count, 1), keep_going)


def states_miscoverage(graph: StateGraph, probability: np.ndarray, kappa: float) -> float:
    """J_miss(S_{pi,kappa}) over all the episodes, exactly (probability: pi of every state)."""
    target = thresholded_states(probability, graph.allowed, kappa)
    value = graph.backward(lambda states, outcome: (target[states] * outcome).sum(axis=1))
    return float((graph.large_right * (1 - graph.episode_success(value))).mean())


def train_k_policy(root, out, hp, train: ReplayData, roles: list[str], started: float, on_step=None):
    """``replay.train_policy.train_policy`` for K > 2 models in play (its checks already done)."""
    unit, cost_unit = step_cost_units(train, hp, large=roles[-1])
    graph = build_states(train, roles, hp, unit, cost_unit)
    n_episodes, n_roles = len(graph.start), len(roles)
    n_inputs = graph.observation.shape[1]
    critic_inputs = np.concatenate([graph.observation, graph.large_right[graph.episode][:, None]], axis=1)
    rng = np.random.default_rng(hp.seed)
    policy = MLP.init(n_inputs, hp.hidden, n_roles, rng)
    critics = tuple(MLP.init(n_inputs + 1, hp.hidden, 1, rng) for _ in range(2))  # success, cost
    optimizers = tuple(Adam(critic.vector().size, hp.lr) for critic in critics)
    buffer: deque[tuple[Walked, np.ndarray]] = deque(maxlen=hp.buffer_batches)
    kappa = hp.kappa
    log = []
    everyone = np.arange(n_episodes)

    def probability(states=None):
        states = np.arange(len(graph.depth)) if states is None else states
        return policy_probabilities(policy, graph.observation[states], graph.allowed[states])

    def sampled(states, t):
        return sample_actions(probability(states), graph.allowed[states], rng.random(len(states)))

    def deployed(current_kappa):
        return lambda states, t: deployed_action(probability(states), graph.allowed[states], current_kappa)

    for step in range(1, hp.steps + 1):
        index = rng.integers(0, n_episodes, size=hp.batch)
        batch = walk_states(graph, index, sampled)
        taken = np.where(batch.mask, batch.state, 0)
        mu = np.take_along_axis(probability(taken), batch.action[..., None], -1)[..., 0]
        buffer.append((batch, np.where(batch.mask, mu, 1.0)))

        recent = Walked.concat([b for b, _ in buffer])
        mu = np.concatenate([m for _, m in buffer])
        states = np.where(recent.mask, recent.state, 0)
        p_now = probability(states)
        target = thresholded_states(p_now, graph.allowed[states], kappa)
        critic_step = critic_update(
            hp,
            critics,
            optimizers,
            critic_inputs[states],
            recent,
            np.take_along_axis(target, recent.action[..., None], -1)[..., 0] / mu,
            np.take_along_axis(p_now, recent.action[..., None], -1)[..., 0],
            mu,
            graph.large_right,
        )

        miscoverage = states_miscoverage(graph, probability(), kappa)
        constraint = miscoverage - hp.alpha
        update = cpo_step(
            hp,
            policy,
            PolicyTerms.of(hp, policy, graph.observation[states], graph.allowed[states], recent, critic_step),
            constraint,
            lambda: states_miscoverage(graph, probability(), kappa) <= max(hp.alpha, miscoverage),
        )

        fresh = rng.integers(0, n_episodes, size=hp.batch)
        calibration = walk_states(graph, fresh, deployed(kappa))
        eta = kappa_step_size(hp, step)
        kappa = kappa_update(kappa, float(calibration.covered.mean()), hp.alpha, eta)

        row = log_row(
            step, batch, calibration, hp, eta, kappa, critic_step.errors, update, miscoverage, graph.has_verifier
        )
        log.append(row)
        if on_step is not None:
            on_step(row)

    final = walk_states(graph, everyone, deployed(kappa))
    return finish_training(out, policy, hp, train, roles, graph, kappa, final, log, started, n_episodes)
