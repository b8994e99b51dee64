"""The memory plan of a `trace gen` run, worked out from the checkpoints' configs before any engine starts.

On vLLM each model runs two engines, and each holds its own copy of the weights: a generator in
``raw_logits`` mode (the raw max logits) and a prefill-only scorer in ``raw_logprobs`` mode (the exact
sampled-token log-probabilities). One engine cannot give both (checked on vLLM 0.33's source):
``logprobs_mode`` is an engine setting (``ModelConfig.logprobs_mode``; ``SamplingParams`` has no per-request
mode, and the sampler's ``logprobs_mode_override`` is only passed by the speculative-decoding rejection
sampler); prompt log-probabilities follow the same mode (``gpu_model_runner._get_prompt_logprobs_dict``, and
``worker/gpu/sample/prompt_logprob.py`` in the V2 runner), so a scoring pass on the generator returns logits
again; no mode returns the log-normaliser that would turn one into the other, short of the whole vocabulary per
token (``logprobs=-1``: 151,936 floats, 594 KiB, per generated token); and sleep mode (``LLM.sleep``, which
would park the idle engine's weights in host memory) exists on CUDA, ROCm and XPU only, and swapping would
serialise generation and scoring and drop both prefix caches at every swap. So the plan states the cost: per
engine, the weights and the share of GPU memory it may take, what that leaves for its KV cache, and how many
tokens that cache holds; a plan in which an engine cannot hold its weights or one full context is refused
before anything loads. The transformers backend (``--backend hf``) holds one copy per model and reads both
values off the same logits.

Weights are the parameter count times the bytes of the engine's dtype (a quantised checkpoint: the bytes its
safetensors hold; ``--quantization fp8``: one byte a parameter). A vLLM engine may take ``share`` of each GPU;
its KV cache gets what is left after its weights and a reserve for activations and the CUDA context
(``VLLM_RESERVE_BYTES``, an assumption: vLLM measures its own at start, so the KV cache it reports differs by
about that much). With tensor parallelism each GPU holds 1/N of the weights and of the KV heads.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tracestore.errors import TraceError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
SAFETENSORS_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1})
# on-the-fly quantisation (vLLM quantises a 16-bit checkpoint as it loads it): bytes per parameter
ON_THE_FLY_BYTES = {"fp8": 1.0, "fp8_per_tensor": 1.0, "fp8_per_block": 1.0, "fp8_per_channel": 1.0, "mxfp8": 1.0}
VLLM_RESERVE_BYTES = 2 * GIB  # per vLLM engine and GPU: activations of its profiling forward, CUDA context
CPU_KV_CACHE_BYTES = GIB  # the vLLM backend's KV cache per engine on a CPU (VLLM_CPU_KVCACHE_SPACE overrides it)
HF_BATCH = 64  # the transformers backend's largest batch (HFBackend.max_batch_size)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: from its config.json, and its safetensors headers where it has weights."""

    name: str
    n_params: int
    n_layer: int
    d_model: int
    n_kv_heads: int
    head_dim: int
    context: int  # max_position_embeddings
    dtype: str  # the checkpoint's
    stored_bytes: int | None = None  # the weights' bytes on disk (None: a config without weights)
    quantized: bool = False  # the checkpoint itself is quantised (its config has a quantization_config)

    @classmethod
    def of_config(cls, name: str, config: dict, n_params: int, stored_bytes: int | None = None) -> ModelShape:
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        return cls(
            name=name,
            n_params=n_params,
            n_layer=config["num_hidden_layers"],
            d_model=config["hidden_size"],
            n_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            context=config.get("max_position_embeddings") or 2048,
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            stored_bytes=stored_bytes,
            quantized="quantization_config" in config,
        )

    @classmethod
    def of_checkpoint(cls, name: str, folder: str | Path) -> ModelShape:
        from tracegen.models import parameter_counts

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        return cls.of_config(name, config, parameter_counts(folder)["n_params"], stored_weight_bytes(folder))

    @property
    def checkpoint_dtype(self) -> str:
        """The dtype the checkpoint declares (float32 where it names none the plan knows)."""
        return self.dtype if self.dtype in DTYPE_BYTES else "float32"

    def weight_bytes(self, dtype: str, quantization: str | None = None) -> tuple[int, bool]:
        """(bytes of the weights as an engine holds them, whether that is exact rather than an estimate)."""
        if self.quantized and self.stored_bytes is not None:
            return self.stored_bytes, True
        if quantization in ON_THE_FLY_BYTES:
            return int(self.n_params * ON_THE_FLY_BYTES[quantization]), False
        return self.n_params * DTYPE_BYTES.get(dtype, 4), quantization is None

    def kv_bytes_per_token(self, dtype: str, gpus: int = 1) -> int:
        """Key and value vectors of one token over every layer, on one of ``gpus`` GPUs (its share of the heads)."""
        heads = max(1, self.n_kv_heads // gpus)
        return 2 * self.n_layer * heads * self.head_dim * DTYPE_BYTES.get(dtype, 4)


def stored_weight_bytes(folder: Path) -> int | None:
    """Bytes of the tensors in a checkpoint's safetensors files (their headers' dtypes and shapes)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                total += math.prod(entry["shape"]) * SAFETENSORS_BYTES.get(entry["dtype"], 4)
    return total


@dataclass(frozen=True)
class Device:
    """Where the engines run: a GPU (memory per GPU) or the CPU (host memory)."""

    name: str
    memory: int  # bytes (per GPU)
    gpu: bool

    @classmethod
    def current(cls) -> Device:
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            return cls(properties.name, properties.total_memory, True)
        return cls("CPU", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), False)


@dataclass(frozen=True)
class EnginePlan:
    """One engine's line of the plan (bytes per GPU; on a CPU, of host memory)."""

    role: str
    engine: str  # generator, scorer (vLLM), hf (transformers)
    model: str
    dtype: str
    gpus: int
    weights: int
    weights_exact: bool
    share: float | None  # of each GPU's memory (vLLM on a GPU); None where memory is not capped
    kv_cache: int  # bytes: left for it (vLLM), given (vLLM CPU), or the full-batch bound (hf)
    kv_tokens: int  # tokens the KV cache holds (hf: at the full batch, HF_BATCH x context)
    context: int  # tokens a prompt plus its step may take

    @property
    def fits(self) -> bool:
        return self.weights > 0 and self.kv_tokens >= self.context


@dataclass
class MemoryPlan:
    """The engines of a run and what each takes, on ``device``."""

    backend: str
    device: Device
    engines: list[EnginePlan] = field(default_factory=list)
    hidden: dict[str, int] = field(default_factory=dict)  # prompt hidden states: weights of each model's forward

    @property
    def shares(self) -> float:
        """Sum of the vLLM engines' GPU memory shares (they share GPU 0)."""
        return sum(engine.share or 0.0 for engine in self.engines)

    def problems(self) -> list[str]:
        """Why the plan cannot run, one line each (empty: it fits)."""
        found = []
        for engine in self.engines:
            if engine.share is not None and engine.kv_cache <= 0:
                found.append(
                    f"the {engine.role} model's {engine.engine} engine may take {engine.share:g} of "
                    f"{_gib(self.device.memory)} = {_gib(engine.share * self.device.memory)}, less than its weights "
                    f"({_gib(engine.weights)}) and the reserve ({_gib(VLLM_RESERVE_BYTES)})"
                )
            elif engine.share is not None and not engine.fits:
                found.append(
                    f"the {engine.role} model's {engine.engine} engine has KV cache for {engine.kv_tokens:,} tokens, "
                    f"less than one full context ({engine.context:,})"
                )
            elif engine.share is None and engine.weights > self.device.memory:
                found.append(f"the {engine.role} model's weights ({_gib(engine.weights)}) exceed {self.device.name}")
        if self.shares > 1:
            found.append(f"the engines ask for {self.shares:.3f} of GPU 0's memory, more than all of it")
        return found

    def check(self) -> None:
        """TraceError naming what does not fit and what to change."""
        problems = self.problems()
        if problems:
            raise TraceError(
                "the memory plan does not fit: "
                + "; ".join(problems)
                + ". Raise --gpu-memory-utilization for that model, shorten --max-model-len, spread it with "
                "--tensor-parallel-size, quantise it (--quantization fp8), or use --backend hf (one copy of the "
                "weights; --dtype bfloat16)"
            )

    def lines(self) -> list[str]:
        """The plan as text, one engine a line, then the totals (nothing when no engine runs locally)."""
        if not self.engines:
            return []
        where = f"{self.device.name}, {_gib(self.device.memory)}" + (" per GPU" if self.device.gpu else "")
        lines = [f"memory plan ({self.backend} on {where}; worked out before any engine starts):"]
        width = max(len(engine.model) for engine in self.engines) if self.engines else 0
        for engine in self.engines:
            weights = ("" if engine.weights_exact else "~") + _gib(engine.weights)
            if engine.share is not None:
                room = f"share {engine.share:.3f} = {_gib(engine.share * self.device.memory)}: "
                cache = f"KV cache ~{_gib(engine.kv_cache)} ({engine.kv_tokens:,} tokens)"
            elif self.backend == "hf":
                room = ""
                cache = f"KV cache up to {_gib(engine.kv_cache)} ({HF_BATCH} requests of the full context)"
            else:
                room = ""
                cache = f"KV cache {_gib(engine.kv_cache)} ({engine.kv_tokens:,} tokens)"
            gpus = f", {engine.gpus} GPUs" if engine.gpus > 1 else ""
            lines.append(
                f"  {engine.role:<6} {engine.model:<{width}}  {engine.engine:<9} {engine.dtype}{gpus}: {room}"
                f"weights {weights}, {cache}; context {engine.context:,}"
            )
        lines += self._totals()
        return lines

    def _totals(self) -> list[str]:
        weights = sum(engine.weights for engine in self.engines)
        lines = []
        if self.backend == "vllm":
            copies = "each model's weights twice (its generator and its exact-logprob scorer)"
            if self.device.gpu:
                lines.append(
                    f"  GPU 0: {self.shares:.3f} of its memory ({_gib(self.shares * self.device.memory)}) for "
                    f"{len(self.engines)} engines, {_gib(weights)} of it weights: {copies}; --backend hf holds one copy"
                )
            else:
                kv = sum(engine.kv_cache for engine in self.engines)
                lines.append(f"  host memory: {_gib(weights)} of weights ({copies}) and {_gib(kv)} of KV cache")
        elif self.engines:
            lines.append(f"  {_gib(weights)} of weights, one copy per model")
        if self.hidden:
            largest = max(self.hidden.values())
            lines.append(
                f"  first, prompt hidden states: one transformers forward per model, one model at a time "
                f"(largest {_gib(largest)} of weights), freed before the engines start"
            )
        return lines

    def manifest_entry(self) -> dict:
        return {
            "backend": self.backend,
            "device": {"name": self.device.name, "memory_bytes": self.device.memory, "gpu": self.device.gpu},
            "engines": [asdict(engine) for engine in self.engines],
            "reserve_bytes_per_engine": VLLM_RESERVE_BYTES if self.backend == "vllm" and self.device.gpu else 0,
        }


def _gib(n_bytes: float) -> str:
    """A size in GiB, or in MiB below one GiB (the toy models weigh a few MiB)."""
    return f"{n_bytes / GIB:.1f} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / (1 << 20):.1f} MiB"


def engine_dtype(kind: str, requested: str | None, shape: ModelShape) -> str:
    """The dtype an engine runs in: the one asked for, else the backend's default (vLLM: the checkpoint's; the
    transformers backend: float32); ``auto`` is the checkpoint's."""
    if requested and requested != "auto":
        return requested
    if kind == "hf" and requested is None:
        return "float32"
    return shape.checkpoint_dtype


def plan_memory(
    kind: str, shapes: dict[str, ModelShape], kwargs: dict[str, dict], device: Device, hidden_roles=()
) -> MemoryPlan:
    """The plan of backend ``kind`` serving each role of ``shapes`` with its engine arguments ``kwargs`` (as
    ``load_backend`` gets them) on ``device``; ``hidden_roles``: the models whose prompt hidden states gen computes
    first. A backend other than vllm and hf gets a plan without engines."""
    plan = MemoryPlan(kind, device)
    for role in hidden_roles:
        plan.hidden[role] = shapes[role].weight_bytes(shapes[role].checkpoint_dtype)[0]  # hidden.py: dtype="auto"
    for role, shape in shapes.items():
        given = kwargs.get(role, {})
        dtype = engine_dtype(kind, given.get("dtype"), shape)
        gpus = int(given.get("tensor_parallel_size", 1))
        weights, exact = shape.weight_bytes(dtype, given.get("quantization"))
        context = int(given.get("max_model_len") or shape.context)
        per_token = shape.kv_bytes_per_token(dtype, gpus)
        common = dict(role=role, model=shape.name, dtype=dtype, gpus=gpus, weights=weights // gpus, weights_exact=exact)
        if kind == "vllm":
            engines = (
                ("generator", "gpu_memory_utilization", context - 1),
                ("scorer", "scorer_memory_utilization", context),
            )
            for engine, share_key, engine_context in engines:
                if device.gpu:
                    share = float(given[share_key])
                    kv = int(share * device.memory) - weights // gpus - VLLM_RESERVE_BYTES
                else:
                    share = None
                    kv = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 0)) * GIB) or CPU_KV_CACHE_BYTES
                plan.engines.append(
                    EnginePlan(
                        engine=engine,
                        share=share,
                        kv_cache=kv,
                        kv_tokens=max(kv, 0) // per_token,
                        context=engine_context,
                        **common,
                    )
                )
        elif kind == "hf":
            kv = HF_BATCH * context * per_token
            plan.engines.append(
                EnginePlan(
                    engine="hf", share=None, kv_cache=kv, kv_tokens=HF_BATCH * context, context=context, **common
                )
            )
    return plan
