"""Which steps a trace still needs: the frontier of a step tree under an expansion strategy.

A node is a path over model characters (``""`` is the prompt, ``"sL"`` = a small step then a
large one). A strategy says, for every node, which models should continue it; ``frontier``
returns the (problem, world, node, model) requests whose node exists, is not terminal, and has
no step by that model yet. Generating those requests and asking again grows the tree one layer
per round until nothing is missing. ``closure`` fits the same loop: its requests are the
(node, model) misses a router replay reports, fed to the same generation function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tracestore.errors import TraceError
from tracestore.schema import TWO_MODEL_ROLES, make_step_id, model_char, role_of_char

EXPANSIONS = ("comb", "full", "closure", "online")


@dataclass(frozen=True, order=True)
class Request:
    """Generate the step that ``model`` writes at node ``parent_path`` of tree (problem_id, world)."""

    problem_id: str
    world: int
    parent_path: str
    model: str  # the role of the model that writes it

    @property
    def path(self) -> str:
        return self.parent_path + model_char(self.model)

    @property
    def step_id(self) -> str:
        return make_step_id(self.problem_id, self.world, self.path)


class Strategy:
    """Which models continue a node; subclasses define ``models_at``. ``roles`` are the trace's model
    roles, smallest first."""

    roles: tuple[str, ...] = TWO_MODEL_ROLES

    def models_at(self, path: str) -> tuple[str, ...]:
        raise NotImplementedError

    def contains(self, path: str) -> bool:
        """Is ``path`` a node this strategy grows (every step on it one the strategy asks for)?"""
        return all(role_of_char(path[k]) in self.models_at(path[:k]) for k in range(len(path)))

    def manifest_entry(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Comb(Strategy):
    """Each model's own chain from the root, plus from every node on model i's chain the completion by
    every larger model (two models: the all-small chain and the all-large completion from each of its nodes)."""

    roles: tuple[str, ...] = TWO_MODEL_ROLES

    def models_at(self, path: str) -> tuple[str, ...]:
        if not path:
            return self.roles
        chars = set(path)
        if len(chars) > 1:
            return (role_of_char(path[-1]),)  # a completion: its model writes to the end
        return self.roles[self.roles.index(role_of_char(path[0])) :]

    def manifest_entry(self) -> dict:
        return {"strategy": "comb"}


@dataclass(frozen=True)
class Full(Strategy):
    """Every choice among the models up to ``depth`` steps, then each leaf completed by each model alone."""

    depth: int
    roles: tuple[str, ...] = TWO_MODEL_ROLES

    def models_at(self, path: str) -> tuple[str, ...]:
        if len(path) <= self.depth:
            return self.roles
        return (role_of_char(path[-1]),)

    def manifest_entry(self) -> dict:
        return {"strategy": "full", "depth": self.depth}


@dataclass(frozen=True)
class Online(Strategy):
    """Nothing up front: an online run grows only the steps its router asks for (see tracegen.closure)."""

    def models_at(self, path: str) -> tuple[str, ...]:
        return ()

    def manifest_entry(self) -> dict:
        return {"strategy": "online"}


def make_strategy(name: str, depth: int | None = None, roles: tuple[str, ...] = TWO_MODEL_ROLES) -> Strategy:
    """The strategy whose frontier a run grows first over the models ``roles`` (smallest first); ``closure``
    starts from ``comb``, ``online`` from nothing."""
    if name in ("comb", "closure", "online"):
        if depth is not None:
            raise TraceError("--depth applies to --expand full only")
        return Online() if name == "online" else Comb(tuple(roles))
    if name == "full":
        if depth is None or depth < 0:
            raise TraceError("--expand full needs --depth D with D >= 0")
        return Full(depth, tuple(roles))
    raise TraceError(f"unknown --expand {name!r}; choose one of {', '.join(EXPANSIONS)}")


def frontier(
    trees: Mapping[tuple[str, int], Mapping[str, bool]],
    strategy: Strategy,
    max_steps: int,
) -> list[Request]:
    """Requests still needed, in a stable order.

    ``trees`` maps each (problem_id, world) to its existing steps as {path: is_final}; a tree with
    no steps yet maps to an empty dict (its root node always exists). A node is terminal when the
    step that made it is final or it already holds ``max_steps`` steps.
    """
    requests = []
    for (problem_id, world), steps in trees.items():
        for node in _open_nodes(steps, max_steps):
            if not strategy.contains(node):
                continue  # added by another strategy (e.g. closure): not this one's to grow
            for model in strategy.models_at(node):
                if node + model_char(model) not in steps:
                    requests.append(Request(problem_id, world, node, model))
    return sorted(requests)


def missing(
    trees: Mapping[tuple[str, int], Mapping[str, bool]], wanted: Iterable[Request], max_steps: int
) -> list[Request]:
    """Of explicitly ``wanted`` (node, model) pairs (e.g. a replay's misses), those that can and must be generated."""
    needed = set()
    for request in wanted:
        steps = trees.get((request.problem_id, request.world), {})
        if request.path in steps:
            continue
        if request.parent_path and request.parent_path not in steps:
            raise TraceError(f"cannot generate {request.step_id}: its node {request.parent_path!r} is not in the trace")
        if not _is_terminal(request.parent_path, steps, max_steps):
            needed.add(request)
    return sorted(needed)


def _open_nodes(steps: Mapping[str, bool], max_steps: int) -> list[str]:
    nodes = [""] + list(steps)
    return [node for node in nodes if not _is_terminal(node, steps, max_steps)]


def _is_terminal(node: str, steps: Mapping[str, bool], max_steps: int) -> bool:
    return len(node) >= max_steps or (node != "" and steps[node])
