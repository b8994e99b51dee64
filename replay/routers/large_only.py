"""Baseline: the large model writes every step."""

import numpy as np

from replay.routers.base import WriterRouter
from replay.schema import LARGE


class LargeOnly(WriterRouter):
    name = "large-only"

    def __init__(self):
        pass

    def choose(self, data, nodes, params):
        return np.full(len(nodes), data.role_index(LARGE, self.name))
