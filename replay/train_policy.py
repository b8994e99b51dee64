"""`trace train policy`: learn the escalation policy of the `policy` router from a cached comb trace.

Si, Lee, Bastani 2026 (Policy-Guided Stepwise Model Routing), in one file, top to bottom:
hyperparameters, networks, the decision process on the cache, the pieces of the update (V-trace,
CPO, kappa), then the training loop.

Decision process, one episode per train (problem, world): at decision t the small model has drafted
step t of its all-small chain. The policy sees that draft's observation (the router's features,
computed by the same `raw_features`) and either continues (keeps the draft; if it is final, the
episode ends) or escalates (one-way: the draft is discarded and the large model writes that step and
every later one; the episode ends). The comb trace holds both outcomes of every decision, so rollouts
never generate anything; a step the rollouts could need and the trace lacks is an error.

Per episode: reward = the answer is correct; success = correct, or every kept step passes the
`verifier` scorer (when the trace has verifier scores); covered = success, or the large model alone
is wrong on that (problem, world); cost = large-model generated tokens (``cost="tokens"``) or FLOPs of
every step paid for, discarded drafts included (``cost="flops"``), both as a share of the large model
alone on that (problem, world). The constrained problem: minimise E[cost] subject to
P(not covered) <= alpha, the paper's P(R_pi = 1 or R_M = 0) >= 1 - alpha.

Every policy step:
1. roll out ``batch`` episodes with the current stochastic policy; keep the last ``buffer_batches``
   batches with their behaviour probabilities mu(a|o);
2. V-trace targets (rho-bar, c-bar) for the reward critic (its reward: success, i.e. correctness when
   the trace has no verifier scores) and the cost critic on the buffer; each critic takes
   ``critic_iters`` Adam steps towards its targets. The critics also see whether the large model
   alone is right (known per episode in training, never shown to the policy);
3. CPO step on the buffer: g = gradient of the objective (minus the cost surrogate, plus an entropy
   bonus that keeps the policy from saturating, where its gradients vanish), b = gradient of the
   miscoverage surrogate (miscoverage advantage = -[large alone right] x success advantage), and
   c = J_miss - alpha, where J_miss is the current policy's expected miscoverage over all train
   episodes, exact because the comb holds every outcome (estimated from rollouts it lags behind the
   policy or, reweighted, is optimistic, and the policy drifts out of the constraint). Conjugate
   gradient gives F^-1 g and F^-1 b, CPO's closed-form dual the Lagrange multiplier nu of the
   constraint and lambda of the KL radius; a step beyond the trust region is shortened to it, and a
   backtracking line search keeps KL <= delta, the objective (if feasible) and the linearised
   constraint;
4. kappa, the deployment threshold (escalate iff pi(escalate|o) >= kappa), moves by
   kappa <- clip(kappa - eta (1 - covered - alpha), 0, 1) with covered the batch mean coverage of the
   thresholded policy: a miss lowers kappa (more escalation), covered episodes raise it slowly.

Training log (``NAME.log.parquet`` next to ``NAME.pt``), one row per policy step: reward, cost and
rollout_coverage of the batch's rollouts; coverage of the thresholded policy on the same batch (what
kappa tracks); alpha; kappa after its update; success_critic_loss, cost_critic_loss; entropy of the
policy on the buffer; kl of the step taken (0 if none); constraint = J_miss - alpha; the CPO
multipliers nu (constraint) and lam (KL); case (cpo, trpo, recovery, none); line_search (backtracking
try accepted, -1 if none); verifier (whether verifier scores count towards coverage).
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.artifacts import load_train_split
from replay.atomic import write_atomic
from replay.costs import CostModel, make_cost_model
from replay.engine import Costs, ReplayData, walk_chains
from replay.errors import TraceError
from replay.outputs import check_output_file
from replay.routers.policy import ESCALATE, mlp, normalise, policy_network, raw_features, save_policy
from replay.schema import LARGE, SMALL
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, check_fractions

DEFAULT_FEATURES = ("conf_max_logit_math", "depth", "is_final", "n_gen_tokens")
COST_UNITS = ("tokens", "flops")
VERIFIER = "verifier"
EPS = 1e-30  # guards divisions only: a trust-region step has its length whatever the gradient's size, so even
# the faint gradients of a nearly saturated policy still move it


@dataclass(frozen=True)
class Hyperparameters:
    alpha: float = 0.02  # allowed miscoverage: P(correct or verified or large alone wrong) >= 1 - alpha
    steps: int = 1000  # policy steps
    lr: float = 1e-3  # Adam learning rate of the success and cost critics
    batch: int = 5  # episodes rolled out per policy step
    eta: float = 0.1  # step size of the kappa update
    seed: int = 0  # seeds network initialisation, episode sampling and actions
    kappa: float = 0.5  # initial deployment threshold on pi(escalate | o)
    delta: float = 0.01  # trust region: mean KL(old policy || new policy) per step at most
    entropy_coef: float = 0.05  # weight of the policy's mean entropy added to minus the cost in the objective
    features: tuple[str, ...] = DEFAULT_FEATURES  # observation, names from replay.routers.policy.FEATURES
    cost: str = "tokens"  # tokens: large-model generated tokens; flops: FLOPs of every step paid for
    hidden: int = 64  # hidden units of the policy and critic MLPs (three layers each)
    gamma: float = 1.0  # discount of success and cost
    rho_bar: float = 2.0  # V-trace clip of the importance weights in the targets and the policy gradient
    c_bar: float = 1.0  # V-trace clip of the trace-cutting weights
    buffer_batches: int = 20  # recent batches the critics and the CPO step learn from (V-trace corrects them)
    critic_iters: int = 5  # critic Adam steps per policy step
    cg_iters: int = 10  # conjugate-gradient iterations for F^-1 g and F^-1 b
    cg_damping: float = 0.1  # added to the Fisher matrix's diagonal
    backtrack_iters: int = 10  # line-search tries, each shrinking the step by backtrack_ratio
    backtrack_ratio: float = 0.8
    split_seed: int = DEFAULT_SPLIT_SEED  # train split as `trace replay` draws it: seed of the hash
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS  # train, calibration, test

    def check(self) -> None:
        """TraceError naming the first hyperparameter out of range (as its command-line option)."""
        if not 0 < self.alpha < 1:
            raise TraceError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        if not 0 <= self.kappa <= 1:
            raise TraceError(f"--kappa must lie in [0, 1], got {self.kappa}")
        if self.cost not in COST_UNITS:
            raise TraceError(f"--cost must be one of {', '.join(COST_UNITS)}, got {self.cost!r}")
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
        for name in ("eta", "entropy_coef", "cg_damping"):
            if getattr(self, name) < 0:
                raise TraceError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.gamma <= 1 or not 0 < self.backtrack_ratio < 1:
            raise TraceError("--gamma must lie in (0, 1] and --backtrack-ratio in (0, 1)")
        check_fractions(self.split_fractions)


# ---------------------------------------------------------------------- the decision process on the cache


@dataclass
class Episodes:
    """Every train (problem, world) as padded (E, T) arrays; T is the longest all-small chain."""

    problem_id: list[str]
    length: np.ndarray  # (E,) decisions = small drafts on the chain up to its final step
    observation: np.ndarray  # (E, T, F) normalised observation of draft t
    keep_cost: np.ndarray  # (E, T) cost of keeping draft t
    escalate_cost: np.ndarray  # (E, T) cost of escalating at t: the discarded draft and the large completion
    escalate_correct: np.ndarray  # (E, T) the large completion from draft t's node is correct
    escalate_success: np.ndarray  # (E, T) ... or every step kept on that path is verified
    small_correct: np.ndarray  # (E,) the all-small chain is correct
    small_success: np.ndarray  # (E,) ... or every step on it is verified
    large_right: np.ndarray  # (E,) the large model alone (the root's large chain) is correct
    feature_mean: np.ndarray  # (F,) of the raw train observations
    feature_std: np.ndarray
    has_verifier: bool

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.keep_cost.shape[1]) < self.length[:, None]


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


def comb_episodes(data: ReplayData, hp: Hyperparameters) -> Episodes:
    """Read every decision of every train episode out of the cached comb trees (no rollout touches the trace)."""
    tree, steps = data.tree, data.steps
    roots = data.roots["node"].to_numpy()
    small_walk, _ = _chain_sums(data, roots, SMALL, np.zeros(steps.height))
    length = small_walk.kept[data.roles.index(SMALL)]
    n_episodes, horizon = len(roots), int(length.max())
    draft = np.full((n_episodes, horizon), -1, dtype=np.int64)
    node = roots.copy()
    for t in range(horizon):
        going = t < length
        draft[going, t] = tree.children[data.roles.index(SMALL), node[going]]
        node[going] = tree.step_child[draft[going, t]]
    valid = draft >= 0

    if hp.cost == "tokens":
        unit = np.where(steps["model"].to_numpy() == LARGE, steps["n_gen_tokens"].to_numpy(), 0).astype(np.float64)
    else:
        unit = Costs(data, make_cost_model("flops", data.manifest)).step_total
    verifier = data.scores_of(VERIFIER)["value"]
    has_verifier = verifier.is_not_null().any()
    passes = (verifier.fill_null(0.0) >= 0.5).to_numpy()

    starts = tree.step_parent[draft[valid]]
    completion, completion_cost = _chain_sums(data, starts, LARGE, unit)
    _, completion_unverified = _chain_sums(data, starts, LARGE, (~passes).astype(np.float64))

    def grid(values, fill):
        out = np.full((n_episodes, horizon), fill, dtype=np.asarray(values).dtype)
        out[valid] = values
        return out

    large_alone_cost = grid(completion_cost, 0.0)[:, 0]
    if (large_alone_cost <= 0).any():
        problem = data.roots["problem_id"][int(np.argmax(large_alone_cost <= 0))]
        raise TraceError(
            f"the large model alone costs nothing on problem {problem!r} ({hp.cost}): cost shares need a positive cost"
        )
    some_row = np.where(valid, draft, 0)  # a harmless row index where there is no draft
    draft_unit = np.where(valid, unit[some_row], 0.0)
    escalate_correct = grid(tree.step_correct[completion.final_step], False)
    drafts_pass = np.where(valid, passes[some_row], True)
    passed_before = np.cumprod(np.concatenate([np.ones((n_episodes, 1), bool), drafts_pass[:, :-1]], 1), 1)
    escalate_verified = passed_before.astype(bool) & grid(completion_unverified == 0, False) & has_verifier
    last_draft = draft[np.arange(n_episodes), length - 1]
    small_correct = tree.step_correct[last_draft]
    small_verified = drafts_pass.all(axis=1) & has_verifier

    raw = raw_features(steps, data.problems, list(hp.features))[draft[valid]]
    known = np.isfinite(raw)  # a null feature (no math tokens, no difficulty) is left out and observed as 0
    count = np.maximum(known.sum(axis=0), 1)
    mean = np.where(known, raw, 0.0).sum(axis=0) / count
    std = np.sqrt(np.where(known, (raw - mean) ** 2, 0.0).sum(axis=0) / count)
    std = np.where(std > 0, std, 1.0)
    observation = np.zeros((n_episodes, horizon, raw.shape[1]), dtype=np.float32)
    observation[valid] = normalise(raw, mean, std)
    return Episodes(
        problem_id=data.roots["problem_id"].to_list(),
        length=length,
        observation=observation,
        keep_cost=draft_unit / large_alone_cost[:, None],
        escalate_cost=(draft_unit + grid(completion_cost, 0.0)) / large_alone_cost[:, None],
        escalate_correct=escalate_correct,
        escalate_success=escalate_correct | escalate_verified,
        small_correct=small_correct,
        small_success=small_correct | small_verified,
        large_right=escalate_correct[:, 0],
        feature_mean=mean,
        feature_std=std,
        has_verifier=bool(has_verifier),
    )


def expected_miss(episodes: Episodes, p_escalate: np.ndarray) -> np.ndarray:
    """Per episode, the probability that a policy escalating at decision t with probability p_escalate[:, t]
    leaves it uncovered (it escalates at the first decision where its draw says so)."""
    rows = np.arange(len(episodes.length))
    p = np.where(episodes.valid, p_escalate, 0.0)
    no_escalation_before = np.cumprod(np.concatenate([np.ones((len(p), 1)), 1 - p[:, :-1]], axis=1), axis=1)
    last = episodes.length - 1
    keeps_all = no_escalation_before[rows, last] * (1 - p[rows, last])
    success = (no_escalation_before * p * episodes.escalate_success).sum(axis=1) + keeps_all * episodes.small_success
    return episodes.large_right * (1 - success)


@dataclass
class Rollout:
    """Episodes walked by one policy: what it did at each decision and how each episode ended."""

    episode: np.ndarray  # (B,) episode indices
    mask: np.ndarray  # (B, T) decisions taken
    action: np.ndarray  # (B, T) 1 = escalate (only ever at an episode's last decision)
    reward: np.ndarray  # (B, T) success, at the last decision
    cost: np.ndarray  # (B, T)
    correct: np.ndarray  # (B,)
    covered: np.ndarray  # (B,)

    @classmethod
    def concat(cls, rollouts: list[Rollout]) -> Rollout:
        return cls(**{name: np.concatenate([getattr(r, name) for r in rollouts]) for name in vars(rollouts[0])})


def rollout(episodes: Episodes, index: np.ndarray, escalate: np.ndarray) -> Rollout:
    """Walk episodes ``index`` where ``escalate`` (B, T) says where the policy would escalate; it escalates at
    the first such decision, or keeps every draft to the end of the chain."""
    valid = episodes.valid[index]
    escalate = escalate & valid
    escalated = escalate.any(axis=1)
    end = np.where(escalated, escalate.argmax(axis=1), episodes.length[index] - 1)
    t = np.arange(valid.shape[1])
    mask = t <= end[:, None]
    at_end = t == end[:, None]
    action = at_end & escalated[:, None]
    rows = np.arange(len(index))
    correct = np.where(escalated, episodes.escalate_correct[index, end], episodes.small_correct[index])
    success = np.where(escalated, episodes.escalate_success[index, end], episodes.small_success[index])
    cost = np.where(action, episodes.escalate_cost[index], episodes.keep_cost[index]) * mask
    reward = np.zeros(mask.shape)
    reward[rows, end] = success
    covered = success | ~episodes.large_right[index]
    return Rollout(index, mask, action.astype(np.int64), reward, cost, correct, covered)


# ---------------------------------------------------------------------- the pieces of one update


def vtrace(
    rewards: np.ndarray,
    values: np.ndarray,
    ratios: np.ndarray,
    mask: np.ndarray,
    gamma: float = 1.0,
    rho_bar: float = 2.0,
    c_bar: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """V-trace targets v_s and policy-gradient advantages rho_s (r_s + gamma v_{s+1} - V(x_s)) (Espeholt et al.
    2018, eq. 1 and 4, lambda = 1) of padded episodes (E, T); ``ratios`` = pi(a|x) / mu(a|x). The state after an
    episode's last step is terminal (value 0)."""
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
    return targets, rho * (rewards + gamma * next_targets - values)


def kappa_update(kappa: float, coverage: float, alpha: float, eta: float) -> float:
    """kappa - eta (1 - coverage - alpha), kept in [0, 1]: escalate iff pi >= kappa, so a miss lowers kappa."""
    return float(np.clip(kappa - eta * (1.0 - coverage - alpha), 0.0, 1.0))


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


# ---------------------------------------------------------------------- training


@dataclass
class TrainResult:
    policy_path: Path
    log_path: Path
    kappa: float
    n_train_episodes: int
    train_coverage: float  # of the thresholded policy on every train episode
    train_accuracy: float
    train_cost: float  # mean cost share
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
) -> TrainResult:
    """Train the escalation policy on the train split of the trace at ``root``; write the policy file ``out``
    and its training log next to it (replacing existing ones only with ``force``). ``on_step`` receives each
    step's log row."""
    import torch

    hp.check()
    out = check_output_file(out, force=force)
    check_output_file(log_path_for(out), force=force)
    started = time.perf_counter()
    train = load_train_split(root, hp.split_seed, hp.split_fractions)
    if SMALL not in train.roles or LARGE not in train.roles:
        raise TraceError(f"trace train policy needs a small and a large model; {root} has {', '.join(train.roles)}")
    episodes = comb_episodes(train, hp)
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
                # 1. roll out a batch with the current policy
                index = rng.integers(0, n_episodes, size=hp.batch)
                p_escalate = escalate_probability(index)
                batch = rollout(episodes, index, rng.random(p_escalate.shape) < p_escalate)
                buffer.append((batch, np.where(batch.action == 1, p_escalate, 1 - p_escalate)))

                # 2. V-trace targets on the buffer; critics regress on them
                recent = Rollout.concat([b for b, _ in buffer])
                mu = np.concatenate([m for _, m in buffer])
                mask = recent.mask.astype(np.float64)
                obs = observation[recent.episode]
                action = torch.from_numpy(recent.action)
                with torch.no_grad():
                    old_log_pi = torch.log_softmax(policy(obs), dim=-1)
                    old_pi = old_log_pi.exp()
                    ratios = old_log_pi.gather(-1, action[..., None])[..., 0].exp().double().numpy() / np.where(
                        recent.mask, mu, 1.0
                    )
                    inputs = torch.from_numpy(critic_inputs[recent.episode])
                    success_values = success_critic(inputs)[..., 0].double().numpy()
                    cost_values = cost_critic(inputs)[..., 0].double().numpy()
                success_targets, success_advantage = vtrace(
                    recent.reward, success_values, ratios, mask, hp.gamma, hp.rho_bar, hp.c_bar
                )
                cost_targets, cost_advantage = vtrace(
                    recent.cost, cost_values, ratios, mask, hp.gamma, hp.rho_bar, hp.c_bar
                )
                step_mask = torch.from_numpy(mask).float()
                for _ in range(hp.critic_iters):
                    errors = [
                        ((critic(inputs)[..., 0] - torch.from_numpy(targets).float()) ** 2 * step_mask).sum()
                        / step_mask.sum()
                        for critic, targets in ((success_critic, success_targets), (cost_critic, cost_targets))
                    ]
                    critic_optimizer.zero_grad()
                    (errors[0] + errors[1]).backward()
                    critic_optimizer.step()

                # 3. CPO step: minimise the cost surrogate subject to the linearised miscoverage constraint
                n_buffer = len(recent.episode)
                large_right = episodes.large_right[recent.episode].astype(np.float64)
                miss_advantage = torch.from_numpy(-large_right[:, None] * success_advantage).float()
                cost_adv = torch.from_numpy(cost_advantage).float()
                constraint = float(expected_miss(episodes, escalate_probability(everyone)).mean()) - hp.alpha
                old_taken = old_log_pi.gather(-1, action[..., None])[..., 0]

                def surrogates():
                    """(objective = -cost + entropy bonus, miscoverage, KL from the old policy, entropy)"""
                    log_pi = torch.log_softmax(policy(obs), dim=-1)
                    ratio = (log_pi.gather(-1, action[..., None])[..., 0] - old_taken).exp() * step_mask
                    kl = ((old_pi * (old_log_pi - log_pi)).sum(-1) * step_mask).sum() / step_mask.sum()
                    entropy = (-(log_pi.exp() * log_pi).sum(-1) * step_mask).sum() / step_mask.sum()
                    objective = -(ratio * cost_adv).sum() / n_buffer + hp.entropy_coef * entropy
                    return objective, (ratio * miss_advantage).sum() / n_buffer, kl, entropy

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
                    # a feasible policy must not get worse; an infeasible one may, to get back within alpha
                    if (
                        trial_kl <= hp.delta
                        and (new_objective >= old_objective or constraint > 0)
                        and new_miss - old_miss <= max(-constraint, 0.0)
                    ):
                        accepted, new_kl = attempt, trial_kl
                        break
                if accepted < 0:
                    torch.nn.utils.vector_to_parameters(old_params, params)

                # 4. kappa from the coverage of the thresholded policy on this batch
                deployed = rollout(episodes, index, escalate_probability(index) >= kappa)
                kappa = kappa_update(kappa, float(deployed.covered.mean()), hp.alpha, hp.eta)

                row = {
                    "step": step,
                    "reward": float(batch.correct.mean()),
                    "cost": float(batch.cost.sum(1).mean()),
                    "rollout_coverage": float(batch.covered.mean()),
                    "coverage": float(deployed.covered.mean()),
                    "alpha": hp.alpha,
                    "kappa": kappa,
                    "success_critic_loss": errors[0].item(),
                    "cost_critic_loss": errors[1].item(),
                    "entropy": entropy.item(),
                    "kl": new_kl,
                    "constraint": constraint,
                    "nu": nu,
                    "lam": lam,
                    "case": case,
                    "line_search": accepted,
                    "verifier": episodes.has_verifier,
                }
                log.append(row)
                if on_step is not None:
                    on_step(row)

            final = rollout(episodes, everyone, escalate_probability(everyone) >= kappa)
    finally:
        torch.set_num_threads(threads)

    train_ids = sorted(train.problems["problem_id"].to_list())
    metrics = {
        "coverage": float(final.covered.mean()),
        "accuracy": float(final.correct.mean()),
        "cost": float(final.cost.sum(1).mean()),
        "episodes": int(n_episodes),
    }
    coverage_events = ["correct", "large_alone_wrong"] + (["all_steps_verified"] if episodes.has_verifier else [])
    save_policy(
        out,
        policy,
        list(hp.features),
        episodes.feature_mean,
        episodes.feature_std,
        kappa,
        hp.hidden,
        train_problem_ids=train_ids,
        split_seed=hp.split_seed,
        split_fractions=[float(f) for f in hp.split_fractions],
        alpha=float(hp.alpha),
        coverage_events=coverage_events,
        cost_unit=hp.cost,
        trace={"dataset": train.manifest.dataset, "models": list(train.manifest.models.values())},
        training={key: list(value) if isinstance(value, tuple) else value for key, value in asdict(hp).items()},
        train_metrics=metrics,
    )
    log_frame = pl.DataFrame(log, schema_overrides={"case": pl.String, "line_search": pl.Int32})
    buffer_bytes = io.BytesIO()
    log_frame.write_parquet(buffer_bytes, compression="zstd")
    log_path = log_path_for(out)
    write_atomic(log_path, buffer_bytes.getvalue())
    return TrainResult(
        policy_path=out,
        log_path=log_path,
        kappa=kappa,
        n_train_episodes=n_episodes,
        train_coverage=metrics["coverage"],
        train_accuracy=metrics["accuracy"],
        train_cost=metrics["cost"],
        has_verifier=episodes.has_verifier,
        seconds=time.perf_counter() - started,
        log=log_frame,
    )
