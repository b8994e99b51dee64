"""The openai backend against a real server: `vllm serve` (vLLM's OpenAI-compatible server) of toy-large on
127.0.0.1, one per module. The small model runs locally (hf); the large one through the server.

Starts a vLLM server and compares it with the session's shared local vLLM engine of toy-large (slow): run with
`pytest -m vllm`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from test_gen import toy_models  # noqa: F401  (fixture: trained toy models, or random-weight stand-ins)
from typer.testing import CliRunner

from cli import app
from scripts.vllm_server import local_server
from tracegen.backends import StepRequest, StepSampling
from tracegen.backends.endpoint_spec import ClientOptions, parse_api_spec
from tracegen.expand import Request
from tracegen.gen import GenOptions, _load_trees, run_gen
from tracegen.growth import Tree, request_seed
from tracegen.models import load_tokenizer, resolve_model
from tracegen.prompts import STEP_DELIMITER, prompt_token_ids
from tracestore.store import open_trace
from tracestore.validate import validate

pytestmark = pytest.mark.vllm

N_PROBLEMS = 12
SEED = 5
SAMPLING = dict(max_steps=6, max_step_tokens=48, temperature=0.7, top_p=1.0, topk=5)


@pytest.fixture(scope="module")
def server(toy_models):  # noqa: F811
    with local_server(resolve_model(toy_models[1], "large").path, "toy-large") as url:
        yield url


def options(models, out, api: str, **overrides) -> GenOptions:
    return GenOptions(
        small=models[0],
        large=models[1],
        dataset="toy",
        out=out,
        limit=N_PROBLEMS,
        backend="hf",
        seed=SEED,
        api=(parse_api_spec(api),),
        api_client=ClientOptions(concurrency=8, timeout=120),
        **SAMPLING,
        **overrides,
    )


@pytest.fixture(scope="module")
def completions_trace(server, toy_models, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("api-vllm") / "completions"
    run_gen(options(toy_models, out, f"large:url={server},model=toy-large,mode=completions,price=0/0/0"))
    return out


def test_completions_mode_equals_the_local_vllm_engine(completions_trace, toy_models, vllm_large):  # noqa: F811
    """Every large step the server wrote is what the local vLLM engine writes for the same token ids and seed."""
    out = completions_trace
    assert validate(out)["problems"] == N_PROBLEMS
    trace = open_trace(out)
    steps = trace.scan("steps").filter(pl.col("model") == "large").collect()
    tokens = dict(trace.scan("tokens").select("step_id", "token_ids").collect().iter_rows())
    tokenizer = load_tokenizer(resolve_model(toy_models[1], "large"))
    problems = {p.problem_id: p for p in _problems(out)}
    roots = {pid: prompt_token_ids(tokenizer, p.question) for pid, p in problems.items()}
    trees: dict[tuple[str, int], Tree] = _load_trees(trace, list(problems.values()), roots, 1)
    rows = list(steps.iter_rows(named=True))
    requests = [
        StepRequest(
            tuple(trees[(row["problem_id"], row["world"])].prompt_ids(row["parent_path"])),
            request_seed(SEED, Request(row["problem_id"], row["world"], row["parent_path"], "large")),
        )
        for row in rows
    ]
    generated = vllm_large.generate_steps(
        requests,
        StepSampling(
            temperature=SAMPLING["temperature"],
            top_p=SAMPLING["top_p"],
            max_step_tokens=SAMPLING["max_step_tokens"],
            topk=SAMPLING["topk"],
            delimiter=STEP_DELIMITER,
        ),
    )
    differ = [
        (row["step_id"], step.text, row["text"])
        for row, step in zip(rows, generated)
        if step.token_ids != list(tokens[row["step_id"]]) or step.text != row["text"]
    ]
    assert len(rows) > 2 * N_PROBLEMS
    assert differ == [], f"{len(differ)} of {len(rows)} large steps differ from the local engine: {differ[:3]}"
    # logprobs: the server's raw_logprobs equal the local exact scoring pass
    server_logprobs = dict(trace.scan("tokens").select("step_id", "logprobs").collect().iter_rows())
    worst = max(
        abs(a - b) for row, step in zip(rows, generated) for a, b in zip(step.logprobs, server_logprobs[row["step_id"]])
    )
    assert worst < 1e-3


def test_completions_mode_bills_the_server_usage(completions_trace):
    steps = open_trace(completions_trace).scan("steps").filter(pl.col("model") == "large").collect()
    assert steps["n_cached_tokens"].sum() > 0  # the server's prefix cache, as its usage reports it
    assert (steps["n_new_prefill_tokens"] == steps["n_prompt_tokens"] - steps["n_cached_tokens"]).all()
    assert steps["conf_max_logit_math"].null_count() == steps.height
    assert steps["conf_top1_prob_min_math"].null_count() < steps.height


def test_chat_mode_validates_has_s_api_and_replays(server, toy_models, tmp_path):  # noqa: F811
    out = tmp_path / "chat"
    run_gen(options(toy_models, out, f"large:url={server},model=toy-large,mode=chat,layout=final,price=gpt-4.1-mini"))
    assert validate(out)["problems"] == N_PROBLEMS
    large = open_trace(out).scan("steps").filter(pl.col("model") == "large").collect()
    assert large.height > N_PROBLEMS
    assert large["conf_top1_prob_min_math"].null_count() < large.height
    assert large["conf_max_logit_math"].null_count() == large["conf_max_logit_mean"].null_count() == large.height
    assert open_trace(out).manifest["engine"]["large"]["chat_layout"] == "final"
    priced = ["--cost", "api", "--price", "small=0", "--price", "large=gpt-4.1-mini", "--split", "all"]
    result = CliRunner().invoke(app, ["replay", str(out), "--router", "large-only", *priced], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "US cents" in result.output


def _problems(out: Path):
    from tracegen.datasets import load_dataset

    return load_dataset("toy", limit=N_PROBLEMS).problems
