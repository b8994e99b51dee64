"""Cost models: what one cached step, or one scorer call, costs a router.

Every model turns the steps table into two arrays (decode and prefill cost per step row) and
prices scorer calls by their ``n_tokens_processed``; the replay engine only adds them up.
A parameter count or price the model needs and cannot find is a TraceError, never a zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from replay.errors import TraceError
from replay.schema import Manifest

COST_MODELS = ("flops", "flops+prefill", "api")
FLOPS_UNIT = 1e12  # flops costs are reported in TFLOPs per query


@dataclass(frozen=True)
class Price:
    """USD per one million tokens."""

    input: float
    cached_input: float
    output: float


GPT_41_MINI = Price(input=0.40, cached_input=0.10, output=1.60)


def parse_price(text: str) -> tuple[str, Price]:
    """Parse ``ROLE=input/cached_input/output`` (USD per 1M tokens, each finite and >= 0), e.g. ``large=2/0.5/8``."""
    key, sep, numbers = text.partition("=")
    parts = numbers.split("/")
    try:
        if not sep or not key or len(parts) != 3:
            raise ValueError
        price = Price(*(float(part) for part in parts))
    except ValueError:
        raise TraceError(
            f"--price must look like ROLE=input/cached/output in USD per 1M tokens, e.g. large=2/0.5/8, got {text!r}"
        ) from None
    if not all(np.isfinite(value) and value >= 0 for value in vars(price).values()):
        raise TraceError(f"--price {text}: prices must be finite numbers >= 0 (USD per 1M tokens)")
    return key, price


def parse_prices(texts: list[str]) -> dict[str, Price] | None:
    """Every ``--price`` by name (None if none was given); a name priced twice is an error."""
    prices: dict[str, Price] = {}
    for text in texts:
        key, price = parse_price(text)
        if key in prices:
            raise TraceError(f"--price {key} is given twice; give each role or scorer one price")
        prices[key] = price
    return prices or None


class CostModel:
    """Prices steps and scorer calls; ``unit`` names what one cost number means.

    A scorer's model comes from trace.json ``scorers.NAME``: ``{"model": ROLE | "self" | NAME,
    "n_params": N}``, where ``"self"`` means the model that wrote the scored step (P(True) asks a
    model about its own answer).
    """

    name: str
    unit: str

    def step_costs(self, steps: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(decode, prefill) cost of each step row."""
        raise NotImplementedError

    def scorer_costs(self, scorer: str, n_tokens_processed: np.ndarray, step_roles: np.ndarray) -> np.ndarray:
        """Cost of each call of ``scorer``: the tokens it processed, the role of the step it scored."""
        raise NotImplementedError


def _per_role(roles: np.ndarray, values: dict, missing: str) -> np.ndarray:
    """``values[role]`` for each entry of ``roles``; TraceError naming the roles without a value."""
    lacking = sorted(set(roles.tolist()) - set(values))
    if lacking:
        raise TraceError(missing.format(roles=", ".join(lacking)))
    return np.array([values[role] for role in roles.tolist()], dtype=object) if roles.size else np.array([])


class FlopsCost(CostModel):
    """2·N FLOPs per generated token (and, with prefill, per newly prefilled token); in TFLOPs."""

    unit = "TFLOPs"

    def __init__(self, n_params: dict[str, float], scorers: dict[str, dict], include_prefill: bool):
        self.n_params = n_params
        self.scorers = scorers
        self.include_prefill = include_prefill
        self.name = "flops+prefill" if include_prefill else "flops"

    def _per_token(self, roles: np.ndarray) -> np.ndarray:
        n = _per_role(roles, self.n_params, "cost model flops needs n_params of model role(s) {roles} in trace.json")
        return 2 * n.astype(np.float64) / FLOPS_UNIT

    def step_costs(self, steps):
        per_token = self._per_token(steps["model"].to_numpy())
        decode = per_token * steps["n_gen_tokens"].to_numpy().astype(np.float64)
        if not self.include_prefill:
            return decode, np.zeros(len(steps))
        return decode, per_token * steps["n_new_prefill_tokens"].to_numpy().astype(np.float64)

    def scorer_costs(self, scorer, n_tokens_processed, step_roles):
        info = self.scorers.get(scorer, {})
        model = info.get("model")
        if info.get("n_params"):
            per_token = np.full(len(n_tokens_processed), 2 * float(info["n_params"]) / FLOPS_UNIT)
        elif model == "self":
            per_token = self._per_token(step_roles)
        elif model in self.n_params:
            per_token = self._per_token(np.full(len(n_tokens_processed), model, dtype=object))
        else:
            raise TraceError(
                f"cost model {self.name} needs the parameter count of scorer {scorer!r}: set "
                f'trace.json scorers.{scorer}.n_params, or its model to a role or "self"'
            )
        return per_token * n_tokens_processed.astype(np.float64)


class ApiCost(CostModel):
    """USD: uncached input, cached input (vLLM's n_cached_tokens) and output tokens at per-model prices.

    ``prices`` is keyed by model role or scorer name; ``default`` (if any) prices every key not in it.
    """

    name = "api"
    unit = "USD"

    def __init__(self, prices: dict[str, Price], scorers: dict[str, dict], default: Price | None = None):
        self.prices = prices
        self.scorers = scorers
        self.default = default

    def _prices(self, keys: np.ndarray, field: str) -> np.ndarray:
        """USD per token of ``field`` for each key (a role or scorer name)."""
        known = {key: self.prices.get(key, self.default) for key in set(keys.tolist())}
        known = {key: getattr(price, field) / 1e6 for key, price in known.items() if price is not None}
        return _per_role(
            keys,
            known,
            "cost model api has no price for {roles}: pass --price NAME=input/cached/output "
            "(USD per 1M tokens) for each",
        ).astype(np.float64)

    def step_costs(self, steps):
        roles = steps["model"].to_numpy()
        cached = steps["n_cached_tokens"].to_numpy().astype(np.float64)
        uncached = steps["n_prompt_tokens"].to_numpy().astype(np.float64) - cached
        decode = self._prices(roles, "output") * steps["n_gen_tokens"].to_numpy().astype(np.float64)
        return decode, self._prices(roles, "input") * uncached + self._prices(roles, "cached_input") * cached

    def scorer_costs(self, scorer, n_tokens_processed, step_roles):
        model = self.scorers.get(scorer, {}).get("model")
        if scorer in self.prices or model is None:
            keys = np.full(len(n_tokens_processed), scorer, dtype=object)
        elif model == "self":
            keys = step_roles
        else:
            keys = np.full(len(n_tokens_processed), model if model in self.prices else scorer, dtype=object)
        # A scorer reads its whole context as input; the judge's single output token is priced as input too.
        return self._prices(keys, "input") * n_tokens_processed.astype(np.float64)


def make_cost_model(name: str, manifest: Mapping, prices: dict[str, Price] | None = None) -> CostModel:
    """Build cost model ``name`` from the trace manifest (parameter counts) and optional prices.

    Without prices the api model prices every model role and scorer at GPT-4.1-mini's rates; once any
    price is given, every role or scorer the replay uses needs its own (a scorer may use its model's).
    """
    manifest = Manifest(manifest)
    scorers = manifest.scorers
    if prices and name != "api":
        raise TraceError(f"--price applies to --cost api, not {name}")
    unknown = sorted(set(prices or {}) - set(manifest.roles) - set(scorers))
    if unknown:
        raise TraceError(
            f"--price names {', '.join(unknown)}, which is neither a model role ({', '.join(manifest.roles)}) nor "
            f"a scorer ({', '.join(scorers) or 'none'}) of this trace"
        )
    if name in ("flops", "flops+prefill"):
        return FlopsCost(manifest.n_params, scorers, include_prefill=name == "flops+prefill")
    if name == "api":
        return ApiCost(prices or {}, scorers, default=None if prices else GPT_41_MINI)
    raise TraceError(f"unknown cost model {name!r}; choose one of {', '.join(COST_MODELS)}")
