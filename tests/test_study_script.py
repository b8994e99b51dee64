"""scripts/study_gsm8k.sh: its dry run plans GSM8K and MATH500 for the real models without starting anything, and
the whole study runs end to end on a CPU (transformers backend) with stand-ins of Qwen2.5-Math-1.5B/7B-Instruct
and Skywork's PRM in a scratch Hugging Face cache, on the GSM8K problems whose answer is 2 or 3.

The stand-ins (scripts/stand_ins.py) keep the real vocabularies, Qwen2.5's tokenizer and the real depth (28
blocks, so the cascade's P(IK) reads layer 24 as on the real models) with layers 64 wide: full-size random models
are 1.5B and 7.6B parameters, hours of CPU for this test. Their output layers are scripted to write short
solutions in the real vocabulary ("We have x = y" ending in the merged ".\\n\\n" token, or "So \\boxed{2}." then
<|im_end|>), right about half the time on these problems: random weights write no answers, and the study's
probes and mixtures need right and wrong solutions to fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.stand_ins import SHRUNK, place_in_hf_cache, write_prm_stand_in, write_stand_in
from tests.test_gen import ROOT
from tracestore.store import open_trace

BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"
ANSWERS = {"2", "3"}  # what the scripted stand-ins answer


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A Hugging Face cache holding the stand-ins under the real repo ids (what the study's aliases name)."""
    root = tmp_path_factory.mktemp("stand-ins")
    home = root / "hf"
    models = {
        "qwen2.5-math-1.5b": write_stand_in("qwen2.5-math-1.5b", root / "small", shrink=SHRUNK, scripted=True),
        "qwen2.5-math-7b": write_stand_in(
            "qwen2.5-math-7b", root / "large", shrink=dict(SHRUNK, hidden_size=96), scripted=True, seed=1
        ),
        "skywork-prm-1.5b": write_prm_stand_in(root / "prm", shrink=SHRUNK, seed=2),
    }
    for alias, folder in models.items():
        place_in_hf_cache(folder, alias, home)
    return home


def study(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
    }
    return subprocess.run(
        ["bash", "scripts/study_gsm8k.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def test_the_dry_run_plans_gsm8k_and_math500_and_starts_nothing(tmp_path):
    result = study(["--dry-run", "--out", str(tmp_path / "study")], tmp_path / "empty-cache")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "memory plan (vllm on a 80 GiB GPU (assumed)" in out
    assert "Qwen/Qwen2.5-Math-7B-Instruct" in out and "each model's weights twice" in out
    assert "gsm8k: 1,319 problems" in out and "math500: 500 problems" in out
    assert out.count("+ trace gen --model qwen2.5-math-1.5b --large qwen2.5-math-7b") == 2
    assert "--expand closure --routers scripts/study_routers.toml" in out
    assert "+ trace report" in out and "--table cmdp --table cascade" in out
    assert out.rstrip().endswith("dry run: nothing was started")
    assert not (tmp_path / "study").exists()


def problems_answered(source: str, answer_field: str, out: Path, limit: int) -> Path:
    lines = []
    for line in (BENCHMARKS / source).read_text().splitlines():
        answer = json.loads(line)[answer_field].split("####")[-1].strip()
        if answer in ANSWERS:
            lines.append(line)
    out.write_text("\n".join(lines[:limit]) + "\n")
    return out


@pytest.mark.slow
def test_the_study_runs_end_to_end_and_resumes(tmp_path, hf_home):
    data = problems_answered("gsm8k_test.jsonl", "answer", tmp_path / "gsm8k.jsonl", limit=64)
    out = tmp_path / "study"
    args = ["--out", str(out), "--datasets", f"gsm8k={data}", "--backend", "hf", "--policy-steps", "30"]
    result = study(args, hf_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout
    assert printed.index("memory plan (hf") < printed.index("+ trace gen")  # estimates first
    assert "hidden states to store: small: layer 24, cascade P(IK): the paper's layer 24 (28 blocks)" in printed
    trace = open_trace(out / "gsm8k")
    assert {role: layers for role, layers in trace.manifest.hidden_layers_by_model.items() if layers} == {"small": [24]}
    steps = trace.scan("steps").collect()
    finals = steps.filter(steps["is_final"])
    assert set(finals["answer"].drop_nulls()) <= ANSWERS and finals["correct"].any() and not finals["correct"].all()
    tokens = trace.scan("tokens").collect()
    assert any(382 in ids for ids in tokens["token_ids"])  # the merged ".\n\n" delimiter token
    assert set(trace.manifest.scorers) >= {"prm", "judge", "first_token", "verifier"}
    report = out / "gsm8k" / "report"
    cmdp, cascade = (report / "table_cmdp.md").read_text(), (report / "table_cascade.md").read_text()
    for router in ("rsd", "specreason", "steer", "policy", "cascade", "oracle"):
        assert router in cmdp
    assert "with P(IK)" in cascade

    again = study(args, hf_home)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = " ".join(again.stdout.split())
    assert "nothing to do" in resumed or " 0 new steps" in resumed  # gen grows nothing again
    assert "0 new verifier scores" in resumed
