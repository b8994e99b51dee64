"""The pieces of one update of `trace train policy` (``replay.train_policy``'s module doc, steps 2-4): the
thresholded policy S, V-trace targets, the exact constraint, the kappa rule, the critics' regression and the CPO
step; and the training log's row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from replay.mlp import MLP, Adam, dot, exp, log, log_softmax
from replay.policy_training.episodes import Episodes, expected_miss
from replay.routers.policy import MASKED

EPS = 1e-30  # guards divisions only: a trust-region step has its length whatever the gradient's size, so even
# the faint gradients of a nearly saturated policy still move it


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
    rho_s factor, see ``replay.train_policy``'s module doc). The state after an episode's last step is terminal
    (value 0)."""
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
    eta (1 - alpha) and a covered episode raises it by eta alpha (``replay.train_policy``'s module doc: the sign
    against eq. (5))."""
    return float(np.clip(kappa - eta * (1.0 - coverage - alpha), 0.0, 1.0))


def kappa_step_size(hp, step: int) -> float:
    """eta_k = eta / k^eta_decay for policy step k = 1, 2, ... (the power through ``replay.mlp``: libm's pow may
    differ in the last bit between CPUs)."""
    if hp.eta_decay == 0:
        return hp.eta
    return hp.eta / float(exp(hp.eta_decay * log(float(step))))


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


def conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, iters: int) -> np.ndarray:
    """Approximately solve A x = b for a symmetric positive-definite A given as ``matvec``."""
    x = np.zeros_like(b)
    residual, direction = b.copy(), b.copy()
    norm = dot(residual, residual)
    tolerance = 1e-10 * norm
    for _ in range(iters):
        if norm <= tolerance or norm == 0:
            break
        product = matvec(direction)
        step = norm / dot(direction, product)
        x = x + step * direction
        residual = residual - step * product
        new_norm = dot(residual, residual)
        direction = residual + (new_norm / norm) * direction
        norm = new_norm
    return x


def fit_critics(hp, critics: tuple[MLP, MLP], optimizers: tuple[Adam, Adam], inputs, targets) -> list[float]:
    """Regress the success and cost critics on their V-trace targets (mean squared error over the decisions
    ``inputs``); the last iteration's losses (before its Adam step)."""
    for _ in range(hp.critic_iters):
        errors = []
        for critic, optimizer, target in zip(critics, optimizers, targets):
            values, layers = critic.forward(inputs)
            residual = values[:, 0] - target
            n_decisions = max(len(target), 1)
            errors.append(float(np.sum(residual * residual)) / n_decisions)
            gradient = critic.backward(layers, (2.0 / n_decisions) * residual[:, None])
            critic.set_vector(optimizer.step(critic.vector(), gradient))
    return errors


@dataclass
class CriticUpdate:
    """What step 2 leaves for the CPO step: the critics' last losses and the weighted miscoverage and cost
    advantages of the actions taken, padded (B, T) like the buffer."""

    errors: list[float]
    miss_advantage: np.ndarray
    cost_advantage: np.ndarray


def critic_update(
    hp,
    critics: tuple[MLP, MLP],
    optimizers: tuple[Adam, Adam],
    inputs: np.ndarray,
    recent,
    target_ratio: np.ndarray,
    taken_probability: np.ndarray,
    mu: np.ndarray,
    large_right: np.ndarray,
) -> CriticUpdate:
    """Step 2 on the buffer ``recent`` (padded decisions, a ``Rollout`` or ``Walked``): V-trace targets of the
    success and cost ``critics`` (evaluated at ``inputs``, (B, T, D)) with ``target_ratio`` = S_k(a_t|o_t) /
    mu(a_t|o_t), the critics regressed on them; then the advantages step 3 uses, weighted by min(rho_bar,
    pi_k(a_t|o_t) / mu(a_t|o_t)) (``taken_probability`` = pi_k(a_t|o_t)), the miscoverage one by -[large alone
    right] (``large_right`` of every episode)."""
    taken = recent.mask
    mask = taken.astype(np.float64)
    decisions = inputs[taken]
    values = []
    for critic in critics:
        value = np.zeros(mask.shape)
        value[taken] = critic(decisions)[:, 0]
        values.append(value)
    success_targets, success_advantage = vtrace(
        recent.reward, values[0], target_ratio, mask, hp.gamma, hp.rho_bar, hp.c_bar
    )
    cost_targets, cost_advantage = vtrace(recent.cost, values[1], target_ratio, mask, hp.gamma, hp.rho_bar, hp.c_bar)
    errors = fit_critics(hp, critics, optimizers, decisions, (success_targets[taken], cost_targets[taken]))
    weight = np.minimum(hp.rho_bar, taken_probability / mu) * mask
    episode_large_right = large_right[recent.episode].astype(np.float64)
    return CriticUpdate(errors, -episode_large_right[:, None] * success_advantage * weight, cost_advantage * weight)


@dataclass
class PolicyTerms:
    """The CPO step's view of the buffer's decisions (``replay.train_policy``'s module doc, step 3): with log pi
    of every taken decision's actions under the current weights, the objective (-cost surrogate + entropy bonus),
    the miscoverage surrogate, the mean KL from pi_k and the mean entropy; and their gradients at pi_k.

    Surrogates divide by the buffer's episodes (``n_buffer``), KL and entropy by its decisions."""

    observation: np.ndarray  # (n, D) the decisions' observations
    allowed: np.ndarray | None  # (n, A) the actions open (None: all)
    action: np.ndarray  # (n,) taken
    old_log_pi: np.ndarray  # (n, A) under pi_k
    cost_advantage: np.ndarray  # (n,)
    miss_advantage: np.ndarray  # (n,)
    n_buffer: int
    entropy_coef: float

    @classmethod
    def of(cls, hp, network: MLP, observation, allowed, recent, critics: CriticUpdate) -> PolicyTerms:
        """From the padded buffer ``recent`` and its observations (and allowed actions) (B, T, ...)."""
        taken = recent.mask
        rows = observation[taken]
        open_actions = None if allowed is None else allowed[taken]
        return cls(
            rows,
            open_actions,
            recent.action[taken],
            log_softmax(cls.masked(network(rows), open_actions)),
            critics.cost_advantage[taken],
            critics.miss_advantage[taken],
            len(recent.episode),
            hp.entropy_coef,
        )

    @staticmethod
    def masked(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        return logits if allowed is None else np.where(allowed, logits, MASKED)

    def values(self, log_pi: np.ndarray) -> tuple[float, float, float, float]:
        """(objective, miscoverage surrogate, KL from pi_k, entropy)"""
        n_decisions = max(len(self.action), 1)
        pi = exp(log_pi)
        rows = np.arange(len(self.action))
        ratio = exp(log_pi[rows, self.action] - self.old_log_pi[rows, self.action])
        kl = float(np.sum(exp(self.old_log_pi) * (self.old_log_pi - log_pi))) / n_decisions
        entropy = float(-np.sum(pi * log_pi)) / n_decisions
        objective = -dot(ratio, self.cost_advantage) / self.n_buffer + self.entropy_coef * entropy
        return objective, dot(ratio, self.miss_advantage) / self.n_buffer, kl, entropy

    def evaluate(self, network: MLP) -> tuple[float, float, float, float]:
        return self.values(log_softmax(self.masked(network(self.observation), self.allowed)))

    def gradients(self, network: MLP, damping: float):
        """At the current weights (pi_k): (values, gradient of the objective, gradient of the miscoverage
        surrogate, v -> (F + damping) v with F the Fisher matrix of the mean KL)."""
        logits, layers = network.forward(self.observation)
        log_pi = log_softmax(self.masked(logits, self.allowed))
        pi = exp(log_pi)
        n_decisions = max(len(self.action), 1)
        rows = np.arange(len(self.action))
        ratio = exp(log_pi[rows, self.action] - self.old_log_pi[rows, self.action])
        taken = np.zeros(pi.shape)
        taken[rows, self.action] = 1.0
        score = ratio[:, None] * (taken - pi)  # d ratio / d logits
        entropy_terms = -(pi * log_pi).sum(axis=1, keepdims=True)
        entropy_gradient = -pi * (log_pi + entropy_terms)  # d entropy_t / d logits
        objective = (-self.cost_advantage[:, None] * score) / self.n_buffer + (
            self.entropy_coef / n_decisions
        ) * entropy_gradient
        miss = (self.miss_advantage[:, None] * score) / self.n_buffer

        def fisher_vector(vector: np.ndarray) -> np.ndarray:
            d_logits = network.jvp(layers, vector)
            if self.allowed is not None:
                d_logits = np.where(self.allowed, d_logits, 0.0)
            curvature = pi * d_logits - pi * (pi * d_logits).sum(axis=1, keepdims=True)
            return network.backward(layers, curvature / n_decisions) + damping * vector

        return (
            self.values(log_pi),
            network.backward(layers, self.masked_gradient(objective)),
            network.backward(layers, self.masked_gradient(miss)),
            fisher_vector,
        )

    def masked_gradient(self, gradient: np.ndarray) -> np.ndarray:
        """No gradient reaches the logit of an action that is not open (its logit was replaced by MASKED)."""
        return gradient if self.allowed is None else np.where(self.allowed, gradient, 0.0)


def cpo_step(hp, network: MLP, terms: PolicyTerms, constraint: float, within_alpha: Callable[[], bool]) -> dict:
    """One CPO update of ``network``'s weights (Achiam et al. 2017): minimise the cost surrogate subject to the
    linearised miscoverage constraint within KL radius delta, then a backtracking line search. ``terms`` gives
    the surrogates, ``within_alpha()`` checks the exact miscoverage of the thresholded policy after a trial step.
    Returns the update's fields of the training log."""
    (old_objective, old_miss, _, entropy), g, b, fisher_vector = terms.gradients(network, hp.cg_damping)
    v = conjugate_gradient(fisher_vector, g, hp.cg_iters)
    w = conjugate_gradient(fisher_vector, b, hp.cg_iters)
    q, r, s = dot(g, v), dot(g, w), dot(b, w)
    lam, nu, case = cpo_multipliers(q, r, s, constraint, hp.delta)
    if case == "recovery":
        direction = -nu * w
    elif case == "none":
        direction = None
    else:
        direction = (v - nu * w) / lam
        quadratic = (q - 2 * nu * r + nu * nu * s) / (lam * lam)  # direction' F direction
        if quadratic > 2 * hp.delta:  # lam near 0 (g parallel to b): keep within the trust region
            direction = direction * np.sqrt(2 * hp.delta / quadratic)
    old_params = network.vector()
    accepted, new_kl, shrink = -1, 0.0, 1.0
    for attempt in range(hp.backtrack_iters if direction is not None else 0):
        network.set_vector(old_params + shrink * direction)
        new_objective, new_miss, trial_kl, _ = terms.evaluate(network)
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
        shrink *= hp.backtrack_ratio
    if accepted < 0:
        network.set_vector(old_params)
    return {
        "entropy": entropy,
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
    hp,
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
        "success_critic_loss": errors[0],
        "cost_critic_loss": errors[1],
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
