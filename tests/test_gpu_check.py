"""scripts/gpu_check: its random-initialised Qwen2.5-Math stand-ins (the real vocabulary and tokenizer) and its
measurements, at tiny scale on the CPU (the GPU run uses the same code at full scale), and its shell wrapper's
syntax."""

from __future__ import annotations

import json
import subprocess

from scripts.gpu_check import TINY, run_check
from scripts.stand_ins import REFERENCE_CONFIGS, write_stand_in
from tests.test_gen import ROOT
from tracegen.options import EngineOptions
from tracestore.validate import validate


def test_stand_ins_have_the_qwen_shapes_and_tokenizer(tmp_path):
    path = write_stand_in("qwen2.5-math-7b", tmp_path, shrink=TINY)
    config = json.loads((path / "config.json").read_text())
    shape = REFERENCE_CONFIGS["qwen2.5-math-7b"]
    assert config["vocab_size"] == shape["vocab_size"] == 152064 and config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "qwen2"
    assert (shape["hidden_size"], shape["num_key_value_heads"]) == (3584, 4)
    tokenizer = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>"
    assert json.loads((path / "stand_in.json").read_text())["stands_in_for"] == "Qwen/Qwen2.5-Math-7B-Instruct"


def test_the_check_runs_gen_and_measures_it(tmp_path, capsys):
    results = run_check(tmp_path, problems=2, max_steps=2, backend="hf", tiny=True, engine=EngineOptions())
    printed = capsys.readouterr().out
    assert [r["label"] for r in results] == [
        "toy world (hf)",
        "tiny Qwen2.5-Math shapes, random weights, GSM8K prompts (hf)",
    ]
    for result, trace in zip(results, ("toy", "qwen")):
        validate(tmp_path / trace)
        assert result["steps"] > 0 and result["tokens"] > 0
        assert set(result["tokens_per_second"]) == {"small", "large"}
        assert all(rate > 0 for rate in result["tokens_per_second"].values())
        assert 0 < result["bytes_per_token"] < 1000
        assert result["plan_weights_gib"] > 0 and result["measured_gib"] is None  # no GPU here
    # random weights rarely sample the delimiter: steps run to the token budget
    assert results[1]["tokens"] >= results[1]["steps"] * 32
    assert "memory plan (hf on CPU" in printed and "bytes on disk per generated token" in printed


def test_the_shell_wrapper_parses():
    subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT, check=True)
