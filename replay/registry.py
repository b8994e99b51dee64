"""One way to register every kind of extension: routers, scorers, cost models, backends and report tables.

Each kind has one ``Registry``; ``get(name)`` finds an entry in the same three places for every kind:

1. built-ins: ``@REGISTRY.register`` above a class of this project (registered under its ``name``), or
   ``REGISTRY.register_lazy(name, "module:Attr")``, imported on first use (an engine that takes seconds to
   import, say);
2. entry points of installed packages, in the kind's group (``trace.routers``, ``trace.scorers``,
   ``trace.costs``, ``trace.backends``, ``trace.tables``); a package declares, in its pyproject.toml::

       [project.entry-points."trace.routers"]
       min-logprob = "my_package.routers:MinLogprob"

3. a reference ``path/to/file.py:Attr`` (the file is imported as a module of its own) or ``package.module:Attr``.

A name declared twice (a built-in and an entry point, or two packages) is an error naming both origins, never
a silent choice; so is an unknown name (listing the choices), an import that fails, or an object the kind's
``check`` refuses: each is one TraceError line. ``rows()`` lists a kind with each entry's origin
(`trace replay --list`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tracestore.errors import TraceError

REFERENCE_FORMS = "FILE.py:Class or module:Class"

_loaded_files: dict[tuple[Path, int], Any] = {}
_entry_point_scans: dict[tuple, dict[str, dict[str, list[metadata.EntryPoint]]]] = {}  # sys.path -> group -> ...


@dataclass(frozen=True)
class Registered:
    """One line of `trace replay --list`."""

    kind: str  # router, scorer, cost, backend or table
    name: str
    source: str  # "built-in FILE", or the entry point and its package
    about: str  # first line of its docstring, or why it cannot be used


@dataclass(frozen=True)
class _Builtin:
    source: str  # "built-in rsd.py"
    target: Any  # the registered object, or "module:Attr" imported on first use
    install: str = ""  # what to install when a lazy target's module cannot be imported


class Registry:
    """The entries of one kind (see the module doc).

    ``kind`` is its name in listings (``cost``), ``noun`` in messages (``cost model``); ``check(obj, origin)``
    returns the object a lookup gives (the object itself, or a wrapper: a per-step function becomes a router
    class) or raises TraceError naming ``origin``; ``looks_like(obj)`` says which attributes of a file to
    suggest when a reference names a missing one; ``discover`` is the package whose modules define the
    built-ins with ``@register`` (imported on first lookup, so that importing the registry stays cheap).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        check: Callable[[Any, str], Any],
        looks_like: Callable[[Any], bool],
        noun: str = "",
        discover: str = "",
    ):
        self.kind = kind
        self.group = group
        self.noun = noun or kind
        self.check = check
        self.looks_like = looks_like
        self.discover = discover
        self._builtins: dict[str, _Builtin] = {}
        self._loaded: dict[str, Any] = {}
        self._discovered = not discover

    # -------------------------------------------------------------- registering built-ins

    def register(self, obj: Any) -> Any:
        """Decorator: register the class ``obj`` under its ``name``; returns it unchanged."""
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise TraceError(f"{obj.__module__}:{obj.__qualname__}: a registered {self.noun} needs a name")
        self._add(name, _Builtin(f"built-in {_file_of(obj.__module__)}", obj))
        self._loaded[name] = obj
        return obj

    def register_lazy(self, name: str, target: str, install: str = "") -> None:
        """Register ``module:Attr`` under ``name``, imported on first use; ``install`` says what to install when
        its module cannot be imported."""
        self._add(name, _Builtin(f"built-in {_file_of(target.partition(':')[0])}", target, install))

    def _add(self, name: str, entry: _Builtin) -> None:
        known = self._builtins.get(name)
        if known is not None and _identity(known.target) != _identity(entry.target):
            raise TraceError(f"{self.noun} {name!r} is registered twice: {known.source} and {entry.source}")
        self._builtins[name] = entry

    # -------------------------------------------------------------- looking up

    def get(self, name: str) -> Any:
        """The entry ``name`` names: a built-in, an installed entry point, or ``FILE.py:Attr`` / ``module:Attr``."""
        origins = self._origins(name)
        if len(origins) > 1:
            raise TraceError(self._collision(name, origins))
        if name in self._builtin_entries():
            return self._builtin(name)
        points = self._entry_points()
        if name in points:
            return self._load_point(points[name][0])
        if is_reference(name):
            obj, origin = load_reference(name, self)
            return self.check(obj, origin)
        raise TraceError(self._unknown(name))

    def knows(self, name: str) -> bool:
        """Whether ``name`` is registered (built-in or entry point) or a reference; nothing is imported."""
        return bool(self._origins(name)) or is_reference(name)

    def check_name(self, name: str) -> None:
        """TraceError unless the registry ``knows`` ``name``."""
        if not self.knows(name):
            raise TraceError(self._unknown(name))

    def names(self, installed: bool = True) -> list[str]:
        """Built-in names in the order they were registered, then (``installed``) the entry points' names, sorted."""
        builtins = list(self._builtin_entries())
        return builtins + (sorted(set(self._entry_points()) - set(builtins)) if installed else [])

    def builtins(self) -> dict[str, Any]:
        """Every built-in entry by name, imported."""
        return {name: self._builtin(name) for name in self._builtin_entries()}

    def rows(self) -> list[Registered]:
        """Built-ins, then entry points (loaded, to show their docstrings or why they cannot be used); an entry
        whose name is registered twice says so."""
        rows = []
        for name, entry in sorted(self._builtin_entries().items()):
            rows.append(Registered(self.kind, name, entry.source, self._about(name, _doc_of_target, entry.target)))
        for name, found in sorted(self._entry_points().items()):
            for point in found:
                about = self._about(name, self._describe_point, point)
                rows.append(Registered(self.kind, name, _point_source(point), about))
        return rows

    # -------------------------------------------------------------- internals

    def _builtin_entries(self) -> dict[str, _Builtin]:
        if not self._discovered:
            self._discovered = True
            package = importlib.import_module(self.discover)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.discover}.{module.name}")
        return self._builtins

    def _builtin(self, name: str) -> Any:
        if name not in self._loaded:
            entry = self._builtins[name]
            module, _, attr = entry.target.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except Exception as error:  # an engine that is missing or fails to start importing
                hint = f"; {entry.install}" if entry.install else ""
                raise TraceError(f"the {name} {self.noun} cannot be imported ({describe_error(error)}){hint}") from None
            self._loaded[name] = self.check(obj, f"{self.noun} {name} ({entry.target})")
        return self._loaded[name]

    def _load_point(self, point: metadata.EntryPoint) -> Any:
        return self.check(load_entry_point(point, self.group), f"entry point {point.name} ({point.value})")

    def _entry_points(self) -> dict[str, list[metadata.EntryPoint]]:
        return installed_entry_points(self.group)

    def _origins(self, name: str) -> list[str]:
        """Where ``name`` is registered: as a built-in, and by each package that declares it."""
        builtins = self._builtin_entries()
        origins = [builtins[name].source] if name in builtins else []
        return origins + [_point_source(point) for point in self._entry_points().get(name, [])]

    def _about(self, name: str, describe: Callable[[Any], str], target: Any) -> str:
        """``describe(target)``, or why entry ``name`` cannot be used."""
        origins = self._origins(name)
        if len(origins) > 1:
            return f"cannot be used: {self._collision(name, origins)}"
        try:
            return describe(target)
        except TraceError as error:
            return f"cannot be used: {error}"

    def _describe_point(self, point: metadata.EntryPoint) -> str:
        return first_line(self._load_point(point))

    def _collision(self, name: str, origins: list[str]) -> str:
        return (
            f"{self.noun} {name!r} is registered twice: {' and '.join(origins)}; uninstall one of the packages "
            "or rename its entry point"
        )

    def _unknown(self, name: str) -> str:
        choices = ", ".join(sorted({*self._builtin_entries(), *self._entry_points()}))
        return f"unknown {self.noun} {name!r}; choose one of {choices}, or give {REFERENCE_FORMS}"


# ---------------------------------------------------------------------- entry points


def installed_entry_points(group: str) -> dict[str, list[metadata.EntryPoint]]:
    """The entry points installed packages declare in ``group``, by name, each distinct target once. Scanned
    again only when ``sys.path`` or one of its folders changes (a package installed or removed)."""
    key = tuple((folder, _mtime(folder)) for folder in sys.path)
    if key not in _entry_point_scans:
        _entry_point_scans.clear()
        _entry_point_scans[key] = {}
    scans = _entry_point_scans[key]
    if group not in scans:
        found: dict[str, list[metadata.EntryPoint]] = {}
        for point in metadata.entry_points(group=group):
            same_name = found.setdefault(point.name, [])
            if all(point.value != seen.value for seen in same_name):  # a package found twice on sys.path
                same_name.append(point)
        scans[group] = found
    return scans[group]


def _mtime(folder: str) -> int:
    try:
        return os.stat(folder or ".").st_mtime_ns
    except OSError:
        return 0


def package_of(point: metadata.EntryPoint) -> str:
    return f"package {point.dist.name} {point.dist.version}" if point.dist is not None else "an unknown package"


def _point_source(point: metadata.EntryPoint) -> str:
    return f"entry point {point.value} ({package_of(point)})"


def load_entry_point(point: metadata.EntryPoint, group: str) -> Any:
    """The object ``point`` names; TraceError naming the entry point, its package and the error."""
    try:
        return point.load()
    except Exception as error:
        raise TraceError(
            f"entry point {point.name} = {point.value} in group {group} ({package_of(point)}) cannot be loaded: "
            f"{describe_error(error)}"
        ) from None


# ---------------------------------------------------------------------- references FILE.py:Attr, module:Attr


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


def load_reference(reference: str, registry: Registry) -> tuple[Any, str]:
    """The object ``FILE.py:Attr`` or ``module:Attr`` names, and where it comes from (for messages)."""
    where, _, attr = reference.rpartition(":")
    if _is_file_reference(where):
        path = Path(where).expanduser()
        module, origin = _import_file(path, registry.noun), str(path)
    else:
        module, origin = _import_module(where, registry), f"module {where}"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(
                name for name, value in vars(module).items() if not name.startswith("_") and registry.looks_like(value)
            )
            hint = f"; it defines {', '.join(found)}" if found else f"; it defines no {registry.noun}"
            raise TraceError(f"{origin} has no {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj, f"{origin}:{attr}"


def _import_file(path: Path, noun: str):
    if not path.is_file():
        raise TraceError(f"{noun} file {path} does not exist" if path.suffix == ".py" else f"{path} is not a file")
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


def _import_module(name: str, registry: Registry):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and (name == error.name or name.startswith(error.name + ".")):
            raise TraceError(
                f"no module named {error.name!r} (a {registry.noun} is a registered name, an entry point of group "
                f"{registry.group}, {REFERENCE_FORMS}; a file needs its .py suffix)"
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


# ---------------------------------------------------------------------- checks and descriptions


def check_subclass(obj: Any, origin: str, noun: str, base: type, hooks: tuple[str, ...], attrs: dict) -> type:
    """``obj`` if it is a subclass of ``base`` that defines ``hooks`` (methods) and ``attrs`` (name: type);
    TraceError naming ``origin`` and what is wrong otherwise."""
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TraceError(f"{origin} is not a {noun}: it must name a subclass of {base.__module__}.{base.__qualname__}")
    missing = [hook for hook in hooks if getattr(obj, hook) is getattr(base, hook, None)]
    missing += [attr for attr, kind in attrs.items() if not isinstance(getattr(obj, attr, None), kind)]
    if missing:
        raise TraceError(f"{origin}: {noun} class {obj.__name__} does not define {', '.join(missing)}")
    return obj


def describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def first_line(obj: Any) -> str:
    """First paragraph of the object's docstring (or of its module's), on one line."""
    own = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    doc = inspect.cleandoc(own or "") or inspect.getdoc(sys.modules.get(getattr(obj, "__module__", ""))) or ""
    return _paragraph(doc)


def _paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


def _doc_of_target(target: Any) -> str:
    """First line of a built-in's docstring; a lazy ``module:Attr`` is read from its source, not imported."""
    if not isinstance(target, str):
        return first_line(target)
    module, _, attr = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == attr:
            return _paragraph(ast.get_docstring(node) or ast.get_docstring(tree) or "")
    return _paragraph(ast.get_docstring(tree) or "")


def _file_of(module: str) -> str:
    return module.rpartition(".")[2] + ".py"


def _identity(target: Any) -> str:
    """The same class registered again (its module imported twice) is not a second entry."""
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
