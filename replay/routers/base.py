"""What every router shares: the scikit-learn-style estimator contract and the three ways a router walks a
tree.

- ``__init__`` only stores its keyword arguments; a router's configuration is its constructor call.
- Every numeric parameter has a declared ``Domain`` in ``domains``; ``fit`` checks the parameters
  against them, and a sweep checks every swept value (``check_values``).
- ``fit(train)`` checks the configuration, learns what it needs from the train split (attributes
  ending in ``_``) and returns ``self``; replaying an unfitted router is an error. A router that also chooses
  something on held-out rows (``uses_calibration``, the cascade's P(IK) regularisation) gets the calibration
  split too: ``_fit(train, calibration)``.
- ``fitted_on_`` lists where every fitted part came from (``replay.artifacts.fit_record``: the trace, its split,
  the problems learned from), whether fitted here (``learned_from``) or loaded from a file (``loaded``); a replay
  marks the rows whose problems a fit saw. Its docstring says which rows each fitted part learns from.
- Adding a router is one new file of this package with ``@ROUTERS.register`` above its class (replay.routers);
  routers of your own (files, modules, entry points) are found by reference through the same registry and
  cannot take a built-in one's name.

Kinds: a ``WriterRouter`` picks the model that writes each step; a ``DraftRouter`` lets the small
model write each step and judges it: keep it, or discard it and have the large model write that step
(``one_way``: and every later one), or (``one_way`` with ``escalate="after"``) keep it and have the large
model write every later step; a ``QueryRouter`` decides per query and implements ``walk`` itself.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from replay.artifacts import check_setting, fit_record
from replay.data import ReplayData
from replay.walk import Costs, DraftRule, Walk, walk_steps
from tracestore.errors import TraceError


@dataclass(frozen=True)
class Domain:
    """The values a numeric parameter may take: finite numbers in [low, high], integers only if
    ``integer``, and None if ``optional`` (the router then uses a value it fitted or loaded)."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    optional: bool = False

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return False
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if math.isfinite(self.low) and math.isfinite(self.high):
            kind += f" in [{self.low:g}, {self.high:g}]"
        elif math.isfinite(self.low):
            kind += f" >= {self.low:g}"
        elif math.isfinite(self.high):
            kind += f" <= {self.high:g}"
        return kind + (" (or unset)" if self.optional else "")


UNIT = Domain(0.0, 1.0)  # probabilities and thresholds on them
SEED = Domain(0, math.inf, integer=True)


class Router:
    """Base class of all routers."""

    name: ClassVar[str] = ""
    sweepable: ClassVar[tuple[str, ...]] = ()  # numeric parameters `--sweep` can vectorise
    domains: ClassVar[dict[str, Domain]] = {}  # every numeric parameter's allowed values
    scorer: str | None = None  # scorer whose scores the router reads and pays for
    uses_calibration: ClassVar[bool] = False  # _fit(train, calibration): chooses something on held-out rows

    @classmethod
    def param_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters.values()
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)  # a class without __init__
        return [p.name for p in parameters if p.name != "self" and p.kind not in variadic]

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        parameters = inspect.signature(cls.__init__).parameters
        return {name: parameters[name].default for name in cls.param_names()}

    @classmethod
    def idle_params(cls, params: dict[str, Any]) -> tuple[str, ...]:
        """The parameters configuration ``params`` does not read (left out where the configuration is shown)."""
        return ()

    def scorer_for(self, roles: list[str]) -> str | None:
        """The scorer whose scores this router reads on a trace with model ``roles`` (its ``scorer`` unless the
        roles change whose verdict it needs)."""
        return self.scorer

    def hidden_layers(self, roles: list[str], n_layers: dict[str, int]) -> dict[str, dict[int, str]]:
        """The prompt hidden-state layers this router reads on a trace of model ``roles`` whose models have
        ``n_layers`` decoder blocks: {role: {layer: why}}. `trace gen --routers FILE` stores them."""
        return {}

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def decision_params(self) -> dict[str, float]:
        """Values of the sweepable parameters this router decides with (a sweep replaces them)."""
        return {name: getattr(self, name) for name in self.sweepable}

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def fit(self, train: ReplayData, calibration: ReplayData | None = None) -> Router:
        """Check the configuration and learn from the train split (and, for a router that ``uses_calibration``,
        choose on the calibration split; None: none held out); returns self."""
        self.check_params()
        self.fitted_on_: list[dict] = []
        if self.uses_calibration:
            self._fit(train, calibration)
        else:
            self._fit(train)
        self.n_train_problems_ = train.problems.height
        return self

    def learned_from(self, data: ReplayData, what: str, problem_ids=None, **record) -> None:
        """Record that a part of this router was fitted here on ``data`` (on ``problem_ids`` of it, default all)."""
        self.fitted_on_.append(fit_record(data, what, problem_ids, **record))

    def loaded(self, record: dict | None, data: ReplayData, path) -> None:
        """Record a part loaded from the file at ``path`` whose ``fitted_on`` is ``record`` (None: it records
        nothing), after checking that it was fitted in the setting of the trace ``data`` comes from."""
        if record is None:
            return
        root = (data.origin or {}).get("trace") or "this trace"
        check_setting(record, data.manifest, path, root)
        self.fitted_on_.append(record)

    def check_params(self) -> None:
        """TraceError for the first parameter outside its domain, or another value this router cannot use."""
        for name in self.domains:
            self.check_values(name, [getattr(self, name)], "parameter")
        self._check_params()

    def check_values(self, name: str, values: Iterable, what: str = "parameter") -> None:
        """TraceError naming the first of ``values`` outside parameter ``name``'s domain (``what``: where
        the values come from, for the message)."""
        domain = self.domains.get(name)
        if domain is None:
            return
        for value in values:
            value = value.item() if isinstance(value, np.generic) else value
            if not domain.contains(value):
                raise TraceError(f"router {self.name}: {what} {name} must be {domain.describe()}, got {value!r}")

    def _check_params(self) -> None:
        """Raise TraceError for a non-numeric parameter value this router cannot use."""

    def _fit(self, train: ReplayData, calibration: ReplayData | None = None) -> None:
        """Learn from the train split (nothing, for routers without learned parts)."""

    def check_fitted(self) -> None:
        if not hasattr(self, "n_train_problems_"):
            raise TraceError(f"router {self.name} is not fitted: call fit(train) before replaying it")

    def walk(self, data: ReplayData, costs: Costs, starts: np.ndarray, params: dict[str, np.ndarray]) -> Walk:
        """Walk every start node (one per problem, world and configuration); ``params`` holds the
        sweepable parameters per state."""
        raise NotImplementedError

    # -- helpers for _check_params

    def _check_choice(self, param: str, choices: tuple[str, ...]) -> None:
        if getattr(self, param) not in choices:
            raise TraceError(
                f"router {self.name}: {param} must be one of {', '.join(choices)}, got {getattr(self, param)!r}"
            )


class WriterRouter(Router):
    """Picks the model that writes each step; nothing is drafted or discarded."""

    def choose(self, data: ReplayData, nodes: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
        """Role index (into ``data.roles``) of the model that writes the next step at each node."""
        raise NotImplementedError

    def walk(self, data, costs, starts, params):
        def choose(nodes, p):
            roles = checked_hook_output(self, "choose", self.choose(data, nodes, p), len(nodes), "role indices")
            if roles.size and (roles.dtype.kind not in "iu" or roles.min() < 0 or roles.max() >= len(data.roles)):
                raise TraceError(
                    f"{router_origin(type(self))}: choose must return role indices 0..{len(data.roles) - 1} "
                    f"(into data.roles = {', '.join(data.roles)}), got {roles[:5].tolist()}..."
                )
            return roles

        return walk_steps(data, costs, starts, params, choose=choose, router=self.name)


class DraftRouter(Router):
    """The small model drafts each step; ``accept`` keeps it or the large model rewrites that step.

    With ``one_way`` the first rejected draft hands the rest of the solution to the large model, and
    ``escalate`` says what happens to that draft: "replace" (discarded, paid for, the large model rewrites
    it) or "after" (kept; the large model writes from the next step on). See ``replay.walk.DraftRule``.
    """

    one_way: bool = False  # after one rejected draft the large model writes the rest, undrafted
    escalate: str = "replace"  # one-way routers: what happens to the draft that triggers escalation
    draft: str = ""  # the role that drafts ("" = the trace's smallest model)
    target: str = ""  # the role that writes rejected steps ("" = the trace's largest model)

    def default_target(self, roles: list[str], draft: str) -> str:
        """The target when ``target`` is not given: the largest model."""
        return roles[-1]

    def draft_roles(self, roles: list[str]) -> tuple[str, str]:
        """(drafting role, target role) on a trace with model ``roles`` (smallest first); TraceError unless both
        are its models and the target is the larger."""
        draft = self.draft or roles[0]
        target = self.target or self.default_target(roles, draft)
        for param, role in (("draft", draft), ("target", target)):
            if role not in roles:
                raise TraceError(
                    f"router {self.name}: {param}={role!r} is not one of the trace's models ({', '.join(roles)})"
                )
        if roles.index(target) <= roles.index(draft):
            raise TraceError(f"router {self.name}: target {target} must be a larger model than draft {draft}")
        return draft, target

    def chain(self, roles: list[str]) -> tuple[str, ...]:
        """The models a rejection hands over along, smallest first: (draft, target) unless a router chains more
        (replay.walk.DraftRule)."""
        return self.draft_roles(roles)

    def draft_signal(self, data: ReplayData) -> np.ndarray:
        """The number the router judges each step row's draft by (NaN where it has none)."""
        raise NotImplementedError

    def accept(self, signal: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
        """Keep (True) or discard each draft, from its signal and the states' parameter values."""
        raise NotImplementedError

    def walk(self, data, costs, starts, params):
        signal = costs.once(
            (self, "draft_signal"),
            lambda: checked_hook_output(self, "draft_signal", self.draft_signal(data), data.steps.height, "numbers"),
        )

        def accept(drafts, p):
            return checked_hook_output(self, "accept", self.accept(drafts, p), len(drafts), "booleans")

        rule = DraftRule(
            signal=signal,
            accept=accept,
            one_way=self.one_way,
            scorer=self.scorer_for(data.roles),
            escalate=self.escalate if self.one_way else "replace",
            roles=self.chain(data.roles),
        )
        return walk_steps(data, costs, starts, params, draft_rule=rule, router=self.name)


def router_origin(obj: Any) -> str:
    """``FILE:Class`` of a router class (or function): where messages about it point."""
    try:
        where = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except TypeError:
        where = getattr(obj, "__module__", "?")
    return f"{where}:{obj.__qualname__}"


def checked_hook_output(router: Router, hook: str, value: Any, length: int, kind: str) -> np.ndarray:
    """A hook's output as an array of ``length`` ``kind``; TraceError naming the router's file and class otherwise
    (a plugin returning the wrong shape fails here, not deep inside the engine)."""
    array = np.asarray(value)
    if array.shape != (length,):
        raise TraceError(
            f"{router_origin(type(router))}: {hook} returned an array of shape {array.shape}; it must return "
            f"{length:,} {kind}, one per {'step row' if hook == 'draft_signal' else 'entry of its input'}"
        )
    wanted = {"booleans": "b", "numbers": "biuf", "role indices": "iu"}[kind]
    if array.dtype.kind not in wanted:
        raise TraceError(f"{router_origin(type(router))}: {hook} must return {kind}, got an array of {array.dtype}")
    return array


class QueryRouter(Router):
    """Decides once per query (which whole solution to use); implements ``walk`` itself."""


def coerce_param(router: type[Router], name: str, value: Any) -> Any:
    """A ``--param`` string converted to the type of the parameter's default."""
    if not isinstance(value, str):
        return value
    default = router.param_defaults()[name]
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if default is None:  # an optional number, such as a threshold read from a file unless given
            return float(value)
    except ValueError:
        if default is None:
            raise TraceError(f"router {router.name}: parameter {name} must be a number, got {value!r}") from None
        kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        raise TraceError(f"router {router.name}: parameter {name} must be {kind}, got {value!r}") from None
    return value
