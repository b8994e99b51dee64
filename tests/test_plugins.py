"""Extensions of your own -- routers, scorers, cost models, backends, report tables -- through the one registry:
the example router shipped with the docs through the CLI's file form, an entry point of an installed package
and the Python API (identical outcomes); the README's "Your own router" section run as written; one of each
kind installed, listed by `--list` and used where it is consumed (`replay`, `score`, `train policy`, `report`,
`gen`); one-line errors for broken plugins, unknown names and names registered twice; study files."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from tracebuild import build_trace, default_manifest, random_trees
from typer.testing import CliRunner

from cli import app
from replay import api
from replay.routers import ROUTERS
from replay.routers.rsd import Rsd
from tracegen.closure import load_router_specs
from tracestore.errors import TraceError
from tracestore.store import open_trace
from tracestore.validate import validate

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "min_logprob.py"
PRM = {"prm": {"model": "prm-test", "n_params": 1e9, "generated_tokens": 0}}
SWEEP = "theta=-4:0:0.5"

OWN_PACKAGES = ("cli", "replay", "tracegen", "analysis", "data", "tests", "scripts")


@pytest.fixture(scope="module")
def study_trace(tmp_path_factory):
    """60 problems, full depth-3 trees with random signals and a PRM score for every small step."""
    steps, scores = random_trees(60, 3, seed=2)
    root = tmp_path_factory.mktemp("study") / "trace"
    return build_trace(root, steps, scores=scores, manifest=default_manifest(scorers=PRM))


@pytest.fixture(autouse=True)
def forget_plugin_modules():
    """Modules a test's plugins imported stay imported: forget them afterwards. Only the plugins' own: a
    library first imported during the test (matplotlib by a report) must stay, or its classes would be
    defined twice in the process."""
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        path = getattr(sys.modules[name], "__file__", None)
        if path is None or path.startswith((sys.prefix, sys.base_prefix)) or name.split(".")[0] in OWN_PACKAGES:
            continue
        del sys.modules[name]


def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    if ok:
        assert result.exit_code == 0, (args, result.output, result.stderr)
    return result


def one_line_error(*args) -> str:
    result = invoke(*args, ok=False)
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def install_package(
    site: Path, entry_points: dict[str, dict[str, str]], modules: dict[str, str], name: str = "trace-test-plugins"
) -> None:
    """A package as pip installs it: modules plus a *.dist-info with entry_points.txt, on sys.path (by caller)."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
            for group, points in entry_points.items()
        )
    )
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)


# ---------------------------------------------------------------------- the example router, three ways


def test_the_example_router_gives_identical_outcomes_by_file_entry_point_and_api(study_trace, tmp_path, monkeypatch):
    by_file = tmp_path / "file.parquet"
    printed = invoke(
        "replay", study_trace, "--split", "all", "--router", f"{EXAMPLE}:MinLogprob", "--sweep", SWEEP, "--out", by_file
    ).output
    assert re.search(r"replayed min-logprob in \d+\.\d\ds", printed)

    site = tmp_path / "site"
    install_package(
        site,
        {"trace.routers": {"min-logprob-installed": "trace_test_example:MinLogprob"}},
        {"trace_test_example": EXAMPLE.read_text()},
    )
    monkeypatch.syspath_prepend(str(site))
    by_entry_point = tmp_path / "entry.parquet"
    invoke(
        "replay",
        study_trace,
        "--split",
        "all",
        "--router",
        "min-logprob-installed",
        "--sweep",
        SWEEP,
        "--out",
        by_entry_point,
    )

    by_api = api.replay(study_trace, f"{EXAMPLE}:MinLogprob", sweep={"theta": "-4:0:0.5"}, split="all")
    per_step = api.replay(study_trace, f"{EXAMPLE}:min_logprob_per_step", sweep=[SWEEP], split="all")

    expected = pl.read_parquet(by_file)
    assert expected["config"].n_unique() == 9 and expected["path"].n_unique() >= 6  # the sweep walks off the comb
    assert expected["misses"].sum() == 0 and expected["router"].unique().to_list() == ["min-logprob"]
    assert pl.read_parquet(by_entry_point).equals(expected)
    assert by_api.outcomes.equals(expected)
    assert per_step.outcomes.drop("router").equals(expected.drop("router"))


def test_readme_your_own_router_runs_as_written(study_trace, tmp_path, monkeypatch):
    section = (REPO / "README.md").read_text().split("## Your own router\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    assert [kind for kind, _ in blocks] == ["python", "bash", "python"]
    (_, router_file), (_, commands), (_, notebook) = blocks
    assert router_file == EXAMPLE.read_text()  # the README shows the shipped file, whole
    assert 15 <= len(router_file.splitlines()) <= 30

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "min_logprob.py").write_text(router_file)
    for command in commands.replace("\\\n", " ").splitlines():
        words = [str(study_trace) if word == "DIR" else word for word in shlex.split(command)]
        if words[:2] == ["mkdir", "-p"]:
            Path(words[2]).mkdir(parents=True, exist_ok=True)
        else:
            assert words[0] == "trace", command
            invoke(*words[1:])
    page = (tmp_path / "report" / "report.md").read_text()
    for router in ("min-logprob", "steer", "rsd"):
        assert f"| {router}" in page, router

    namespace: dict = {}
    exec(notebook.replace('"DIR"', repr(str(study_trace))), namespace)  # noqa: S102 - the README's own code
    assert isinstance(namespace["mine"].summary(), pl.DataFrame) and namespace["mine"].summary().height == 17
    in_memory = namespace["page"].markdown
    assert (tmp_path / "report-py" / "index.html").is_file()

    def without_sources(markdown: str) -> str:
        """In memory, result N (router) stands where the files' router.parquet stood."""
        markdown = re.sub(r"result \d+ \(([\w-]+)\)", r"\1.parquet", markdown)
        return "\n".join(line for line in markdown.splitlines() if not line.startswith("- Results:"))

    assert without_sources(in_memory) == without_sources(page)  # the report of results in memory = of the files


# ---------------------------------------------------------------------- errors that help

SIGNAL = "    def draft_signal(self, data):\n        return data.steps['logprob_min'].to_numpy()\n"
ACCEPT = "    def accept(self, signal, params):\n        return signal >= -2.0\n"
DRAFT_ROUTER = "from replay.routers.base import DraftRouter, WriterRouter\n\n\nclass Mine(DraftRouter):\n"


@pytest.mark.parametrize(
    ("source", "attr", "message"),
    [
        ("def broken(:\n", "Mine", "importing it failed (line 1): SyntaxError"),
        (
            "import trace_no_such_module\n",
            "Mine",
            "(line 1): ModuleNotFoundError: No module named 'trace_no_such_module'",
        ),
        ("x = 1\nraise RuntimeError('boom')\n", "Mine", "importing it failed (line 2): RuntimeError: boom"),
        ("x = 1\n", "Mine", "has no 'Mine'; it defines no router"),
        ("THETA = 3\n", "THETA", ":THETA is a int, not a router"),
        (
            "class Mine:\n    def decide(self, node):\n        return True\n",
            "Mine",
            "class Mine is not a router (it has a decide method",
        ),
        ("from replay.routers.base import DraftRouter\n", "DraftRouter", "DraftRouter is a base class"),
        (
            DRAFT_ROUTER + SIGNAL,
            "Mine",
            "router class Mine does not define accept (a DraftRouter needs draft_signal, accept)",
        ),
        (
            DRAFT_ROUTER + "    name = 'rsd'\n" + SIGNAL + ACCEPT,
            "Mine",
            "class Mine takes the name 'rsd' of a built-in router",
        ),
        (
            DRAFT_ROUTER + SIGNAL.replace("to_numpy()", "to_numpy()[:-1]") + ACCEPT,
            "Mine",
            "Mine: draft_signal returned an array of shape (839,); it must return 840 numbers, one per step row",
        ),
        (
            DRAFT_ROUTER + SIGNAL + ACCEPT.replace("signal >= -2.0", "signal * 1.0"),
            "Mine",
            "Mine: accept must return booleans, got an array of float32",
        ),
        (
            "import numpy as np\n"
            + DRAFT_ROUTER.replace("Mine(DraftRouter)", "Mine(WriterRouter)")
            + "    def choose(self, data, nodes, params):\n        return np.full(len(nodes), 5)\n",
            "Mine",
            "Mine: choose must return role indices 0..1 (into data.roles = small, large), got [5, 5",
        ),
    ],
)
def test_a_broken_plugin_is_one_line_naming_the_file_class_and_fault(study_trace, tmp_path, source, attr, message):
    plugin = tmp_path / "my_router.py"
    plugin.write_text(source)
    line = one_line_error("replay", study_trace, "--split", "all", "--router", f"{plugin}:{attr}")
    assert str(plugin) in line and message in line, line
    assert ROUTERS.get("rsd") is Rsd  # a plugin never replaces a built-in


def test_missing_files_and_modules_are_named(study_trace, tmp_path):
    line = one_line_error("replay", study_trace, "--router", f"{tmp_path / 'none.py'}:Mine")
    assert f"router file {tmp_path / 'none.py'} does not exist" in line
    line = one_line_error("replay", study_trace, "--router", "trace_no_such_module:Mine")
    assert "no module named 'trace_no_such_module'" in line
    line = one_line_error("replay", study_trace, "--router", "nope")
    assert "unknown router 'nope'; choose one of cascade," in line and "or give FILE.py:Class or module:Class" in line


# ---------------------------------------------------------------------- entry points and --list

COST_MODULE = '''
import numpy as np

from replay.costs import CostModel


class StepCount(CostModel):
    """One unit per step written, kept or discarded."""

    name = "steps"
    unit = "steps"
    convention = "1 per step written; scorer calls free"

    def __init__(self, manifest, prices):
        self.manifest = manifest

    def step_costs(self, steps):
        return np.ones(steps.height), np.zeros(steps.height)

    def scorer_costs(self, scorer, n_tokens_processed, step_roles):
        return np.zeros(len(n_tokens_processed))


class NotACost:
    pass
'''
SCORER_MODULE = '''
import polars as pl

from tracegen.scorers.base import Score, Scorer


class StepLength(Scorer):
    """Scores each small step by its generated tokens / 10."""

    name = "step-length"
    signal = "length"
    generated_tokens = 0

    def wants(self):
        return pl.col("model") == "small"

    def describe(self):
        return {"model": "exact", "prompt": "generated tokens / 10"}

    def score(self, items):
        return [Score(value=len(item.step_ids) / 10, n_tokens_processed=0) for item in items]
'''


BACKEND_MODULE = '''
from tracegen.backends.base import GeneratedStep


class Scripted:
    """Writes one final step at every node: the prompt's last three tokens, read as "answer 7"."""

    name = "scripted"
    max_total_tokens = 4096

    def __init__(self, model_path):
        self.model_path = model_path

    def generate_steps(self, requests, sampling):
        steps = []
        for request in requests:
            ids = list(request.prompt_ids[-3:])
            steps.append(
                GeneratedStep(
                    token_ids=ids,
                    text="answer 7",
                    finish_reason="eos",
                    logprobs=[-0.5] * 3,
                    max_logits=[9.0] * 3,
                    topk_ids=[[token] * sampling.topk for token in ids],
                    topk_logprobs=[[-0.5] * sampling.topk] * 3,
                    n_cached_tokens=0,
                    gen_seconds=0.0,
                )
            )
        return steps

    def engine_info(self):
        return {"name": self.name, "version": "1"}

    def close(self):
        pass
'''
TABLE_MODULE = '''
import polars as pl

from analysis.tables import ReportTable


class Ranking(ReportTable):
    """The methods at their operating points, by A/C."""

    name = "ranking"
    title = "Methods by A/C"

    def frame(self, inputs):
        rows = [{"method": row.run.label, "a_over_c": row.a_over_c.value} for row in inputs.rows]
        return pl.DataFrame(rows).sort("a_over_c", descending=True)
'''
ONE_OF_EACH = {"router": "min-logprob-installed", "scorer": "step-length", "cost": "steps", "backend": "scripted"}
ONE_OF_EACH["table"] = "ranking"  # kind: the name the `installed` package gives it


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """One installed package with an extension of each kind, and two that cannot be used."""
    site = tmp_path / "site"
    install_package(
        site,
        {
            "trace.routers": {"min-logprob-installed": "trace_test_example:MinLogprob", "broken": "trace_test_gone:X"},
            "trace.costs": {"steps": "trace_test_costs:StepCount", "not-a-cost": "trace_test_costs:NotACost"},
            "trace.scorers": {"step-length": "trace_test_scorers:StepLength"},
            "trace.backends": {"scripted": "trace_test_backends:Scripted"},
            "trace.tables": {"ranking": "trace_test_tables:Ranking"},
        },
        {
            "trace_test_example": EXAMPLE.read_text(),
            "trace_test_costs": COST_MODULE,
            "trace_test_scorers": SCORER_MODULE,
            "trace_test_backends": BACKEND_MODULE,
            "trace_test_tables": TABLE_MODULE,
        },
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def registry_rows():
    from analysis.tables import TABLES
    from replay.costs import COSTS
    from replay.routers import ROUTERS
    from tracegen.backends import BACKENDS
    from tracegen.scorers import SCORERS

    return {(row.kind, row.name): row for r in (ROUTERS, SCORERS, COSTS, BACKENDS, TABLES) for row in r.rows()}


def listed(*args) -> set[tuple[str, str]]:
    """(kind, name) of every row `trace replay --list` (or the equivalent args) prints."""
    shown = set()
    for line in invoke(*args).output.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) == 4 and cells[0] and cells[1] and cells[0] != "Kind":
            shown.add((cells[0], cells[1]))
    return shown


def test_list_shows_one_of_each_kind_installed_and_where_it_comes_from(installed):
    rows = registry_rows()
    assert (rows["router", "rsd"].source, rows["router", "rsd"].about) == (
        "built-in rsd.py",
        "Reward-guided speculative decoding (Liao et al. 2025).",
    )
    builtin = {("scorer", "prm"), ("cost", "flops"), ("backend", "hf"), ("backend", "vllm"), ("table", "cascade")}
    assert builtin <= set(rows) and rows["backend", "hf"].about.startswith("The transformers backend")
    for kind, name in ONE_OF_EACH.items():
        row = rows[kind, name]
        assert row.source.startswith("entry point trace_test_") and row.source.endswith(
            "(package trace-test-plugins 0.1)"
        )
        assert not row.about.startswith("cannot be used"), row
    assert rows["router", "min-logprob-installed"].about.startswith("The small model drafts each step; a draft whose")
    assert rows["backend", "scripted"].about.startswith("Writes one final step at every node")
    assert rows["router", "broken"].about.startswith("cannot be used: entry point broken = trace_test_gone:X")
    assert rows["cost", "not-a-cost"].about.startswith("cannot be used: entry point not-a-cost")
    assert listed("replay", "--list") == listed("replay", "unused", "--router", "help") == set(rows)
    frame = api.registered()
    assert set(frame["kind"]) == {"router", "cost"} and "min-logprob-installed" in frame["name"].to_list()


def test_listing_every_kind_imports_no_engine_or_heavy_library():
    """Built-in backends are registered lazily (module:Class) and their docstrings read from the source."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom cli import app\n"
        "assert CliRunner().invoke(app, ['replay', '--list']).exit_code == 0\n"
        "print(sorted(m for m in ('vllm', 'transformers', 'torch', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_broken_entry_point_names_itself_and_its_package(study_trace, installed):
    line = one_line_error("replay", study_trace, "--router", "broken")
    assert "entry point broken = trace_test_gone:X in group trace.routers (package trace-test-plugins 0.1)" in line
    assert "ModuleNotFoundError" in line
    line = one_line_error("replay", study_trace, "--router", "small-only", "--cost", "not-a-cost")
    assert "entry point not-a-cost (trace_test_costs:NotACost) is not a cost model" in line


def test_a_name_registered_twice_is_one_line_naming_both(study_trace, installed, tmp_path, monkeypatch):
    other = tmp_path / "other-site"
    install_package(
        other,
        {"trace.routers": {"rsd": "trace_test_example2:MinLogprob"}, "trace.costs": {"steps": "trace_test_costs2:X"}},
        {"trace_test_example2": EXAMPLE.read_text(), "trace_test_costs2": COST_MODULE.replace("StepCount", "X")},
        name="trace-other-plugins",
    )
    monkeypatch.syspath_prepend(str(other))
    line = one_line_error("replay", study_trace, "--router", "rsd")
    assert "router 'rsd' is registered twice: built-in rsd.py and entry point trace_test_example2:MinLogprob " in line
    assert "(package trace-other-plugins 0.1)" in line
    line = one_line_error("replay", study_trace, "--router", "small-only", "--cost", "steps")
    assert "cost model 'steps' is registered twice: entry point trace_test_costs" in line
    assert "(package trace-test-plugins 0.1)" in line and "(package trace-other-plugins 0.1)" in line
    rows = registry_rows()
    assert rows["router", "rsd"].about.startswith("cannot be used: router 'rsd' is registered twice")


def test_a_built_in_name_registered_twice_is_refused_naming_both_files():
    from replay.registry import Registry

    tables = Registry("table", "trace.test-tables", lambda obj, origin: obj, lambda value: False)
    tables.register_lazy("cmdp", "analysis.tables:CmdpTable")
    tables.register_lazy("cmdp", "analysis.tables:CmdpTable")  # the same entry again (its module imported twice)
    with pytest.raises(TraceError, match="table 'cmdp' is registered twice: built-in tables.py and built-in report.py"):
        tables.register_lazy("cmdp", "analysis.report:CmdpTable")
    assert tables.names() == ["cmdp"]


@pytest.mark.parametrize(
    ("args", "message", "kind"),
    [
        (
            ["replay", "TRACE", "--router", "nope"],
            "unknown router 'nope'; choose one of broken, cascade,",
            "router",
        ),
        (["replay", "TRACE", "--router", "small-only", "--cost", "nope"], "unknown cost model 'nope'", "cost"),
        (["score", "TRACE", "--scorer", "nope"], "unknown scorer 'nope'; choose one of api-verifier,", "scorer"),
        (["train", "policy", "TRACE", "--cost", "nope", "--out", "OUT/p.pt"], "--cost must be one of flops,", "cost"),
        (["report", "TRACE", "RESULTS", "--table", "nope", "--out", "OUT/r"], "unknown table 'nope'", "table"),
        (
            [
                "gen",
                "--model",
                "toy-small",
                "--large",
                "toy-large",
                "--dataset",
                "toy",
                "--backend",
                "nope",
                "--out",
                "OUT/g",
            ],
            "unknown backend 'nope'",
            "backend",
        ),
    ],
)
def test_an_unknown_name_is_one_line_with_the_choices_installed_too(
    study_trace, installed, tmp_path, args, message, kind
):
    results = tmp_path / "small.parquet"
    invoke("replay", study_trace, "--split", "all", "--router", "small-only", "--out", results)
    words = {"TRACE": str(study_trace), "RESULTS": str(results)}
    line = one_line_error(*[words.get(arg, arg.replace("OUT", str(tmp_path))) for arg in args])
    assert message in line and ONE_OF_EACH[kind] in line, line


def test_a_cost_model_from_an_entry_point_prices_the_replay(study_trace, installed):
    small = api.replay(study_trace, "small-only", split="all", cost="steps")
    assert small.outcomes["cost"].unique().to_list() == [3.0] and small.outcomes["cost_unit"][0] == "steps"
    rejected = api.replay(study_trace, "rsd", params={"tau": "1"}, split="all", cost="steps")  # every draft rejected
    assert rejected.outcomes["cost"].unique().to_list() == [6.0]  # 3 drafts thrown away + 3 large steps


def test_a_scorer_from_an_entry_point_scores_and_a_router_reads_it(study_trace, installed, tmp_path):
    trace = shutil.copytree(study_trace, tmp_path / "scored")
    invoke("score", trace, "--scorer", "step-length")

    from replay.stepwise import step_router

    @step_router(scorer="length")
    def long_drafts(node, tau=0.5):
        return node.draft.score >= tau

    # every small step of the fixture has 10 generated tokens: score 1.0
    kept = api.replay(trace, long_drafts, split="all")
    assert kept.outcomes["misses"].sum() == 0 and kept.outcomes["path"].unique().to_list() == ["sss"]
    rejected = api.replay(trace, long_drafts, params={"tau": "1.5"}, split="all")
    assert rejected.outcomes["path"].unique().to_list() == ["LLL"]


def test_a_cost_model_from_an_entry_point_trains_the_policy_and_from_a_file_prices_the_replay(
    study_trace, installed, tmp_path
):
    printed = " ".join(
        invoke(
            "train", "policy", study_trace, "--cost", "steps", "--steps", 2, "--out", tmp_path / "p.pt"
        ).output.split()
    )
    # every walk of a depth-3 tree writes 3 steps, as the large model alone does
    assert "cost 3 steps per query (1.0000 of the large model alone)" in printed
    cost_file = tmp_path / "my_costs.py"
    cost_file.write_text(COST_MODULE)
    by_file = api.replay(study_trace, "rsd", params={"tau": "1"}, split="all", cost=f"{cost_file}:StepCount")
    by_entry_point = api.replay(study_trace, "rsd", params={"tau": "1"}, split="all", cost="steps")
    assert by_file.outcomes.equals(by_entry_point.outcomes) and by_file.outcomes["cost"].unique().to_list() == [6.0]


def test_a_report_table_from_an_entry_point_is_built_from_the_report_numbers(study_trace, installed, tmp_path):
    results = []
    for router, sweep in (("rsd", "tau=0:1:0.25"), ("random", "p=0.2,0.8")):
        results.append(tmp_path / f"{router}.parquet")
        invoke("replay", study_trace, "--split", "all", "--router", router, "--sweep", sweep, "--out", results[-1])
    out = tmp_path / "report"
    split = ["--split", "all", "--pick-split", "reported", "--bootstrap", 10]
    invoke("report", study_trace, *results, "--table", "cmdp", "--table", "ranking", "--out", out, *split)
    ranking = pl.read_csv(out / "table_ranking.csv")
    cmdp = pl.read_csv(out / "table_cmdp.csv")
    assert ranking["method"].sort().to_list() == ["large-only", "random", "rsd", "small-only"]
    assert ranking.equals(cmdp.select("method", "a_over_c").sort("a_over_c", descending=True))
    assert (out / "table_ranking.md").read_text().startswith("## Methods by A/C\n\n| method | a_over_c |")
    assert "## Methods by A/C" in (out / "report.md").read_text()


def test_a_backend_from_an_entry_point_grows_the_trace(installed, tmp_path):
    out = tmp_path / "grown"
    invoke(
        "gen",
        "--model",
        "toy-small",
        "--large",
        "toy-large",
        "--dataset",
        "toy",
        "--limit",
        2,
        "--backend",
        "scripted",
        "--out",
        out,
    )
    trace = open_trace(out)
    steps = trace.scan("steps").collect()
    assert trace.manifest["engine"]["name"] == "scripted"
    assert sorted(steps["path"].unique().to_list()) == ["L", "s"] and steps.height == 4  # every step is final
    assert set(steps["text"]) == {"answer 7"} and steps["n_gen_tokens"].to_list() == [3] * 4
    validate(out)


# ---------------------------------------------------------------------- study files


def test_study_files_take_router_references_relative_to_themselves(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "my_router.py")
    (folder / "routers.toml").write_text(
        '[[router]]\nname = "my_router.py:MinLogprob"\nsweep = ["theta=-3:0:1"]\n\n'
        '[[router]]\nname = "my_router.py:min_logprob_per_step"\nparams = {theta = "-1"}\n'
    )
    specs = load_router_specs(folder / "routers.toml")
    assert [spec.name for spec in specs] == [
        f"{folder}/my_router.py:MinLogprob",
        f"{folder}/my_router.py:min_logprob_per_step",
    ]
    assert specs[0].router().name == "min-logprob" and specs[1].router().theta == -1.0
    (folder / "routers.toml").write_text('[[router]]\nname = "my_router.py:MinLogprob"\nsweep = ["tau=0:1:0.5"]\n')
    with pytest.raises(TraceError, match="router 1: router min-logprob cannot sweep tau; sweepable: theta"):
        load_router_specs(folder / "routers.toml")


def test_replay_prints_its_time_and_suggests_the_vectorised_form_for_a_slow_per_step_sweep(study_trace, monkeypatch):
    monkeypatch.setattr(api, "SLOW_SECONDS", 0.0)  # every replay counts as slow
    per_step = invoke("replay", study_trace, "--router", f"{EXAMPLE}:min_logprob_per_step", "--sweep", SWEEP).output
    flat = " ".join(per_step.split())
    assert re.search(r"replayed min-logprob-per-step in \d+\.\d\ds", flat)
    assert "min-logprob-per-step is a per-step router: 9 configuration(s) took" in flat
    assert "write it as a vectorised DraftRouter" in flat
    vectorised = invoke("replay", study_trace, "--router", f"{EXAMPLE}:MinLogprob", "--sweep", SWEEP).output
    assert "per-step router" not in vectorised and "replayed min-logprob in" in vectorised
