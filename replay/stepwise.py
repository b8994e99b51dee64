"""Per-step routers, for prototyping: a function or class that sees one node and decides one draft.

At each step the draft model writes a candidate (the draft); the router looks at it -- the steps kept so
far with their signals, the draft with its signals and, with ``scorer``, its score -- and returns True to
keep it or False to reject it. A rejected draft is discarded (paid for) and the large model writes that
step; with ``one_way`` it also writes every later one, and ``escalate="after"`` keeps the rejected draft
and hands over from the next step, exactly as for a vectorised ``DraftRouter`` (replay.walk.DraftRule).

Two forms::

    @step_router(scorer="prm")                      # a function: its keyword arguments are the parameters
    def prm_threshold(node, tau=0.7):
        return node.draft.score >= tau

    class PrmThreshold(StepRouter):                 # a class: the estimator contract of every router
        name = "prm-threshold"
        sweepable = ("tau",)                        # default: every parameter with a numeric default
        scorer = "prm"

        def __init__(self, tau=0.7):
            self.tau = tau

        def decide(self, node):
            return node.draft.score >= self.tau

The engine runs a per-step router through the same walk as a vectorised one (its ``accept`` hook asks
``decide`` once per distinct (draft, configuration) the walk reaches), so misses, costs and outcomes are
the same as those of the equivalent ``DraftRouter``; only the speed differs (a Python call per draft and
configuration). For big sweeps write the vectorised form: ``draft_signal`` (one number per step row) and
``accept`` (keep or not, from the signals and the configurations' parameter arrays).
"""

from __future__ import annotations

import copy
import inspect
import traceback
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from replay.registry import describe_error
from replay.routers.base import DraftRouter, router_origin
from tracestore.errors import TraceError

HIDDEN_COLUMNS = ("correct",)  # a router cannot know whether an answer is right


class TreeView:
    """The steps of a replayed trace as Python values, column by column on first use, and the chain of
    steps that leads to each step row."""

    def __init__(self, data, scorer: str | None):
        self.data = data
        self.scorer = scorer
        tree = data.tree
        creator = np.full(tree.children.shape[1], -1, dtype=np.int64)
        creator[tree.step_child] = np.arange(len(tree.step_child))
        self.previous_step = creator[tree.step_parent]  # the step row before each step row on its path (-1: first)
        self._columns: dict[str, list] = {}

    def column(self, name: str) -> list:
        if name not in self._columns:
            if name in HIDDEN_COLUMNS or name not in self.data.steps.columns:
                signals = ", ".join(c for c in self.data.steps.columns if c not in HIDDEN_COLUMNS)
                why = "a router cannot read whether an answer is right" if name in HIDDEN_COLUMNS else "no such column"
                raise AttributeError(f"a step has no signal {name!r} ({why}); its signals: {signals}")
            self._columns[name] = self.data.steps[name].to_list()
        return self._columns[name]

    @cached_property
    def scores(self) -> tuple[list, list]:
        scores = self.data.scores_of(self.scorer)
        return scores["value"].to_list(), scores["detail"].to_list()

    def path_rows(self, row: int) -> list[int]:
        """The step rows before ``row`` on its path, root first."""
        rows = []
        row = int(self.previous_step[row])
        while row >= 0:
            rows.append(row)
            row = int(self.previous_step[row])
        return rows[::-1]


class Step:
    """One step: every steps column but the text and the grade, as attributes (``step.logprob_min``,
    ``step.conf_max_logit_math``, ``step.depth``, ``step.model``, ...); ``score`` and ``score_detail`` are the
    router's scorer's value and detail for a draft."""

    __slots__ = ("_view", "row")

    def __init__(self, view: TreeView, row: int):
        self._view = view
        self.row = row

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._view.column(name)[self.row]

    @property
    def score(self) -> float | None:
        """The router's scorer's value of this step (None where it has none)."""
        return self._scores()[0][self.row]

    @property
    def score_detail(self) -> list[float] | None:
        return self._scores()[1][self.row]

    def _scores(self) -> tuple[list, list]:
        if self._view.scorer is None:  # not AttributeError: that would fall through to __getattr__
            raise TraceError(
                "this router declares no scorer, so its drafts have no score: set scorer = 'prm' (or the scorer "
                "it reads) on the router; a scorer's calls are paid for and a missing score is a miss"
            )
        return self._view.scores

    def __repr__(self) -> str:
        return f"Step({self.step_id!r})"


class Node:
    """What a per-step router sees: the steps kept so far (``steps``, root first) and the draft that would come
    next (``draft``)."""

    __slots__ = ("draft", "_steps")

    def __init__(self, draft: Step):
        self.draft = draft
        self._steps = None

    @property
    def steps(self) -> tuple[Step, ...]:
        if self._steps is None:  # built on first use: most routers read the draft only
            view = self.draft._view
            self._steps = tuple(Step(view, row) for row in view.path_rows(self.draft.row))
        return self._steps

    @property
    def depth(self) -> int:
        """Steps so far (the draft's index in its solution)."""
        return self.draft.depth

    @property
    def problem_id(self) -> str:
        return self.draft.problem_id

    @property
    def world(self) -> int:
        return self.draft.world

    @property
    def path(self) -> str:
        """The node's path (the draft continues it)."""
        return self.draft.parent_path

    def __repr__(self) -> str:
        return f"Node({self.problem_id!r}, world={self.world}, path={self.path!r}, draft={self.draft.model})"


class StepRouter(DraftRouter):
    """Base class of per-step routers: define ``decide(node) -> bool`` (True keeps the draft), reading the
    configuration from ``self``'s parameters (a sweep sets the swept ones per configuration)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "sweepable" not in cls.__dict__:
            cls.sweepable = tuple(
                name
                for name, default in cls.param_defaults().items()
                if isinstance(default, (int, float)) and not isinstance(default, bool)
            )

    def decide(self, node: Node) -> bool:
        raise NotImplementedError

    def draft_signal(self, data):
        self._view = TreeView(data, self.scorer)
        return np.arange(data.steps.height, dtype=np.float64)  # the step row itself: decide reads the rest

    def accept(self, signal, params):
        rows = signal.astype(np.int64)
        names = sorted(params)
        config = np.zeros(len(rows), dtype=np.int64)  # a code per distinct combination of parameter values
        n_configs = 1
        for name in names:
            values, inverse = np.unique(params[name], return_inverse=True)
            config = config * len(values) + inverse.reshape(-1)
            n_configs *= len(values)
        _, first, inverse = np.unique(rows * n_configs + config, return_index=True, return_inverse=True)
        configured: dict[tuple, StepRouter] = {}
        decisions = np.empty(len(first), dtype=bool)
        for i, at in enumerate(first.tolist()):
            values = tuple(_as_configured(getattr(self, name), params[name][at].item()) for name in names)
            if values not in configured:
                configured[values] = router = copy.copy(self)
                for name, value in zip(names, values):
                    setattr(router, name, value)
            decisions[i] = self._decision(configured[values], int(rows[at]))
        return decisions[inverse.reshape(-1)]

    def _decision(self, router: StepRouter, row: int) -> bool:
        node = Node(Step(self._view, row))
        try:
            decision = router.decide(node)
        except TraceError as error:
            raise TraceError(f"{router_origin(type(self))}: on draft {node.draft.step_id!r}: {error}") from None
        except Exception as error:
            raise TraceError(
                f"{router_origin(type(self))}: decide failed{_line_of(error, type(self))} on draft "
                f"{node.draft.step_id!r}: {describe_error(error)}"
            ) from None
        if not isinstance(decision, (bool, np.bool_)):
            raise TraceError(
                f"{router_origin(type(self))}: decide returned {decision!r} for draft {node.draft.step_id!r}; it "
                "must return True (keep the draft) or False (reject it)"
            )
        return bool(decision)


def _as_configured(configured: Any, value: float) -> Any:
    """A swept value (the engine sweeps floats) as an int where the router was configured with one."""
    if isinstance(configured, int) and not isinstance(configured, bool) and float(value).is_integer():
        return int(value)
    return value


def _line_of(error: BaseException, cls: type) -> str:
    try:
        path = Path(inspect.getsourcefile(cls) or "").resolve()
    except TypeError:
        return ""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path]
    return f" (line {lines[-1]})" if lines else ""


def step_router(
    function=None, *, name: str | None = None, scorer: str | None = None, one_way: bool = False, escalate="replace"
):
    """Make a per-step router class from ``function(node, **params) -> bool`` (True keeps the draft).

    Its keyword arguments (each with a default) are the router's parameters; the numeric ones are
    sweepable. ``name`` defaults to the function's name with dashes; ``scorer``, ``one_way`` and
    ``escalate`` are as for every ``DraftRouter``. Use it bare (``@step_router``) or with arguments.
    """

    def wrap(function):
        parameters = list(inspect.signature(function).parameters.values())
        if not parameters or parameters[0].name != "node":
            raise TypeError(f"function {function.__name__} must take the node as its first argument, named node")
        for parameter in parameters[1:]:
            if parameter.default is inspect.Parameter.empty or parameter.kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                raise TypeError(
                    f"function {function.__name__}: parameter {parameter.name} needs a default value "
                    "(the router's parameters are its keyword arguments)"
                )
        defaults = {parameter.name: parameter.default for parameter in parameters[1:]}

        def __init__(self, **params):
            for key, default in defaults.items():
                setattr(self, key, params.pop(key, default))
            if params:
                raise TypeError(f"unknown parameter(s) {', '.join(params)}")

        __init__.__signature__ = inspect.Signature(
            [
                inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                *(
                    inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default)
                    for key, default in defaults.items()
                ),
            ]
        )

        def decide(self, node):
            return function(node, **self.get_params())

        namespace = {
            "__init__": __init__,
            "decide": decide,
            "__doc__": function.__doc__,
            "__module__": function.__module__,
            "__qualname__": function.__qualname__,
            "scorer": scorer,
            "one_way": one_way,
            "escalate": escalate,
            "name": name or function.__name__.replace("_", "-"),
        }
        return type(function.__name__, (StepRouter,), namespace)

    return wrap(function) if function is not None else wrap
