"""Baseline: the cheapest cached solution path that is correct.

Over every complete root-to-final path the trace holds for a (problem, world), the oracle takes the
cheapest correct one under the replay's cost model (ties: the shorter, then lexicographically
smaller path); when no cached path is correct, the cheapest path. A root with no complete path is a
miss, reported where the smallest model's chain breaks off. On a trace of K models the paths are those
of all K.
"""

import numpy as np
import polars as pl

from replay.routers import ROUTERS
from replay.routers.base import QueryRouter
from replay.walk import Walk, walk_chains


@ROUTERS.register
class Oracle(QueryRouter):
    name = "oracle"

    def __init__(self):
        pass

    def walk(self, data, costs, starts, params):
        roots, inverse = np.unique(starts, return_inverse=True)
        steps = data.steps
        n_roles, n_steps = len(data.roles), steps.height
        own_decode = np.zeros((n_roles, n_steps))
        own_decode[data.tree.step_role, np.arange(n_steps)] = costs.decode
        own_kept = np.zeros((n_roles, n_steps), dtype=np.int64)
        own_kept[data.tree.step_role, np.arange(n_steps)] = 1
        decode, kept, prefill = own_decode.copy(), own_kept.copy(), costs.prefill.copy()
        # A step is reachable when every step on its path from the root is cached.
        creator = np.full(len(data.node_path), -1, dtype=np.int64)
        creator[data.tree.step_child] = np.arange(n_steps)
        parent_step = creator[data.tree.step_parent]
        root = np.full(n_steps, -1, dtype=np.int64)
        depth = steps["depth"].to_numpy()
        for level in np.unique(depth):
            rows = np.flatnonzero(depth == level)
            above = parent_step[rows]
            at_root = steps["parent_path"].gather(rows).to_numpy() == ""
            inner = above >= 0
            root[rows[at_root]] = data.tree.step_parent[rows[at_root]]
            root[rows[inner]] = root[above[inner]]
            decode[:, rows[inner]] += decode[:, above[inner]]
            kept[:, rows[inner]] += kept[:, above[inner]]
            prefill[rows[inner]] += prefill[above[inner]]
        total = decode.sum(axis=0) + prefill
        candidates = pl.DataFrame(
            {
                "step": np.arange(n_steps),
                "root": root,
                "wrong": ~data.tree.step_correct,
                "cost": total,
                "length": depth,
                "path": steps["path"],
            }
        ).filter(pl.Series(data.tree.step_final & np.isin(root, roots)))
        best = candidates.sort("wrong", "cost", "length", "path").group_by("root", maintain_order=True).first()
        chosen = np.full(len(roots), -1, dtype=np.int64)
        chosen[np.searchsorted(roots, best["root"].to_numpy())] = best["step"].to_numpy()

        walk = Walk.empty(n_roles, len(roots))
        found = chosen >= 0
        pick = chosen[found]
        walk.decode[:, found] = decode[:, pick]
        walk.kept[:, found] = kept[:, pick]
        walk.prefill[found] = prefill[pick]
        walk.final_step[found] = pick
        walk.end_node[found] = data.tree.step_child[pick]
        lost = np.flatnonzero(~found)
        if lost.size:
            broken = walk_chains(data, costs, roots[lost], 0)
            walk.end_node[lost] = broken.end_node
            walk.miss_role[lost] = broken.miss_role
        return walk.take(inverse)
