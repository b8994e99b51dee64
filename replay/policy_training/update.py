"""The pieces of one update of `trace train policy` (``replay.train_policy``'s module doc, steps 2-4): the
thresholded policy S, V-trace targets, the exact constraint, the kappa rule, the critics' regression and the CPO
step; and the training log's row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from replay.policy_training.episodes import Episodes, expected_miss

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


def fit_critics(hp, optimizer, critics, inputs, targets, step_mask, n_decisions: float) -> list:
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
    hp,
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
    hp,
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


def cpo_step(hp, params: list, surrogates: Callable, constraint: float, within_alpha: Callable[[], bool]) -> dict:
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
