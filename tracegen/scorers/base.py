"""What every scorer shares: the step it scores (with its path's context) and a registry by name.

A scorer is a class with a ``name``; defining it registers it (adding a scorer is one new file).
It picks the steps it scores (``wants``), describes itself for trace.json (``manifest_entry``:
its model, prompt and, for cost models, whose parameters a call costs) and scores a batch of
``Item``s, returning one ``Score`` each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import polars as pl

from replay.errors import TraceError

SCORERS: dict[str, type[Scorer]] = {}


@dataclass(frozen=True)
class Item:
    """One step to score, with everything on its path."""

    step_id: str
    problem_id: str
    question: str
    reference: str
    role: str                # the model role that wrote the step
    path: str
    step_texts: list[str]    # every step of the path, this one last
    prefix_ids: list[int]    # prompt + earlier steps' token ids (the writer's context)
    step_ids: list[int]      # this step's token ids
    is_final: bool
    answer: str | None


@dataclass(frozen=True)
class Score:
    value: float
    n_tokens_processed: int
    detail: list[float] | None = None


class Scorer:
    """Base class of all scorers. ``toy`` selects the toy world's variant (see each scorer's docstring)."""

    name: ClassVar[str]
    default_batch: ClassVar[int] = 256

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SCORERS[cls.name] = cls

    def __init__(self, manifest: dict, *, model: str | None, backend: str | None, toy: bool):
        self.manifest = manifest
        self.model = model
        self.backend = backend
        self.toy = toy
        self.shared_engines: dict = {}  # {role: backend} already running for the trace's models (lent by gen)
        self._started = False

    def wants(self) -> pl.Expr:
        """Which steps rows this scorer scores."""
        raise NotImplementedError

    def manifest_entry(self) -> dict:
        """trace.json ``scorers.NAME``: model (a role, "self", a name), prompt/variant, n_params if its own."""
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


def make_scorer(name: str, manifest: dict, *, model: str | None = None, backend: str | None = None) -> Scorer:
    if name not in SCORERS:
        raise TraceError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
    toy = (manifest.get("dataset") or {}).get("name") == "toy"
    return SCORERS[name](manifest, model=model, backend=backend, toy=toy)


def trace_model(manifest: dict, role: str):
    """The checkpoint of one of the trace's model roles: where gen loaded it, else by its name."""
    from pathlib import Path

    from tracegen.models import ModelRef, fetch_model, resolve_model

    entry = next((m for m in manifest.get("models", []) if m.get("role") == role), None)
    if entry is None:
        raise TraceError(f"the trace has no {role} model")
    path = (manifest.get("model_paths") or {}).get(role)
    if path and Path(path).is_dir():
        return ModelRef(role, entry["name"], path)
    return fetch_model(resolve_model(entry["name"], role))


def named_model(name: str, role: str):
    from tracegen.models import fetch_model, resolve_model

    return fetch_model(resolve_model(name, role))


def model_entry(model) -> dict:
    """Manifest fields of a scorer's own model: its name, revision and parameter count (for cost models)."""
    from pathlib import Path

    from tracegen.models import canonical_name, count_parameters, revision

    return {"name": canonical_name(model), "revision": revision(Path(model.path)),
            "n_params": count_parameters(Path(model.path))}


class LanguageModelScorer(Scorer):
    """A scorer that asks language models (one engine per model role it needs) for probabilities."""

    def _load(self) -> None:
        self._engines: dict[str, object] = {}
        self._tokenizers: dict[str, object] = {}

    def engine(self, role: str, model):
        """The backend (scoring only) and tokenizer of ``model`` (the trace's ``role`` model, or a scorer's own
        model under its scorer's name), started on first use unless gen lent one for the role."""
        if role not in self._tokenizers:
            from tracegen.backends import load_backend
            from tracegen.gen import default_backend
            from tracegen.models import load_tokenizer

            self._tokenizers[role] = load_tokenizer(model)
            if role not in self.shared_engines:
                kind = self.backend or default_backend()
                self._engines[role] = load_backend(kind, model.path, **({"generator": False} if kind == "vllm" else {}))
        return self.shared_engines.get(role) or self._engines[role], self._tokenizers[role]

    def close(self) -> None:
        for engine in getattr(self, "_engines", {}).values():
            engine.close()
        self._engines = {}
        self._started = False
