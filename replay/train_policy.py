"""`trace train policy`: learn the escalation policy of the `policy` router from a cached comb trace.

Si, Lee, Bastani 2026 (Policy-Guided Stepwise Model Routing, §3-4), in one file, top to bottom:
hyperparameters, the decision process on the cache, the pieces of the update (thresholded policy, V-trace,
constraint, CPO, kappa), then the training loop.

The models in play are ``draft`` .. ``target`` in size order (defaults: the trace's smallest and largest). With
two of them (every two-model trace, or e.g. ``--draft m0 --target m1``) the small model is the draft and the
large model the target, and everything below holds as written; with more, the last section of this file trains
the K-action policy (continue, or escalate to any larger model in play) on the same pieces.

Decision process, one episode per train (problem, world), read off the comb trace (the all-small chain and
the all-large completion from every node on it, so rollouts never generate anything; a step a rollout could
need and the trace lacks is an error). The small model writes step 1. With ``escalate="after"`` (default, the
paper's process) decision t (t = 1, 2, ...) comes after the small model has written step t, if that step is not
final: the policy sees o_t, the router's features of step t, and either continues (the small model writes step
t+1) or escalates (one-way: step t is kept and the large model writes every later step; the episode ends). A
small chain of n steps has n - 1 decisions; a final small step ends the episode with nothing to decide. With
``escalate="replace"`` (the ablation) decision t reads the same observation of the small step t, final or not,
and escalating discards that step (still paid for) and has the large model write it and every later one: n
decisions. The router replays exactly these processes (``--param escalate``).

Per episode: reward = success = the answer is correct, or every kept step passes the `verifier` scorer (when
the trace has verifier scores); covered = success, or the large model alone (its chain from the root) is wrong
(R_M = 0); cost = the sum over every step paid for (kept, and under ``replace`` discarded) of the replay cost
model's per-step cost (``cost``: flops, flops+prefill, api with ``prices``, exactly as `trace replay` adds them
up; or tokens: the large model's generated tokens), divided by one constant, ``cost_scale`` = the mean cost of
the large model alone over the train episodes, so that minimising the mean scaled cost minimises the mean cost
per query that `trace replay` reports. Per decision, the cost of the step(s) the action makes the system write:
continue = the next small step (``replace``: the kept draft), escalate = the large completion (``replace``:
plus the discarded draft); the first small step under ``after`` is paid before any decision (``base_cost``).
The constrained problem (eq. 3): minimise E[cost] subject to P(covered) >= 1 - alpha.

The thresholded policy (§4.1): S(a|o) = 1{pi(a|o) >= kappa} / sum_a' 1{pi(a'|o) >= kappa}, with two actions:
S(escalate|o) = 1 when only escalate passes the threshold, 1/2 when both do (possible only for kappa <= 1/2),
0 when only continue does, and 0 when neither does (possible only for kappa > 1/2; eq. (6) continues there).
Deployed (eq. 6, the router): escalate iff pi(escalate|o) >= kappa, which is S except on ties, where it
escalates.

Every policy step k (policy pi_k, threshold kappa_k):
1. roll out ``batch`` train episodes drawn uniformly with the stochastic pi_k; keep the last ``buffer_batches``
   batches with the probabilities mu(a|o) their actions had when they were drawn (mu = pi_k for this batch);
2. V-trace (Espeholt et al. 2018) targets of the success and cost critics toward the thresholded policy
   S_k = S_{pi_k, kappa_k}: rho_t = min(rho_bar, S_k(a_t|o_t) / mu(a_t|o_t)), c_t = min(c_bar, same ratio).
   The off-policy buffer composes with this: V-trace only needs the target's and the behaviour's probability of
   each stored action, so every stored decision uses the mu recorded when it was drawn and the current S_k (for
   the newest batch mu = pi_k, the paper's ratio S/pi). Each critic takes ``critic_iters`` Adam steps towards
   its targets. The critics also see whether the large model alone is right (known per episode in training,
   never shown to the policy);
3. CPO step (Achiam et al. 2017) on the buffer. Advantages of the action taken under S_k from the next decision
   on: A_t = r_t + gamma v_{t+1} - V(o_t) with the V-trace targets v (no rho_t factor: S is piecewise constant
   in the weights and gives zero probability to the action outside the thresholded set, so rho_t A_t would
   never tell the policy to move an action into the set). Surrogates: sum_t w_t (pi(a_t|o_t) / pi_k(a_t|o_t))
   A_t over the buffer, with w_t = min(rho_bar, pi_k(a_t|o_t) / mu(a_t|o_t)) the per-decision correction of an
   older batch (1 for the newest). g = gradient of the objective (minus the cost surrogate, plus an entropy bonus
   that keeps pi from saturating, where its gradients vanish), b = gradient of the miscoverage surrogate
   (miscoverage advantage = -[large alone right] x success advantage), and c = J_miss(S_k) - alpha, where
   J_miss(S_k) = P(not covered) of the thresholded policy over all train episodes, computed exactly: the comb
   holds every outcome, so the expectation under S_k is a finite sum (it is what the paper's estimator
   E_pi[prod_t rho_t 1{R_pi = 1}] estimates from rollouts, without its variance or its clipping bias).
   The trust region is on pi, mean KL(pi_k || pi) <= delta over the buffer's decisions (eq. (4) writes it on
   S, whose KL between two thresholdings is 0 or infinite). Conjugate gradient gives F^-1 g and F^-1 b (F the
   Fisher matrix of that KL), CPO's closed-form dual the Lagrange multiplier nu of the
   constraint and lambda of the KL radius; a step beyond the trust region is shortened to it, and a
   backtracking line search keeps KL <= delta, the objective (if feasible), the linearised constraint and the
   exact one: J_miss(S_{pi_new, kappa_k}) <= alpha if the policy was feasible, else no larger than before (S
   is piecewise constant, so the miscoverage jumps where pi crosses kappa, which the linearisation cannot see;
   without this guard feasible cost steps and recovery steps alternate);
4. kappa (eq. 5 and its verifier variant): with the new policy pi_{k+1} and the old threshold kappa_k, a fresh
   batch of ``batch`` train episodes (drawn uniformly, independently of step 1's) is walked as deployed (eq. 6),
   and kappa_{k+1} = clip(kappa_k - eta_k (1 - coverage - alpha), 0, 1), coverage = the batch's mean of
   1{correct or large alone wrong or (verifier scores) every kept step verified}, eta_k = eta / k^eta_decay.
   The sign: escalation happens iff pi(escalate|o) >= kappa, so a miss must lower kappa (more escalation) and
   a covered episode raise it (by eta alpha); eq. (5) as printed adds eta (1 - 1{covered} - alpha), which would
   raise kappa after a miss. This is online conformal calibration (Angelopoulos et al. 2024) of the set
   {a : pi(a|o) >= kappa} with score 1 - pi: the threshold 1 - kappa grows after a miss.

Only train-split episodes feed anything: the rollouts, the critics, the constraint and kappa. What the two-model
policy learns from is the comb of each train (problem, world): the all-small chain from the root and the large
model's completion from every node on it (the steps it observes and pays for, their features' scaling, the
outcomes); steps grown after a large step (closure's, ``full``'s) are never read, so training on a trace closed
over other routers gives the same file byte for byte. The K-model policy (below) is the exception by design: it
learns every escalation the cache can play out, so growing a trace for a router that escalates twice (chained
STEER) adds actions it then trains on. The file records where it was trained (``fitted_on``).

Training log (``NAME.log.parquet`` next to ``NAME.pt``), one row per policy step: reward, cost (scaled) and
rollout_coverage of the batch's rollouts under pi_k; coverage of the deployed pi_{k+1}, kappa_k on the kappa
batch (what kappa tracks); alpha; eta (eta_k); kappa after its update; success_critic_loss, cost_critic_loss;
entropy of pi_k on the buffer; kl of the step taken (0 if none); miscoverage = J_miss(S_k) and constraint =
miscoverage - alpha; the CPO multipliers nu (constraint) and lam (KL); case (cpo, trpo, recovery, none);
line_search (backtracking try accepted, -1 if none); verifier (whether verifier scores count towards coverage).
"""

from __future__ import annotations

import io
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.artifacts import fit_record, load_train_split
from replay.costs import COSTS, CostModel, Price, make_cost_model
from replay.data import ReplayData
from replay.endpoint_signals import require_signals
from replay.policy_walk import allowed_actions, deployed_action
from replay.routers.policy import (
    ESCALATE,
    POLICY_INSTEAD,
    mlp,
    model_set,
    normalise,
    policy_network,
    raw_features,
    save_policy,
    with_role,
)
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, check_fractions
from replay.walk import ESCALATE_MODES, Costs, walk_chains
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.outputs import check_output_file

DEFAULT_FEATURES = ("conf_max_logit_math", "depth", "is_final", "n_gen_tokens")
LARGE_TOKENS = "tokens"  # --cost tokens: the large model's generated tokens, not a cost model
VERIFIER = "verifier"
EPS = 1e-30  # guards divisions only: a trust-region step has its length whatever the gradient's size, so even
# the faint gradients of a nearly saturated policy still move it


@dataclass(frozen=True)
class Hyperparameters:
    alpha: float = 0.02  # allowed miscoverage: P(correct or verified or large alone wrong) >= 1 - alpha
    steps: int = 1000  # policy steps
    lr: float = 1e-3  # Adam learning rate of the success and cost critics
    batch: int = 5  # episodes rolled out per policy step (and walked for each kappa update)
    eta: float = 0.1  # step size of the kappa update
    eta_decay: float = 0.0  # eta_k = eta / k^eta_decay (0: constant, the paper's setting; (1/2, 1]: Robbins-Monro)
    seed: int = 0  # seeds network initialisation, episode sampling and actions
    kappa: float = 0.5  # initial deployment threshold on pi(escalate | o)
    delta: float = 0.01  # trust region: mean KL(old policy || new policy) per step at most
    entropy_coef: float = 0.05  # weight of the policy's mean entropy added to minus the scaled cost in the objective
    features: tuple[str, ...] = DEFAULT_FEATURES  # observation, names from replay.routers.policy.FEATURES
    escalate: str = "after"  # after: the step that triggers escalation is kept; replace: it is rewritten
    cost: str = "flops"  # a replay cost model (flops, flops+prefill, api) or tokens (large-model generated tokens)
    prices: tuple[tuple[str, Price], ...] = ()  # api prices by model role (none: GPT-4.1-mini rates, as replay)
    hidden: int = 64  # hidden units of the policy and critic MLPs (three layers each)
    gamma: float = 1.0  # discount of success and cost
    rho_bar: float = 2.0  # clip of the V-trace weights rho and of the policy-gradient correction of old batches
    c_bar: float = 1.0  # V-trace clip of the trace-cutting weights
    buffer_batches: int = 20  # recent batches the critics and the CPO step learn from (V-trace corrects them)
    critic_iters: int = 5  # critic Adam steps per policy step
    cg_iters: int = 10  # conjugate-gradient iterations for F^-1 g and F^-1 b
    cg_damping: float = 0.1  # added to the Fisher matrix's diagonal
    backtrack_iters: int = 10  # line-search tries, each shrinking the step by backtrack_ratio
    backtrack_ratio: float = 0.8
    split_seed: int = DEFAULT_SPLIT_SEED  # train split as `trace replay` draws it: seed of the hash
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS  # train, calibration, test
    split_by: str = ""  # a problems column or a file of (problem_id, split) lines (replay.splits); "": the hash

    def check(self) -> None:
        """TraceError naming the first hyperparameter out of range (as its command-line option)."""
        if not 0 < self.alpha < 1:
            raise TraceError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        if not 0 <= self.kappa <= 1:
            raise TraceError(f"--kappa must lie in [0, 1], got {self.kappa}")
        if self.cost != LARGE_TOKENS and not COSTS.knows(self.cost):
            choices = ", ".join([*COSTS.names(), LARGE_TOKENS])
            raise TraceError(f"--cost must be one of {choices} (or FILE.py:Class or module:Class), got {self.cost!r}")
        if self.prices and self.cost != "api":
            raise TraceError("--price applies to --cost api only")
        if self.escalate not in ESCALATE_MODES:
            raise TraceError(f"--escalate must be one of {', '.join(ESCALATE_MODES)}, got {self.escalate!r}")
        if not self.features:
            raise TraceError("--features needs at least one feature")
        positive = (
            "steps",
            "batch",
            "lr",
            "delta",
            "hidden",
            "rho_bar",
            "c_bar",
            "buffer_batches",
            "critic_iters",
            "cg_iters",
            "backtrack_iters",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise TraceError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("eta", "eta_decay", "entropy_coef", "cg_damping"):
            if getattr(self, name) < 0:
                raise TraceError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.gamma <= 1 or not 0 < self.backtrack_ratio < 1:
            raise TraceError("--gamma must lie in (0, 1] and --backtrack-ratio in (0, 1)")
        check_fractions(self.split_fractions)


# ---------------------------------------------------------------------- the decision process on the cache


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


def step_cost_units(data: ReplayData, hp: Hyperparameters, large: str | None = None) -> tuple[np.ndarray, str]:
    """(cost of each step row, unit): the replay cost model's decode + prefill cost, which is what `trace replay`
    adds up for a kept or a discarded step, or the ``large`` model's (default the largest's) generated tokens
    (``cost="tokens"``)."""
    if hp.cost == LARGE_TOKENS:
        large = data.steps["model"].to_numpy() == (large or data.roles[-1])
        return np.where(large, data.steps["n_gen_tokens"].to_numpy(), 0).astype(np.float64), "large tokens"
    model = make_cost_model(hp.cost, data.manifest, dict(hp.prices) or None)
    return Costs(data, model).step_total, model.unit


def comb_episodes(data: ReplayData, hp: Hyperparameters, roles: tuple[str, str] | None = None) -> Episodes:
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
    observation = np.zeros((n_episodes, horizon, raw.shape[1]), dtype=np.float32)
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


# ---------------------------------------------------------------------- the pieces of one update


def thresholded(p_escalate: np.ndarray, kappa: float) -> np.ndarray:
    """S_{pi,kappa}(escalate | o) from pi(escalate | o): 1{pi(a|o) >= kappa} normalised over the two actions;
    1/2 when both pass (kappa <= 1/2), 0 when neither does (kappa > 1/2; eq. (6) continues there)."""
    escalate_in = p_escalate >= kappa
    continue_in = 1.0 - p_escalate >= kappa
    return np.where(escalate_in & continue_in, 0.5, np.where(escalate_in, 1.0, 0.0))


def action_probability(p_escalate: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Probability of each taken action (1 = escalate) under a policy with escalation probabilities p_escalate."""
    return np.where(action == 1, p_escalate, 1.0 - p_escalate)


def target_ratios(p_escalate: np.ndarray, behaviour: np.ndarray, action: np.ndarray, kappa: float) -> np.ndarray:
    """S_{pi,kappa}(a_t|o_t) / mu(a_t|o_t) for each taken action: ``p_escalate`` = pi(escalate|o_t) of the current
    policy, ``behaviour`` = mu(a_t|o_t), the probability the action had when it was drawn (unclipped; V-trace clips)."""
    return action_probability(thresholded(p_escalate, kappa), action) / behaviour


def vtrace(
    rewards: np.ndarray,
    values: np.ndarray,
    ratios: np.ndarray,
    mask: np.ndarray,
    gamma: float = 1.0,
    rho_bar: float = 2.0,
    c_bar: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """V-trace targets v_s (Espeholt et al. 2018, eq. 1, lambda = 1) of padded episodes (E, T), with ``ratios`` =
    target(a|x) / behaviour(a|x): rho_s = min(rho_bar, ratio), c_s = min(c_bar, ratio); and the advantages
    r_s + gamma v_{s+1} - V(x_s) of the actions taken (the target's values from the next state on, without the
    rho_s factor, see the module doc). The state after an episode's last step is terminal (value 0)."""
    rho = np.minimum(rho_bar, ratios) * mask
    c = np.minimum(c_bar, ratios) * mask
    values = values * mask
    next_values = np.concatenate([values[:, 1:], np.zeros((len(values), 1))], axis=1)
    delta = rho * (rewards + gamma * next_values - values)
    correction = np.zeros(values.shape)  # v_s - V(x_s)
    carry = np.zeros(len(values))
    for s in reversed(range(values.shape[1])):
        carry = delta[:, s] + gamma * c[:, s] * carry
        correction[:, s] = carry * mask[:, s]
    targets = values + correction
    next_targets = np.concatenate([targets[:, 1:], np.zeros((len(values), 1))], axis=1)
    return targets, (rewards + gamma * next_targets - values) * mask


def threshold_miscoverage(episodes: Episodes, p_escalate: np.ndarray, kappa: float) -> float:
    """J_miss(S_{pi,kappa}): P(not covered) of the thresholded policy over all the episodes, exactly (the
    constraint of the CPO step is this minus alpha)."""
    return float(expected_miss(episodes, thresholded(p_escalate, kappa)).mean())


def kappa_update(kappa: float, coverage: float, alpha: float, eta: float) -> float:
    """kappa - eta (1 - coverage - alpha), kept in [0, 1]: escalate iff pi >= kappa, so a miss lowers kappa by
    eta (1 - alpha) and a covered episode raises it by eta alpha (module doc: the sign against eq. (5))."""
    return float(np.clip(kappa - eta * (1.0 - coverage - alpha), 0.0, 1.0))


def kappa_step_size(hp: Hyperparameters, step: int) -> float:
    """eta_k = eta / k^eta_decay for policy step k = 1, 2, ..."""
    return hp.eta / step**hp.eta_decay


def cpo_multipliers(q: float, r: float, s: float, c: float, delta: float) -> tuple[float, float, str]:
    """(lambda, nu, case) solving CPO's step (Achiam et al. 2017, appendix 10.2) through its dual:
    max g.x  s.t.  x'Fx / 2 <= delta,  b.x + c <= 0,  with q = g'F^-1 g, r = g'F^-1 b, s = b'F^-1 b.

    The dual is min over lambda, nu >= 0 of (q - 2 nu r + nu^2 s) / (2 lambda) - nu c + lambda delta; the step
    is x = (F^-1 g - nu F^-1 b) / lambda. Case "recovery" (no feasible x in the trust region): x = -nu F^-1 b;
    "trpo": the constraint cannot bind (nu = 0); "none": no step. (The paper minimises -g, so its r is -r.)"""
    if s < EPS:  # the constraint does not change to first order
        return (float(np.sqrt(q / (2 * delta))), 0.0, "trpo") if q > EPS else (0.0, 0.0, "none")
    room = 2 * delta - c * c / s  # B in the paper
    if c > 0 and room < 0:
        return 0.0, float(np.sqrt(2 * delta / s)), "recovery"
    if q < EPS:
        return 0.0, 0.0, "none"
    lam_b = np.sqrt(q / (2 * delta))  # minimiser of the dual where nu = 0
    if room < 0:  # c <= 0 and the constraint cannot bind inside the trust region
        return float(lam_b), 0.0, "trpo"
    a = max(q - r * r / s, 0.0)
    lam_a = np.sqrt(a / max(room, EPS))  # minimiser of the dual where nu = (lambda c + r) / s > 0

    def dual_a(lam):
        return a / (2 * lam) + room * lam / 2 - r * c / s

    def dual_b(lam):
        return q / (2 * lam) + delta * lam

    if c == 0:
        lam = lam_a if r > 0 else lam_b
    else:
        lam_mid = -r / c  # where lambda c + r changes sign: the border between the two pieces of the dual
        if lam_mid > 0:
            if c > 0:
                lam_a, lam_b = max(lam_a, lam_mid), min(lam_b, lam_mid)
            else:
                lam_a, lam_b = min(lam_a, lam_mid), max(lam_b, lam_mid)
            lam = lam_a if dual_a(max(lam_a, EPS)) <= dual_b(max(lam_b, EPS)) else lam_b
        else:
            lam = lam_a if c > 0 else lam_b
    lam = max(float(lam), EPS)
    return lam, max(0.0, lam * c + r) / s, "cpo"


def conjugate_gradient(matvec: Callable, b, iters: int):
    """Approximately solve A x = b for a symmetric positive-definite A given as ``matvec``."""
    import torch

    x = torch.zeros_like(b)
    residual, direction = b.clone(), b.clone()
    norm = residual @ residual
    tolerance = 1e-10 * norm
    for _ in range(iters):
        if norm <= tolerance or norm == 0:
            break
        product = matvec(direction)
        step = norm / (direction @ product)
        x += step * direction
        residual -= step * product
        new_norm = residual @ residual
        direction = residual + (new_norm / norm) * direction
        norm = new_norm
    return x


def fit_critics(hp: Hyperparameters, optimizer, critics, inputs, targets, step_mask, n_decisions: float) -> list:
    """Regress the success and cost critics on their V-trace targets (masked mean squared error); the last
    iteration's losses."""
    import torch

    for _ in range(hp.critic_iters):
        errors = [
            ((critic(inputs)[..., 0] - torch.from_numpy(target).float()) ** 2 * step_mask).sum() / n_decisions
            for critic, target in zip(critics, targets)
        ]
        optimizer.zero_grad()
        (errors[0] + errors[1]).backward()
        optimizer.step()
    return errors


@dataclass
class CriticUpdate:
    """What step 2 leaves for the CPO step: the critics' last losses, the buffer's step mask and decision count,
    and the weighted miscoverage and cost advantages of the actions taken."""

    errors: list
    step_mask: object  # (B, T) float tensor
    n_decisions: float
    miss_advantage: object  # (B, T) float tensor
    cost_advantage: object  # (B, T) float tensor


def critic_update(
    hp: Hyperparameters,
    optimizer,
    critics,
    inputs,
    recent,
    target_ratio: np.ndarray,
    taken_probability: np.ndarray,
    mu: np.ndarray,
    large_right: np.ndarray,
) -> CriticUpdate:
    """Step 2 on the buffer ``recent`` (padded decisions, a ``Rollout`` or ``Walked``): V-trace targets of the
    success and cost ``critics`` (evaluated at ``inputs``) with ``target_ratio`` = S_k(a_t|o_t) / mu(a_t|o_t),
    the critics regressed on them; then the advantages step 3 uses, weighted by min(rho_bar, pi_k(a_t|o_t) /
    mu(a_t|o_t)) (``taken_probability`` = pi_k(a_t|o_t)), the miscoverage one by -[large alone right] (``large_right``
    of every episode)."""
    import torch

    success_critic, cost_critic = critics
    mask = recent.mask.astype(np.float64)
    with torch.no_grad():
        success_values = success_critic(inputs)[..., 0].double().numpy()
        cost_values = cost_critic(inputs)[..., 0].double().numpy()
    success_targets, success_advantage = vtrace(
        recent.reward, success_values, target_ratio, mask, hp.gamma, hp.rho_bar, hp.c_bar
    )
    cost_targets, cost_advantage = vtrace(recent.cost, cost_values, target_ratio, mask, hp.gamma, hp.rho_bar, hp.c_bar)
    step_mask = torch.from_numpy(mask).float()
    n_decisions = max(float(mask.sum()), 1.0)
    errors = fit_critics(hp, optimizer, critics, inputs, (success_targets, cost_targets), step_mask, n_decisions)
    weight = np.minimum(hp.rho_bar, taken_probability / mu) * mask
    episode_large_right = large_right[recent.episode].astype(np.float64)
    return CriticUpdate(
        errors,
        step_mask,
        n_decisions,
        torch.from_numpy(-episode_large_right[:, None] * success_advantage * weight).float(),
        torch.from_numpy(cost_advantage * weight).float(),
    )


def cpo_surrogates(
    hp: Hyperparameters,
    log_policy: Callable,
    taken: np.ndarray,
    old_log_pi,
    old_pi,
    critics: CriticUpdate,
    n_buffer: int,
) -> Callable:
    """The ``surrogates`` of ``cpo_step`` on the buffer: ``log_policy()`` gives log pi of every decision under
    the current weights, ``old_log_pi`` and ``old_pi`` those of pi_k, ``taken`` the actions taken."""
    import torch

    action = torch.from_numpy(taken)
    old_taken = old_log_pi.gather(-1, action[..., None])[..., 0]
    step_mask, n_decisions = critics.step_mask, critics.n_decisions

    def surrogates():
        """(objective = -cost + entropy bonus, miscoverage, KL from the old policy, entropy)"""
        log_pi = log_policy()
        ratio = (log_pi.gather(-1, action[..., None])[..., 0] - old_taken).exp() * step_mask
        kl = ((old_pi * (old_log_pi - log_pi)).sum(-1) * step_mask).sum() / n_decisions
        entropy = (-(log_pi.exp() * log_pi).sum(-1) * step_mask).sum() / n_decisions
        objective = -(ratio * critics.cost_advantage).sum() / n_buffer + hp.entropy_coef * entropy
        return objective, (ratio * critics.miss_advantage).sum() / n_buffer, kl, entropy

    return surrogates


def cpo_step(
    hp: Hyperparameters, params: list, surrogates: Callable, constraint: float, within_alpha: Callable[[], bool]
) -> dict:
    """One CPO update of ``params`` (Achiam et al. 2017): minimise the cost surrogate subject to the linearised
    miscoverage constraint within KL radius delta, then a backtracking line search. ``surrogates()`` gives
    (objective, miscoverage surrogate, KL from the old policy, entropy); ``within_alpha()`` checks the exact
    miscoverage of the thresholded policy after a trial step. Returns the update's fields of the training log."""
    import torch

    objective, miss_surrogate, kl, entropy = surrogates()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(objective, params, retain_graph=True)])
    b = torch.cat([x.reshape(-1) for x in torch.autograd.grad(miss_surrogate, params, retain_graph=True)])
    kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl, params, create_graph=True)])

    def fisher_vector(vector):
        product = torch.autograd.grad(kl_grad @ vector, params, retain_graph=True)
        return torch.cat([x.reshape(-1) for x in product]) + hp.cg_damping * vector

    v = conjugate_gradient(fisher_vector, g, hp.cg_iters)
    w = conjugate_gradient(fisher_vector, b, hp.cg_iters)
    q, r, s = float(g @ v), float(g @ w), float(b @ w)
    lam, nu, case = cpo_multipliers(q, r, s, constraint, hp.delta)
    if case == "recovery":
        direction = -nu * w
    elif case == "none":
        direction = None
    else:
        direction = (v - nu * w) / lam
        quadratic = (q - 2 * nu * r + nu * nu * s) / lam**2  # direction' F direction
        if quadratic > 2 * hp.delta:  # lam near 0 (g parallel to b): keep within the trust region
            direction = direction * np.sqrt(2 * hp.delta / quadratic)
    old_params = torch.nn.utils.parameters_to_vector(params).detach()
    old_objective, old_miss = objective.item(), miss_surrogate.item()
    accepted, new_kl = -1, 0.0
    for attempt in range(hp.backtrack_iters if direction is not None else 0):
        torch.nn.utils.vector_to_parameters(old_params + hp.backtrack_ratio**attempt * direction, params)
        with torch.no_grad():
            new_objective, new_miss, trial_kl, _ = (x.item() for x in surrogates())
        # a feasible policy must not get worse; an infeasible one may, to get back within alpha. The
        # thresholded policy's miscoverage jumps where pi crosses kappa, which the linearised constraint
        # cannot see: the exact value must stay within alpha (feasible) or not grow (infeasible).
        if (
            trial_kl <= hp.delta
            and (new_objective >= old_objective or constraint > 0)
            and new_miss - old_miss <= max(-constraint, 0.0)
            and within_alpha()
        ):
            accepted, new_kl = attempt, trial_kl
            break
    if accepted < 0:
        torch.nn.utils.vector_to_parameters(old_params, params)
    return {
        "entropy": entropy.item(),
        "kl": new_kl,
        "constraint": constraint,
        "nu": nu,
        "lam": lam,
        "case": case,
        "line_search": accepted,
    }


def log_row(
    step: int,
    batch,
    calibration,
    hp: Hyperparameters,
    eta: float,
    kappa: float,
    errors,
    update: dict,
    miscoverage: float,
    has_verifier: bool,
) -> dict:
    """One step's row of the training log: the rollout batch, the coverage of the deployed policy on the
    calibration batch, kappa, the critics' losses and the CPO update."""
    return {
        "step": step,
        "reward": float(batch.correct.mean()),
        "cost": float(batch.total_cost.mean()),
        "rollout_coverage": float(batch.covered.mean()),
        "coverage": float(calibration.covered.mean()),
        "alpha": hp.alpha,
        "eta": eta,
        "kappa": kappa,
        "success_critic_loss": errors[0].item(),
        "cost_critic_loss": errors[1].item(),
        "entropy": update["entropy"],
        "kl": update["kl"],
        "miscoverage": miscoverage,
        "constraint": update["constraint"],
        "nu": update["nu"],
        "lam": update["lam"],
        "case": update["case"],
        "line_search": update["line_search"],
        "verifier": has_verifier,
    }


def finish_training(
    out,
    policy,
    hp,
    train: ReplayData,
    roles: list[str],
    source,
    kappa: float,
    final,
    log: list,
    started: float,
    n_episodes: int,
) -> TrainResult:
    """Write the policy file and its training log; ``source`` (the two-model ``Episodes`` or the K-model
    ``StateGraph``) gives the feature scaling, cost unit and scale, and ``final`` the deployed policy's
    walk over every train episode."""
    metrics = {
        "coverage": float(final.covered.mean()),
        "best_coverage": source.best_coverage(),
        "accuracy": float(final.correct.mean()),
        "cost": float(final.total_cost.mean() * source.cost_scale),
        "cost_share": float(final.total_cost.mean()),
        "episodes": int(n_episodes),
    }
    coverage_events = ["correct", "large_alone_wrong"] + (["all_steps_verified"] if source.has_verifier else [])
    models = train.manifest.models
    save_policy(
        out,
        policy,
        list(hp.features),
        source.feature_mean,
        source.feature_std,
        kappa,
        hp.hidden,
        escalate=hp.escalate,
        roles=roles,
        role_models=[models[role]["name"] for role in roles],
        train_problem_ids=sorted(train.problems["problem_id"].to_list()),
        fitted_on=fit_record(train, "policy"),
        alpha=float(hp.alpha),
        coverage_events=coverage_events,
        cost_model=hp.cost,
        cost_unit=source.cost_unit,
        cost_scale=source.cost_scale,
        trace={"dataset": train.manifest.dataset, "models": list(models.values())},
        training=_plain(asdict(hp)),
        train_metrics=metrics,
    )
    log_frame = pl.DataFrame(log, schema_overrides={"case": pl.String, "line_search": pl.Int32})
    buffer_bytes = io.BytesIO()
    log_frame.write_parquet(buffer_bytes, compression="zstd")
    log_path = log_path_for(out)
    write_atomic(log_path, buffer_bytes.getvalue())
    return TrainResult(
        policy_path=Path(out),
        log_path=log_path,
        kappa=kappa,
        n_train_episodes=n_episodes,
        train_coverage=metrics["coverage"],
        best_coverage=metrics["best_coverage"],
        train_accuracy=metrics["accuracy"],
        train_cost=metrics["cost"],
        train_cost_share=metrics["cost_share"],
        cost_unit=source.cost_unit,
        escalate=hp.escalate,
        has_verifier=source.has_verifier,
        seconds=time.perf_counter() - started,
        log=log_frame,
    )


# ---------------------------------------------------------------------- training


@dataclass
class TrainResult:
    policy_path: Path
    log_path: Path
    kappa: float
    n_train_episodes: int
    train_coverage: float  # of the deployed policy on every train episode
    best_coverage: float  # of the best possible policy under this escalate mode on the train episodes
    train_accuracy: float
    train_cost: float  # mean cost per query in the cost model's units
    train_cost_share: float  # ... divided by the large model alone's mean cost
    cost_unit: str
    escalate: str
    has_verifier: bool
    seconds: float
    log: pl.DataFrame


def log_path_for(policy_path: str | Path) -> Path:
    """``policy.pt`` -> ``policy.log.parquet`` next to it."""
    policy_path = Path(policy_path)
    return policy_path.with_name(f"{policy_path.stem}.log.parquet")


def train_policy(
    root,
    out,
    hp: Hyperparameters = Hyperparameters(),
    on_step: Callable[[dict], None] | None = None,
    *,
    force: bool = False,
    draft: str = "",
    target: str = "",
    models: str = "",
) -> TrainResult:
    """Train the escalation policy on the train split of the trace at ``root``; write the policy file ``out``
    and its training log next to it (replacing existing ones only with ``force``). ``on_step`` receives each
    step's log row. The models in play: ``models`` (comma-separated roles, smallest first), else ``draft`` ..
    ``target`` (default the smallest .. the largest)."""
    import torch

    hp.check()
    out = check_output_file(out, force=force)
    check_output_file(log_path_for(out), force=force)
    started = time.perf_counter()
    train = load_train_split(root, hp.split_seed, hp.split_fractions, hp.split_by)
    roles = model_set(train.roles, draft, target, "trace train policy", models)
    for role in roles[:-1]:  # the models whose steps the policy reads
        require_signals(train.manifest, role, hp.features, "policy", POLICY_INSTEAD)
    if len(roles) > 2:
        return train_k_policy(root, out, hp, train, roles, started, on_step)
    episodes = comb_episodes(train, hp, (roles[0], roles[-1]))
    if not episodes.length.any():
        raise TraceError(
            f"no decisions to learn from: every all-small chain of the train split ends at its first step, and "
            f"escalate={hp.escalate} decides only after a non-final one"
        )
    n_episodes, horizon, n_features = episodes.observation.shape
    critic_inputs = np.concatenate(
        [episodes.observation, np.broadcast_to(episodes.large_right[:, None, None], (n_episodes, horizon, 1))], axis=2
    ).astype(np.float32)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and bit-for-bit repeatable
    try:
        with torch.random.fork_rng(devices=[]):
            # Seeding, in one place.
            torch.manual_seed(hp.seed)
            rng = np.random.default_rng(hp.seed)
            policy = policy_network(n_features, hp.hidden)
            success_critic = mlp(n_features + 1, hp.hidden, 1)  # input: the observation and large_right
            cost_critic = mlp(n_features + 1, hp.hidden, 1)
            critic_optimizer = torch.optim.Adam([*success_critic.parameters(), *cost_critic.parameters()], lr=hp.lr)
            params = list(policy.parameters())
            observation = torch.from_numpy(episodes.observation)
            buffer: deque[tuple[Rollout, np.ndarray]] = deque(maxlen=hp.buffer_batches)  # (rollout, mu(a|o))
            kappa = hp.kappa
            log = []
            everyone = np.arange(n_episodes)

            def escalate_probability(index):
                with torch.no_grad():
                    return torch.softmax(policy(observation[index]), dim=-1)[..., ESCALATE].numpy().astype(np.float64)

            for step in range(1, hp.steps + 1):
                # 1. roll out a batch with the current stochastic policy pi_k
                index = rng.integers(0, n_episodes, size=hp.batch)
                p_escalate = escalate_probability(index)
                batch = rollout(episodes, index, rng.random(p_escalate.shape) < p_escalate)
                buffer.append((batch, action_probability(p_escalate, batch.action)))

                # 2. V-trace targets toward the thresholded policy S_k on the buffer; critics regress on them
                recent = Rollout.concat([b for b, _ in buffer])
                mu = np.where(recent.mask, np.concatenate([m for _, m in buffer]), 1.0)
                obs = observation[recent.episode]
                with torch.no_grad():
                    old_log_pi = torch.log_softmax(policy(obs), dim=-1)
                    old_pi = old_log_pi.exp()
                    p_now = old_pi[..., ESCALATE].double().numpy()
                critics = critic_update(
                    hp,
                    critic_optimizer,
                    (success_critic, cost_critic),
                    torch.from_numpy(critic_inputs[recent.episode]),
                    recent,
                    target_ratios(p_now, mu, recent.action, kappa),
                    action_probability(p_now, recent.action),
                    mu,
                    episodes.large_right,
                )

                # 3. CPO step: minimise the cost surrogate subject to the linearised miscoverage constraint
                miscoverage = threshold_miscoverage(episodes, escalate_probability(everyone), kappa)
                constraint = miscoverage - hp.alpha
                update = cpo_step(
                    hp,
                    params,
                    cpo_surrogates(
                        hp,
                        lambda: torch.log_softmax(policy(obs), dim=-1),
                        recent.action,
                        old_log_pi,
                        old_pi,
                        critics,
                        len(recent.episode),
                    ),
                    constraint,
                    lambda: (
                        threshold_miscoverage(episodes, escalate_probability(everyone), kappa)
                        <= max(hp.alpha, miscoverage)
                    ),
                )

                # 4. kappa from the coverage of the deployed pi_{k+1}, kappa_k on a fresh batch of train episodes
                fresh = rng.integers(0, n_episodes, size=hp.batch)
                deployed = rollout(episodes, fresh, escalate_probability(fresh) >= kappa)
                eta = kappa_step_size(hp, step)
                kappa = kappa_update(kappa, float(deployed.covered.mean()), hp.alpha, eta)

                row = log_row(
                    step, batch, deployed, hp, eta, kappa, critics.errors, update, miscoverage, episodes.has_verifier
                )
                log.append(row)
                if on_step is not None:
                    on_step(row)

            final = rollout(episodes, everyone, escalate_probability(everyone) >= kappa)
    finally:
        torch.set_num_threads(threads)

    return finish_training(out, policy, hp, train, roles, episodes, kappa, final, log, started, n_episodes)


def _plain(value):
    """Tuples as lists, recursively: what the policy file's ``training`` entry stores (torch's safe loader)."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


# ---------------------------------------------------------------------- K models in play
#
# `trace train policy` with K > 2 models in play: the action space of Si, Lee, Bastani 2026 §3.1, continue with
# the current model M_k or escalate to any M_j, j > k (one-way), trained as the two-model policy is
# (``replay.train_policy``'s module doc: rollouts under pi, V-trace critics toward the thresholded_states policy
# S_{pi,kappa}, a CPO step under the exact miscoverage of S, kappa by eq. (5)); deployed as the router replays it
# (``replay.routers.policy``: the largest model whose pi >= kappa, else continue).
#
# An episode is no longer a chain of decisions with a terminal escalation: escalating to a middle model starts
# that model's chain, on which the policy decides again. So the decisions of the train episodes are read off the
# cache as a graph of states: a state is (the step the policy observes, the current model), and each action leads
# to the next state or ends the episode with a known outcome and a known cost. Decisions and costs are the
# two-model ones per model: ``after``, decide after each non-final step of the current model (continue = the
# current model's next step; escalate to M_j = M_j's next step, or, for the largest model, its completion);
# ``replace``, decide on each draft (continue = keep it; escalate = discard it, paid for, and M_j drafts the
# same step, or the largest model completes from there).
#
# An action whose continuation the trace does not hold (the completion of M_j from that node is not cached in
# full) is masked out of the action set at that observation: pi is renormalised over the actions the cache can
# play out, in rollouts, in S, in the exact miscoverage and in the CPO surrogates. On a comb this masks the second
# escalation (M_0 -> M_1 -> M_2: the comb holds the completions only from nodes of chains that start at the
# root); after `trace gen --expand closure` has grown what a replay of the policy missed, retraining sees those
# actions too. The deployed policy does not know the cache: where it takes a masked action the replay reports a
# miss, which closure grows.
#
# The covering event uses the largest model in play: R_M is M_{K-1} alone from the root; costs are scaled by its
# mean cost (as the two-model trainer does with the large model).

MASKED = -1e9  # logit of an action the cache cannot play out: probability exactly 0, no NaN in KL or entropy


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
    """Episodes walked by one policy, padded to the graph's horizon: the fields of ``train_policy.Rollout`` and
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
    import torch

    unit, cost_unit = step_cost_units(train, hp, large=roles[-1])
    graph = build_states(train, roles, hp, unit, cost_unit)
    n_episodes, n_roles = len(graph.start), len(roles)
    n_inputs = graph.observation.shape[1]
    critic_inputs = np.concatenate([graph.observation, graph.large_right[graph.episode][:, None]], axis=1).astype(
        np.float32
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            rng = np.random.default_rng(hp.seed)
            n_features = n_inputs - n_roles
            policy = policy_network(n_features, hp.hidden, n_roles)
            success_critic = mlp(n_inputs + 1, hp.hidden, 1)
            cost_critic = mlp(n_inputs + 1, hp.hidden, 1)
            critic_optimizer = torch.optim.Adam([*success_critic.parameters(), *cost_critic.parameters()], lr=hp.lr)
            params = list(policy.parameters())
            observation = torch.from_numpy(graph.observation)
            blocked = torch.from_numpy(~graph.allowed)
            critic_table = torch.from_numpy(critic_inputs)
            buffer: deque[tuple[Walked, np.ndarray]] = deque(maxlen=hp.buffer_batches)
            kappa = hp.kappa
            log = []
            everyone = np.arange(n_episodes)

            def log_policy(states):
                states = torch.as_tensor(states)
                return torch.log_softmax(policy(observation[states]).masked_fill(blocked[states], MASKED), dim=-1)

            def probability(states=None):
                states = np.arange(len(graph.depth)) if states is None else states
                with torch.no_grad():
                    return log_policy(states).exp().double().numpy()

            def sampled(states, t):
                return sample_actions(probability(states), graph.allowed[states], rng.random(len(states)))

            def deployed(current_kappa):
                return lambda states, t: deployed_action(probability(states), graph.allowed[states], current_kappa)

            for step in range(1, hp.steps + 1):
                index = rng.integers(0, n_episodes, size=hp.batch)
                batch = walk_states(graph, index, sampled)
                taken = np.where(batch.mask, batch.state, 0)
                mu = np.take_along_axis(
                    probability(taken.reshape(-1)).reshape(*taken.shape, n_roles), batch.action[..., None], -1
                )[..., 0]
                buffer.append((batch, np.where(batch.mask, mu, 1.0)))

                recent = Walked.concat([b for b, _ in buffer])
                mu = np.concatenate([m for _, m in buffer])
                states = np.where(recent.mask, recent.state, 0)
                with torch.no_grad():
                    old_log_pi = log_policy(torch.from_numpy(states))
                    old_pi = old_log_pi.exp()
                    p_now = old_pi.double().numpy()
                target = thresholded_states(p_now, graph.allowed[states], kappa)
                critics = critic_update(
                    hp,
                    critic_optimizer,
                    (success_critic, cost_critic),
                    critic_table[torch.from_numpy(states)],
                    recent,
                    np.take_along_axis(target, recent.action[..., None], -1)[..., 0] / mu,
                    np.take_along_axis(p_now, recent.action[..., None], -1)[..., 0],
                    mu,
                    graph.large_right,
                )

                miscoverage = states_miscoverage(graph, probability(), kappa)
                constraint = miscoverage - hp.alpha
                state_tensor = torch.from_numpy(states)
                update = cpo_step(
                    hp,
                    params,
                    cpo_surrogates(
                        hp,
                        lambda: log_policy(state_tensor),
                        recent.action,
                        old_log_pi,
                        old_pi,
                        critics,
                        len(recent.episode),
                    ),
                    constraint,
                    lambda: states_miscoverage(graph, probability(), kappa) <= max(hp.alpha, miscoverage),
                )

                fresh = rng.integers(0, n_episodes, size=hp.batch)
                calibration = walk_states(graph, fresh, deployed(kappa))
                eta = kappa_step_size(hp, step)
                kappa = kappa_update(kappa, float(calibration.covered.mean()), hp.alpha, eta)

                row = log_row(
                    step, batch, calibration, hp, eta, kappa, critics.errors, update, miscoverage, graph.has_verifier
                )
                log.append(row)
                if on_step is not None:
                    on_step(row)

            final = walk_states(graph, everyone, deployed(kappa))
    finally:
        torch.set_num_threads(threads)

    return finish_training(out, policy, hp, train, roles, graph, kappa, final, log, started, n_episodes)
