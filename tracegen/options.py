"""What the phase-one commands take (`trace gen`, its `--ray` workers, `trace audit`), each setting with its
default written once: the command line reads its defaults from these classes, as vLLM's command line reads
EngineArgs. Kept apart from the code that runs them, so that building the command line stays cheap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tracegen.backends.base import StepSampling
from tracegen.prompts import STEP_DELIMITER
from tracestore.errors import TraceError
from tracestore.schema import model_roles

ALL_ROLES = "*"  # key of an engine setting that every model role without its own value gets


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings of `trace gen` (`--tensor-parallel-size`, ...): each maps a model role, or ALL_ROLES, to its
    value (tracegen.engine_settings parses and applies them). Unset: the engine's own default, except
    `--gpu-memory-utilization`, whose ALL_ROLES value is the share of each GPU the run's vLLM engines take together
    (default ``tracegen.backends.VLLM_MEMORY_BUDGET``), split between the models as ``memory_share`` says."""

    tensor_parallel_size: dict = field(default_factory=dict)
    gpu_memory_utilization: dict = field(default_factory=dict)
    max_model_len: dict = field(default_factory=dict)
    dtype: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)

    def given(self) -> dict[str, dict]:
        """The settings given, by option name (dashes), each {role or ALL_ROLES: value}."""
        return {
            f"--{name.replace('_', '-')}": getattr(self, name)
            for name in self.__dataclass_fields__
            if getattr(self, name)
        }


@dataclass(frozen=True)
class GenOptions:
    """Everything `trace gen` takes; see commands.generation.gen for each option's meaning."""

    small: str
    large: str
    dataset: str
    out: Path
    middle: tuple[str, ...] = ()  # models between small and large, smallest first (`--models A,B,C`)
    split: str | None = None
    limit: int | None = None
    level: int | None = None
    worlds: int = 1
    expand: str = "comb"
    depth: int | None = None
    temperature: float = StepSampling.temperature
    top_p: float = StepSampling.top_p
    max_step_tokens: int = StepSampling.max_step_tokens
    max_steps: int = 32
    topk: int = StepSampling.topk
    hidden_layers: tuple[int, ...] = ()
    backend: str | None = None
    shard: str | None = None
    seed: int = 0
    timings: bool = False  # store measured wall seconds per step (makes the step files differ run to run)
    routers: tuple = ()  # RouterSpecs whose misses closure (and online) runs grow
    budget_tokens: int | None = None  # closure stops once this many tokens were generated
    engine: EngineOptions = field(default_factory=EngineOptions)
    api: tuple = ()  # ApiSpecs of roles served by an OpenAI-compatible endpoint (tracegen.endpoint_roles)
    api_client: object = None  # their ClientOptions (concurrency, timeout, retries, budget)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every model, smallest first."""
        return (self.small, *self.middle, self.large)

    @property
    def roles(self) -> tuple[str, ...]:
        """The role of each of ``model_names``: small/large for two models, m0..m{K-1} for K."""
        return model_roles(len(self.model_names))

    def step_sampling(self) -> StepSampling:
        """The sampling settings every request of the run is sent with."""
        return StepSampling(
            temperature=self.temperature,
            top_p=self.top_p,
            max_step_tokens=self.max_step_tokens,
            topk=self.topk,
            delimiter=STEP_DELIMITER,
        )


@dataclass(frozen=True)
class RayOptions:
    """`trace gen --ray ADDRESS`: grow the trace with Ray workers, each a shard of the problems."""

    address: str | None = None  # "local", "auto" or host:port; None: no Ray
    workers: int = 2
    gpus_per_worker: float = 0.0  # a worker's small and large engines share them
    cpus_per_worker: float = 1.0

    def check(self) -> None:
        """TraceError if worker settings are given without --ray."""
        if self.address is None and self != RayOptions():
            raise TraceError("--workers, --gpus-per-worker and --cpus-per-worker need --ray")


@dataclass(frozen=True)
class AuditOptions:
    """Everything `trace audit` takes."""

    root: Path
    sample: int = 100  # steps to regenerate (all of them when the trace has fewer)
    seed: int = 0  # of the sample
    backend: str | None = None  # default: the engine that wrote the trace
    min_identical: float | None = None  # default: 1.0 with the recorded engine, else 0.0
    out: Path | None = None  # per-step details, CSV
    force: bool = False  # replace --out
