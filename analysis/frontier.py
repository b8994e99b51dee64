"""The cost-accuracy frontier: of a set of (cost, accuracy) points, the cheapest at each accuracy level. The report's
summary, its accuracy-cost plot (each sweep's own frontier as its line) and `trace replay`'s terminal table share it.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-12


def frontier_order(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the frontier points in order of cost: a point is on it when every point at most as costly is
    less accurate (ties: the earliest point stands for its equals). NaN points are never on it."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    valid = np.flatnonzero(np.isfinite(cost) & np.isfinite(accuracy))
    order = valid[np.lexsort((valid, -accuracy[valid], cost[valid]))]  # by cost, then most accurate, then first
    kept, best = [], -np.inf
    for index in order:
        if accuracy[index] > best + TOLERANCE:
            kept.append(index)
            best = accuracy[index]
    return np.array(kept, dtype=np.int64)


def on_frontier(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """A boolean mask of the frontier points (see ``frontier_order``)."""
    mask = np.zeros(len(cost), dtype=bool)
    mask[frontier_order(cost, accuracy)] = True
    return mask


def dominated_by(cost: np.ndarray, accuracy: np.ndarray, index: int) -> int | None:
    """Of the frontier points at least as accurate as point ``index`` for no more cost, the cheapest; None when
    ``index`` is on the frontier."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    front = frontier_order(cost, accuracy)
    if index in front:
        return None
    better = [i for i in front if cost[i] <= cost[index] + TOLERANCE and accuracy[i] >= accuracy[index] - TOLERANCE]
    return int(better[0]) if better else None
