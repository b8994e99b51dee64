"""`trace train policy`: learn the escalation policy of the `policy` router from a cached comb trace.

Si, Lee, Bastani 2026 (Policy-Guided Stepwise Model Routing, §3-4). This file holds the hyperparameters and
the training loop, top to bottom; the pieces it calls live in ``replay/policy_training/``: the decision process
on the cache (``episodes``), the pieces of the update (``update``: thresholded policy, V-trace, constraint, CPO,
kappa), the policy file and log (``results``).

The models in play are ``draft`` .. ``target`` in size order (defaults: the trace's smallest and largest). With
two of them (every two-model trace, or e.g. ``--draft m0 --target m1``) the small model is the draft and the
large model the target, and everything below holds as written; with more, ``policy_training.k_models`` trains
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
over other routers gives the same file byte for byte. The K-model policy (policy_training.k_models) is the
exception by design: it learns every escalation the cache can play out, so growing a trace for a router that
escalates twice (chained STEER) adds actions it then trains on. The file records where it was trained
(``fitted_on``).

Training log (``NAME.log.parquet`` next to ``NAME.pt``), one row per policy step: reward, cost (scaled) and
rollout_coverage of the batch's rollouts under pi_k; coverage of the deployed pi_{k+1}, kappa_k on the kappa
batch (what kappa tracks); alpha; eta (eta_k); kappa after its update; success_critic_loss, cost_critic_loss;
entropy of pi_k on the buffer; kl of the step taken (0 if none); miscoverage = J_miss(S_k) and constraint =
miscoverage - alpha; the CPO multipliers nu (constraint) and lam (KL); case (cpo, trpo, recovery, none);
line_search (backtracking try accepted, -1 if none); verifier (whether verifier scores count towards coverage).

The policy file records how training ended when it ended off target (``flags``: the coverage target out of reach
or not reached on the train split, kappa at 0 or 1), which the command prints and `trace report` marks.

Numerics: the networks (policy and critics) and every step above run in ``replay.mlp``'s float64 arithmetic,
whose bits do not depend on the CPU, the thread count or the BLAS (no torch, no BLAS-rounded product, no libm
call); every random draw comes from one generator seeded with ``seed``. So the same trace, hyperparameters and
seed give the same policy file and log, byte for byte, on any x86 CPU; the command prints the file's SHA-256.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from replay.artifacts import load_train_split
from replay.costs import COSTS, Price
from replay.endpoint_signals import require_signals
from replay.latency import profile_path
from replay.mlp import MLP, Adam
from replay.policy_training.episodes import LARGE_TOKENS, Rollout, comb_episodes, rollout
from replay.policy_training.k_models import train_k_policy
from replay.policy_training.results import TrainResult, finish_training, log_path_for
from replay.policy_training.update import (
    PolicyTerms,
    action_probability,
    cpo_step,
    critic_update,
    kappa_step_size,
    kappa_update,
    log_row,
    target_ratios,
    threshold_miscoverage,
)
from replay.routers.policy import ESCALATE, POLICY_INSTEAD, model_set, policy_probabilities
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, check_fractions
from replay.walk import ESCALATE_MODES
from tracestore.errors import TraceError
from tracestore.outputs import check_output_file

# The paper's observation (DESIGN: uncertainty, step index, is-final flag, step length), one default for both
# escalate modes. is_final informs only escalate=replace (a decision about a final step: escalating rewrites the
# answer); under escalate=after every decision follows a non-final step, so the flag is constant (mean 0, std falling
# back to 1) and its observation is 0 at every decision: it stays, and cannot move the policy there.
DEFAULT_FEATURES = ("conf_max_logit_math", "depth", "is_final", "n_gen_tokens")


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
    prices: tuple[tuple[str, Price], ...] = ()  # api prices by model role or scorer (every one needs one)
    latency_profile: str | None = None  # cost latency: the latency profile (default: the trace's latency.json)
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
        if self.latency_profile and self.cost != "latency":
            raise TraceError("--latency-profile applies to --cost latency only")
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
    hp.check()
    if hp.cost == "latency" and not hp.latency_profile:
        hp = replace(hp, latency_profile=profile_path(root, None))
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
    )

    # Seeding, in one place.
    rng = np.random.default_rng(hp.seed)
    policy = MLP.init(n_features, hp.hidden, 2, rng)
    critics = tuple(MLP.init(n_features + 1, hp.hidden, 1, rng) for _ in range(2))  # success, cost: the
    # observation and large_right in
    optimizers = tuple(Adam(critic.vector().size, hp.lr) for critic in critics)
    buffer: deque[tuple[Rollout, np.ndarray]] = deque(maxlen=hp.buffer_batches)  # (rollout, mu(a|o))
    kappa = hp.kappa
    log = []
    everyone = np.arange(n_episodes)

    def escalate_probability(index):
        return policy_probabilities(policy, episodes.observation[index])[..., ESCALATE]

    for step in range(1, hp.steps + 1):
        # 1. roll out a batch with the current stochastic policy pi_k
        index = rng.integers(0, n_episodes, size=hp.batch)
        p_escalate = escalate_probability(index)
        batch = rollout(episodes, index, rng.random(p_escalate.shape) < p_escalate)
        buffer.append((batch, action_probability(p_escalate, batch.action)))

        # 2. V-trace targets toward the thresholded policy S_k on the buffer; critics regress on them
        recent = Rollout.concat([b for b, _ in buffer])
        mu = np.where(recent.mask, np.concatenate([m for _, m in buffer]), 1.0)
        p_now = escalate_probability(recent.episode)
        critic_step = critic_update(
            hp,
            critics,
            optimizers,
            critic_inputs[recent.episode],
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
            policy,
            PolicyTerms.of(hp, policy, episodes.observation[recent.episode], None, recent, critic_step),
            constraint,
            lambda: (
                threshold_miscoverage(episodes, escalate_probability(everyone), kappa) <= max(hp.alpha, miscoverage)
            ),
        )

        # 4. kappa from the coverage of the deployed pi_{k+1}, kappa_k on a fresh batch of train episodes
        fresh = rng.integers(0, n_episodes, size=hp.batch)
        deployed = rollout(episodes, fresh, escalate_probability(fresh) >= kappa)
        eta = kappa_step_size(hp, step)
        kappa = kappa_update(kappa, float(deployed.covered.mean()), hp.alpha, eta)

        row = log_row(
            step, batch, deployed, hp, eta, kappa, critic_step.errors, update, miscoverage, episodes.has_verifier
        )
        log.append(row)
        if on_step is not None:
            on_step(row)

    final = rollout(episodes, everyone, escalate_probability(everyone) >= kappa)
    return finish_training(out, policy, hp, train, roles, episodes, kappa, final, log, started, n_episodes)
