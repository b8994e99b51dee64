"""What every scorer shares: the step it scores (with its path's context) and a registry by name.

A scorer is a class with a ``name``; defining it registers it (adding a scorer is one new file).
It picks the steps it scores (``wants``), describes itself for trace.json (``manifest_entry``:
its model, prompt and, for cost models, whose parameters a call costs) and scores a batch of
``Item``s, returning one ``Score`` each. A world's variant of a scorer (the toy judge) is a class
of its own that stores the same signal; ``make_scorer`` picks it for that world's traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import polars as pl

from replay.entry_points import SCORER_GROUP, Registered, entry_point_rows, entry_points, first_line, load_entry_point
from tracegen.backends import default_backend, load_backend, scorer_engine_kwargs
from tracegen.models import ModelRef, load_tokenizer, model_entry, named_model, trace_model
from tracestore.errors import TraceError
from tracestore.schema import Manifest

SCORERS: dict[str, type[Scorer]] = {}
# What a trace of a world asks for by signal name: the toy models cannot follow the judge's or P(True)'s
# instructions, and the toy world has an exact step verifier and a PRM of its own.
WORLD_SCORERS = {"toy": {"judge": "toy-judge", "ptrue": "toy-ptrue", "verifier": "exact-verifier"}}
WORLD_SCORER_MODELS = {"toy": {"prm": "toy-prm"}}


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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SCORERS[cls.name] = cls

    def __init__(self, manifest: Manifest, *, model: str | None = None, backend: str | None = None):
        self.manifest = manifest
        self.model = model
        self.backend = backend
        self.shared_engines: dict = {}  # {role: backend} already running for the trace's models (lent by gen)
        self._started = False

    def check(self) -> None:
        """TraceError if this scorer cannot run as configured (before anything is loaded or written)."""

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


def make_scorer(name: str, manifest: Manifest, *, model: str | None = None, backend: str | None = None) -> Scorer:
    """The scorer ``name`` (a registered name, or a signal that the trace's world serves with a variant);
    ``NAME@ROLE`` asks a per-role scorer (the judge) of the trace's ``ROLE`` model instead of its largest."""
    name, _, role = name.partition("@")
    variants = WORLD_SCORERS.get(manifest.dataset_name, {})
    chosen = variants.get(name, name)
    if chosen in SCORERS:
        cls = SCORERS[chosen]
    elif chosen in entry_points(SCORER_GROUP):
        cls = plugin_scorer_class(entry_points(SCORER_GROUP)[chosen])
    else:
        known = sorted({*SCORERS, *entry_points(SCORER_GROUP)})
        raise TraceError(f"unknown scorer {name!r}; choose one of {', '.join(known)}")
    scorer = cls(manifest, model=model or WORLD_SCORER_MODELS.get(manifest.dataset_name, {}).get(name), backend=backend)
    if role:
        if not getattr(cls, "per_role", False):
            raise TraceError(f"scorer {name} cannot be asked of one model role ({name}@{role}); only judge can")
        scorer.ask_role(role, own_model=model is not None)
    return scorer


def plugin_scorer_class(point, group: str = SCORER_GROUP) -> type[Scorer]:
    """The Scorer subclass entry point ``point`` (group trace.scorers) names; TraceError saying what is wrong."""
    cls = load_entry_point(point, group)
    where = f"entry point {point.name} ({point.value})"
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TraceError(f"{where} is not a scorer: it must name a subclass of tracegen.scorers.base.Scorer")
    missing = [hook for hook in ("wants", "describe", "score") if getattr(cls, hook) is getattr(Scorer, hook)]
    missing += [attr for attr in ("name", "signal") if not isinstance(getattr(cls, attr, None), str)]
    if not isinstance(getattr(cls, "generated_tokens", None), int):
        missing.append("generated_tokens")
    if missing:
        raise TraceError(f"{where}: scorer class {cls.__name__} does not define {', '.join(missing)}")
    return cls


def registered_scorers() -> list[Registered]:
    """Built-in scorers, then those installed packages declare (entry points of group trace.scorers)."""
    rows = [
        Registered("scorer", name, f"built-in {cls.__module__.rsplit('.', 1)[-1]}.py", first_line(cls))
        for name, cls in sorted(SCORERS.items())
        if cls.__module__.startswith("tracegen.")
    ]
    return rows + entry_point_rows("scorer", SCORER_GROUP, {row.name for row in rows}, plugin_scorer_class)


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
