"""Entry points of installed packages: how a package registers routers (``trace.routers``), scorers
(``trace.scorers``) and cost models (``trace.costs``) without touching this one.

A package declares, in its pyproject.toml::

    [project.entry-points."trace.routers"]
    min-logprob = "my_package.routers:MinLogprob"
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from tracestore.errors import TraceError

ROUTER_GROUP, SCORER_GROUP, COST_GROUP = "trace.routers", "trace.scorers", "trace.costs"


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """The entry points of ``group`` that installed packages declare, by name (the first of a name wins)."""
    found: dict[str, metadata.EntryPoint] = {}
    for point in metadata.entry_points(group=group):
        found.setdefault(point.name, point)
    return found


def describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def package_of(point: metadata.EntryPoint) -> str:
    return f"package {point.dist.name} {point.dist.version}" if point.dist is not None else "an unknown package"


def load_entry_point(point: metadata.EntryPoint, group: str) -> Any:
    """The object ``point`` names; TraceError naming the entry point, its package and the error."""
    try:
        return point.load()
    except Exception as error:
        raise TraceError(
            f"entry point {point.name} = {point.value} in group {group} ({package_of(point)}) cannot be loaded: "
            f"{describe_error(error)}"
        ) from None


def first_line(obj: Any) -> str:
    """First paragraph of the object's docstring (or of its module's), on one line."""
    own = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    doc = inspect.cleandoc(own or "") or inspect.getdoc(sys.modules.get(getattr(obj, "__module__", ""))) or ""
    return " ".join(doc.split("\n\n")[0].split())


@dataclass(frozen=True)
class Registered:
    """One line of `trace replay --list`."""

    kind: str  # router, scorer or cost
    name: str
    source: str  # "built-in FILE", or the entry point and its package
    about: str  # first line of its docstring, or why it cannot be used


def entry_point_rows(kind: str, group: str, builtin: set[str], load=load_entry_point) -> list[Registered]:
    """One row per entry point of ``group``, loaded (through ``load``) to show its docstring or why it fails."""
    rows = []
    for name, point in sorted(entry_points(group).items()):
        source = f"entry point {point.value} ({package_of(point)})"
        if name in builtin:
            rows.append(Registered(kind, name, source, "ignored: a built-in has this name"))
            continue
        try:
            about = first_line(load(point, group))
        except TraceError as error:
            about = f"cannot be used: {error}"
        rows.append(Registered(kind, name, source, about))
    return rows
