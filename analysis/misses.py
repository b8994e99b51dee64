"""What to do about misses: the routers file (`trace gen --expand closure --routers FILE`, format in
tracegen/closure.py) that grows the steps a replayed router lacked, and the sentence that says so."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from replay.params import params_text

CLOSURE_FILE = "closure.toml"
MISS_MARK = "*"  # beside a router or configuration some of whose walks missed, in every table


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def routers_toml(name: str, params: Mapping[str, Any], sweep: Sequence[str], note: str = "") -> str:
    """One ``[[router]]`` table: ``name`` as `trace replay --router` takes it, ``params`` as its ``--param``s and
    ``sweep`` as its ``--sweep``s."""
    lines = ["[[router]]", f"name = {_toml_string(name)}" + (f"  # {note}" if note else "")]
    if params:
        pairs = [
            f"{key} = {_toml_string(params_text({key: value}).partition('=')[2])}" for key, value in params.items()
        ]
        lines.append("params = {" + ", ".join(pairs) + "}")
    if sweep:
        lines.append("sweep = [" + ", ".join(_toml_string(text) for text in sweep) + "]")
    return "\n".join(lines)


def closure_advice(trace_dir) -> str:
    """The sentence that goes before the routers file (``routers_toml`` tables) that grows what was missed."""
    return (
        f"To grow the missing steps, write the routers file below to {CLOSURE_FILE} and run `trace gen --expand "
        f"closure --routers {CLOSURE_FILE}` with the options that grew {trace_dir} (its --model, --large, --dataset "
        f"and --out {trace_dir}): it generates and scores what these configurations need, and then they replay "
        "without misses."
    )
