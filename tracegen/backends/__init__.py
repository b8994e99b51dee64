"""Generation backends for `trace gen`, `score` and `audit`: vLLM (default where installed), transformers, and a
fake one for tests of everything around the engines (seeded steps of the toy world, no model; ``fake-stream`` also
streams, as vLLM does), and the engine settings each model role gets.

A backend is a class constructed as ``cls(model_path, **engine_kwargs)`` with the ``Backend`` methods
(tracegen.backends.base), registered in ``BACKENDS`` (replay.registry): the built-ins lazily by
``module:Class``, so that an engine is imported only when it is loaded (phase two never pulls one in), others
through entry points of group ``trace.backends`` or as ``--backend FILE.py:Class``.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

from replay.registry import Registry
from tracegen.backends.base import Backend, GeneratedStep, StepRequest, StepSampling
from tracestore.errors import TraceError
from tracestore.schema import LARGE, SMALL, TWO_MODEL_ROLES

BACKEND_METHODS = ("generate_steps", "engine_info", "close")


def _backend_class(obj, origin: str) -> type:
    missing = [method for method in BACKEND_METHODS if not callable(getattr(obj, method, None))]
    if not isinstance(obj, type) or missing:
        raise TraceError(
            f"{origin} is not a backend: it must name a class with the methods of tracegen.backends.base.Backend "
            f"(lacking: {', '.join(missing) or 'it is not a class'})"
        )
    return obj


def _looks_like_backend(value) -> bool:
    return isinstance(value, type) and hasattr(value, "generate_steps")


BACKENDS = Registry("backend", "trace.backends", _backend_class, _looks_like_backend)
BACKENDS.register_lazy(
    "vllm",
    "tracegen.backends.vllm_engine:VLLMBackend",
    install="install trace-routing[cpu] or [gpu], or use --backend hf",
)
BACKENDS.register_lazy("hf", "tracegen.backends.hf:HFBackend", install="install trace-routing[hf]")
BACKENDS.register_lazy("fake", "tracegen.backends.fake:FakeBackend", install="install trace-routing[hf]")
BACKENDS.register_lazy(
    "fake-stream", "tracegen.backends.fake:StreamingFakeBackend", install="install trace-routing[hf]"
)

__all__ = [
    "BACKENDS",
    "Backend",
    "GeneratedStep",
    "StepRequest",
    "StepSampling",
    "check_backend",
    "default_backend",
    "engine_kwargs_for",
    "load_backend",
    "scorer_engine_kwargs",
]

# On one GPU the four vLLM engines (a generator and an exact scorer per model) split the memory:
# the large model gets 70% of it, and each model's scorer 40% of its model's share.
VLLM_MEMORY_BUDGET = 0.88
VLLM_MEMORY_SHARES = {SMALL: 0.3, LARGE: 0.7}
VLLM_SCORER_SHARE = 0.4


def check_backend(kind: str | None) -> None:
    """TraceError unless ``kind`` is None (the default backend) or a known backend (nothing is imported)."""
    if kind is not None:
        BACKENDS.check_name(kind)


def default_backend() -> str:
    """vllm where it is installed, else hf. Found without importing it (an import takes seconds, and a `trace gen`
    with nothing to do should end before that); a broken install fails where the engine starts, naming vLLM."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def memory_share(role: str, roles: tuple[str, ...] = TWO_MODEL_ROLES) -> float:
    """The share of GPU memory the model ``role`` gets: 30/70 for a small/large pair; with K models, the
    i-th smallest gets (i + 1) / (1 + 2 + ... + K)."""
    if role in VLLM_MEMORY_SHARES and tuple(roles) == TWO_MODEL_ROLES:
        return VLLM_MEMORY_SHARES[role]
    rank = list(roles).index(role) + 1
    return rank / (len(roles) * (len(roles) + 1) / 2)


def engine_kwargs_for(
    kind: str,
    role: str,
    given: dict,
    roles: tuple[str, ...] = TWO_MODEL_ROLES,
    *,
    budget: float = VLLM_MEMORY_BUDGET,
    role_share: float | None = None,
) -> dict:
    """Engine arguments for one model role of ``roles``: ``given``, and on vLLM the GPU memory shares of its two
    engines: ``role_share`` of each GPU (default: its ``memory_share`` of ``budget``), split between its generator
    and its exact-logprob scorer."""
    if kind != "vllm":
        return dict(given)
    share = role_share if role_share is not None else budget * memory_share(role, roles)
    defaults = {
        "gpu_memory_utilization": round(share * (1 - VLLM_SCORER_SHARE), 3),
        "scorer_memory_utilization": round(share * VLLM_SCORER_SHARE, 3),
    }
    return {**defaults, **given}


def scorer_engine_kwargs(kind: str) -> dict:
    """Engine arguments of a scorer's own engine: on vLLM, scoring only (no generator)."""
    return {"generator": False} if kind == "vllm" else {}


def load_backend(kind: str, model_path: str, **engine_kwargs) -> Backend:
    """Start the engine ``kind`` (see BACKENDS) on a local checkpoint folder or a Hugging Face id."""
    cls = BACKENDS.get(kind)
    if str(model_path).startswith((".", "/", "~")) and not Path(model_path).expanduser().is_dir():
        raise TraceError(f"model folder {model_path} does not exist")
    parameters = inspect.signature(cls).parameters.values()
    if all(parameter.kind != inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        unknown = sorted(set(engine_kwargs) - {parameter.name for parameter in parameters})
        if unknown:
            raise TraceError(f"unknown {kind} engine argument(s): {', '.join(unknown)}")
    return cls(str(model_path), **engine_kwargs)
