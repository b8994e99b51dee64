"""The package graph DESIGN.md's layout promises: no import cycle between modules, the command line (cli.py and
its command groups in commands/) on top where nothing imports it, phase two never imports phase one or an engine,
the toy world's data imports no code of ours. Read with `ast`, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("commands", "tracestore", "tracegen", "replay", "analysis", "data")
ENGINES = ("vllm", "transformers")


def module_files() -> dict[str, Path]:
    files = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (``from a import b`` names a.b and a)."""
    names = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {
        module: {name for name in imported_names(path) if name in files and name != module}
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {
        "cli",
        "commands.generation",
        "tracestore.schema",
        "tracestore.store",
        "tracegen.gen",
        "analysis.report",
        "data.toy.task",
    } <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_packages_import_only_downwards():
    """cli -> commands -> analysis -> replay -> tracestore; commands -> tracegen -> replay, tracestore, data; the
    trace format (tracestore) and the toy world (data) import none of ours."""
    allowed = {
        "commands": {"commands", "tracestore", "tracegen", "replay", "analysis", "data"},
        "tracestore": {"tracestore"},
        "replay": {"replay", "tracestore"},
        "analysis": {"analysis", "replay", "tracestore"},
        "tracegen": {"tracegen", "replay", "tracestore", "data"},
        "data": {"data"},
    }
    for module, targets in import_graph().items():
        package = module.split(".")[0]
        if package == "cli":
            continue
        wrong = sorted(t for t in targets if t.split(".")[0] not in allowed[package])
        assert not wrong, f"{module} imports {wrong}"


def test_phase_two_never_imports_an_engine():
    for module, path in module_files().items():
        if module.split(".")[0] in ("tracestore", "replay", "analysis"):
            engines = sorted(n for n in imported_names(path) if n.split(".")[0] in ENGINES)
            assert not engines, f"{module} imports {engines}"


def test_the_command_line_is_the_top_floor_that_nothing_imports():
    """cli.py assembles the app from commands/ and nothing else; only cli imports commands, and nothing imports cli."""
    graph = import_graph()
    assert {target.split(".")[0] for target in graph["cli"]} == {"commands"}
    for module, targets in graph.items():
        assert "cli" not in targets, f"{module} imports cli"
        if module.split(".")[0] not in ("cli", "commands"):
            wrong = sorted(t for t in targets if t.split(".")[0] == "commands")
            assert not wrong, f"{module} imports {wrong}"


ROUTER_SIDE = ("replay.routers", "replay.pik", "replay.policy_walk", "replay.stepwise")
WALK_KERNEL = ("replay.data", "replay.walk")
ORCHESTRATION = ("replay.run", "replay.results", "replay.params", "replay.api")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def test_routers_walk_on_the_kernel_and_never_import_the_orchestration():
    """Routers import the replay data and the walk kernel, never the modules that run a replay (no call-back
    cycle: a replay calls a router's walk, which walks on the kernel); the kernel imports no router."""
    graph = import_graph()
    routers = [module for module in graph if within(module, ROUTER_SIDE)]
    assert {"replay.routers.base", "replay.routers.steer", "replay.stepwise"} <= set(routers)
    assert "replay.walk" in reachable(graph, "replay.routers.base")
    for module in routers:
        wrong = sorted(target for target in reachable(graph, module) if within(target, ORCHESTRATION))
        assert not wrong, f"{module} imports {wrong}"
    for module in WALK_KERNEL:
        wrong = sorted(t for t in reachable(graph, module) if within(t, ORCHESTRATION + ROUTER_SIDE))
        assert not wrong, f"{module} imports {wrong}"


MAX_LINES = 600
LONGER = {  # module -> why it may be longer
    "replay.train_policy": "one algorithm in one readable file, top to bottom (STYLE.md: CleanRL)",
}


def test_modules_stay_short_unless_said_why():
    long = {}
    for module, path in module_files().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and module not in LONGER:
            long[module] = lines
    assert not long, f"modules over {MAX_LINES} lines without a reason in LONGER: {long}"
