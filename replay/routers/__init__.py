"""The routers' registry (replay.registry, group ``trace.routers``) and ``make_router``.

A built-in router is one module of this package with ``@ROUTERS.register`` above its class (registered by its
``name``); the modules are imported on the first lookup and import heavy libraries (scikit-learn, torch) inside
the functions that use them, so that listing the registry (the names in `trace --help`) stays fast.

A reference (``--router``, a study file's ``name``, ``api.router``) is a registered name, the name of an entry
point of group ``trace.routers``, ``path/to/file.py:Class`` or ``package.module:Class``. ``Class`` is a router
class (a subclass of ``DraftRouter``, ``WriterRouter``, ``QueryRouter`` or ``replay.stepwise.StepRouter``) or a
per-step function ``decide(node, **params)`` (see replay.stepwise). Every problem with one -- a file that does
not import, an attribute that is not a router, a missing hook -- is one TraceError naming the file, the class
and what is wrong.
"""

from __future__ import annotations

import inspect
from typing import Any

from replay.registry import Registry
from replay.routers.base import DraftRouter, QueryRouter, Router, WriterRouter, coerce_param, router_origin
from tracestore.errors import TraceError

_WHAT_A_ROUTER_IS = (
    "a router is a subclass of replay.routers.base.DraftRouter or WriterRouter (vectorised hooks), of "
    "replay.stepwise.StepRouter (decide(node) per step), or a function decide(node, **params)"
)


def _hooks() -> dict[type, tuple[str, ...]]:
    """The base classes a router subclasses (none is a router itself), each with the hooks a subclass must
    define; a subclass of several is checked as the first."""
    from replay.stepwise import StepRouter  # stepwise imports routers.base: imported once both exist

    return {
        StepRouter: ("decide",),
        DraftRouter: ("draft_signal", "accept"),
        WriterRouter: ("choose",),
        QueryRouter: ("walk",),
        Router: ("walk",),
    }


def as_router_class(obj: Any, origin: str) -> type[Router]:
    """``obj`` as a router class: a Router subclass with its hooks, or a per-step function wrapped by
    replay.stepwise.step_router. TraceError naming ``origin`` and what is wrong otherwise."""
    from replay.stepwise import step_router

    if inspect.isfunction(obj):
        try:
            return step_router(obj)
        except TypeError as error:
            raise TraceError(f"{origin}: {error}") from None
    if not isinstance(obj, type):
        raise TraceError(f"{origin} is a {type(obj).__name__}, not a router; {_WHAT_A_ROUTER_IS}")
    if not issubclass(obj, Router):
        hint = " (it has a decide method: subclass replay.stepwise.StepRouter)" if hasattr(obj, "decide") else ""
        raise TraceError(f"{origin}: class {obj.__name__} is not a router{hint}; {_WHAT_A_ROUTER_IS}")
    hooks = _hooks()
    if obj in hooks:
        raise TraceError(f"{origin}: {obj.__name__} is a base class; subclass it and define its hooks")
    for kind, needed in hooks.items():
        if issubclass(obj, kind):
            missing = [hook for hook in needed if getattr(obj, hook) is getattr(kind, hook)]
            if missing:
                raise TraceError(
                    f"{origin}: router class {obj.__name__} does not define {', '.join(missing)} "
                    f"(a {kind.__name__} needs {', '.join(needed)})"
                )
            break
    if "name" not in vars(obj):
        obj.name = obj.__name__  # an unnamed plugin router is known by its class name
    if not isinstance(obj.name, str) or not obj.name:
        raise TraceError(f"{origin}: router class {obj.__name__} needs a name (a non-empty string)")
    if ROUTERS.builtins().get(obj.name, obj) is not obj:
        raise TraceError(
            f"{origin}: class {obj.__name__} takes the name {obj.name!r} of a built-in router; give it another name"
        )
    return obj


def _looks_like_router(value: Any) -> bool:
    if isinstance(value, type):
        return issubclass(value, Router) and value not in _hooks()
    return inspect.isfunction(value) and "node" in inspect.signature(value).parameters


ROUTERS = Registry("router", "trace.routers", as_router_class, _looks_like_router, discover=__name__)


def make_router(reference: Any, **params: Any) -> Router:
    """The router ``reference`` names (see the module doc), or made from the router class or per-step function
    given, with ``params`` (strings are converted to the defaults' types)."""
    if isinstance(reference, str):
        cls = ROUTERS.get(reference)
    else:
        cls = as_router_class(reference, router_origin(reference))
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        valid = ", ".join(cls.param_names()) or "none"
        raise TraceError(f"router {cls.name} has no parameter {', '.join(unknown)}; its parameters: {valid}")
    return cls(**{key: coerce_param(cls, key, value) for key, value in params.items()})


__all__ = ["ROUTERS", "Router", "make_router"]
