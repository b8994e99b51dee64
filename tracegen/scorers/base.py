"""What every scorer shares: the step it scores (with its path's context) and the registry ``SCORERS``.

A scorer is a class with a ``name``; adding one is one new file of this package with ``@SCORERS.register``
above its class (or an entry point of group ``trace.scorers``, or ``--scorer FILE.py:Class``; see
replay.registry). It picks the steps it scores (``wants``), describes itself for trace.json
(``manifest_entry``: its model, prompt and, for cost models, whose parameters a call costs) and scores a
batch of ``Item``s, returning one ``Score`` each. A world's variant of a scorer (the toy judge) is a class
of its own that stores the same signal and names its ``world``; ``make_scorer`` picks it for that world's
traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import polars as pl

from replay.registry import Registry, check_subclass
from tracegen.backends import default_backend, load_backend, scorer_engine_kwargs
from tracegen.engine_logs import route_engine_logs
from tracegen.models import ModelRef, load_tokenizer, model_entry, named_model, trace_model
from tracestore.errors import TraceError
from tracestore.schema import Manifest


@dataclass(frozen=True)
class Item:
    """One step to score, with everything on its path."""

    step_id: str
    problem_id: str
    question: str
    reference: str
    role: str  # the model role that wrote the step
    path: str
    step_texts: list[str]  # every step of the path, this one last
    prefix_ids: list[int]  # prompt + earlier steps' token ids (the writer's context)
    step_ids: list[int]  # this step's token ids
    is_final: bool
    answer: str | None


@dataclass(frozen=True)
class Score:
    value: float
    n_tokens_processed: int
    detail: list[float] | None = None


class Scorer:
    """Base class of all scorers.

    ``name`` registers the class; ``signal`` is the name its values are stored under (scores.scorer,
    trace.json ``scorers.SIGNAL``) and the routers read: a variant such as ``toy-judge`` stores the
    ``judge`` signal. The constructor only stores its arguments; ``check`` and ``manifest_entry``
    resolve the scorer's model, ``start`` loads it.
    """

    name: ClassVar[str]
    signal: ClassVar[str]
    generated_tokens: ClassVar[int]  # tokens one call generates (what the flops and kaplan cost models charge)
    default_batch: ClassVar[int] = 256
    # The world (dataset) whose traces get this scorer when they ask for its signal: the toy models cannot follow
    # the judge's or P(True)'s instructions, and the toy world has an exact step verifier.
    world: ClassVar[str] = ""
    world_models: ClassVar[dict[str, str]] = {}  # the scorer's default model on a world's traces
    presets: ClassVar[dict[str, object]] = {}  # the named prompts it can ask with (`--preset`), its default first

    def __init__(
        self,
        manifest: Manifest,
        *,
        model: str | None = None,
        backend: str | None = None,
        preset: str | None = None,
    ):
        self.manifest = manifest
        self.model = model
        self.backend = backend
        self.preset = preset
        self.shared_engines: dict = {}  # {role: backend} already running for the trace's models (lent by gen)
        self._started = False

    @property
    def preset_name(self) -> str:
        """The prompt preset asked with: ``preset``, else the scorer's default (its first)."""
        return self.preset or next(iter(self.presets))

    @property
    def prompt(self):
        """The preset asked with (see tracegen.prompts)."""
        return self.presets[self.preset_name]

    def check(self) -> None:
        """TraceError if this scorer cannot run as configured (before anything is loaded or written)."""

    def check_preset(self) -> None:
        """TraceError for a ``preset`` this scorer does not have."""
        if self.preset is None or self.preset in self.presets:
            return
        if not self.presets:
            raise TraceError(f"scorer {self.name} asks no prompt, so it takes no --preset (got {self.preset!r})")
        raise TraceError(
            f"scorer {self.name} has no prompt preset {self.preset!r}; presets: {', '.join(self.presets)} "
            f"(default {next(iter(self.presets))})"
        )

    def wants(self) -> pl.Expr:
        """Which steps rows this scorer scores."""
        raise NotImplementedError

    def manifest_entry(self) -> dict:
        """trace.json ``scorers.SIGNAL``: this scorer's name, the tokens a call generates, and ``describe``."""
        return {"scorer": self.name, "generated_tokens": self.generated_tokens, **self.describe()}

    def describe(self) -> dict:
        """Its model (a role, "self", "exact", a name; with n_params, n_layer, d_model if its own) and prompt."""
        raise NotImplementedError

    def start(self) -> None:
        """Load the models (when there is something to score; once)."""
        if not self._started:
            self._load()
            self._started = True

    def _load(self) -> None:
        """Load what scoring needs."""

    def score(self, items: list[Item]) -> list[Score]:
        raise NotImplementedError

    def close(self) -> None:
        """Release engines."""


def _scorer_class(obj, origin: str) -> type[Scorer]:
    return check_subclass(
        obj,
        origin,
        "scorer",
        Scorer,
        ("wants", "describe", "score"),
        {"name": str, "signal": str, "generated_tokens": int},
    )


def _looks_like_scorer(value) -> bool:
    return isinstance(value, type) and issubclass(value, Scorer) and "name" in vars(value)


SCORERS = Registry("scorer", "trace.scorers", _scorer_class, _looks_like_scorer, discover="tracegen.scorers")


def world_variants() -> dict[str, dict[str, str]]:
    """{world: {signal: the built-in scorer its traces run for it}}."""
    variants: dict[str, dict[str, str]] = {}
    for name, cls in SCORERS.builtins().items():
        if cls.world:
            variants.setdefault(cls.world, {})[cls.signal] = name
    return variants


def preset_choices() -> dict[str, tuple[str, ...]]:
    """{built-in scorer: its prompt presets, the default first}, for the scorers that ask a prompt."""
    return {name: tuple(cls.presets) for name, cls in sorted(SCORERS.builtins().items()) if cls.presets}


def make_scorer(
    name: str,
    manifest: Manifest,
    *,
    model: str | None = None,
    backend: str | None = None,
    preset: str | None = None,
) -> Scorer:
    """The scorer ``name`` (see SCORERS, or a signal that the trace's world serves with a variant), asking with
    prompt preset ``preset`` (default: its first); ``NAME@ROLE`` asks a per-role scorer (the judge) of the
    trace's ``ROLE`` model instead of its largest."""
    name, _, role = name.partition("@")
    world = manifest.dataset_name
    cls = SCORERS.get(world_variants().get(world, {}).get(name, name))
    scorer = cls(manifest, model=model or cls.world_models.get(world), backend=backend, preset=preset)
    scorer.check_preset()
    if role:
        if not getattr(cls, "per_role", False):
            raise TraceError(f"scorer {name} cannot be asked of one model role ({name}@{role}); only judge can")
        scorer.ask_role(role, own_model=model is not None)
    return scorer


class LanguageModelScorer(Scorer):
    """A scorer that asks language models (one engine per model role it needs) for probabilities."""

    def _load(self) -> None:
        self._engines: dict[str, object] = {}
        self._tokenizers: dict[str, object] = {}

    def engine(self, role: str, model):
        """The backend (scoring only) and tokenizer of ``model`` (the trace's ``role`` model, or a scorer's own
        model under its scorer's name), started on first use unless gen lent one for the role."""
        if role not in self._tokenizers:
            self._tokenizers[role] = load_tokenizer(model)
            if role not in self.shared_engines:
                if getattr(self, "trace_root", None) is not None:  # an engine's log lines to the trace's logs/
                    route_engine_logs(self.trace_root, self.backend)
                kind = self.backend or default_backend()
                self._engines[role] = load_backend(kind, model.path, **scorer_engine_kwargs(kind))
        return self.shared_engines.get(role) or self._engines[role], self._tokenizers[role]

    def close(self) -> None:
        for engine in getattr(self, "_engines", {}).values():
            engine.close()
        self._engines = {}
        self._started = False


class LargeModelScorer(LanguageModelScorer):
    """A scorer asked of the trace's largest model, unless ``--model`` names one of its own. A ``per_role``
    scorer can be asked of another of the trace's models (``NAME@ROLE``, see ``ask_role``)."""

    per_role: ClassVar[bool] = False
    role: str | None = None  # the trace's model asked (None: the largest)

    def ask_role(self, role: str, own_model: bool = False) -> None:
        """Ask the trace's ``role`` model instead of the largest: its values are stored as ``SIGNAL@ROLE``
        (as ``SIGNAL`` when ``role`` is the largest model, the default)."""
        roles = self.manifest.roles
        if own_model:
            raise TraceError(f"{self.signal}@{role} asks the trace's {role} model; do not also give --model")
        if role not in roles[1:]:
            raise TraceError(
                f"{self.signal}@{role}: {role!r} is not one of the trace's models that judge a smaller one "
                f"({', '.join(roles[1:])})"
            )
        self.role = role
        if role != roles[-1]:
            self.signal = f"{type(self).signal}@{role}"

    @property
    def largest_role(self) -> str:
        """The trace's model this scorer asks: the largest, or the role ``ask_role`` chose."""
        return self.role or self.manifest.roles[-1]

    @cached_property
    def checkpoint(self) -> ModelRef:
        return named_model(self.model, self.signal) if self.model else trace_model(self.manifest, self.largest_role)

    @property
    def engine_role(self) -> str:
        """Under which name its engine runs: the role asked (gen may lend that engine), or the scorer's own."""
        return self.largest_role if self.model is None else self.signal

    def model_fields(self) -> dict:
        """trace.json's record of whose model a call runs (and its size, for an own model)."""
        if self.model is None:
            return {"model": self.largest_role}
        return {**model_entry(self.checkpoint), "model": self.signal}
