"""Generation backends for `trace gen`: vLLM (default where installed) and transformers.

Engines are imported only when a backend is loaded, so phase two never pulls them in.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from replay.errors import TraceError
from tracegen.backends.base import FINISH_REASONS, Backend, GeneratedStep, StepRequest, StepSampling

BACKENDS = ("vllm", "hf")

__all__ = ["BACKENDS", "FINISH_REASONS", "Backend", "GeneratedStep", "StepRequest", "StepSampling", "load_backend"]


def load_backend(kind: str, model_path: str, **engine_kwargs) -> Backend:
    """Start the engine ``kind`` ("vllm" or "hf") on a local checkpoint folder or a Hugging Face id."""
    if kind not in BACKENDS:
        raise TraceError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if str(model_path).startswith((".", "/", "~")) and not Path(model_path).expanduser().is_dir():
        raise TraceError(f"model folder {model_path} does not exist")
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
