"""RSD written per step: keep a draft whose PRM score reaches tau (the built-in `rsd` router, one draft at a time).

It walks exactly like the vectorised `rsd` (tests/test_stepwise.py checks it over a full tau sweep);
bench/stepwise.py times the two side by side."""

from replay.stepwise import StepRouter


class StepRsd(StepRouter):
    """RSD restated one draft at a time: keep a draft whose PRM score reaches tau."""

    name = "step-rsd"

    def __init__(self, tau=0.7, scorer="prm"):
        self.tau = tau
        self.scorer = scorer

    def decide(self, node):
        return node.draft.score >= self.tau
