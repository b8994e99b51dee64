"""`trace gen` end to end on the toy world: the trees, counters, grades, manifest and hidden states of a run with the
transformers backend; reruns, resume, locks, lost parts, full contexts and shards with the fake backend (instant,
seeded steps of the toy world: tracegen/backends/fake.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from tracebuild import toy_gen_options
from typer.testing import CliRunner

from cli import app
from data.toy import MODEL_ALIASES, task
from tracegen import gen as gen_module
from tracegen.datasets import load_dataset
from tracegen.expand import Comb, Request, frontier
from tracegen.gen import GenOptions, in_shard, parse_shard, run_gen
from tracegen.grading import extract_answer, is_final_step
from tracegen.growth import StoredStep, Tree, request_seed
from tracestore.errors import TraceError
from tracestore.store import open_trace
from tracestore.validate import validate

ROOT = Path(__file__).resolve().parent.parent
N_PROBLEMS = 3
MAX_STEPS = 5
STEP_TOKENS = 48


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> tuple[str, str]:
    """The trained toy models, or random-weight ones of the same shape while those are being trained."""
    if all(path.is_dir() for path in MODEL_ALIASES.values()):
        return "toy-small", "toy-large"
    from transformers import Qwen2ForCausalLM

    from data.toy.tokenizer import build_tokenizer
    from scripts.toy.train import model_config

    folder = tmp_path_factory.mktemp("toy-models")
    tokenizer = build_tokenizer()
    for size in ("small", "large"):
        torch.manual_seed(0)
        Qwen2ForCausalLM(model_config(size, tokenizer)).save_pretrained(folder / size)
        tokenizer.save_pretrained(folder / size)
    return str(folder / "small"), str(folder / "large")


def options(models, out, **overrides) -> GenOptions:
    """A `trace gen` of ``models`` on N_PROBLEMS toy problems; the transformers backend unless ``backend`` says."""
    settings = dict(
        small=models[0], large=models[1], limit=N_PROBLEMS, max_step_tokens=STEP_TOKENS, max_steps=MAX_STEPS, seed=3
    )
    return toy_gen_options(out, **{**settings, **overrides})


@pytest.fixture(scope="module")
def comb_trace(toy_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "comb"
    run_gen(options(toy_models, out, worlds=2, hidden_layers=(-1, 1)))
    return out


def read_steps(root: Path) -> pl.DataFrame:
    return open_trace(root).scan("steps").collect().sort("step_id")


def test_comb_trace_validates_and_is_complete(comb_trace):
    counts = validate(comb_trace)
    steps = read_steps(comb_trace)
    assert counts["problems"] == N_PROBLEMS and counts["steps"] == steps.height > 0
    assert steps.select("problem_id", "world").n_unique() == 2 * N_PROBLEMS
    # no comb step is missing: asking the strategy again gives nothing to do
    trees = {(p, w): {} for p in steps["problem_id"].unique() for w in (0, 1)}
    for row in steps.iter_rows(named=True):
        trees[(row["problem_id"], row["world"])][row["path"]] = row["is_final"]
    assert frontier(trees, Comb(), max_steps=MAX_STEPS) == []
    # and every step is a comb step: small chains, large completions
    assert all("Ls" not in path for path in steps["path"])
    for nodes in trees.values():
        assert "s" in nodes and "L" in nodes
        chain = [path for path in nodes if "L" not in path]
        for path in chain:
            if not nodes[path] and len(path) < MAX_STEPS:
                assert path + "L" in nodes  # a large completion starts at every open chain node


def test_step_counters_follow_the_tree(comb_trace):
    trace = open_trace(comb_trace)
    steps = read_steps(comb_trace)
    tokens = {r["step_id"]: r["token_ids"] for r in trace.scan("tokens").collect().iter_rows(named=True)}
    problems = {r["problem_id"]: r for r in trace.scan("problems").collect().iter_rows(named=True)}
    by_id = {r["step_id"]: r for r in steps.iter_rows(named=True)}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trace.manifest["model_paths"]["small"])
    from tracegen.prompts import prompt_token_ids

    for row in by_id.values():
        prefix = f"{row['problem_id']}/{row['world']}/"
        ancestors = [by_id[prefix + row["path"][:end]] for end in range(1, len(row["path"]))]
        root = len(prompt_token_ids(tokenizer, problems[row["problem_id"]]["question"]))
        assert row["n_prompt_tokens"] == root + sum(a["n_gen_tokens"] for a in ancestors)
        assert row["n_gen_tokens"] == len(tokens[row["step_id"]])
        own = [a for a in ancestors if a["model"] == row["model"]]
        if own:  # the model already holds its last step's prompt and all but its last sampled token
            last = own[-1]
            assert row["n_new_prefill_tokens"] == row["n_prompt_tokens"] - (
                last["n_prompt_tokens"] + last["n_gen_tokens"] - 1
            )
        else:
            assert row["n_new_prefill_tokens"] == row["n_prompt_tokens"]
        assert row["depth"] == len(row["parent_path"])
        # text is the decoded tokens up to the delimiter (the char-level toy tokenizer merges nothing)
        decoded = tokenizer.decode(tokens[row["step_id"]], skip_special_tokens=True)
        assert decoded.split("\n\n")[0] == row["text"]
        assert decoded.endswith("\n\n") == (row["finish_reason"] == "delimiter")
        assert row["is_final"] == is_final_step(row["text"], row["finish_reason"])


def test_final_steps_graded_exactly(comb_trace):
    steps = read_steps(comb_trace)
    problems = {p.problem_id: p for p in load_dataset("toy", limit=N_PROBLEMS).problems}
    by_id = {r["step_id"]: r for r in steps.iter_rows(named=True)}
    finals = [r for r in by_id.values() if r["is_final"]]
    assert finals and any(r["correct"] for r in finals)
    for row in finals:
        prefix = f"{row['problem_id']}/{row['world']}/"
        solution = "\n\n".join(by_id[prefix + row["path"][:end]]["text"] for end in range(1, len(row["path"]) + 1))
        expected = extract_answer(solution)
        assert row["answer"] == (expected or "")
        assert row["correct"] == task.grade(expected, problems[row["problem_id"]].reference)
    non_final = steps.filter(~pl.col("is_final"))
    assert non_final["answer"].null_count() == non_final.height


def test_manifest_records_the_run(comb_trace):
    manifest = open_trace(comb_trace).manifest
    small, large = manifest["models"]
    assert (small["role"], large["role"]) == ("small", "large")
    assert 0 < small["n_params"] < large["n_params"]
    for model in (small, large):  # the shape the kaplan cost model reads, as the checkpoint's config.json says
        config = json.loads((Path(manifest.model_path(model["role"])) / "config.json").read_text())
        assert (model["n_layer"], model["d_model"]) == (config["num_hidden_layers"], config["hidden_size"])
    assert manifest["dataset"]["name"] == "toy" and manifest["grader"]["name"] == "toy-exact"
    assert manifest["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_step_tokens": STEP_TOKENS, "topk": 5}
    assert manifest["expansions"] == [{"strategy": "comb", "max_steps": MAX_STEPS}] and manifest["worlds"] == 2
    assert manifest["engine"]["name"] == "hf"
    assert manifest["hidden"]["layers"] == [-1, 1]
    assert manifest["hidden"]["normed"]["small"] == {"-1": True, "1": False}


def test_hidden_vectors_match_a_direct_forward(comb_trace):
    trace = open_trace(comb_trace)
    hidden = trace.scan("hidden").collect()
    assert hidden.height == N_PROBLEMS * 2 * 2  # problems x models x layers
    problem = load_dataset("toy", limit=1).problems[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracegen.prompts import prompt_token_ids

    path = trace.manifest["model_paths"]["large"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = prompt_token_ids(AutoTokenizer.from_pretrained(path), problem.question)
    with torch.inference_mode():
        states = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (-1, 1):
        stored = hidden.filter(
            (pl.col("problem_id") == problem.problem_id) & (pl.col("model") == "large") & (pl.col("layer") == layer)
        )["vector"].to_list()[0]
        np.testing.assert_allclose(stored, states[layer][0, -1].numpy(), rtol=2e-3, atol=2e-3)


def test_rerun_is_a_no_op_and_a_differing_setting_is_refused(comb_trace, toy_models):
    before = sorted(os.listdir(comb_trace / "steps"))
    summary = run_gen(options(toy_models, comb_trace, worlds=2, hidden_layers=(-1, 1)))
    assert summary.new_steps == 0 and summary.hidden_rows == 0
    assert sorted(os.listdir(comb_trace / "steps")) == before
    with pytest.raises(TraceError, match=r"sampling\.temperature"):
        run_gen(options(toy_models, comb_trace, worlds=2, temperature=0.5))
    with pytest.raises(TraceError, match=r"models\.large\.name = '[^']+', but this run has models\.large\.name"):
        run_gen(options(toy_models, comb_trace, worlds=2, large=toy_models[0]))
    assert sorted(os.listdir(comb_trace / "steps")) == before


def test_a_rerun_with_nothing_to_do_starts_no_engine(comb_trace, toy_models, monkeypatch):
    def start_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(gen_module, "load_backend", start_engine)
    before = {path.name: path.stat().st_mtime_ns for path in (comb_trace / "steps").iterdir()}
    summary = run_gen(options(toy_models, comb_trace, worlds=2, hidden_layers=(-1, 1)))
    assert summary.up_to_date and summary.new_steps == 0
    assert {path.name: path.stat().st_mtime_ns for path in (comb_trace / "steps").iterdir()} == before
    # one more world is work to do: the engines start (here, the patched start refuses)
    with pytest.raises(AssertionError, match="an engine was started"):
        run_gen(options(toy_models, comb_trace, worlds=3, hidden_layers=(-1, 1)))


def test_engine_log_lines_go_to_the_trace_logs_folder(tmp_path, monkeypatch, capsys):
    import logging

    from tracegen.engine_logs import route_engine_logs

    for name in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    assert route_engine_logs(tmp_path, "hf") is None and not (tmp_path / "logs").exists()
    log_file = route_engine_logs(tmp_path, None)
    try:
        assert log_file == tmp_path / "logs" / "vllm.log"
        config = json.loads(Path(os.environ["VLLM_LOGGING_CONFIG_PATH"]).read_text())  # what vLLM's processes read
        assert config["handlers"]["file"]["filename"] == str(log_file.resolve())
        logging.getLogger("vllm.engine").warning("a warning the terminal should not show")
        logging.getLogger("vllm.engine").error("an error it should")
        written = log_file.read_text()
        assert "a warning the terminal should not show" in written and "an error it should" in written
        shown = capsys.readouterr().err
        assert "an error it should" in shown and "should not show" not in shown
    finally:
        logging.captureWarnings(False)
        for name in ("vllm", "py.warnings"):
            for handler in logging.getLogger(name).handlers[:]:
                logging.getLogger(name).removeHandler(handler)
                handler.close()


def test_same_command_twice_gives_identical_files(toy_models, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        run_gen(options(toy_models, out, limit=2, max_steps=3, backend="fake"))
    assert read_steps(runs[0])["gen_seconds"].null_count() == read_steps(runs[0]).height
    run_gen(options(toy_models, tmp_path / "timed", limit=2, max_steps=3, timings=True, backend="fake"))
    assert (read_steps(tmp_path / "timed")["gen_seconds"] > 0).all()
    for table in ("steps", "tokens", "problems"):
        names = sorted(os.listdir(runs[0] / table))
        assert names == sorted(os.listdir(runs[1] / table))
        for name in names:
            first, second = ((run / table / name).read_bytes() for run in runs)
            assert first == second


class Overlapping:
    """A backend marked ``concurrent`` that records how many calls of its group are in flight at once."""

    concurrent = True

    def __init__(self, backend, group: dict):
        self.backend, self.group = backend, group

    def generate_steps(self, requests, sampling):
        with self.group["lock"]:
            self.group["active"] += 1
            self.group["most"] = max(self.group["most"], self.group["active"])
        time.sleep(0.2)  # long enough for the other model's call to start
        try:
            return self.backend.generate_steps(requests, sampling)
        finally:
            with self.group["lock"]:
                self.group["active"] -= 1

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_concurrent_backends_overlap_and_write_the_same_files(toy_models, tmp_path):
    import threading

    from tracegen.backends import load_backend
    from tracegen.models import resolve_model

    sequential, overlapped = tmp_path / "sequential", tmp_path / "overlapped"
    run_gen(options(toy_models, sequential, limit=2, max_steps=3, backend="fake"))
    group = {"lock": threading.Lock(), "active": 0, "most": 0}
    backends = {
        role: Overlapping(load_backend("fake", resolve_model(name, role).path), group)
        for role, name in zip(("small", "large"), toy_models)
    }
    run_gen(options(toy_models, overlapped, limit=2, max_steps=3, backend="fake"), backends=backends)
    assert group["most"] == 2  # both models' batches were in flight at once
    for table in ("steps", "tokens"):
        names = sorted(os.listdir(sequential / table))
        assert names == sorted(os.listdir(overlapped / table))
        assert all((sequential / table / n).read_bytes() == (overlapped / table / n).read_bytes() for n in names)


def gen_command(models, out: Path, backend: str = "hf", limit: int = N_PROBLEMS) -> list[str]:
    """`trace gen` of `options(models, out, max_steps=5, backend=backend, limit=limit)`, as a command line."""
    return [
        sys.executable,
        "-m",
        "cli",
        "gen",
        "--model",
        models[0],
        "--large",
        models[1],
        "--dataset",
        "toy",
        "--limit",
        str(limit),
        "--max-steps",
        "5",
        "--max-step-tokens",
        str(STEP_TOKENS),
        "--backend",
        backend,
        "--seed",
        "3",
        "--out",
        str(out),
    ]


# Problems of the kill tests on the fake backend: enough that a round takes far longer than the kill takes to land.
KILLED_PROBLEMS = 60


def test_killed_run_resumes_to_the_uninterrupted_result(toy_models, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_gen(options(toy_models, reference, max_steps=5, backend="fake", limit=KILLED_PROBLEMS))
    command = gen_command(toy_models, killed, backend="fake", limit=KILLED_PROBLEMS)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "steps").glob("part-*.parquet")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = read_steps(killed)
    full = read_steps(reference)
    assert 0 < partial.height < full.height, "the kill should land after the first round and before the last"
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # it grew only what the killed run had not stored
    assert f"{full.height - partial.height:,} new steps" in " ".join(result.stdout.split()), result.stdout
    validate(killed)
    resumed = read_steps(killed)
    columns = ["step_id", "text", "n_prompt_tokens", "n_new_prefill_tokens", "n_gen_tokens", "is_final", "answer"]
    assert resumed.select(columns).equals(full.select(columns))


def test_a_second_gen_into_a_trace_being_written_is_refused_naming_the_first(toy_models, tmp_path):
    # issue 13, item 1: two such gens used to both exit 0, their parts written over each other
    out = tmp_path / "t"
    command = gen_command(toy_models, out, backend="fake", limit=KILLED_PROBLEMS)
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / ".lock-w0").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # holding the lock, for as long as the second needs to start
    try:
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate()
    assert first.returncode == 0
    assert second.returncode == 1
    message = " ".join(second.stderr.split())
    assert f"{out} is being written by pid {first.pid} on {socket.gethostname()}" in message, message
    assert "(writer w0: cli.py gen --model" in message and "Traceback" not in message
    validate(out)
    steps = read_steps(out)
    assert steps["step_id"].n_unique() == steps.height > 0


def test_a_lost_steps_part_is_named_then_regrown_by_rerunning_gen(toy_models, tmp_path, caplog):
    out = tmp_path / "t"
    run_gen(options(toy_models, out, limit=2, max_steps=3, backend="fake"))
    full = read_steps(out)
    lost = sorted((out / "steps").glob("part-*"))[-1]
    lost_steps = pl.read_parquet(lost).height
    lost.unlink()
    with pytest.raises(TraceError, match=f"{lost} is missing: writer w0 recorded it"):
        validate(out)
    summary = run_gen(options(toy_models, out, limit=2, max_steps=3, backend="fake"))
    assert f"{lost} is missing (writer w0 recorded it)" in caplog.text
    assert summary.new_steps == lost_steps > 0  # only what was lost
    validate(out)
    assert read_steps(out).drop("n_cached_tokens").equals(full.drop("n_cached_tokens"))


def test_another_engine_is_refused_before_one_starts(comb_trace, toy_models, monkeypatch):
    # issue 13, item 9: --backend vllm on an hf trace was found only after minutes of engine start
    def start_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(gen_module, "load_backend", start_engine)
    with pytest.raises(
        TraceError, match=r"engine\.name = 'hf', but this run has engine\.name = 'vllm'; use --backend hf"
    ):
        run_gen(options(toy_models, comb_trace, worlds=2, hidden_layers=(-1, 1), backend="vllm"))


def test_problems_whose_prompt_fills_the_context_are_named(toy_models, tmp_path):
    # issue 13, item 8: a 24k-character question got no tree and only "2 nodes left unexpanded"
    dataset = tmp_path / "gsm8k_test.jsonl"
    records = [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5 #### 5"},
        {"question": "What is 2 + 3? " * 40, "answer": "#### 5"},
    ]
    dataset.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "t"
    summary = run_gen(options(toy_models, out, dataset=str(dataset), limit=None, max_steps=2, backend="fake"))
    assert summary.skipped_context_full == 2  # the long problem's root, for each model
    assert summary.context_full_problems == ["gsm8k-test-00001"]
    rerun = ["gen", "--model", toy_models[0], "--large", toy_models[1], "--dataset", str(dataset), "--out", str(out)]
    rerun += ["--max-steps", "2", "--max-step-tokens", str(STEP_TOKENS), "--backend", "fake", "--seed", "3"]
    result = CliRunner().invoke(app, rerun)
    assert result.exit_code == 0, result.output
    assert "in problem(s): gsm8k-test-00001" in " ".join(result.stdout.split())


def test_shards_partition_the_problems(toy_models, tmp_path):
    ids = [p.problem_id for p in load_dataset("toy", limit=40).problems]
    shards = [{pid for pid in ids if in_shard(pid, (i, 3))} for i in range(3)]
    assert set().union(*shards) == set(ids) and sum(map(len, shards)) == len(ids)
    assert all(shards)
    out = tmp_path / "sharded"
    for i in range(2):
        run_gen(options(toy_models, out, limit=4, max_steps=1, shard=f"{i}/2", backend="fake"))
    validate(out)
    names = os.listdir(out / "steps")
    assert {name.split("-")[1] for name in names} == {"shard0of2", "shard1of2"}
    assert read_steps(out)["problem_id"].n_unique() == 4


def test_seed_and_shard_parsing():
    request = Request("toy-test-L3-00000", 0, "s", "large")
    assert request_seed(0, request) == request_seed(0, request)
    others = [
        Request("toy-test-L3-00000", 1, "s", "large"),
        Request("toy-test-L3-00000", 0, "", "large"),
        Request("toy-test-L3-00000", 0, "s", "small"),
        Request("toy-test-L3-00001", 0, "s", "large"),
    ]
    seeds = {request_seed(0, r) for r in others} | {request_seed(0, request), request_seed(1, request)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x", "1-4", "-1/2"):
        with pytest.raises(TraceError, match="--shard"):
            parse_shard(bad)


def test_new_prefill_counts_on_a_hand_tree():
    tree = Tree(problem=None, world=0, root_ids=[1] * 10)
    tree.steps["s"] = StoredStep("small", "a", [2] * 4, 10, 4, False)
    tree.steps["sL"] = StoredStep("large", "b", [3] * 5, 14, 5, False)
    tree.steps["sLs"] = StoredStep("small", "c", [4] * 3, 19, 3, False)
    assert len(tree.prompt_ids("sLs")) == 22
    assert tree.processed_by("small", "") == 0
    assert tree.processed_by("small", "s") == 13  # 10 prompt + 4 generated - the last, never fed back
    assert tree.processed_by("large", "s") == 0
    assert tree.processed_by("large", "sLs") == 18
    assert tree.processed_by("small", "sLs") == 21


def test_cli_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "gen",
            "--model",
            "gpt-9",
            "--large",
            "toy-large",
            "--dataset",
            "toy",
            "--out",
            str(tmp_path / "x"),
            "--backend",
            "hf",
        ],
    )
    assert result.exit_code == 1
    assert "unknown model 'gpt-9'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app,
        [
            "gen",
            "--model",
            "toy-small",
            "--large",
            "toy-large",
            "--dataset",
            "nope",
            "--out",
            str(tmp_path / "x"),
            "--backend",
            "hf",
        ],
    )
    assert result.exit_code == 1 and "neither a dataset name" in result.output


@pytest.mark.parametrize("worker_option", [["--workers", "3"], ["--gpus-per-worker", "1"], ["--cpus-per-worker", "2"]])
def test_ray_worker_options_need_ray(tmp_path, worker_option):
    out = tmp_path / "x"
    args = ["gen", "--model", "toy-small", "--large", "toy-large", "--dataset", "toy", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *worker_option])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert " ".join(result.output.split()) == "error: --workers, --gpus-per-worker and --cpus-per-worker need --ray"
    assert not out.exists()
