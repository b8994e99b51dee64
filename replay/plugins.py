"""Routers and cost models from outside the package: by file, by module, or by installed entry point.

A router reference is one of

- a registered name (``rsd``, ``steer``, ...; ``trace replay --list`` shows them),
- the name of an entry point in group ``trace.routers`` of an installed package,
- ``path/to/file.py:Class`` (the file is imported as a module of its own), or
- ``package.module:Class`` (an importable module).

``Class`` is a router class (a subclass of ``replay.routers.base.Router``, e.g. ``DraftRouter``, or a
``replay.stepwise.StepRouter``) or a per-step function ``decide(node, **params)`` (see replay.stepwise).
Installed packages register cost models the same way (group ``trace.costs``); scorers live in phase
one (group ``trace.scorers``, see tracegen.scorers.base). Every problem with a plugin -- a file that
does not import, an attribute that is not a router, a missing hook -- is one TraceError naming the
file, the class and what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from replay.entry_points import (
    ROUTER_GROUP,
    Registered,
    describe_error,
    entry_point_rows,
    entry_points,
    first_line,
    load_entry_point,
    package_of,
)
from replay.routers import ROUTERS
from replay.routers.base import DraftRouter, QueryRouter, Router, WriterRouter, coerce_param, router_origin
from replay.stepwise import StepRouter, step_router
from tracestore.errors import TraceError

REFERENCE_FORMS = "a registered name, an entry point of group trace.routers, FILE.py:Class or module:Class"

# the base classes a plugin subclasses; each is not a router itself
_BASES = (Router, WriterRouter, DraftRouter, QueryRouter, StepRouter)
# hooks a router kind must define (the base class's own raise NotImplementedError)
_HOOKS = {
    StepRouter: ("decide",),
    DraftRouter: ("draft_signal", "accept"),
    WriterRouter: ("choose",),
    Router: ("walk",),
}
_loaded_files: dict[tuple[Path, int], Any] = {}


# ---------------------------------------------------------------------- loading objects


def is_reference(text: str) -> bool:
    """Whether ``text`` names an object in a file or module (``X:Attr``) rather than a registered name."""
    where, sep, attr = text.rpartition(":")
    return bool(sep and where and attr)


def _is_file_reference(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def anchor_reference(reference: str, base_dir: Path) -> str:
    """``reference`` with a relative ``FILE.py:Class`` file made relative to ``base_dir`` (a study file's
    folder); anything else unchanged."""
    where, _, attr = reference.rpartition(":")
    if not is_reference(reference) or not _is_file_reference(where) or Path(where).expanduser().is_absolute():
        return reference
    return f"{base_dir / where}:{attr}"


def load_reference(reference: str) -> tuple[Any, str]:
    """The object ``FILE.py:Attr`` or ``module:Attr`` names, and where it comes from (for messages)."""
    where, _, attr = reference.rpartition(":")
    if _is_file_reference(where):
        path = Path(where).expanduser()
        module, origin = _import_file(path), str(path)
    else:
        module, origin = _import_module(where), f"module {where}"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(
                name for name, value in vars(module).items() if _looks_like_router(value) and not name.startswith("_")
            )
            hint = f"; it defines {', '.join(found)}" if found else "; it defines no router"
            raise TraceError(f"{origin} has no {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj, f"{origin}:{attr}"


def _looks_like_router(value: Any) -> bool:
    if isinstance(value, type):
        return issubclass(value, Router) and value not in _BASES
    return inspect.isfunction(value) and "node" in inspect.signature(value).parameters


def _import_file(path: Path):
    if not path.is_file():
        raise TraceError(f"router file {path} does not exist" if path.suffix == ".py" else f"{path} is not a file")
    resolved = path.resolve()
    key = (resolved, resolved.stat().st_mtime_ns)
    if key in _loaded_files:
        return _loaded_files[key]
    name = "trace_plugin_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise TraceError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        where = _where_in(error, resolved)
        raise TraceError(f"{path}: importing it failed{where}: {describe_error(error)}") from None
    _loaded_files[key] = module
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and (name == error.name or name.startswith(error.name + ".")):
            raise TraceError(
                f"no module named {error.name!r} (a router reference is {REFERENCE_FORMS}; a file needs its .py suffix)"
            ) from None
        raise TraceError(f"module {name}: importing it failed: {describe_error(error)}") from None
    except Exception as error:
        raise TraceError(f"module {name}: importing it failed: {describe_error(error)}") from None


def _where_in(error: BaseException, path: Path) -> str:
    """`` (line N)`` of the innermost line of ``path`` the error came from."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" (line {error.lineno})"
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path]
    return f" (line {lines[-1]})" if lines else ""


# ---------------------------------------------------------------------- routers


def router_class(reference: str) -> type[Router]:
    """The router class ``reference`` names (see the module doc; a relative file is found from the working
    directory)."""
    if reference in ROUTERS:
        return ROUTERS[reference]
    points = entry_points(ROUTER_GROUP)
    if reference in points:
        return _load_router_entry_point(points[reference])
    if is_reference(reference):
        obj, origin = load_reference(reference)
        return as_router_class(obj, origin)
    known = sorted({*ROUTERS, *points})
    raise TraceError(
        f"unknown router {reference!r}; choose one of {', '.join(known)}, or give FILE.py:Class or module:Class"
    )


def as_router_class(obj: Any, origin: str) -> type[Router]:
    """``obj`` as a router class: a Router subclass with its hooks, or a per-step function wrapped by
    replay.stepwise.step_router. TraceError naming ``origin`` and what is wrong otherwise."""
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
    if obj in _BASES:
        raise TraceError(f"{origin}: {obj.__name__} is a base class; subclass it and define its hooks")
    for kind, hooks in _HOOKS.items():
        if issubclass(obj, kind):
            missing = [hook for hook in hooks if getattr(obj, hook) is getattr(kind, hook)]
            if missing:
                raise TraceError(
                    f"{origin}: router class {obj.__name__} does not define {', '.join(missing)} "
                    f"(a {kind.__name__} needs {', '.join(hooks)})"
                )
            break
    if "name" not in vars(obj):
        obj.name = obj.__name__  # an unnamed plugin router is known by its class name
    if not isinstance(obj.name, str) or not obj.name:
        raise TraceError(f"{origin}: router class {obj.__name__} needs a name (a non-empty string)")
    if ROUTERS.get(obj.name, obj) is not obj:
        raise TraceError(
            f"{origin}: class {obj.__name__} takes the name {obj.name!r} of a built-in router; give it another name"
        )
    return obj


_WHAT_A_ROUTER_IS = (
    "a router is a subclass of replay.routers.base.DraftRouter or WriterRouter (vectorised hooks), of "
    "replay.stepwise.StepRouter (decide(node) per step), or a function decide(node, **params)"
)


def make_router(reference: Any, **params: Any) -> Router:
    """The router ``reference`` names (see router_class), or made from the router class or per-step
    function given, with ``params`` (strings are converted to the defaults' types)."""
    if isinstance(reference, str):
        cls = router_class(reference)
    else:
        cls = as_router_class(reference, router_origin(reference))
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        valid = ", ".join(cls.param_names()) or "none"
        raise TraceError(f"router {cls.name} has no parameter {', '.join(unknown)}; its parameters: {valid}")
    return cls(**{key: coerce_param(cls, key, value) for key, value in params.items()})


# ---------------------------------------------------------------------- listing


def _load_router_entry_point(point: metadata.EntryPoint, group: str = ROUTER_GROUP) -> type[Router]:
    obj = load_entry_point(point, group)
    return as_router_class(obj, f"entry point {point.name} ({point.value}, {package_of(point)})")


def registered_routers() -> list[Registered]:
    """Built-in routers, then those installed packages declare (entry points of group trace.routers)."""
    rows = [
        Registered("router", name, f"built-in {Path(inspect.getfile(cls)).name}", first_line(cls))
        for name, cls in sorted(ROUTERS.items())
    ]
    return rows + entry_point_rows("router", ROUTER_GROUP, {row.name for row in rows}, _load_router_entry_point)
