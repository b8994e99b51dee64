"""The walk of the `policy` router with K > 2 models in play (``replay.routers.policy``'s module doc): the current
model writes (``after``) or drafts (``replace``) each step, and after it the deployed policy continues or
escalates to a larger model in play, one-way. A step the walk needs and the trace lacks is a miss, reported as
every other router's are (the node and the model that should write there), so `trace gen --expand closure` grows
it."""

from __future__ import annotations

import numpy as np

from replay.data import ReplayData
from replay.walk import Costs, Walk


def allowed_actions(role: np.ndarray, n_roles: int) -> np.ndarray:
    """(..., K) actions open at the current model ``role``: continue (0) and escalating to a larger model."""
    action = np.arange(n_roles)
    return (action == 0) | (action > np.asarray(role)[..., None])


def deployed_action(probability: np.ndarray, allowed: np.ndarray, kappa) -> np.ndarray:
    """Eq. (6) over K actions: the largest allowed escalation whose pi >= kappa, else 0 (continue)."""
    passing = allowed & (probability >= np.asarray(kappa, dtype=np.float64)[..., None])
    passing[..., 0] = False
    largest = probability.shape[-1] - 1 - np.argmax(passing[..., ::-1], axis=-1)
    return np.where(passing.any(axis=-1), largest, 0)


def walk_k_models(
    data: ReplayData,
    costs: Costs,
    starts: np.ndarray,
    kappa: np.ndarray,
    probability: np.ndarray,
    roles: list[str],
    escalate: str,
) -> Walk:
    """Walk every state from its start node, the first of ``roles`` writing first, until a final step or a miss.
    ``probability`` (step rows, K): pi(a | o) of each step row of a model in play below the largest; ``kappa``
    per state."""
    tree = data.tree
    children, step_child, step_final, step_role = tree.children, tree.step_child, tree.step_final, tree.step_role
    n_states, n_roles = len(starts), len(roles)
    role_index = np.array([data.roles.index(role) for role in roles])
    walk = Walk.empty(len(data.roles), n_states)
    active = np.arange(n_states)
    here = np.asarray(starts, dtype=np.int64)
    current = np.zeros(n_states, dtype=np.int64)  # position in ``roles`` of the model writing the next step
    kappa = np.asarray(kappa, dtype=np.float64)
    replace = escalate == "replace"

    def keep(mask: np.ndarray) -> None:
        nonlocal active, here, current
        active, here, current = active[mask], here[mask], current[mask]

    while active.size:
        step = children[role_index[current], here]
        cached = step >= 0
        if not cached.all():
            lost = ~cached
            walk.end_node[active[lost]] = here[lost]
            walk.miss_role[active[lost]] = role_index[current[lost]]
            keep(cached)
            step = step[cached]
        judged = current < n_roles - 1  # the largest model in play writes on, undecided
        if not replace:
            judged &= ~step_final[step]  # after: a final step ends the solution, nothing left to decide
        action = np.zeros(active.size, dtype=np.int64)
        if judged.any():
            rows = step[judged]
            allowed = allowed_actions(current[judged], n_roles)
            action[judged] = deployed_action(np.nan_to_num(probability[rows]), allowed, kappa[active[judged]])
        escalated = action > 0
        if replace and escalated.any():  # the draft is discarded (paid for); the new model drafts this step
            gone = active[escalated]
            walk.discarded[gone] += costs.step_total[step[escalated]]
            walk.n_discarded[gone] += 1
            current[escalated] = action[escalated]
            writes = ~escalated
        else:
            writes = np.ones(active.size, dtype=bool)
            current = np.where(escalated, action, current)  # after: the new model writes from the next step
        written, states = step[writes], active[writes]
        walk.decode[step_role[written], states] += costs.decode[written]  # each state at most once per step
        walk.kept[step_role[written], states] += 1
        walk.prefill[states] += costs.prefill[written]
        here = np.where(writes, step_child[np.where(writes, step, 0)], here)
        final = writes & np.where(writes, step_final[step], False)
        if final.any():
            walk.final_step[active[final]] = step[final]
            walk.end_node[active[final]] = here[final]
            keep(~final)
    return walk
