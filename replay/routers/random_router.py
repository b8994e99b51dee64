"""Baseline: each step goes to the large model with probability p, independently per node.

The draw at a node is a hash of (seed, problem_id/world/path), so it is the same in every replay,
in every configuration of a sweep over p, and online.
"""

import numpy as np

from replay.routers import ROUTERS
from replay.routers.base import SEED, UNIT, WriterRouter
from replay.splits import hash_uniform


@ROUTERS.register
class RandomRouter(WriterRouter):
    name = "random"
    sweepable = ("p",)
    domains = {"p": UNIT, "seed": SEED}

    def __init__(self, p=0.5, seed=0):
        self.p = p
        self.seed = seed

    def choose(self, data, nodes, params):
        small, large = 0, len(data.roles) - 1  # the smallest and the largest model
        unique, inverse = np.unique(nodes, return_inverse=True)
        draws = hash_uniform(data.node_names(unique), self.seed)[inverse]
        return np.where(draws < params["p"], large, small)
