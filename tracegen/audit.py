"""`trace audit`: regenerate a random sample of a trace's steps and measure how far the cache is from the engine.

The sample is stratified over (model, depth): the sample size is spread as evenly as the strata allow, so
deep and rare steps are audited too, and each stratum's steps are drawn at random with the audit's seed.
Every sampled step is regenerated as `trace gen` wrote it: the same model (its checkpoint checked against
trace.json), the prompt rebuilt from the problem and the stored token ids of the step's ancestors, the
recorded sampling settings and the step's own seed (``tracegen.growth.request_seed``), through the recorded
engine or another one (``--backend hf`` cross-checks a vLLM trace). Compared with what is stored:

- identical: the same token ids, token for token;
- otherwise the first divergent position (a length difference counts at the shorter one's end) and depth;
- on the tokens that agree (all of an identical step, those before the divergence otherwise): the largest
  |delta log-probability| of the sampled token and |delta max logit|;
- whether the step's finality, extracted answer or correctness (graded by the trace's grader) changed.

The summary is appended to trace.json ``audits`` (a history: earlier audits are never rewritten), through
the trace's writer lock and atomic manifest write; per-step details can go to a CSV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from tracegen.backends import StepRequest, StepSampling, check_backend, engine_kwargs_for, load_backend
from tracegen.engine_settings import recorded_kwargs
from tracegen.expand import Request
from tracegen.grading import GRADERS, Grader, extract_answer, grader_for, grader_named, is_final_step
from tracegen.growth import request_seed
from tracegen.models import load_tokenizer, model_manifest, trace_model
from tracegen.options import AuditOptions
from tracegen.prompts import prompt_token_ids
from tracegen.regrade import delimiter_of, solution_texts
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.outputs import check_output_file
from tracestore.schema import Manifest, first_difference, lookup_field
from tracestore.store import TraceWriter, open_trace

AUDIT_WRITER = "audit"
DIVERGENT_LISTED = 20  # divergent steps named in trace.json's summary (all of them go to --out)
# Engine fields that describe the run rather than what it outputs.
_RUN_FIELDS = ("max_total_tokens",)


@dataclass
class AuditResult:
    summary: dict  # as appended to trace.json audits
    details: pl.DataFrame  # one row per audited step

    @property
    def passed(self) -> bool:
        return bool(self.summary["passed"])


# ---------------------------------------------------------------- sampling and comparing (no engine)


def sample_steps(steps: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """``n`` rows of ``steps`` (all when it has fewer), stratified over (model, depth).

    Strata are taken in (model, depth) order; each gets an equal share of ``n`` up to its size, what a
    full stratum cannot take goes to the others, and a remainder smaller than the open strata goes to
    strata drawn at random. Within a stratum, steps (in step_id order) are drawn without replacement.
    """
    if n < 1:
        raise TraceError(f"--sample must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    strata = steps.group_by("model", "depth").agg(pl.col("step_id").sort()).sort("model", "depth")
    members = strata["step_id"].to_list()
    sizes = np.array([len(ids) for ids in members])
    taken = np.zeros(len(sizes), dtype=np.int64)
    left = min(n, int(sizes.sum()))
    while left:
        open_strata = np.flatnonzero(taken < sizes)
        share = left // open_strata.size
        if share == 0:
            taken[rng.choice(open_strata, size=left, replace=False)] += 1
            break
        add = np.minimum(share, sizes[open_strata] - taken[open_strata])
        taken[open_strata] += add
        left -= int(add.sum())
    chosen = []
    for ids, count in zip(members, taken):
        if count:
            chosen += [ids[int(i)] for i in sorted(rng.choice(len(ids), size=int(count), replace=False))]
    return steps.filter(pl.col("step_id").is_in(chosen)).sort("step_id")


def compare_tokens(
    stored_ids, stored_logprobs, stored_max_logits, new_ids, new_logprobs, new_max_logits
) -> dict[str, object]:
    """Token-level comparison of a stored step with its regeneration (see the module doc)."""
    stored_ids, new_ids = np.asarray(stored_ids, dtype=np.int64), np.asarray(new_ids, dtype=np.int64)
    common = min(stored_ids.size, new_ids.size)
    differs = np.flatnonzero(stored_ids[:common] != new_ids[:common])
    if differs.size:
        first = int(differs[0])
    elif stored_ids.size != new_ids.size:
        first = common
    else:
        first = None
    agree = common if first is None else first

    def largest_gap(stored, new) -> float | None:
        if agree == 0:
            return None
        gap = np.abs(np.asarray(stored[:agree], dtype=np.float64) - np.asarray(new[:agree], dtype=np.float64))
        return float(gap.max())

    return {
        "identical": first is None,
        "first_divergence": first,
        "stored_token": int(stored_ids[first]) if first is not None and first < stored_ids.size else None,
        "new_token": int(new_ids[first]) if first is not None and first < new_ids.size else None,
        "n_agreeing": agree,
        "max_abs_delta_logprob": largest_gap(stored_logprobs, new_logprobs),
        "max_abs_delta_max_logit": largest_gap(stored_max_logits, new_max_logits),
    }


def summarize(
    details: pl.DataFrame, population: pl.DataFrame, *, min_identical: float, requested: int, seed: int
) -> dict:
    """The audit's summary from its per-step ``details`` and the (model, depth) sizes of all steps."""
    n = details.height
    identical = int(details["identical"].sum())
    sampled = details.group_by("model", "depth").agg(n=pl.len(), identical=pl.col("identical").sum())
    strata = population.group_by("model", "depth").agg(size=pl.len()).join(sampled, on=["model", "depth"])
    sizes = strata["size"].to_numpy()
    # summed before dividing, so that a sample identical in every stratum estimates exactly 1.0
    estimate = float(np.sum(sizes * (strata["identical"].to_numpy() / strata["n"].to_numpy())) / sizes.sum())
    divergent = details.filter(~pl.col("identical")).sort("step_id")

    def largest(column: str) -> float | None:
        value = details[column].max()
        return None if value is None else float(value)

    def breakdown(column: str) -> dict:
        rows = details.group_by(column).agg(audited=pl.len(), identical=pl.col("identical").sum()).sort(column)
        return {str(row[column]): {"audited": row["audited"], "identical": row["identical"]} for row in rows.to_dicts()}

    share = identical / n
    return {
        "sample": requested,
        "seed": seed,
        "audited": n,
        "identical": identical,
        "identical_share": share,
        "estimated_identical_share": estimate,  # strata weighted by their size in the trace
        "by_model": breakdown("model"),
        "by_depth": breakdown("depth"),
        "divergent": divergent.height,
        "first_divergences": [
            {
                "step_id": row["step_id"],
                "model": row["model"],
                "depth": row["depth"],
                "position": row["first_divergence"],
            }
            for row in divergent.head(DIVERGENT_LISTED).iter_rows(named=True)
        ],
        "max_abs_delta_logprob": largest("max_abs_delta_logprob"),
        "max_abs_delta_max_logit": largest("max_abs_delta_max_logit"),
        "finality_changed": int(details["final_changed"].sum()),
        "answers_changed": int(details["answer_changed"].sum()),
        "correct_changed": int(details["correct_changed"].sum()),
        "min_identical": min_identical,
        "passed": share >= min_identical,
    }


# ---------------------------------------------------------------- regeneration


def recorded_engine(manifest: Manifest, role: str) -> dict:
    """The engine entry gen recorded for ``role`` (one entry for all roles, or one per role)."""
    engine = manifest.get("engine")
    if not isinstance(engine, dict) or not engine:
        raise TraceError("trace.json records no engine: the trace was not written by trace gen")
    entry = engine if "name" in engine else engine.get(role)
    if not isinstance(entry, dict) or "name" not in entry:
        raise TraceError(f"trace.json records no engine for the {role} model")
    return entry


def _engine_differences(recorded: dict, running: dict) -> list[str]:
    keys = sorted((set(recorded) | set(running)) - set(_RUN_FIELDS))
    return [key for key in keys if recorded.get(key) != running.get(key)]


def _sampling(manifest: Manifest) -> StepSampling:
    sampling = manifest.get("sampling")
    if not isinstance(sampling, dict):
        raise TraceError("trace.json records no sampling settings")
    try:
        return StepSampling(
            temperature=float(sampling["temperature"]),
            top_p=float(sampling["top_p"]),
            max_step_tokens=int(sampling["max_step_tokens"]),
            topk=int(sampling["topk"]),
            delimiter=delimiter_of(manifest),
        )
    except (KeyError, TypeError, ValueError):
        raise TraceError(
            f"trace.json sampling must have temperature, top_p, max_step_tokens and topk: {sampling}"
        ) from None


def _grader(manifest: Manifest) -> Grader:
    """The grader that graded the steps: by its recorded name, else the dataset's."""
    name = (manifest.get("grader") or {}).get("name")
    return grader_named(name) if name in GRADERS else grader_for(manifest.dataset_name or "")


def _base_seed(manifest: Manifest) -> int:
    seed = (manifest.get("seeds") or {}).get("seed")
    if not isinstance(seed, int):
        raise TraceError("trace.json records no seeds.seed: the steps' seeds cannot be derived")
    return seed


def run_audit(options: AuditOptions, backends: dict | None = None, progress: Callable | None = None) -> AuditResult:
    """Audit the trace at ``options.root`` (see the module doc). ``backends`` ({role: backend}) lends engines
    already running for the trace's models (they must be of kind ``options.backend``, default the recorded
    one). ``progress(stage=..., **info)`` is called as work advances."""
    report = progress or (lambda **_: None)
    check_backend(options.backend)
    if options.min_identical is not None and not 0 <= options.min_identical <= 1:
        raise TraceError(f"--min-identical must be in [0, 1], got {options.min_identical}")
    if options.out is not None:
        if Path(options.out).suffix != ".csv":
            raise TraceError(f"--out {options.out}: the file name must end in .csv")
        check_output_file(options.out, force=options.force)
    trace = open_trace(options.root)
    manifest = trace.manifest
    sampling, grader, base_seed = _sampling(manifest), _grader(manifest), _base_seed(manifest)
    with TraceWriter(options.root, None, writer_id=AUDIT_WRITER) as writer:
        steps = trace.scan("steps").collect()
        if steps.height == 0:
            raise TraceError(f"{options.root} holds no steps to audit")
        sample = sample_steps(steps, options.sample, options.seed)
        roles = [role for role in manifest.roles if role in set(sample["model"])]
        recorded = {role: recorded_engine(manifest, role) for role in roles}
        kind = options.backend or recorded[roles[0]]["name"]
        same_engine = all(entry["name"] == kind for entry in recorded.values())
        min_identical = options.min_identical if options.min_identical is not None else (1.0 if same_engine else 0.0)

        prompts = _prompts(trace, steps, sample, roles)
        report(stage="load", backend=kind, roles=roles)
        loaded = []
        try:
            engines = {}
            for role in roles:
                if backends is not None and role in backends:
                    engines[role] = backends[role]
                    continue
                model = trace_model(manifest, role)
                # the recorded engine's dtype, quantisation, parallelism and context (another engine: its own)
                given = recorded_kwargs(recorded[role]) if recorded[role]["name"] == kind else {}
                engines[role] = load_backend(
                    kind, model.path, **engine_kwargs_for(kind, role, given, tuple(manifest.roles))
                )
                loaded.append(engines[role])
            running = {role: engines[role].engine_info() for role in roles}
            differs = sorted({key for role in roles for key in _engine_differences(recorded[role], running[role])})
            regenerated = {}
            for role in roles:
                batch = sample.filter(pl.col("model") == role)
                report(stage="generate", role=role, n=batch.height)
                requests = [
                    StepRequest(
                        prompt_ids=tuple(prompts[row["step_id"]]),
                        seed=request_seed(
                            base_seed, Request(row["problem_id"], row["world"], row["parent_path"], role)
                        ),
                    )
                    for row in batch.iter_rows(named=True)
                ]
                regenerated.update(zip(batch["step_id"], engines[role].generate_steps(requests, sampling)))
        finally:
            for backend in loaded:
                backend.close()
        details = _details(trace, steps, sample, regenerated, grader)
        summary = {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": kind,
            "engine": {"name": kind, "version": running[roles[0]].get("version")},
            "recorded_engine": sorted({entry["name"] for entry in recorded.values()}),
            "same_engine": same_engine,
            "engine_differs": differs,
            **summarize(details, steps, min_identical=min_identical, requested=options.sample, seed=options.seed),
        }
        writer.update_manifest(audits=[*writer.manifest.audits, summary])
    if options.out is not None:
        out = check_output_file(options.out, force=options.force)
        write_atomic(out, lambda temp: details.write_csv(temp))
    return AuditResult(summary=summary, details=details)


def _prompts(trace, steps: pl.DataFrame, sample: pl.DataFrame, roles: list[str]) -> dict[str, list[int]]:
    """The prompt ids gen gave each sampled step: the problem's chat prompt plus its ancestors' token ids."""
    manifest = trace.manifest
    questions = dict(trace.scan("problems").select("problem_id", "question").collect().iter_rows())
    ancestor_ids = {
        f"{row['problem_id']}/{row['world']}/{row['parent_path'][:end]}"
        for row in sample.iter_rows(named=True)
        for end in range(1, len(row["parent_path"]) + 1)
    }
    tokens = dict(
        trace.scan("tokens")
        .filter(pl.col("step_id").is_in(list(ancestor_ids)))
        .select("step_id", "token_ids")
        .collect()
        .iter_rows()
    )
    tokenizers = {}
    for role in roles:
        model = trace_model(manifest, role)
        tokenizers[role] = load_tokenizer(model)
        differing = first_difference(manifest.model(role), model_manifest(model, tokenizers[role]))
        if differing and differing != "role":
            raise TraceError(
                f"the {role} model at {model.path} differs from the one that wrote the trace in {differing} "
                f"({lookup_field(manifest.model(role), differing)!r} recorded); the audit needs the recorded model"
            )
    prompts = {}
    for row in sample.iter_rows(named=True):
        ids = prompt_token_ids(tokenizers[row["model"]], questions[row["problem_id"]])
        for end in range(1, len(row["parent_path"]) + 1):
            ancestor = f"{row['problem_id']}/{row['world']}/{row['parent_path'][:end]}"
            if ancestor not in tokens:
                raise TraceError(f"step {row['step_id']!r}: its ancestor {ancestor!r} has no tokens row")
            ids += list(tokens[ancestor])
        if len(ids) != row["n_prompt_tokens"]:
            raise TraceError(
                f"step {row['step_id']!r} was generated after {row['n_prompt_tokens']} prompt tokens, but its "
                f"prompt rebuilds to {len(ids)}: the tokenizer or chat template is not the recorded one"
            )
        prompts[row["step_id"]] = ids
    return prompts


def _details(trace, steps: pl.DataFrame, sample: pl.DataFrame, regenerated: dict, grader: Grader) -> pl.DataFrame:
    """One row per audited step: the token comparison and what became of its answer."""
    stored = dict(
        (row["step_id"], row)
        for row in trace.scan("tokens")
        .filter(pl.col("step_id").is_in(sample["step_id"].to_list()))
        .select("step_id", "token_ids", "logprobs", "max_logits")
        .collect()
        .iter_rows(named=True)
    )
    references = dict(trace.scan("problems").select("problem_id", "reference").collect().iter_rows())
    delimiter = delimiter_of(trace.manifest)
    parents = sample.filter(pl.col("parent_path") != "").select(
        "step_id", "problem_id", "world", pl.col("parent_path").alias("path")
    )
    earlier = solution_texts(steps, parents, delimiter)
    rows = []
    for row in sample.iter_rows(named=True):
        step_id, new = row["step_id"], regenerated[row["step_id"]]
        old = stored[step_id]
        compared = compare_tokens(
            old["token_ids"], old["logprobs"], old["max_logits"], new.token_ids, new.logprobs, new.max_logits
        )
        final = is_final_step(new.text, new.finish_reason)
        answer = correct = None
        if final:
            before = earlier.get(step_id)
            answer = extract_answer(before + delimiter + new.text if before else new.text) or ""
            correct = bool(grader.grade(answer or None, references[row["problem_id"]]))
        rows.append(
            {
                "step_id": step_id,
                "model": row["model"],
                "depth": row["depth"],
                "n_stored": len(old["token_ids"]),
                "n_regenerated": len(new.token_ids),
                **compared,
                "stored_final": row["is_final"],
                "regenerated_final": final,
                "stored_answer": row["answer"],
                "regenerated_answer": answer,
                "stored_correct": row["correct"],
                "regenerated_correct": correct,
                "final_changed": row["is_final"] != final,
                "answer_changed": row["answer"] != answer,
                "correct_changed": row["correct"] != correct,
            }
        )
    schema = {
        "step_id": pl.String,
        "model": pl.String,
        "depth": pl.Int32,
        "n_stored": pl.Int32,
        "n_regenerated": pl.Int32,
        "identical": pl.Boolean,
        "first_divergence": pl.Int32,
        "stored_token": pl.Int64,
        "new_token": pl.Int64,
        "n_agreeing": pl.Int32,
        "max_abs_delta_logprob": pl.Float64,
        "max_abs_delta_max_logit": pl.Float64,
        "stored_final": pl.Boolean,
        "regenerated_final": pl.Boolean,
        "stored_answer": pl.String,
        "regenerated_answer": pl.String,
        "stored_correct": pl.Boolean,
        "regenerated_correct": pl.Boolean,
        "final_changed": pl.Boolean,
        "answer_changed": pl.Boolean,
        "correct_changed": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)
