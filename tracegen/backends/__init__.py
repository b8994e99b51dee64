"""Generation backends for `trace gen`: vLLM (default where installed), transformers, and a fake one (seeded
stand-in steps of the toy world, no model: for tests of everything around the engines), and the engine settings
each model role gets.

Engines are imported only when a backend is loaded, so phase two never pulls them in.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from tracegen.backends.base import Backend, GeneratedStep, StepRequest, StepSampling
from tracestore.errors import TraceError
from tracestore.schema import LARGE, SMALL, TWO_MODEL_ROLES

BACKENDS = ("vllm", "hf", "fake")

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
    """TraceError unless ``kind`` is None (the default backend) or a known backend."""
    if kind is not None and kind not in BACKENDS:
        raise TraceError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


def default_backend() -> str:
    """vllm where it is importable, else hf."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm"


def memory_share(role: str, roles: tuple[str, ...] = TWO_MODEL_ROLES) -> float:
    """The share of GPU memory the model ``role`` gets: 30/70 for a small/large pair; with K models, the
    i-th smallest gets (i + 1) / (1 + 2 + ... + K)."""
    if role in VLLM_MEMORY_SHARES and tuple(roles) == TWO_MODEL_ROLES:
        return VLLM_MEMORY_SHARES[role]
    rank = list(roles).index(role) + 1
    return rank / (len(roles) * (len(roles) + 1) / 2)


def engine_kwargs_for(kind: str, role: str, given: dict, roles: tuple[str, ...] = TWO_MODEL_ROLES) -> dict:
    """Engine arguments for one model role of ``roles``: on vLLM, its share of GPU memory unless ``given``
    sets it."""
    if kind != "vllm":
        return dict(given)
    share = VLLM_MEMORY_BUDGET * memory_share(role, roles)
    defaults = {
        "gpu_memory_utilization": round(share * (1 - VLLM_SCORER_SHARE), 3),
        "scorer_memory_utilization": round(share * VLLM_SCORER_SHARE, 3),
    }
    return {**defaults, **given}


def scorer_engine_kwargs(kind: str) -> dict:
    """Engine arguments of a scorer's own engine: on vLLM, scoring only (no generator)."""
    return {"generator": False} if kind == "vllm" else {}


def load_backend(kind: str, model_path: str, **engine_kwargs) -> Backend:
    """Start the engine ``kind`` ("vllm", "hf" or "fake") on a local checkpoint folder or a Hugging Face id."""
    check_backend(kind)
    if str(model_path).startswith((".", "/", "~")) and not Path(model_path).expanduser().is_dir():
        raise TraceError(f"model folder {model_path} does not exist")
    if kind == "fake":
        from tracegen.backends.fake import FakeBackend, StreamingFakeBackend

        streaming = engine_kwargs.pop("streaming", False)
        cls = StreamingFakeBackend if streaming else FakeBackend
        unknown = sorted(set(engine_kwargs) - set(inspect.signature(cls).parameters))
        if unknown:
            raise TraceError(f"unknown fake engine argument(s): {', '.join(unknown)}")
        return cls(str(model_path), **engine_kwargs)
    if kind == "hf":
        try:
            from tracegen.backends.hf import HFBackend
        except ImportError as error:
            raise TraceError(f"the hf backend needs transformers ({error}); install trace-routing[hf]") from error
        unknown = sorted(set(engine_kwargs) - set(inspect.signature(HFBackend).parameters))
        if unknown:
            raise TraceError(f"unknown hf engine argument(s): {', '.join(unknown)}")
        return HFBackend(str(model_path), **engine_kwargs)
    try:
        from tracegen.backends.vllm_engine import VLLMBackend
    except ImportError as error:
        raise TraceError(
            f"the vllm backend needs vLLM ({error}); install trace-routing[cpu] or [gpu], or use --backend hf"
        ) from error
    return VLLMBackend(str(model_path), **engine_kwargs)
