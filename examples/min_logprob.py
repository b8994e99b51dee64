"""Escalate a step whose least likely token is too unlikely (minimum token logprob below theta)."""

from replay.routers.base import DraftRouter
from replay.stepwise import step_router


class MinLogprob(DraftRouter):
    """The small model drafts each step; a draft whose least likely token has logprob < theta is discarded
    and the large model writes that step."""

    name = "min-logprob"
    sweepable = ("theta",)

    def __init__(self, theta=-2.0):
        self.theta = theta

    def draft_signal(self, data):  # one number per cached step
        return data.steps["logprob_min"].to_numpy()

    def accept(self, signal, params):  # keep or not, for many drafts and configurations at once
        return signal >= params["theta"]


@step_router  # the same rule one draft at a time: quick to write, slower to sweep
def min_logprob_per_step(node, theta=-2.0):
    return node.draft.logprob_min >= theta
