"""Engine settings of `trace gen`: `--tensor-parallel-size`, `--gpu-memory-utilization`, `--max-model-len`,
`--dtype`, `--quantization`, each given once for every model (``2``) or per model role (``small=1,large=4``).

What trace.json records of them, and why:

- In the cache key (``engine``, compared on every rerun): dtype, quantisation, tensor parallelism and the
  context (``max_total_tokens``, from `--max-model-len`). Each changes what a step would contain: dtype and
  quantisation change the logits; tensor parallelism splits every matrix product over GPUs and sums the parts in
  another order (logits differ in their last bits, so a sampled token can differ); the context decides where a
  step is cut and which nodes are left unexpanded.
- Outside it (``engine_resources``): the GPU memory share of each engine and the memory plan. Memory only decides
  how many requests an engine runs at once; each request keeps its own seed and its step does not depend on what
  shares its batch (the property `trace audit` checks), so a rerun with another share resumes the same trace.
"""

from __future__ import annotations

from collections.abc import Callable

from tracegen.backends import VLLM_MEMORY_BUDGET, engine_kwargs_for
from tracegen.options import ALL_ROLES, EngineOptions
from tracestore.errors import TraceError

DTYPES = ("auto", "float32", "bfloat16", "float16")
# the settings each built-in backend takes (an installed backend gets what it declares; load_backend checks)
SUPPORTED = {
    "vllm": {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype", "quantization"},
    "hf": {"max_model_len", "dtype"},
}
# settings the engine entry records when they come from a trace, to regenerate with them (trace audit)
RECORDED = ("dtype", "quantization", "tensor_parallel_size")


def parse_role_values(text: str | None, option: str, cast: Callable[[str], object]) -> dict:
    """``"4"`` -> {ALL_ROLES: 4}; ``"small=1,large=4"`` -> {"small": 1, "large": 4}; None or "" -> {}."""
    if not text:
        return {}
    values = {}
    for part in text.split(","):
        role, _, value = part.rpartition("=")
        role = role.strip() or ALL_ROLES
        if role in values:
            raise TraceError(f"{option} gives {'every model' if role == ALL_ROLES else role} twice: {text!r}")
        try:
            values[role] = cast(value.strip())
        except ValueError as error:
            raise TraceError(f"{option} {text!r}: {error}") from None
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def memory_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"{value:g} is not a share of GPU memory in (0, 1]")
    return value


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return text


def quantization_name(text: str) -> str:
    if not text:
        raise ValueError("name a quantisation method (e.g. fp8, awq, gptq)")
    return text


def parse_engine_options(
    tensor_parallel_size: str | None = None,
    gpu_memory_utilization: str | None = None,
    max_model_len: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
) -> EngineOptions:
    """EngineOptions from the command line's texts."""
    return EngineOptions(
        tensor_parallel_size=parse_role_values(tensor_parallel_size, "--tensor-parallel-size", positive_int),
        gpu_memory_utilization=parse_role_values(gpu_memory_utilization, "--gpu-memory-utilization", memory_fraction),
        max_model_len=parse_role_values(max_model_len, "--max-model-len", positive_int),
        dtype=parse_role_values(dtype, "--dtype", dtype_name),
        quantization=parse_role_values(quantization, "--quantization", quantization_name),
    )


def check_engine_options(engine: EngineOptions, kind: str, roles: tuple[str, ...], engine_roles: set[str]) -> None:
    """TraceError for a role that is not one of ``roles``, a setting for a role no local engine serves (an API
    role), a setting the backend ``kind`` does not take, or a quantisation vLLM does not know."""
    for option, values in engine.given().items():
        for role in values:
            if role != ALL_ROLES and role not in roles:
                raise TraceError(f"{option} names {role!r}, which is not one of this run's models ({', '.join(roles)})")
            if role != ALL_ROLES and role not in engine_roles:
                raise TraceError(f"{option} names {role}, which an API endpoint serves: it has no local engine")
        setting = option.removeprefix("--").replace("-", "_")
        if kind in SUPPORTED and setting not in SUPPORTED[kind]:
            takes = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(SUPPORTED[kind]))
            raise TraceError(f"{option} applies to --backend vllm; the {kind} backend takes {takes}")
    if kind == "vllm" and engine.quantization:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        unknown = sorted(set(engine.quantization.values()) - set(QUANTIZATION_METHODS))
        if unknown:
            raise TraceError(
                f"--quantization {unknown[0]!r} is not a vLLM quantisation method ({', '.join(QUANTIZATION_METHODS)})"
            )


def backend_kwargs(kind: str, role: str, roles: tuple[str, ...], engine: EngineOptions) -> dict:
    """What ``load_backend`` gets for one model role: the settings given for it (its own, else every model's), and
    on vLLM its engines' GPU memory shares."""
    given = {}
    for name in ("tensor_parallel_size", "max_model_len", "dtype", "quantization"):
        values = getattr(engine, name)
        value = values.get(role, values.get(ALL_ROLES))
        if value is not None:
            given[name] = value
    return engine_kwargs_for(
        kind,
        role,
        given,
        roles,
        budget=engine.gpu_memory_utilization.get(ALL_ROLES, VLLM_MEMORY_BUDGET),
        role_share=engine.gpu_memory_utilization.get(role),
    )


def recorded_kwargs(entry: dict) -> dict:
    """The engine settings a trace's engine entry records, as ``load_backend`` takes them (to regenerate its steps
    with the same dtype, quantisation, tensor parallelism and context)."""
    kwargs = {name: entry[name] for name in RECORDED if entry.get(name) is not None}
    if isinstance(entry.get("max_total_tokens"), int):
        kwargs["max_model_len"] = entry["max_total_tokens"] + 1  # both backends keep one position back
    return kwargs


def resources_entry(kwargs_by_role: dict[str, dict]) -> dict:
    """trace.json ``engine_resources`` (not part of the cache key): each role's GPU memory shares."""
    shares = ("gpu_memory_utilization", "scorer_memory_utilization")
    return {
        role: {name: kwargs[name] for name in shares if name in kwargs}
        for role, kwargs in kwargs_by_role.items()
        if any(name in kwargs for name in shares)
    }
