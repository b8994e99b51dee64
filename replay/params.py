"""Router parameters and sweeps: `--param` and `--sweep` parsed and checked against the router, the grid of
configurations a replay walks, and parameters written as text (results, report labels and tables, terminal).

Each check lives here once: ``check_sweep`` (the router's parameters, and which of them a sweep varies over
which values; before anything is fitted) and ``check_grid_size`` (how many configurations, and the memory
their walks take).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracestore.errors import TraceError

# At most this many configurations unless the user raises it (`--max-configs`): a sweep such as
# tau=0:1:1e-9 would otherwise allocate until the kernel kills the process.
DEFAULT_MAX_CONFIGS = 20_000
# Peak memory per walk state, for the estimate a refusal names: measured replaying RSD sweeps of 0.2M-2M
# states on the toy demo trace, 450-670 bytes (the outcomes keep ~135; the rest is working copies).
BYTES_PER_STATE = 600


def parse_param(text: str) -> tuple[str, str]:
    """Split ``k=v``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise TraceError(f"--param must look like name=value, got {text!r}")
    return name.strip(), value.strip()


def parse_sweep(text: str, max_configs: int = DEFAULT_MAX_CONFIGS) -> tuple[str, np.ndarray]:
    """``tau=0:1:0.01`` (start:stop:step, stop included) or ``tau=0.3,0.5,0.7`` -> (name, values).
    A range of more than ``max_configs`` values is refused before it is built."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    usage = f"--sweep must look like name=start:stop:step (step > 0, stop >= start) or name=v1,v2,..., got {text!r}"
    if not sep or not name:
        raise TraceError(usage)
    try:
        if ":" in value:
            start, stop, step = (float(part) for part in value.split(":"))
            if not np.isfinite([start, stop, step]).all() or step <= 0 or stop < start:
                raise ValueError
            steps = (stop - start) / step
            count = int(np.floor(steps + 1e-9 * max(1.0, steps))) + 1  # stop included despite rounding
            if count > max_configs:
                raise TraceError(
                    f"--sweep {text} has {count:,} values; at most {max_configs:,} configurations run "
                    "(use a coarser step, or raise --max-configs)"
                )
            values = np.round(start + step * np.arange(count), 12)
        else:
            values = np.array([float(part) for part in value.split(",")])
    except ValueError:
        raise TraceError(usage) from None
    return name, values


def parse_sweeps(
    sweep: Mapping[str, Any] | Sequence[str] | None, max_configs: int = DEFAULT_MAX_CONFIGS
) -> dict[str, np.ndarray]:
    """``{"tau": "0:1:0.05"}``, ``{"tau": [0.3, 0.5]}`` or ``["tau=0:1:0.05"]`` (as `--sweep`) -> arrays; a
    parameter given twice is refused."""
    if max_configs < 1:
        raise TraceError(f"--max-configs must be at least 1, got {max_configs}")
    if not sweep:
        return {}
    if isinstance(sweep, str):
        sweep = [sweep]
    texts = list(sweep) if not isinstance(sweep, Mapping) else []
    values: dict[str, np.ndarray] = {}
    if isinstance(sweep, Mapping):
        for name, given in sweep.items():
            if isinstance(given, str):
                texts.append(f"{name}={given}")
            else:
                values[name] = np.asarray(given, dtype=float).reshape(-1)
    for text in texts:
        name, array = parse_sweep(text, max_configs)
        if name in values:
            raise TraceError(f"--sweep {name} is given twice")
        values[name] = array
    return values


@dataclass(frozen=True)
class Configs:
    """The configurations of one replay: their full parameter dicts and the swept values as arrays."""

    params: list[dict]
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.params)

    def take(self, index: slice) -> Configs:
        return Configs(self.params[index], {name: values[index] for name, values in self.values.items()})


def check_sweep(router, sweep: Mapping[str, np.ndarray]) -> None:
    """Refuse a parameter outside its domain (or another value the router cannot use), a sweep of a parameter
    the router cannot sweep, or a swept value outside the parameter's domain. Needs no fitted router, so it
    runs before anything is fitted."""
    router.check_params()
    unknown = sorted(set(sweep) - set(router.sweepable))
    if unknown:
        allowed = ", ".join(router.sweepable) or "none"
        raise TraceError(f"router {router.name} cannot sweep {', '.join(unknown)}; sweepable: {allowed}")
    for name, values in sweep.items():
        router.check_values(name, values, "--sweep")


def check_grid_size(sweep: dict[str, np.ndarray], max_configs: int, n_walks: int | None = None) -> None:
    """Refuse a grid of more than ``max_configs`` configurations, naming its size (in walk states and
    memory too, given the ``n_walks`` walked per configuration)."""
    sizes = [len(values) for values in sweep.values()]
    n_configs = int(np.prod(sizes, dtype=float))
    if n_configs <= max_configs:
        return
    size = f"{' x '.join(map(str, sizes))} = {n_configs:,} configurations"
    if n_walks is not None:
        states = n_configs * n_walks
        size += f" x {n_walks:,} walks = {states:,} walk states (about {states * BYTES_PER_STATE / 1e9:.3g} GB)"
    raise TraceError(
        f"--sweep gives {size}; at most {max_configs:,} configurations run (use coarser steps, or raise --max-configs)"
    )


def sweep_configs(router, sweep: Mapping[str, np.ndarray] | None) -> Configs:
    """The router's own configuration, or the grid of every swept parameter (others fixed), of a sweep that
    check_sweep and check_grid_size passed."""
    base = {**router.get_params(), **router.decision_params()}
    sweep = sweep or {}
    names = list(router.sweepable)
    grids = [sweep.get(name, np.array([base[name]], dtype=float)) for name in names]
    combos = list(itertools.product(*grids)) if names else [()]
    params = [{**base, **{name: float(value) for name, value in zip(names, combo)}} for combo in combos]
    values = {name: np.array([combo[i] for combo in combos], dtype=float) for i, name in enumerate(names)}
    return Configs(params, values)


def params_text(params: Mapping[str, Any], separator: str = ", ") -> str:
    """Parameters as ``name=value`` text, as `--param` takes them: floats as %g, booleans as true/false."""
    return separator.join(f"{name}={_value_text(value)}" for name, value in params.items())


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)
