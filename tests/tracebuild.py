"""Hand-made traces for tests, written through the real TraceWriter.

A step is given by its interesting fields only; everything else gets a plausible default::

    root = build_trace(tmp_path / "t", [
        {"path": "s"},
        {"path": "ss", "is_final": True, "correct": False},
        {"path": "L", "is_final": True, "correct": True, "conf_max_logit_math": 3.5},
    ])

Default floats are exact in float32, so rows read back compare equal to what was written.
Keys of a step dict that are tokens columns (`token_ids`, `logprobs`, ...) go to its tokens row.
`comb_steps` builds the comb tree `trace gen --expand comb` grows (the all-small chain plus the
all-large completion from every node on it; with `chars="012"`, the comb of three models m0, m1, m2).
`toy_gen_options` gives the options of a small real `trace gen` run on the toy world.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracestore.schema import SCHEMAS, TOKEN_ARRAY_COLUMNS, make_step_id, model_char
from tracestore.store import TraceWriter, open_trace

CHAR_ROLES = {model_char(role): role for role in ("small", "large")}
TOPK = 3

# tokens one call of each scorer generates, as `trace score` records it (judge, verifier, P(True): one; a PRM: none)
GENERATED_TOKENS = {"judge": 1, "verifier": 1, "ptrue": 1, "first_token": 1}


def default_manifest(**overrides) -> dict:
    manifest = {
        "models": [
            {
                "role": "small",
                "name": "toy-small",
                "revision": "test",
                "n_params": 100_000,
                "n_layer": 2,
                "d_model": 64,
            },
            {
                "role": "large",
                "name": "toy-large",
                "revision": "test",
                "n_params": 800_000,
                "n_layer": 3,
                "d_model": 128,
            },
        ],
        "dataset": {"name": "toy", "file_hash": "test"},
        "prompt_template": "test",
        "sampling": {"temperature": 0.7, "top_p": 1.0, "max_step_tokens": 64, "topk": TOPK},
        "delimiter": "\n\n",
        "grader": {"name": "toy", "version": "1"},
        "engine": {"name": "test"},
        "seeds": {"base": 0},
        "expansion": "comb",
    }
    manifest.update(overrides)
    return manifest


def toy_gen_options(out: str | Path, *, limit: int | None, seed: int, **overrides):
    """GenOptions of a small `trace gen` run on the toy world: toy-small and toy-large, ``limit`` problems, steps
    of at most 48 tokens, chains of at most 5 steps, the transformers backend; ``overrides`` replace any field."""
    from tracegen.gen import GenOptions  # phase one: only the tests that grow traces pay for importing it

    settings = dict(
        small="toy-small",
        large="toy-large",
        dataset="toy",
        out=out,
        limit=limit,
        max_step_tokens=48,
        max_steps=5,
        backend="hf",
        seed=seed,
    )
    return GenOptions(**{**settings, **overrides})


def role_of(path: str) -> str:
    char = path[-1]
    return CHAR_ROLES.get(char, f"m{char}")


def step_and_tokens(fields: dict) -> tuple[dict, dict]:
    """A full steps row and tokens row from the interesting `fields` (path is the one you always give)."""
    fields = dict(fields)
    path = fields.pop("path")
    token_overrides = {column: fields.pop(column) for column in TOKEN_ARRAY_COLUMNS if column in fields}
    n_gen = fields.get("n_gen_tokens", len(token_overrides.get("token_ids", [0] * 4)))
    is_final = fields.get("is_final", False)
    step = {
        "problem_id": "p0",
        "world": 0,
        "parent_path": path[:-1],
        "path": path,
        "depth": len(path) - 1,
        "model": role_of(path),
        "text": f"step {path}",
        "n_prompt_tokens": 20 + 4 * (len(path) - 1),
        "n_new_prefill_tokens": 20 + 4 * (len(path) - 1),
        "n_cached_tokens": 0,
        "n_gen_tokens": n_gen,
        "finish_reason": "eos" if is_final else "delimiter",
        "is_final": is_final,
        "answer": "42" if is_final else None,
        "correct": False if is_final else None,
        "conf_max_logit_mean": 10.0,
        "conf_max_logit_math": 10.0,
        "conf_top1_prob_min_math": 0.875,
        "logprob_mean": -0.125,
        "logprob_min": -0.5,
        "first_token_logprob": -0.125,
        "gen_seconds": 0.0078125,
    }
    step.update(fields)
    step["step_id"] = fields.get("step_id", make_step_id(step["problem_id"], step["world"], path))
    tokens = {
        "step_id": step["step_id"],
        "token_ids": [10 + i for i in range(n_gen)],
        "logprobs": [-0.125] * n_gen,
        "max_logits": [10.0] * n_gen,
        "topk_ids": [[10 + i + j for j in range(TOPK)] for i in range(n_gen)],
        "topk_logprobs": [[-0.125 - j for j in range(TOPK)] for _ in range(n_gen)],
        "is_math": [True] * n_gen,
    }
    tokens.update(token_overrides)
    return step, tokens


def comb_steps(
    problem_id: str,
    n_steps: int,
    *,
    world: int = 0,
    correct: Callable[[str], bool] = lambda path: "L" in path,
    chars: str = "sL",
) -> list[dict]:
    """The comb tree of one (problem, world) whose solutions all take `n_steps` steps, over the models whose path
    characters are `chars` (smallest first; "012" for roles m0, m1, m2): each model's own chain from the root,
    and from every node of model i's chain the completion by every larger model j (for "sL": "s", "ss", ...
    "s"*n_steps, and from every node "s"*k (k < n_steps) the large completion "s"*k + "L", ...).
    `correct(path)` grades each final step."""
    paths = [char * depth for char in chars for depth in range(1, n_steps + 1)]
    for i, j in itertools.combinations(range(len(chars)), 2):
        for k in range(1, n_steps):
            paths += [chars[i] * k + chars[j] * m for m in range(1, n_steps - k + 1)]
    steps = []
    for path in paths:
        is_final = len(path) == n_steps
        steps.append(
            {
                "problem_id": problem_id,
                "world": world,
                "path": path,
                "is_final": is_final,
                "correct": correct(path) if is_final else None,
            }
        )
    return steps


def default_problem(problem_id: str) -> dict:
    return {
        "problem_id": problem_id,
        "dataset": "toy",
        "split": "test",
        "question": f"Compute {problem_id}.",
        "reference": "42",
        "meta": json.dumps({"level": 1}),
    }


def build_trace(
    root: str | Path,
    steps: Iterable[dict],
    *,
    problems: list[dict] | None = None,
    manifest: dict | None = None,
    scores: list[dict] | None = None,
    hidden: list[dict] | None = None,
    grades: list[dict] | None = None,
    parts: int = 1,
) -> Path:
    """Write a trace at `root` from short step dicts (see module doc); returns `root`.
    Problems default to one per problem_id used; `parts` splits the steps into that many part files."""
    rows = [step_and_tokens(fields) for fields in steps]
    if problems is None:
        problems = [default_problem(pid) for pid in dict.fromkeys(step["problem_id"] for step, _ in rows)]
    with TraceWriter(root, manifest if manifest is not None else default_manifest()) as writer:
        writer.append_problems(problems)
        size = -(-len(rows) // parts) if rows else 0
        for start in range(0, len(rows), max(size, 1)):
            chunk = rows[start : start + size]
            writer.append_steps([step for step, _ in chunk], [tokens for _, tokens in chunk])
        if hidden:
            writer.append_hidden(hidden)
        if scores:
            described = writer.manifest.get("scorers") or {}
            missing = {
                row["scorer"]: {"prompt": "hand-built", "generated_tokens": GENERATED_TOKENS.get(row["scorer"], 0)}
                for row in scores
                if row["scorer"] not in described
            }
            if missing:  # as `trace score` records each scorer it ran
                writer.update_manifest(scorers={**described, **missing})
            writer.append_scores(scores)
        if grades:  # as `trace regrade` records each grade set it wrote
            sets = {row["grade_set"]: {"grader": {"name": "hand-built", "version": "0"}} for row in grades}
            writer.update_manifest(grade_sets={**writer.manifest.grade_sets, **sets})
            writer.append_grades(grades)
    return Path(root)


def rewrite_parts(root: str | Path, table: str, transform: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    """Apply `transform` to every part file of `table` in place, bypassing the writer's checks and lock:
    the way tests corrupt a trace. Columns keep the types of SCHEMAS; required ones may get nulls."""
    schema = SCHEMAS[table]
    relaxed = pa.schema([field.with_nullable(True) for field in schema])
    for file in open_trace(root).files(table):
        frame = transform(pl.read_parquet(file))
        pq.write_table(frame.to_arrow().select(schema.names).cast(relaxed), file, compression="zstd")


def forget_part(root: str | Path, name: str, writer_id: str = "w0") -> None:
    """Drop part ``name`` from a writer's parts record, as if the writer had crashed before recording it."""
    record_file = Path(root) / "_parts" / f"{writer_id}.json"
    record = json.loads(record_file.read_text())
    record["parts"] = {table: [n for n in names if n != name] for table, names in record["parts"].items()}
    record_file.write_text(json.dumps(record))


def random_trees(n_problems: int, depth: int, *, seed: int = 0, unscored: float = 0.0, uncached: float = 0.0):
    """(steps, prm scores) of ``n_problems`` full small/large trees of ``depth`` with seeded random signals:
    logprob_min in [-4, 0], conf_max_logit_math from two bumps, a PRM score for every small step (but a
    share ``unscored`` of them), final steps right more often the more large steps and the easier the
    problem; a share ``uncached`` of the non-root steps is left out with its subtree (the walks that reach
    them miss)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    steps, scores = [], []
    for index in range(n_problems):
        problem = f"q{index:03d}"
        ease = rng.random()
        paths = [""]
        dropped: set[str] = set()
        for level in range(1, depth + 1):
            paths = [p + c for p in paths for c in "sL"]
            for path in paths:
                if path[:-1] in dropped or (level > 1 and rng.random() < uncached):
                    dropped.add(path)
                    continue
                final = level == depth
                confident = rng.random() < 0.6
                steps.append(
                    {
                        "problem_id": problem,
                        "path": path,
                        "is_final": final,
                        "correct": bool(rng.random() < 0.3 * ease + 0.25 * path.count("L")) if final else None,
                        "n_gen_tokens": 10 if path[-1] == "s" else 20,
                        "logprob_min": float(np.float32(-4 * rng.random())),
                        "conf_max_logit_math": float(np.float32(rng.normal(12.0 if confident else 7.0, 1.0))),
                    }
                )
                if path[-1] == "s" and rng.random() >= unscored:
                    scores.append(
                        {
                            "step_id": f"{problem}/0/{path}",
                            "scorer": "prm",
                            "value": float(np.float32(rng.random())),
                            "detail": None,
                            "n_tokens_processed": 30,
                        }
                    )
    return steps, scores
