"""Router parameters and sweeps: `--param` and `--sweep` parsed and checked against the router, the grid of
configurations a replay walks, and parameters written as text (results, report labels and tables, terminal).

Each check lives here once: ``check_sweep`` (the router's parameters, and which of them a sweep varies over
which values; before anything is fitted), ``check_grid_size`` (how many configurations, and the memory
their walks take) and ``check_memory`` (a sweep's memory estimate against the memory available, before
anything is built).
"""

from __future__ import annotations

import json
import math
import os
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
# Memory per configuration besides its walk states (its parameters, their JSON, its summary row): measured
# replaying random sweeps of 20k-200k configurations on a 6-walk trace, ~930 bytes.
BYTES_PER_CONFIG = 1_000
# A replay of more walk states than this does not hold its outcomes in memory: configurations are walked in
# blocks of at most STREAM_BLOCK_STATES states, each block's outcomes appended to a Parquet file. What stays
# is each configuration's summary row and misses: measured on 1M-2M configurations of random on a 6-walk
# trace, ~225 bytes a configuration.
STREAM_STATES = 4_000_000
STREAM_BLOCK_STATES = 524_288
BYTES_PER_STREAMED_CONFIG = 300


def sweep_memory(n_configs: int, n_walks: int = 1) -> int:
    """Bytes a replay of ``n_configs`` configurations of ``n_walks`` walks each needs at its peak, estimated
    (its outcomes streamed to disk beyond STREAM_STATES walk states)."""
    states = n_configs * n_walks
    if states > STREAM_STATES:
        return n_configs * BYTES_PER_STREAMED_CONFIG + STREAM_BLOCK_STATES * BYTES_PER_STATE
    return n_configs * BYTES_PER_CONFIG + states * BYTES_PER_STATE


def available_memory() -> int | None:
    """Bytes of memory the system can give a process now without swapping (Linux's MemAvailable, else the
    free pages), or None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gigabytes(n_bytes: int) -> str:
    gigabytes = n_bytes / 1e9
    return f"{gigabytes:,.0f} GB" if gigabytes >= 100 else f"{gigabytes:.3g} GB"


def check_memory(what: str, needed: int) -> None:
    """Refuse a run estimated to need more memory than is available, naming both (``what`` says what it is)."""
    available = available_memory()
    if available is not None and needed > available:
        raise TraceError(
            f"{what} needs about {_gigabytes(needed)} of memory, but {_gigabytes(available)} is available; use "
            "coarser steps, or pass --no-memory-check to run it anyway"
        )


@dataclass(frozen=True)
class SweepLimits:
    """How large a sweep may grow: at most ``max_configs`` configurations (`--max-configs`), and with
    ``memory_check`` (`--memory-check`) no larger a memory estimate than the memory available."""

    max_configs: int = DEFAULT_MAX_CONFIGS
    memory_check: bool = True


def parse_param(text: str) -> tuple[str, str]:
    """Split ``k=v``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise TraceError(f"--param must look like name=value, got {text!r}")
    return name.strip(), value.strip()


def parse_sweep(text: str, max_configs: int = DEFAULT_MAX_CONFIGS, memory_check: bool = True) -> tuple[str, np.ndarray]:
    """``tau=0:1:0.01`` (start:stop:step, stop included) or ``tau=0.3,0.5,0.7`` -> (name, values).
    A range of more than ``max_configs`` values, or (``memory_check``) one whose configurations alone would
    need more memory than is available, is refused before it is built."""
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
                    f"--sweep {text} has {count:,} values (at least {_gigabytes(sweep_memory(count))} of memory); "
                    f"at most {max_configs:,} configurations run (use a coarser step, or raise --max-configs)"
                )
            if memory_check:
                check_memory(f"--sweep {text} ({count:,} values)", sweep_memory(count))
            values = np.round(start + step * np.arange(count), 12)
        else:
            values = np.array([float(part) for part in value.split(",")])
    except ValueError:
        raise TraceError(usage) from None
    return name, values


def parse_sweeps(
    sweep: Mapping[str, Any] | Sequence[str] | None, max_configs: int = DEFAULT_MAX_CONFIGS, memory_check: bool = True
) -> dict[str, np.ndarray]:
    """``{"tau": "0:1:0.05"}``, ``{"tau": [0.3, 0.5]}`` or ``["tau=0:1:0.05"]`` (as `--sweep`) -> arrays; a
    parameter given twice is refused (a range checked as ``parse_sweep`` checks it)."""
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
        name, array = parse_sweep(text, max_configs, memory_check)
        if name in values:
            raise TraceError(f"--sweep {name} is given twice")
        values[name] = array
    return values


@dataclass(frozen=True)
class Configs:
    """The configurations of one replay: the router's parameters, and each sweepable one's value in every
    configuration as an array (a configuration's full dict is built when asked for, a block at a time)."""

    base: dict
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 1

    @property
    def params(self) -> list[dict]:
        columns = {name: values.tolist() for name, values in self.values.items()}
        return [{**self.base, **{name: column[i] for name, column in columns.items()}} for i in range(len(self))]

    def take(self, index: slice) -> Configs:
        return Configs(self.base, {name: values[index] for name, values in self.values.items()})


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


def _grid_size(sweep: Mapping[str, np.ndarray], n_walks: int | None) -> tuple[int, str]:
    """The number of configurations of a grid, and its size in words (in walk states too, given the
    ``n_walks`` walked per configuration)."""
    sizes = [len(values) for values in sweep.values()]
    n_configs = math.prod(sizes)
    size = f"{' x '.join(map(str, sizes))} = {n_configs:,} configurations"
    if n_walks is not None:
        size += f" x {n_walks:,} walks = {n_configs * n_walks:,} walk states"
    return n_configs, size


def check_grid_size(sweep: Mapping[str, np.ndarray], max_configs: int, n_walks: int | None = None) -> None:
    """Refuse a grid of more than ``max_configs`` configurations, naming its size and memory."""
    n_configs, size = _grid_size(sweep, n_walks)
    if n_configs > max_configs:
        memory = _gigabytes(sweep_memory(n_configs, n_walks or 1))
        raise TraceError(
            f"--sweep gives {size} ({'about' if n_walks else 'at least'} {memory}); at most {max_configs:,} "
            "configurations run (use coarser steps, or raise --max-configs)"
        )


def check_sweep_memory(sweep: Mapping[str, np.ndarray], n_walks: int) -> None:
    """Refuse a sweep estimated to need more memory than is available (before anything is built)."""
    if sweep:
        n_configs, size = _grid_size(sweep, n_walks)
        check_memory(f"--sweep's {size}", sweep_memory(n_configs, n_walks))


def sweep_configs(router, sweep: Mapping[str, np.ndarray] | None) -> Configs:
    """The router's own configuration, or the grid of every swept parameter (others fixed), of a sweep that
    check_sweep and check_grid_size passed."""
    base = {**router.get_params(), **router.decision_params()}
    sweep = sweep or {}
    names = list(router.sweepable)
    grids = [np.asarray(sweep.get(name, [base[name]]), dtype=float) for name in names]
    axes = np.meshgrid(*grids, indexing="ij") if names else []  # the last parameter varies fastest
    return Configs(base, {name: axis.reshape(-1) for name, axis in zip(names, axes)})


def params_text(params: Mapping[str, Any], separator: str = ", ") -> str:
    """Parameters as ``name=value`` text, as `--param` takes them: floats as %g, booleans as true/false."""
    return separator.join(f"{name}={_value_text(value)}" for name, value in params.items())


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)
