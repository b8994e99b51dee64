"""The openai backend against a local OpenAI-compatible server (tests/endpoint_server.py): faults, resume, budget,
errors. Everything runs on 127.0.0.1; no model engine starts (the toy server serves the endpoint roles, the fake
backend any other: seeded toy steps, no model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from endpoint_server import ApiServer, ServerState
from test_gen import toy_models  # noqa: F401  (fixture: trained toy models, or random-weight stand-ins)

from tracegen.backends.endpoint_spec import ClientOptions, parse_api_spec
from tracegen.gen import GenOptions, run_gen
from tracegen.models import load_tokenizer, resolve_model
from tracestore.errors import TraceError
from tracestore.schema import API_RESPONSES_DIR
from tracestore.store import open_trace
from tracestore.validate import validate

ROOT = Path(__file__).resolve().parent.parent
N_PROBLEMS = 6
KEY = "sk-test-4f1d9c"


def tokenizer(models):
    return load_tokenizer(resolve_model(models[1], "large"))


def api_options(models, out, url, *, mode="completions", client=None, key_env=None, **overrides) -> GenOptions:
    extra = f",key-env={key_env}" if key_env else ""
    small_price = overrides.pop("small_price", None)
    small_extra = extra + (f",price={small_price}" if small_price else "")
    settings = dict(
        small=models[0],
        large=models[1],
        dataset="toy",
        out=out,
        limit=N_PROBLEMS,
        max_steps=5,
        max_step_tokens=48,
        seed=3,
        backend="fake",  # of a role not served by the API
        api=(
            parse_api_spec(f"small:url={url},model=toy-small,mode=completions{small_extra}"),
            parse_api_spec(f"large:url={url},model=toy-large,mode={mode},layout=final,price=gpt-4.1-mini{extra}"),
        ),
        api_client=client or ClientOptions(concurrency=4, timeout=5, backoff=0.01),
    )
    settings.update(overrides)
    return GenOptions(**settings)


def step_frame(out: Path) -> pl.DataFrame:
    return open_trace(out).scan("steps").drop("gen_seconds").sort("step_id").collect()


def journal_files(out: Path) -> set[str]:
    return {path.name for path in (out / API_RESPONSES_DIR).rglob("*.json")}


@pytest.fixture(scope="module")
def clean_run(toy_models, tmp_path_factory):  # noqa: F811
    """A trace grown against a server without faults: the data every faulty run must reproduce."""
    state = ServerState(tokenizer=tokenizer(toy_models))
    out = tmp_path_factory.mktemp("api") / "clean"
    with ApiServer(state) as server:
        summary = run_gen(api_options(toy_models, out, server.url))
    return out, state, summary


def test_clean_run_validates_with_usage_and_no_logits(clean_run):
    out, state, summary = clean_run
    assert validate(out)["problems"] == N_PROBLEMS
    steps = step_frame(out)
    assert steps.height == summary.new_steps > 2 * N_PROBLEMS
    assert steps["conf_max_logit_mean"].null_count() == steps.height
    assert steps["conf_max_logit_math"].null_count() == steps.height
    assert steps["conf_top1_prob_min_math"].null_count() == 0
    tokens = open_trace(out).scan("tokens").collect()
    assert tokens["max_logits"].null_count() == tokens.height
    # usage as the server billed it: its cached tokens are whole 32-token blocks of the prompt
    assert (steps["n_cached_tokens"] == steps["n_prompt_tokens"] // 32 * 32).all()
    assert (steps["n_new_prefill_tokens"] == steps["n_prompt_tokens"] - steps["n_cached_tokens"]).all()
    # one well-formed answer per request, each stored once
    assert set(state.outcomes().values()) == {1}
    assert {name.removesuffix(".json") for name in journal_files(out)} == set(state.outcomes())
    assert len(journal_files(out)) == steps.height
    # graded: the toy server writes a wrong step for seeds divisible by 4, so both outcomes occur
    assert set(steps.filter(pl.col("is_final"))["correct"].to_list()) == {True, False}


def test_manifest_records_modes_but_never_the_key(clean_run, toy_models, tmp_path, monkeypatch):  # noqa: F811
    out, _, _ = clean_run
    manifest = open_trace(out).manifest
    assert manifest["engine"]["large"]["mode"] == "completions"
    assert manifest["engine"]["large"]["served_model"] == "toy-large"
    assert manifest["api_endpoints"]["large"]["url"].startswith("http://127.0.0.1:")

    monkeypatch.setenv("TOY_API_KEY", KEY)
    state = ServerState(tokenizer=tokenizer(toy_models), api_key=KEY)
    keyed = tmp_path / "keyed"
    with ApiServer(state) as server:
        run_gen(api_options(toy_models, keyed, server.url, key_env="TOY_API_KEY", limit=2))
    assert validate(keyed)["problems"] == 2
    for path in keyed.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_faults_give_the_same_data_and_nothing_is_paid_twice(clean_run, toy_models, tmp_path):  # noqa: F811
    clean, _, _ = clean_run
    state = ServerState(
        tokenizer=tokenizer(toy_models),
        faults={"429": 1, "500": 1, "slow": 1, "malformed": 1, "cutoff": 1},
        fault_every=3,  # a third of the requests meet every fault once, in turn
        slow_seconds=1.5,
        retry_after="0.2",
    )
    out = tmp_path / "faulty"
    client = ClientOptions(concurrency=8, timeout=1.0, backoff=0.01, max_retries=12)  # 5 faults + dropped keep-alives
    with ApiServer(state) as server:
        run_gen(api_options(toy_models, out, server.url, client=client))
    assert step_frame(out).equals(step_frame(clean))
    paid = state.outcomes()
    assert set(paid.values()) == {1}, "a request was answered (and billed) twice"
    for fault in ("429", "500", "slow", "malformed", "cutoff"):
        assert sum(state.outcomes(fault).values()) > 0, fault
    # Retry-After was honoured: each retry after a 429 came at least 0.2 s later
    times = {}
    for digest, outcome, at in state.log:
        times.setdefault(digest, []).append((outcome, at))
    gaps = [b[1] - a[1] for seen in times.values() for a, b in zip(seen, seen[1:]) if a[0] == "429"]
    assert gaps and min(gaps) >= 0.2


def test_rerun_of_a_finished_trace_sends_nothing(clean_run, toy_models, tmp_path):  # noqa: F811
    clean, _, _ = clean_run
    state = ServerState(tokenizer=tokenizer(toy_models))
    with ApiServer(state) as server:
        summary = run_gen(api_options(toy_models, clean, server.url))
    assert summary.new_steps == 0
    assert [outcome for _, outcome, _ in state.log] == []  # only GET /models, which is not logged


def test_a_crash_mid_round_resends_only_the_missing(clean_run, toy_models, tmp_path):  # noqa: F811
    """Responses of a round that never reached the steps table (the process died) are not paid again."""
    clean, _, _ = clean_run
    state = ServerState(tokenizer=tokenizer(toy_models), faults={"500": 99}, fault_every=5)
    out = tmp_path / "crash"
    client = ClientOptions(concurrency=4, timeout=5, backoff=0.0, max_retries=1)
    with ApiServer(state) as server:
        with pytest.raises(TraceError, match="failed 2 times, last: HTTP 500"):
            run_gen(api_options(toy_models, out, server.url, client=client))
        paid_before = state.outcomes()
        assert paid_before and {name.removesuffix(".json") for name in journal_files(out)} == set(paid_before)
        state.faults = {}
        state.log.clear()
        run_gen(api_options(toy_models, out, server.url, client=client))
    assert step_frame(out).equals(step_frame(clean))
    assert not set(state.outcomes()) & set(paid_before), "a stored response was requested again"


def test_kill_9_then_rerun_sends_only_missing_requests(clean_run, toy_models, tmp_path):  # noqa: F811
    clean, _, _ = clean_run
    state = ServerState(tokenizer=tokenizer(toy_models), delay=0.15)
    out = tmp_path / "killed"
    with ApiServer(state) as server:
        large = f"large:url={server.url},model=toy-large,mode=completions"
        command = [
            sys.executable, "-m", "cli", "gen", "--model", toy_models[0], "--large", toy_models[1],
            "--dataset", "toy", "--limit", str(N_PROBLEMS), "--max-steps", "5", "--max-step-tokens", "48",
            "--seed", "3", "--api", f"small:url={server.url},model=toy-small,mode=completions",
            "--api", large + ",layout=final,price=gpt-4.1-mini", "--concurrency", "2", "--out", str(out),
            "--backend", "fake",
        ]  # fmt: skip
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while len(state.outcomes()) < 12 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        stored_at_kill = journal_files(out)
        sent_before = set(state.outcomes())
        state.log.clear()
        rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert step_frame(out).equals(step_frame(clean))
    resent = set(state.outcomes())
    keys_at_kill = {name.removesuffix(".json") for name in stored_at_kill}
    assert len(keys_at_kill) >= 10
    assert resent == {name.removesuffix(".json") for name in journal_files(out)} - keys_at_kill
    assert len(resent & sent_before) <= 2  # only the requests in flight (--concurrency 2) when the process died


def test_budget_stops_cleanly_and_keeps_what_was_bought(clean_run, toy_models, tmp_path):  # noqa: F811
    clean, _, _ = clean_run
    state = ServerState(tokenizer=tokenizer(toy_models))
    out = tmp_path / "budget"
    with ApiServer(state) as server:
        tight = ClientOptions(concurrency=1, timeout=5, budget_usd=0.0003)
        with pytest.raises(TraceError, match=r"--budget-usd 0.0003 reached: this run spent \$0\.000"):
            run_gen(api_options(toy_models, out, server.url, client=tight, small_price="0"))
        bought = set(state.outcomes())
        assert bought and {name.removesuffix(".json") for name in journal_files(out)} == bought
        run_gen(api_options(toy_models, out, server.url))
    assert step_frame(out).equals(step_frame(clean))
    assert set(state.outcomes().values()) == {1}


def test_budget_needs_a_price(toy_models, tmp_path):  # noqa: F811
    state = ServerState(tokenizer=tokenizer(toy_models))
    with ApiServer(state) as server:
        options = api_options(toy_models, tmp_path / "t", server.url, client=ClientOptions(budget_usd=1.0))
        with pytest.raises(TraceError, match="--budget-usd needs the price of the small role"):
            run_gen(options)


def test_wrong_key_unknown_model_and_unreachable_url_are_one_clear_error(toy_models, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TOY_API_KEY", "sk-wrong-key-123")
    state = ServerState(tokenizer=tokenizer(toy_models), api_key=KEY)
    with ApiServer(state) as server:
        url = server.url
        wrong_key = [sys.executable, "-m", "cli", "gen", "--model", toy_models[0], "--large", toy_models[1],
                     "--dataset", "toy", "--limit", "2", "--out", str(tmp_path / "a"), "--backend", "fake",
                     "--api", f"small:url={url},model=toy-small,key-env=TOY_API_KEY"]  # fmt: skip
        result = subprocess.run(wrong_key, cwd=ROOT, capture_output=True, text=True, env=os.environ, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "rejected the API key (401); check the key in $TOY_API_KEY" in result.stderr + result.stdout
        assert "sk-wrong-key-123" not in result.stderr + result.stdout

        state.api_key = None
        with pytest.raises(TraceError, match="serves no model 'gpt-9'"):
            run_gen(api_options(toy_models, tmp_path / "b", url, api=(parse_api_spec(f"large:url={url},model=gpt-9"),)))
    closed = f"http://127.0.0.1:{_free_port()}/v1"
    client = ClientOptions(timeout=2, max_retries=1, backoff=0.01)
    with pytest.raises(TraceError, match=r"endpoint http://127.0.0.1:\d+/v1 failed 2 times, last: connection failed"):
        run_gen(api_options(toy_models, tmp_path / "c", closed, client=client))


def test_bad_api_spec_is_named():
    with pytest.raises(TraceError, match="unknown setting 'colour=red'"):
        parse_api_spec("large:url=http://x/v1,colour=red")
    with pytest.raises(TraceError, match="mode must be one of completions, chat"):
        parse_api_spec("large:url=http://x/v1,mode=edit")
    with pytest.raises(TraceError, match="--api must look like"):
        parse_api_spec("large")


def test_chat_mode_run_has_s_api_and_replays(toy_models, tmp_path):  # noqa: F811
    """Chat mode, closed-API style (instruction layout, tokens named by text): S_API filled, raw logits null."""
    state = ServerState(tokenizer=tokenizer(toy_models))
    out = tmp_path / "chat"
    with ApiServer(state) as server:
        options = api_options(toy_models, out, server.url, mode="chat")
        options = GenOptions(
            **{
                **options.__dict__,
                "api": (options.api[0], parse_api_spec(f"large:url={server.url},model=toy-large,mode=chat")),
            }
        )
        run_gen(options)
    assert validate(out)["problems"] == N_PROBLEMS
    manifest = open_trace(out).manifest
    assert manifest.model("large") == {"role": "large", "name": "toy-large", "served_by": "openai", "mode": "chat"}
    assert manifest["engine"]["large"]["chat_layout"] == "instruction"
    steps = step_frame(out)
    large = steps.filter(pl.col("model") == "large")
    assert large.height > N_PROBLEMS and large["conf_top1_prob_min_math"].null_count() == 0
    assert large["conf_max_logit_math"].null_count() == large.height
    tokens = open_trace(out).scan("tokens").join(large.lazy().select("step_id"), on="step_id").collect()
    assert all(set(ids) == {-1} for ids in tokens["token_ids"])
    assert large.filter(pl.col("is_final"))["correct"].null_count() == 0
    priced = ("--cost", "api", "--price", "small=0", "--price", "large=gpt-4.1-mini", "--split", "all")
    replayed = invoke("replay", out, "--router", "large-only", *priced, "--out", tmp_path / "large.parquet")
    assert replayed.exit_code == 0, replayed.output
    assert pl.read_parquet(tmp_path / "large.parquet")["misses"].sum() == 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def open_to_closed(toy_models, tmp_path_factory):  # noqa: F811
    """The CMDP seed's open-to-closed setting in miniature: a local small model (the fake backend's toy-small) and a
    chat-API large one."""
    state = ServerState(tokenizer=tokenizer(toy_models))
    out = tmp_path_factory.mktemp("o2c") / "trace"
    with ApiServer(state) as server:
        spec = parse_api_spec(f"large:url={server.url},model=toy-large,mode=chat,price=gpt-4.1-mini")
        run_gen(api_options(toy_models, out, server.url, api=(spec,), limit=40, max_steps=4))
    return out


def invoke(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_open_to_closed_policy_trains_on_s_api_and_reports_cents(open_to_closed, tmp_path):
    out = open_to_closed
    assert validate(out)["problems"] == 40
    steps = step_frame(out)
    assert steps.filter(pl.col("model") == "small")["conf_max_logit_math"].null_count() == 0  # local: raw logits
    assert steps.filter(pl.col("model") == "large")["conf_max_logit_math"].null_count() > 0  # API: none

    policy = tmp_path / "policy.pt"
    features = "conf_top1_prob_min_math,depth,is_final,n_gen_tokens"
    prices = ("--price", "small=0", "--price", "large=gpt-4.1-mini")
    options = ("--features", features, "--cost", "api", *prices, "--steps", 40)
    trained = invoke("train", "policy", out, "--out", policy, *options)
    assert trained.exit_code == 0, trained.output
    api_cost = ("--cost", "api", *prices, "--split", "all")
    results = []
    for router, params in (("small-only", ()), ("large-only", ()), ("policy", ("--param", f"path={policy}"))):
        result_file = tmp_path / f"{router}.parquet"
        replayed = invoke("replay", out, "--router", router, *params, *api_cost, "--out", result_file)
        assert replayed.exit_code == 0, replayed.output
        results.append(result_file)
    large = pl.read_parquet(results[1])
    assert large["misses"].sum() == 0
    # --cost api reproduces the bill: every response of the all-large chains at GPT-4.1-mini's list prices
    chains = steps.filter(pl.col("path").str.contains("^L+$"))
    usd = (
        0.40 * (chains["n_prompt_tokens"] - chains["n_cached_tokens"]).sum()
        + 0.10 * chains["n_cached_tokens"].sum()
        + 1.60 * chains["n_gen_tokens"].sum()
    ) / 1e6
    assert chains["n_cached_tokens"].sum() > 0
    assert large["cost"].sum() == pytest.approx(100 * usd, rel=1e-9)
    assert large["cost"].sum() > 0 and set(large["cost_unit"]) == {"US cents"}
    report = tmp_path / "report"
    made = invoke(
        "report", out, *results, "--out", report, "--table", "cmdp", "--split", "all", "--pick-split", "reported",
        "--allow-overlap",  # every row, the policy's train rows too
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    table = pl.read_csv(report / "table_cmdp.csv")
    methods = table["method"].to_list()
    assert methods[:2] == ["small-only", "large-only"]
    # 40 training steps end off the coverage target, which the report marks on the policy's row (‡)
    assert [method.split()[0] for method in methods[2:]] == ["policy"]
    cents = [column for column in table.columns if "cent" in column]
    assert cents, table.columns
    by_method = dict(zip(table["method"], table[cents[0]]))
    assert by_method["small-only"] == 0 and by_method["large-only"] > 0


def test_routers_needing_raw_logits_of_an_api_role_refuse(clean_run, tmp_path):
    """Both roles of clean_run are API-served: STEER and a policy on raw logits name the role and signal."""
    out, _, _ = clean_run
    steer = invoke("replay", out, "--router", "steer", "--split", "all")
    assert steer.exit_code == 1
    assert "router steer needs conf_max_logit_math (raw logits) of the small model's steps" in steer.output
    assert "served by an API (completions mode)" in steer.output
    trained = invoke("train", "policy", out, "--out", tmp_path / "p.pt", "--steps", 2)
    assert trained.exit_code == 1
    assert "router policy needs conf_max_logit_math (raw logits) of the small model's steps" in trained.output
    assert "--features conf_top1_prob_min_math" in trained.output


def test_api_verifier_checks_steps_and_is_paid_once(open_to_closed, toy_models, tmp_path):  # noqa: F811
    """The open-to-closed checker (GPT-4o-mini in the seed) as a scorer behind an endpoint: the toy server answers
    with the exact verifier's verdict, so the stored values equal it; a second run sends nothing."""
    import shutil

    from data.toy.task import step_is_valid

    out = tmp_path / "scored"
    shutil.copytree(open_to_closed, out)
    state = ServerState(tokenizer=tokenizer(toy_models))
    with ApiServer(state) as server:
        spec = f"url={server.url},model=toy-large,price=gpt-4o-mini"
        first = invoke("score", out, "--scorer", "api-verifier", "--model", spec)
        assert first.exit_code == 0, first.output
        sent = sum(state.outcomes().values())
        again = invoke("score", out, "--scorer", "api-verifier", "--model", spec)
        assert again.exit_code == 0, again.output
    # steps with the same question and texts (small and large often agree) share one request
    assert validate(out)["scores"] == step_frame(out).height >= sent
    assert len(list((out / API_RESPONSES_DIR / "verifier").glob("*.json"))) == sent
    assert sum(state.outcomes().values()) == sent
    trace = open_trace(out)
    texts = trace.scan("steps").select("step_id", "problem_id", "path", "text").collect()
    questions = dict(trace.scan("problems").select("problem_id", "question").collect().iter_rows())
    by_node = {(row["problem_id"], row["path"]): row["text"] for row in texts.iter_rows(named=True)}
    scores = dict(trace.scan("scores").select("step_id", "value").collect().iter_rows())
    for row in texts.iter_rows(named=True):
        path = row["path"]
        steps = [by_node[(row["problem_id"], path[:end])] for end in range(1, len(path) + 1)]
        assert scores[row["step_id"]] == float(step_is_valid(questions[row["problem_id"]], steps[:-1], steps[-1]))
    assert trace.manifest.scorers["verifier"]["name"] == "toy-large"
    priced = ("--cost", "api", "--price", "small=0", "--price", "large=gpt-4.1-mini", "--price", "verifier=gpt-4o-mini")
    trained = invoke(
        "train", "policy", out, "--out", tmp_path / "p.pt", "--features", "conf_top1_prob_min_math,depth", *priced,
        "--steps", 5,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
