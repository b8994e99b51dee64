"""Engine settings of `trace gen` (--tensor-parallel-size, --gpu-memory-utilization, --max-model-len, --dtype,
--quantization) and the memory plan printed before any engine starts: parsing, what each backend gets, what
trace.json records in and outside the cache key, and the plan's arithmetic against real models' weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tracebuild import toy_gen_options
from typer.testing import CliRunner

from cli import app
from data.toy import MODEL_ALIASES
from tests.test_cli_foundation import assert_one_error
from tracegen import memory_plan
from tracegen.backends import VLLM_MEMORY_BUDGET, memory_share
from tracegen.engine_settings import backend_kwargs, check_engine_options, parse_engine_options, recorded_kwargs
from tracegen.gen import run_gen
from tracegen.memory_plan import GIB, VLLM_RESERVE_BYTES, Device, ModelShape, plan_memory
from tracegen.options import ALL_ROLES, EngineOptions
from tracestore.errors import TraceError
from tracestore.store import open_trace

ROLES = ("small", "large")
runner = CliRunner()


def test_settings_are_given_for_every_model_or_per_role():
    engine = parse_engine_options("large=4", "0.9", "small=2048,large=4096", "bfloat16", "large=fp8")
    assert engine.tensor_parallel_size == {"large": 4}
    assert engine.gpu_memory_utilization == {ALL_ROLES: 0.9}
    assert backend_kwargs("vllm", "large", ROLES, engine) == {
        "tensor_parallel_size": 4,
        "max_model_len": 4096,
        "dtype": "bfloat16",
        "quantization": "fp8",
        "gpu_memory_utilization": round(0.9 * memory_share("large") * 0.6, 3),
        "scorer_memory_utilization": round(0.9 * memory_share("large") * 0.4, 3),
    }
    small = backend_kwargs("vllm", "small", ROLES, engine)
    assert "tensor_parallel_size" not in small and small["max_model_len"] == 2048
    # a model's own share replaces its part of the budget; its generator and scorer split it 60/40
    pinned = backend_kwargs("vllm", "large", ROLES, parse_engine_options(gpu_memory_utilization="large=0.5"))
    assert (pinned["gpu_memory_utilization"], pinned["scorer_memory_utilization"]) == (0.3, 0.2)
    default = backend_kwargs("vllm", "small", ROLES, EngineOptions())
    assert default["gpu_memory_utilization"] == round(VLLM_MEMORY_BUDGET * 0.3 * 0.6, 3)
    assert backend_kwargs("hf", "small", ROLES, parse_engine_options(dtype="bfloat16")) == {"dtype": "bfloat16"}


@pytest.mark.parametrize(
    ("given", "kind", "message"),
    [
        (dict(tensor_parallel_size="0"), "vllm", "--tensor-parallel-size '0': 0 is not a positive integer"),
        (dict(gpu_memory_utilization="1.5"), "vllm", "1.5 is not a share of GPU memory in (0, 1]"),
        (dict(dtype="fp64"), "vllm", "dtype must be one of auto, float32, bfloat16, float16"),
        (dict(max_model_len="small=1,small=2"), "vllm", "--max-model-len gives small twice"),
        (dict(tensor_parallel_size="medium=2"), "vllm", "names 'medium', which is not one of this run's models"),
        (dict(tensor_parallel_size="2"), "hf", "--tensor-parallel-size applies to --backend vllm"),
        (dict(quantization="int3"), "vllm", "--quantization 'int3' is not a vLLM quantisation method"),
    ],
)
def test_bad_settings_are_refused_with_one_line(given, kind, message):
    with pytest.raises(TraceError, match="^.*$") as raised:
        check_engine_options(parse_engine_options(**given), kind, ROLES, set(ROLES))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_setting_for_an_api_role_is_refused():
    with pytest.raises(TraceError, match="names large, which an API endpoint serves"):
        check_engine_options(parse_engine_options(dtype="large=bfloat16"), "vllm", ROLES, {"small"})


def test_gen_help_lists_the_engine_options_and_a_bad_value_exits_with_one_line():
    result = runner.invoke(app, ["gen", "--help"], env={"COLUMNS": "200"})
    for option in (
        "--tensor-parallel-size",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--dtype",
        "--quantization",
    ):
        assert option in result.output
    args = ["gen", "--model", "toy-small", "--large", "toy-large", "--dataset", "toy", "--out", "unused"]
    assert_one_error(runner.invoke(app, [*args, "--gpu-memory-utilization", "small=2"]), "2 is not a share of GPU")


def test_recorded_settings_regenerate_with_the_same_engine():
    entry = {"name": "vllm", "dtype": "bfloat16", "tensor_parallel_size": 2, "max_total_tokens": 4095, "seed": 0}
    assert recorded_kwargs(entry) == {"dtype": "bfloat16", "tensor_parallel_size": 2, "max_model_len": 4096}


# -- the memory plan


def toy_shape(name: str) -> ModelShape:
    return ModelShape.of_checkpoint(name, MODEL_ALIASES[name])


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_the_plans_weights_are_the_loaded_models_bytes(dtype):
    from transformers import AutoModelForCausalLM

    shape = toy_shape("toy-large")
    plan = plan_memory("hf", {"large": shape}, {"large": {"dtype": dtype} if dtype else {}}, Device("cpu", GIB, False))
    model = AutoModelForCausalLM.from_pretrained(MODEL_ALIASES["toy-large"], dtype=getattr(torch, dtype or "float32"))
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    (engine,) = plan.engines
    assert engine.weights == loaded and engine.weights_exact
    assert engine.dtype == (dtype or "float32")
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * (2 if dtype else 4)
    assert engine.kv_cache == memory_plan.HF_BATCH * config.max_position_embeddings * per_token


def qwen_shape(**overrides) -> ModelShape:
    """Qwen2.5-Math-7B-Instruct's published shape (7,615,616,512 parameters, bfloat16)."""
    fields = dict(
        name="Qwen/Qwen2.5-Math-7B-Instruct",
        n_params=7_615_616_512,
        n_layer=28,
        d_model=3584,
        n_kv_heads=4,
        head_dim=128,
        context=4096,
        dtype="bfloat16",
    )
    return ModelShape(**{**fields, **overrides})


def test_a_vllm_plan_gives_each_engine_its_share_and_states_both_weight_copies():
    gpu = Device("H100", 80 * GIB, True)
    kwargs = {"large": backend_kwargs("vllm", "large", ROLES, EngineOptions())}
    plan = plan_memory("vllm", {"large": qwen_shape()}, kwargs, gpu)
    generator, scorer = plan.engines
    weights = 7_615_616_512 * 2
    assert generator.weights == scorer.weights == weights  # one copy per engine
    assert generator.share == round(VLLM_MEMORY_BUDGET * memory_share("large") * 0.6, 3)
    assert generator.kv_cache == int(generator.share * 80 * GIB) - weights - VLLM_RESERVE_BYTES
    assert generator.kv_tokens == generator.kv_cache // (2 * 28 * 4 * 128 * 2)
    assert (generator.context, scorer.context) == (4095, 4096)
    assert plan.problems() == []
    text = "\n".join(plan.lines())
    assert "each model's weights twice" in text and "--backend hf holds one copy" in text
    # tensor parallelism halves the weights and the KV heads on each GPU
    tp = plan_memory("vllm", {"large": qwen_shape()}, {"large": {**kwargs["large"], "tensor_parallel_size": 2}}, gpu)
    assert tp.engines[0].weights == weights // 2 and tp.engines[0].kv_tokens > generator.kv_tokens


def test_a_plan_that_does_not_fit_is_refused_naming_the_engine_and_the_ways_out():
    card = Device("24 GB card", 24 * GIB, True)
    kwargs = {"large": backend_kwargs("vllm", "large", ROLES, EngineOptions())}
    plan = plan_memory("vllm", {"large": qwen_shape()}, kwargs, card)
    with pytest.raises(TraceError, match="the large model's generator engine may take 0.37 of 24.0 GiB") as raised:
        plan.check()
    assert "--backend hf" in str(raised.value) and "--quantization fp8" in str(raised.value)
    # one copy in bfloat16 on the transformers backend fits the card
    assert plan_memory("hf", {"large": qwen_shape()}, {"large": {"dtype": "bfloat16"}}, card).problems() == []
    fp8 = plan_memory("vllm", {"large": qwen_shape()}, {"large": {**kwargs["large"], "quantization": "fp8"}}, card)
    assert fp8.engines[0].weights == 7_615_616_512 and not fp8.engines[0].weights_exact


def test_gen_prints_the_plan_before_any_engine_starts_and_records_it_outside_the_cache_key(tmp_path, monkeypatch):
    stages = []
    constructed = []
    from tracegen.backends.hf import HFBackend

    original = HFBackend.__init__

    def recording_init(self, *args, **kwargs):
        constructed.append(len(stages))
        original(self, *args, **kwargs)

    monkeypatch.setattr(HFBackend, "__init__", recording_init)
    out = tmp_path / "t"
    options = toy_gen_options(out, limit=2, seed=0, max_steps=1, hidden_layers=(-1,))
    run_gen(options, progress=lambda stage, **info: stages.append((stage, info)))
    names = [stage for stage, _ in stages]
    plan = dict(stages)["memory-plan"]["plan"]
    assert names.index("memory-plan") < names.index("hidden") < min(constructed)
    assert [engine.role for engine in plan.engines] == ["small", "large"]
    manifest = open_trace(out).manifest
    assert manifest["engine_resources"]["memory_plan"]["engines"][0]["weights"] == plan.engines[0].weights
    assert manifest["engine"]["dtype"] == "float32"


def test_dtype_is_in_the_cache_key_and_the_memory_share_is_not(tmp_path):
    out = tmp_path / "t"
    run_gen(toy_gen_options(out, limit=1, seed=0, max_steps=1, engine=parse_engine_options(dtype="bfloat16")))
    assert open_trace(out).manifest["engine"]["dtype"] == "bfloat16"
    with pytest.raises(TraceError, match="engine.dtype = 'bfloat16', but this run has engine.dtype = 'float32'"):
        run_gen(toy_gen_options(out, limit=1, seed=0, max_steps=1))
    manifest = open_trace(out).manifest
    assert "gpu_memory_utilization" not in json.dumps(manifest["engine"]) and "engine_resources" in manifest


def test_a_plan_refused_before_loading_leaves_no_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan.Device, "current", classmethod(lambda cls: Device("tiny GPU", 2 * GIB, True)))
    out = tmp_path / "t"
    with pytest.raises(TraceError, match="the memory plan does not fit"):
        run_gen(toy_gen_options(out, limit=1, seed=0, backend="vllm"))
    assert not Path(out).exists()
