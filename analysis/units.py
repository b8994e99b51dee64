"""Numbers as people read them, for the report and the terminal: a cost unit chosen for the data (a toy model's
1.21e-04 TFLOPs per query is 121 MFLOPs), three significant digits without exponents, an interval on one line.

Kept free of heavy imports: the terminal table of `trace replay` uses it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

SIGNIFICANT = 3
# SI prefixes by power of ten; a cost unit such as "TFLOPs" is rescaled among them
PREFIXES = {18: "E", 15: "P", 12: "T", 9: "G", 6: "M", 3: "k", 0: ""}
TIME_UNITS = {"s": 0, "ms": -3, "µs": -6}


@dataclass(frozen=True)
class CostScale:
    """How costs in a results file's unit (``source``) are shown: multiplied by ``factor``, in ``unit``."""

    source: str
    unit: str
    factor: float = 1.0

    def __call__(self, value: float | None) -> float | None:
        return None if value is None else value * self.factor

    def text(self, value: float | None) -> str:
        return number(self(value))

    @property
    def singular(self) -> str:
        """The unit after "per" ("% per MFLOP")."""
        return self.unit[:-1] if self.unit.endswith("FLOPs") else self.unit


def _split_prefix(unit: str, base: str) -> int | None:
    """The power of ten of an SI-prefixed ``base`` unit ("TFLOPs" -> 12), None if ``unit`` is not one."""
    if not unit.endswith(base):
        return None
    prefix = unit[: -len(base)]
    powers = {letter: power for power, letter in PREFIXES.items()}
    return powers.get(prefix)


def cost_scale(unit: str, values: Iterable[float | None]) -> CostScale:
    """The unit that shows ``values`` (costs in ``unit``) as numbers from 1 to 999 where it can: SI prefixes for
    FLOPs (TFLOPs -> GFLOPs, MFLOPs, ...), ms and µs for seconds; any other unit stays as it is. Chosen by the
    median of the positive values, so that one outlier does not push the rest into decimals."""
    positive = sorted(v for v in values if v is not None and math.isfinite(v) and v > 0)
    if not positive:
        return CostScale(unit, unit)
    typical = positive[len(positive) // 2]
    power = _split_prefix(unit, "FLOPs")
    if power is not None:
        target = max((p for p in PREFIXES if typical * 10.0**power >= 10.0**p), default=0)
        return CostScale(unit, f"{PREFIXES[target]}FLOPs", 10.0 ** (power - target))
    seconds = {"s": 0, "seconds": 0, "ms": -3}.get(unit)
    if seconds is not None:
        target = next((name for name, p in TIME_UNITS.items() if typical * 10.0**seconds >= 10.0**p), "µs")
        return CostScale(unit, target, 10.0 ** (seconds - TIME_UNITS[target]))
    return CostScale(unit, unit)


def number(value: float | None, digits: int = SIGNIFICANT) -> str:
    """``value`` to ``digits`` significant digits, written out (1,210; 26.6; 0.0293), in scientific notation only
    below 0.001 or from 10^7 on; "-" for None or NaN."""
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3 or magnitude >= 7:
        return f"{value:.{digits - 1}e}"
    rounded = round(value, digits - 1 - magnitude)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:,.{decimals}f}"


def tick(value: float) -> str:
    """An axis tick: ``number`` without trailing zeros (2.5, 10, 0.05)."""
    text = number(value)
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def percent_points(value: float | None) -> str:
    """An accuracy (0-1) in percent with one decimal, without the sign: 95.2."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def with_interval(value: float | None, interval: tuple[float, float] | None, fmt=number) -> str:
    """``value [low, high]`` (the page keeps a number cell on one line)."""
    if value is None or not math.isfinite(value):
        return "-"
    if interval is None:
        return fmt(value)
    low, high = interval
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def share(value: float) -> str:
    """A ratio as a percentage for prose: 0.43 -> 43%, 1.216 -> 122%, 0.0042 -> 0.42%."""
    percent = 100 * value
    return f"{number(percent, 2) if abs(percent) < 10 else f'{percent:,.0f}'}%"
