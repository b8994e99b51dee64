"""Cost models: what one cached step, or one scorer call, costs a router, in the seeds' conventions.

- ``flops`` (the CMDP seed's §5 "Average cost"): 2·N FLOPs per *generated* token, for models and
  scorers alike; prefill is not counted. A PRM generates nothing; SpecReason's judge writes one token.
- ``flops+prefill``: also 2·N per prompt token processed (a step's ``n_new_prefill_tokens``, under
  prefix caching; a scorer call's whole context).
- ``kaplan`` (the cascade seed's eq. 2): per generated token 2·N + 2·n_layer·n_ctx·d_model, with
  n_ctx the tokens before it and N Kaplan's non-embedding parameter count (trace.json
  ``n_params_non_embedding``).
- ``api``: US cents, at explicit per-role (or per-scorer) prices in USD per 1M input / cached input /
  output tokens. Cached input is the prefix-cache reuse ``n_prompt_tokens - n_new_prefill_tokens``.

Each model also states its A/C (accuracy per cost) as the seed table in its units prints it:
``a_over_c_unit`` in words and ``a_over_c_scale``, with A/C = a_over_c_scale x accuracy (0-1) / mean cost
per query. FLOPs (the CMDP seed's Table 1): accuracy in % per TFLOP (85.2 / 0.973 = 87.56); API (its
Table 2): accuracy as a fraction per US cent (0.952 / 0.0293 = 32.4).

Every model turns the steps table into two arrays (decode and prefill cost per step row) and prices
scorer calls from their ``n_tokens_processed`` and the tokens a call generates (trace.json
``scorers.NAME.generated_tokens``); the replay engine only adds them up. A parameter count, layer
count, width or price a model needs and cannot find is a TraceError naming it, never a zero.

A cost model is a ``CostModel`` subclass (with ``name``, ``unit`` and ``convention``) constructed as
``cls(manifest, prices)``, registered in ``COSTS`` (replay.registry): the built-ins here with
``@COSTS.register``, others through entry points of group ``trace.costs`` or as ``FILE.py:Class``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from replay.registry import Registry, check_subclass
from tracestore.errors import TraceError
from tracestore.schema import Manifest

NON_EMBEDDING = "n_params_non_embedding"  # trace.json: a model's parameters without its vocabulary embeddings
FLOPS_UNIT = 1e12  # FLOPs costs are reported in TFLOPs per query
CENTS_PER_USD = 100


@dataclass(frozen=True)
class Price:
    """USD per one million tokens."""

    input: float
    cached_input: float
    output: float


FREE = Price(0.0, 0.0, 0.0)
# Published list prices (USD per 1M input / cached input / output tokens) of the seeds' API models.
KNOWN_PRICES = {
    "gpt-4.1": Price(2.00, 0.50, 8.00),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4o": Price(2.50, 1.25, 10.00),
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
}
PRICE_FORMS = "ROLE=MODEL (" + ", ".join(KNOWN_PRICES) + "), ROLE=input/cached/output in USD per 1M tokens, or ROLE=0"


def parse_price(text: str) -> tuple[str, Price]:
    """Parse ``ROLE=PRICE`` where PRICE is a known model name (``large=gpt-4.1-mini``), three numbers in USD
    per 1M tokens (``large=2/0.5/8``: input, cached input, output) or ``0`` (a free, e.g. open, model)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise TraceError(f"--price must look like {PRICE_FORMS}; got {text!r}")
    if value in KNOWN_PRICES:
        return key, KNOWN_PRICES[value]
    parts = value.split("/")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1 and numbers[0] == 0:
        return key, FREE
    if len(numbers) != 3:
        raise TraceError(f"--price must look like {PRICE_FORMS}; got {text!r}")
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        raise TraceError(f"--price {text}: prices must be finite and not negative")
    return key, Price(*numbers)


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
    """Prices steps and scorer calls; ``unit`` names what one cost number means, ``convention`` how it is
    counted (every result file and report states it).

    A scorer's model comes from trace.json ``scorers.NAME``: ``{"model": ROLE | "self" | NAME,
    "n_params": N, ...}``, where ``"self"`` means the model that wrote the scored step (P(True) asks a
    model about its own answer).
    """

    name: str
    unit: str
    convention: str
    a_over_c_scale: float = 1.0  # A/C = a_over_c_scale x accuracy (0-1) / mean cost per query

    @property
    def a_over_c_unit(self) -> str:
        """What one A/C number means, in words (a subclass names its seed table's unit)."""
        return f"accuracy (0-1) per {self.unit}"

    def step_costs(self, steps: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(decode, prefill) cost of each step row."""
        raise NotImplementedError

    def scorer_costs(self, scorer: str, n_tokens_processed: np.ndarray, step_roles: np.ndarray) -> np.ndarray:
        """Cost of each call of ``scorer``: the tokens it processed, the role of the step it scored."""
        raise NotImplementedError


def _cost_class(obj, origin: str) -> type[CostModel]:
    return check_subclass(
        obj, origin, "cost model", CostModel, ("step_costs",), {"name": str, "unit": str, "convention": str}
    )


def _looks_like_cost(value) -> bool:
    return isinstance(value, type) and issubclass(value, CostModel) and value is not CostModel


COSTS = Registry("cost", "trace.costs", _cost_class, _looks_like_cost, noun="cost model")


def _per_key(keys: np.ndarray | pl.Series, values: dict, missing: str) -> np.ndarray:
    """``values[key]`` for each entry of ``keys``; TraceError naming the keys without a value."""
    keys = keys if isinstance(keys, pl.Series) else pl.Series(keys, dtype=pl.String)
    lacking = sorted(set(keys.unique().to_list()) - set(values))
    if lacking:
        raise TraceError(missing.format(keys=", ".join(lacking)))
    return _lookup(keys, values)


def _lookup(keys: pl.Series, values: dict) -> np.ndarray:
    """``values[key]`` for each key (all present), as float64: a vectorised lookup, not a Python loop."""
    return keys.replace_strict({key: float(value) for key, value in values.items()}, return_dtype=pl.Float64).to_numpy()


def _column(steps: pl.DataFrame, name: str) -> np.ndarray:
    return steps[name].to_numpy().astype(np.float64)


@dataclass(frozen=True)
class _Scorer:
    """What pricing a scorer's calls needs from its trace.json entry."""

    name: str
    info: dict

    @property
    def generated(self) -> int:
        tokens = self.info.get("generated_tokens")
        if not isinstance(tokens, int) or tokens < 0:
            raise TraceError(
                f"trace.json scorers.{self.name} has no generated_tokens (tokens a call writes), which the cost "
                f"models need; score the trace again with this version of trace score"
            )
        return tokens

    def keys(self, n_calls: int, step_roles: np.ndarray) -> np.ndarray:
        """For each call, whose model it runs: the scorer's own (keyed by the scorer's name), the scored
        step's role ("self"), or a role of the trace."""
        model = self.info.get("model")
        if self.info.get("n_params") or model is None:
            return np.full(n_calls, self.name, dtype=object)
        if model == "self":
            return step_roles
        return np.full(n_calls, model, dtype=object)


@COSTS.register
class FlopsCost(CostModel):
    """2·N FLOPs per generated token; in TFLOPs."""

    name = "flops"
    unit = "TFLOPs"
    convention = "2·N FLOPs per generated token, models and scorers alike; prefill not counted (the seeds')"
    a_over_c_unit = "accuracy % per TFLOP"  # the CMDP seed's Table 1
    a_over_c_scale = 100.0
    include_prefill = False

    def __init__(self, manifest: Manifest, prices: dict[str, Price] | None = None):
        self.n_params = manifest.n_params
        self.scorers = manifest.scorers

    def _per_token(self, keys: np.ndarray | pl.Series, sizes: dict) -> np.ndarray:
        n = _per_key(keys, sizes, f"cost model {self.name} needs n_params of {{keys}} in trace.json")
        return 2 * n / FLOPS_UNIT

    def step_costs(self, steps):
        per_token = self._per_token(steps["model"], self.n_params)
        decode = per_token * _column(steps, "n_gen_tokens")
        if not self.include_prefill:
            return decode, np.zeros(len(steps))
        return decode, per_token * _column(steps, "n_new_prefill_tokens")

    def scorer_costs(self, scorer, n_tokens_processed, step_roles):
        described = _Scorer(scorer, self.scorers.get(scorer, {}))
        tokens = n_tokens_processed.astype(np.float64)
        if not self.include_prefill:
            tokens = np.full(len(tokens), float(described.generated))
            if described.generated == 0:
                return tokens  # nothing generated: no parameter count needed
        sizes = dict(self.n_params)
        if described.info.get("n_params"):
            sizes[scorer] = float(described.info["n_params"])
        keys = described.keys(len(tokens), step_roles)
        if not set(keys.tolist()) <= set(sizes):
            raise TraceError(
                f"cost model {self.name} needs the parameter count of scorer {scorer!r}: set trace.json "
                f'scorers.{scorer}.n_params, or its model to a role or "self"'
            )
        return self._per_token(keys, sizes) * tokens


@COSTS.register
class FlopsPrefillCost(FlopsCost):
    """2·N FLOPs per generated and per prefilled token; in TFLOPs."""

    name = "flops+prefill"
    convention = (
        "2·N FLOPs per generated and per prefilled token (new prefix tokens of a step; a scorer's whole context)"
    )
    include_prefill = True


@COSTS.register
class KaplanCost(CostModel):
    """The cascade seed's eq. (2): per generated token 2·N + 2·n_layer·n_ctx·d_model, N the non-embedding
    parameters (Kaplan et al.'s N); in TFLOPs."""

    name = "kaplan"
    unit = "TFLOPs"
    convention = (
        "per generated token 2·N + 2·n_layer·n_ctx·d_model FLOPs, N = non-embedding parameters, n_ctx = tokens "
        "before it (Kaplan et al.)"
    )
    a_over_c_unit = FlopsCost.a_over_c_unit
    a_over_c_scale = FlopsCost.a_over_c_scale

    def __init__(self, manifest: Manifest, prices: dict[str, Price] | None = None):
        self.shapes = {role: self._shape(f"models.{role}", model) for role, model in manifest.models.items()}
        self.scorers = manifest.scorers

    @staticmethod
    def _shape(where: str, info: dict) -> tuple[float, float, float]:
        for field in (NON_EMBEDDING, "n_layer", "d_model"):
            if not info.get(field):
                why = " (Kaplan's N, which leaves out the embeddings)" if field == NON_EMBEDDING else ""
                raise TraceError(f"cost model kaplan needs trace.json {where}.{field}{why}")
        return float(info[NON_EMBEDDING]), float(info["n_layer"]), float(info["d_model"])

    @staticmethod
    def _generation(shape: np.ndarray, context: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """FLOPs of generating ``generated`` tokens after ``context`` tokens: sum over t < g of
        2N + 2·n_layer·(context + t)·d_model."""
        n, n_layer, d_model = shape.T
        positions = generated * context + generated * (generated - 1) / 2
        return (2 * n * generated + 2 * n_layer * d_model * positions) / FLOPS_UNIT

    def _shapes_of(self, keys: np.ndarray | pl.Series, shapes: dict) -> np.ndarray:
        keys = keys if isinstance(keys, pl.Series) else pl.Series(keys, dtype=pl.String)
        lacking = sorted(set(keys.unique().to_list()) - set(shapes))
        if lacking:
            raise TraceError(f"cost model kaplan needs {NON_EMBEDDING}, n_layer and d_model of {', '.join(lacking)}")
        return np.column_stack([_lookup(keys, {key: shape[i] for key, shape in shapes.items()}) for i in range(3)])

    def step_costs(self, steps):
        shape = self._shapes_of(steps["model"], self.shapes)
        decode = self._generation(shape, _column(steps, "n_prompt_tokens"), _column(steps, "n_gen_tokens"))
        return decode, np.zeros(len(steps))

    def scorer_costs(self, scorer, n_tokens_processed, step_roles):
        described = _Scorer(scorer, self.scorers.get(scorer, {}))
        generated = np.full(len(n_tokens_processed), float(described.generated))
        if described.generated == 0:
            return generated
        shapes = dict(self.shapes)
        if described.info.get("n_params") or described.info.get(NON_EMBEDDING):
            shapes[scorer] = self._shape(f"scorers.{scorer}", described.info)
        shape = self._shapes_of(described.keys(len(generated), step_roles), shapes)
        return self._generation(shape, n_tokens_processed.astype(np.float64) - generated, generated)


@COSTS.register
class ApiCost(CostModel):
    """US cents at per-role prices: uncached input, cached input (prefix reuse) and output tokens.

    ``prices`` is keyed by model role or scorer name; a scorer without its own price is billed at its
    model's (a role, or the scored step's role for "self").
    """

    name = "api"
    unit = "US cents"
    a_over_c_unit = "accuracy (0-1) per US cent"  # the CMDP seed's Table 2
    a_over_c_scale = 1.0
    convention = (
        "US cents at the given prices per 1M tokens; cached input = n_prompt_tokens - n_new_prefill_tokens "
        "(the trace's prefix-cache reuse); a scorer call's context is uncached input"
    )

    def __init__(self, manifest: Manifest, prices: dict[str, Price] | None = None):
        if not prices:
            raise TraceError(
                f"cost model api needs prices: --price ROLE=... for each model role ({', '.join(manifest.roles)}) "
                f"as {PRICE_FORMS}"
            )
        unknown = sorted(set(prices) - set(manifest.roles) - set(manifest.scorers))
        if unknown:
            raise TraceError(
                f"--price {unknown[0]}: not a model role ({', '.join(manifest.roles)}) or scorer "
                f"({', '.join(manifest.scorers) or 'none'}) of this trace"
            )
        self.prices = prices
        self.scorers = manifest.scorers

    def _rates(self, keys: np.ndarray | pl.Series, field: str) -> np.ndarray:
        """US cents per token of ``field`` for each key (a role or scorer name)."""
        rates = {key: getattr(price, field) * CENTS_PER_USD / 1e6 for key, price in self.prices.items()}
        missing = "cost model api has no price for {keys}: pass --price NAME=... for each (" + PRICE_FORMS + ")"
        return _per_key(keys, rates, missing)

    def step_costs(self, steps):
        roles = steps["model"]
        prompt = _column(steps, "n_prompt_tokens")
        cached = prompt - _column(steps, "n_new_prefill_tokens")
        decode = self._rates(roles, "output") * _column(steps, "n_gen_tokens")
        return decode, self._rates(roles, "input") * (prompt - cached) + self._rates(roles, "cached_input") * cached

    def scorer_costs(self, scorer, n_tokens_processed, step_roles):
        described = _Scorer(scorer, self.scorers.get(scorer, {}))
        n = len(n_tokens_processed)
        keys = np.full(n, scorer, dtype=object) if scorer in self.prices else described.keys(n, step_roles)
        generated = float(described.generated)
        context = n_tokens_processed.astype(np.float64) - generated
        return self._rates(keys, "input") * context + self._rates(keys, "output") * generated


COSTS.register_lazy("latency", "replay.latency:LatencyCost")


def make_cost_model(name: str, manifest: Mapping, prices: dict[str, Price] | None = None, profile=None) -> CostModel:
    """Build cost model ``name`` (see COSTS) from the trace manifest (model sizes, scorers) and, for ``api``,
    prices; for one that reads a latency profile (``latency``), ``profile`` (a path; None: none).

    ``api`` needs a price for every model role in the steps it prices and every scorer it bills (a
    scorer may use its model's); an open model billed nothing is priced ``0``.
    """
    cls = COSTS.get(name)
    if prices and name != "api":
        raise TraceError(f"--price applies to --cost api, not {name}")
    if getattr(cls, "uses_profile", False):
        return cls(Manifest(manifest), prices, profile)
    return cls(Manifest(manifest), prices)
