"""scripts/gpu_check: its random-initialised Qwen-shaped models and measurements, at tiny scale on the CPU
(the GPU run uses the same code at full scale), and its shell wrapper's syntax."""

from __future__ import annotations

import json
import subprocess

from scripts.gpu_check import QWEN_SHAPES, random_model, run_check
from tests.test_gen import ROOT
from tracestore.validate import validate


def test_random_models_have_the_qwen_shapes(tmp_path):
    path = random_model("qwen2.5-math-7b", tmp_path, tiny=True)
    config = json.loads((path / "config.json").read_text())
    shape = QWEN_SHAPES["qwen2.5-math-7b"]
    assert config["vocab_size"] == shape["vocab_size"] and config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "qwen2"
    assert QWEN_SHAPES["qwen2.5-math-1.5b"]["num_key_value_heads"] == 2 and shape["hidden_size"] == 3584


def test_the_check_runs_gen_and_measures_it(tmp_path, capsys):
    results = run_check(tmp_path, problems=2, max_steps=2, backend="hf", tiny=True)
    printed = capsys.readouterr().out
    assert [r["label"] for r in results] == ["toy world (hf)", "tiny Qwen2.5-Math shapes, random weights (hf)"]
    for result, trace in zip(results, ("toy", "qwen")):
        validate(tmp_path / trace)
        assert result["steps"] > 0 and result["tokens"] > 0
        assert set(result["tokens_per_second"]) == {"small", "large"}
        assert all(rate > 0 for rate in result["tokens_per_second"].values())
        assert 0 < result["bytes_per_token"] < 1000
    # random weights rarely sample the delimiter: steps run to the token budget
    assert results[1]["tokens"] >= results[1]["steps"] * 32
    assert "generated tokens/s small" in printed and "bytes on disk per generated token" in printed


def test_the_shell_wrapper_parses():
    subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT, check=True)
