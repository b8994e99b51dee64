"""`trace gen`: grow step trees of a small and a large model (or K models, smallest first), round by
round, into a trace directory.

Round n holds the steps the expansion strategy asks for at every node written in round n - 1 (round 0: every
step still missing in every (problem, world) tree). A child's prompt is its parent's prompt ids plus the parent
step's token ids, never re-tokenised text. On vLLM each child joins its engine's running batch as soon as its
parent is generated (``tracegen.continuous``); other backends get each round as one batch per model. Either way
each round's steps are appended through the TraceWriter as one part, in the same order, once the round and every
earlier one is done: a killed run loses at most the rounds not yet written; rerunning the same command resumes
from what is stored. The manifest is the cache key: a rerun with any output-changing setting that differs is
refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from tracegen import continuous, endpoint_roles, engine_settings, hidden
from tracegen.backends import StepRequest, check_backend, default_backend, load_backend
from tracegen.closure import ClosureResult, close_over
from tracegen.datasets import Dataset, Problem, load_dataset
from tracegen.engine_logs import route_engine_logs
from tracegen.expand import Request, Strategy, frontier, make_strategy
from tracegen.grading import Grader, grader_for
from tracegen.growth import GenSummary, GrowthRun, StoredStep, Tree
from tracegen.memory_plan import Device, MemoryPlan, ModelShape, plan_memory
from tracegen.models import ModelRef, canonical_name, fetch_model, load_tokenizer, model_manifest, resolve_model
from tracegen.options import GenOptions
from tracegen.prompts import SYSTEM_PROMPT, prompt_token_ids
from tracegen.up_to_date import nothing_to_do, remember_closed
from tracestore.errors import TraceError
from tracestore.outputs import check_outside_trace
from tracestore.schema import json_normal, model_roles, schema_version_for
from tracestore.store import Trace, TraceWriter, open_trace


def parse_models(small: str | None, large: str | None, models: str | None) -> list[str]:
    """The models of `trace gen`, smallest first: ``--models A,B,C``, or the pair ``--model A --large B``."""
    if models is not None:
        if small is not None or large is not None:
            raise TraceError("give either --models A,B,... or --model and --large, not both")
        names = [name.strip() for name in models.split(",")]
        if len(names) < 2 or not all(names):
            raise TraceError(f"--models needs at least two comma-separated model names, got {models!r}")
        if len(set(names)) < len(names):
            raise TraceError(f"--models names a model twice: {models!r}")
        model_roles(len(names))  # at most MAX_MODELS
        return names
    if small is None or large is None:
        raise TraceError("name the models: --model SMALL --large LARGE, or --models A,B,... (smallest first)")
    return [small, large]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> (i, n)."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise TraceError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise TraceError(f"--shard {text}: need 0 <= i < n")
    return index, count


def in_shard(problem_id: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    digest = hashlib.sha256(problem_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") % shard[1] == shard[0]


def run_gen(options: GenOptions, progress: Callable | None = None, backends: dict | None = None) -> GenSummary:
    """Grow the trees of ``options`` into ``options.out``; resumable and idempotent.

    ``progress(stage=..., **info)`` is called as work advances (see tracegen.progress.GenProgress). ``backends``
    ({"small": ..., "large": ...}, or by role m0..m{K-1}) reuses engines already loaded for these models.
    """
    started = time.perf_counter()
    _check_options(options)
    shard = parse_shard(options.shard)
    strategy = make_strategy(options.expand, options.depth, options.roles)
    dataset = load_dataset(options.dataset, split=options.split, limit=options.limit, level=options.level)
    grader = grader_for(dataset.name)
    problems = [p for p in dataset.problems if in_shard(p.problem_id, shard)]
    models = _load_models(options, problems)
    sampling = options.step_sampling()
    manifest = _manifest(options, models, dataset, grader, sampling)
    writer_id = f"shard{shard[0]}of{shard[1]}" if shard else "w0"
    report = progress or (lambda **_: None)
    summary = GenSummary(out=Path(options.out), problems=len(problems))
    shapes = {
        role: ModelShape.of_checkpoint(canonical_name(model), model.path) for role, model in models.checkpoints.items()
    }
    n_blocks = {role: shape.n_layer for role, shape in shapes.items()}
    wanted_hidden = hidden.plan_hidden(options.hidden_layers, options.routers, options.roles, n_blocks)
    report(stage="hidden-plan", plan=wanted_hidden)
    kind = options.backend or default_backend()
    engine_kwargs, memory = {}, None
    if backends is None:
        engine_kwargs, memory = _plan_engines(options, kind, models, shapes, wanted_hidden)
        report(stage="memory-plan", plan=memory)
        memory.check()
    with TraceWriter(options.out, manifest, writer_id=writer_id, shard=shard is not None) as writer:
        writer.append_problems([p.row() for p in problems])
        if any(wanted_hidden.layers.values()):
            summary.hidden_rows = _write_hidden(writer, models, wanted_hidden.layers, n_blocks, report)
        continuation = endpoint_roles.continuations(models.api, models.tokenizers, sampling.delimiter)
        trees = _load_trees(open_trace(options.out), problems, models.root_ids, options.worlds, continuation)
        if backends is None and _up_to_date(options, kind, trees, strategy, writer, summary):
            summary.up_to_date = True
            summary.closure = ClosureResult() if options.routers else None  # no router misses anything
            _record_run(writer, options, strategy)
            summary.seconds = time.perf_counter() - started
            report(stage="done", requests=[], summary=summary)
            return summary
        with contextlib.ExitStack() as engines:
            if backends is None:
                backends = _open_backends(options, kind, engine_kwargs, models, writer, report, engines)
                writer.update_manifest(
                    engine_resources={
                        "memory_shares": engine_settings.resources_entry(engine_kwargs),
                        "memory_plan": memory.manifest_entry(),
                    }
                )
            writer.update_manifest(engine=_engine_entry(backends), engine_request=_engine_request(options, kind))
            if models.api:
                writer.update_manifest(api_endpoints=endpoint_roles.endpoints_entry(models.api))
            run = GrowthRun(
                trees=trees,
                strategy=strategy,
                max_steps=options.max_steps,
                backends=backends,
                context_len=min(backend.max_total_tokens for backend in backends.values()),
                sampling=sampling,
                seed=options.seed,
                grader=grader,
                tokenizers=models.tokenizers,
                timings=options.timings,
                writer=writer,
                summary=summary,
                report=report,
            )
            _grow(run)
            if options.routers:
                summary.closure = _close(options, run, engines)
                if not summary.closure.remaining_misses:
                    remember_closed(Path(options.out), options, trees)
        _record_run(writer, options, strategy)
    summary.seconds = time.perf_counter() - started
    report(stage="done", requests=[], summary=summary)
    return summary


@dataclass
class _RunModels:
    """A run's models by role: each one's name, the --api specs of the roles an endpoint serves, the local
    checkpoints (of every role but the chat-mode API ones), the tokenizers (a chat-mode role reads and writes text
    in the trace's) and each problem's prompt ids."""

    names: dict[str, str]
    api: dict
    checkpoints: dict[str, ModelRef]
    tokenizers: dict
    root_ids: dict[str, list[int]]


def _load_models(options: GenOptions, problems: list[Problem]) -> _RunModels:
    names = dict(zip(options.roles, options.model_names))
    api = endpoint_roles.api_specs(options.api, options.roles)
    checkpoints = {
        role: fetch_model(resolve_model(name, role))
        for role, name in names.items()
        if not endpoint_roles.is_text_only(api.get(role))
    }
    tokenizers = {role: load_tokenizer(model) for role, model in checkpoints.items()}
    root_ids = _shared_prompts(checkpoints, tokenizers, problems)
    for role in set(names) - set(checkpoints):
        tokenizers[role] = next(iter(tokenizers.values()))
    return _RunModels(names, api, checkpoints, tokenizers, root_ids)


def _engine_request(options: GenOptions, kind: str) -> dict:
    """What a run asked of its engines that can change the cache key's ``engine`` entry (the backend and the
    engine settings given, memory shares aside)."""
    given = {name: values for name, values in options.engine.given().items() if name != "--gpu-memory-utilization"}
    return {"backend": kind, "settings": given}


def _up_to_date(
    options: GenOptions, kind: str, trees: dict, strategy: Strategy, writer: TraceWriter, summary: GenSummary
) -> bool:
    """Whether the run has nothing to generate or score (tracegen.up_to_date), checked before any engine starts
    (an explicit --backend other than the trace's engine is refused here too, as when engines start). A run that
    asks its engines for other settings than the run that wrote the trace's ``engine`` entry is not decided here:
    its engines start, and the cache key's check refuses what they would change."""
    if options.backend is not None:
        _check_engine_name(writer.manifest.get("engine"), options.backend, options.out)
    if writer.manifest.get("engine") and writer.manifest.get("engine_request") != json_normal(
        _engine_request(options, kind)
    ):
        return False
    finals = {key: tree.is_final_map() for key, tree in trees.items()}
    requests = frontier(finals, strategy, options.max_steps)
    if not nothing_to_do(Path(options.out), trees, requests, options):
        return False
    summary.skipped_context_full = len(requests)  # what is left asked for does not fit the context
    summary.context_full_problems = sorted({request.problem_id for request in requests})
    return True


def _plan_engines(
    options: GenOptions, kind: str, models: _RunModels, shapes: dict[str, ModelShape], wanted_hidden
) -> tuple[dict[str, dict], MemoryPlan]:
    """Each local engine's arguments (the --tensor-parallel-size, ... settings and memory shares), and the memory
    plan they make, worked out before anything loads."""
    local = [role for role in options.roles if role not in models.api]
    engine_settings.check_engine_options(options.engine, kind, options.roles, set(local))
    kwargs = {role: engine_settings.backend_kwargs(kind, role, options.roles, options.engine) for role in local}
    hidden_roles = [role for role, layers in wanted_hidden.layers.items() if layers]
    plan = plan_memory(kind, {role: shapes[role] for role in local}, kwargs, Device.current(), hidden_roles)
    return kwargs, plan


def _open_backends(
    options: GenOptions, kind: str, engine_kwargs: dict, models: _RunModels, writer: TraceWriter, report, engines
) -> dict:
    """An engine (with its ``engine_kwargs``) or an API client per role, each closed with ``engines``; the
    engines' own log lines go to the trace's logs/ folder."""
    route_engine_logs(options.out, kind)
    _check_engine_name(writer.manifest.get("engine"), kind, options.out)
    backends = {}
    for role in options.roles:
        if role in models.api:
            backends[role] = endpoint_roles.open_backend(
                models.api[role], options.out, models.names[role], options.api_client, models.tokenizers[role], report
            )
        else:
            backends[role] = load_backend(kind, models.checkpoints[role].path, **engine_kwargs[role])
        engines.callback(backends[role].close)
    return backends


def _grow(run: GrowthRun) -> None:
    """Every step the strategy asks for: streamed where every backend can take requests one by one, then round by
    round (what the backends cannot stream, and what is left: nodes whose prompt fills the context)."""
    if continuous.can_stream(run.backends):
        continuous.grow_continuously(run)
    while True:
        requests = run.frontier()
        full = [r for r in requests if not run.fits(r)]
        run.summary.skipped_context_full = len(full)
        run.summary.context_full_problems = sorted({r.problem_id for r in full})
        requests = [r for r in requests if run.fits(r)]
        run.report(stage="round", requests=requests, summary=run.summary)
        if not requests:
            return
        grow_round(run, requests)


def grow_round(run: GrowthRun, requests: Sequence[Request]) -> None:
    """One round: every request of each model in one batch, then one atomic append of all new steps.

    ``closure`` calls this with the (node, model) misses of a router replay (see ``expand.missing``).
    """
    batches = {}  # role -> (its requests, the engine's StepRequests)
    for role in run.backends:
        batch = [r for r in requests if r.model == role]
        if batch:
            batches[role] = (batch, [run.step_request(r) for r in batch])
    generated_by_role = _generate_batches(
        run.backends, {role: batch[1] for role, batch in batches.items()}, run.sampling
    )

    step_rows, token_rows, new_steps = [], [], []
    for role, (batch, step_requests) in batches.items():
        for request, step_request, step in zip(batch, step_requests, generated_by_role[role]):
            step_row, token_row, stored = run.step_rows(request, step_request.prompt_ids, step)
            step_rows.append(step_row)
            token_rows.append(token_row)
            new_steps.append((request, stored))
            run.summary.new_gen_tokens += stored.n_gen_tokens
    run.writer.append_steps(step_rows, token_rows)
    for request, stored in new_steps:
        run.tree(request).steps[request.path] = stored
    run.summary.new_steps += len(new_steps)
    run.summary.rounds += 1


def _generate_batches(backends: dict, batches: dict[str, list[StepRequest]], sampling) -> dict[str, list]:
    """Each role's batch through its backend. Backends whose engines run in processes of their own
    (``concurrent``) get their batches at once, each from a thread: one model's generation then overlaps
    another's generation and scoring instead of waiting for it. Each engine sees the same batch either way,
    so the steps are the same."""
    overlapped = [role for role in batches if getattr(backends[role], "concurrent", False)]
    results = {}
    if len(overlapped) > 1:
        with ThreadPoolExecutor(max_workers=len(overlapped), thread_name_prefix="trace-gen") as pool:
            futures = {role: pool.submit(backends[role].generate_steps, batches[role], sampling) for role in overlapped}
            results = {role: future.result() for role, future in futures.items()}
    for role, batch in batches.items():
        if role not in results:
            results[role] = backends[role].generate_steps(batch, sampling)
    return results


def _close(options: GenOptions, run: GrowthRun, engines: contextlib.ExitStack) -> ClosureResult:
    """Grow and score what the routers of a closure or online run miss (see tracegen.closure)."""
    from tracegen.scoring import open_scorer, score_pending

    scorers = {}

    def score(names: set[str]) -> int:
        scored = 0
        for name in sorted(names):
            if name not in scorers:
                scorers[name] = open_scorer(
                    options.out, name, backend=options.backend or default_backend(), engines=run.backends
                )
                engines.callback(scorers[name].close)
            scored += score_pending(options.out, scorers[name], wait=True).new
        return scored

    return close_over(
        Path(options.out),
        list(options.routers),
        trees=run.trees,
        max_steps=run.max_steps,
        fits=run.fits,
        generate=functools.partial(grow_round, run),
        score=score,
        spent_tokens=lambda: run.summary.new_gen_tokens,
        budget_tokens=options.budget_tokens,
        report=run.report,
    )


def _check_options(options: GenOptions) -> None:
    check_backend(options.backend)
    check_outside_trace(options.out)  # before any model loads
    checks = [
        (options.worlds >= 1, f"--worlds must be at least 1, got {options.worlds}"),
        (options.temperature >= 0, f"--temperature must be >= 0, got {options.temperature}"),
        (0 < options.top_p <= 1, f"--top-p must be in (0, 1], got {options.top_p}"),
        (options.max_step_tokens >= 1, f"--max-step-tokens must be at least 1, got {options.max_step_tokens}"),
        (options.max_steps >= 1, f"--max-steps must be at least 1, got {options.max_steps}"),
        (options.topk >= 1, f"--topk must be at least 1, got {options.topk}"),
        (
            options.expand not in ("closure", "online") or bool(options.routers),
            f"--expand {options.expand} needs --routers FILE (the router configurations whose misses it grows)",
        ),
        (
            not options.routers or options.expand in ("closure", "online"),
            "--routers applies to --expand closure or online only",
        ),
        (
            options.budget_tokens is None or options.budget_tokens >= 1,
            f"--budget-tokens must be at least 1, got {options.budget_tokens}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise TraceError(message)


def _shared_prompts(models: dict[str, ModelRef], tokenizers: dict, problems: list[Problem]) -> dict[str, list[int]]:
    """Each problem's prompt ids. Steps pass between the models as token ids, so all must share the
    vocabulary and turn every question into the same prompt (a chat-mode API role has no local model)."""
    first, *others = models
    for role in others:
        name, other = models[first].name, models[role].name
        if _id_texts(tokenizers[first]) != _id_texts(tokenizers[role]):
            raise TraceError(f"models {name} and {other} have different vocabularies; a step tree needs one tokenizer")
    prompts = {}
    for problem in problems:
        ids = prompt_token_ids(tokenizers[first], problem.question)
        for role in others:
            if ids != prompt_token_ids(tokenizers[role], problem.question):
                raise TraceError(
                    f"models {models[first].name} and {models[role].name} build different prompts for problem "
                    f"{problem.problem_id} (their chat templates differ); a step tree needs one prompt per problem"
                )
        prompts[problem.problem_id] = ids
    return prompts


def _id_texts(tokenizer) -> list[str]:
    """What every token id decodes to: equal lists mean the models read ids alike."""
    return tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])


def _manifest(options: GenOptions, models: _RunModels, dataset: Dataset, grader: Grader, sampling) -> dict:
    return {
        "schema_version": schema_version_for(options.roles),
        "models": _model_entries(options, models),
        "model_paths": {role: model.path for role, model in models.checkpoints.items()},
        "dataset": {"name": dataset.name, "split": dataset.split, "file_hash": dataset.file_hash},
        "dataset_source": dataset.source,
        "prompt_template": {
            "system": SYSTEM_PROMPT,
            "layout": "model chat template: system, user = question, assistant header; steps appended as token ids",
        },
        "sampling": {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_step_tokens": sampling.max_step_tokens,
            "topk": sampling.topk,
        },
        "delimiter": sampling.delimiter,
        "grader": grader.manifest_entry(),
        "seeds": {
            "seed": options.seed,
            "request_seed": "sha256(seed, problem_id, world, parent_path, model)[:8] little-endian, 63 bits",
        },
        "tool_version": importlib.metadata.version("trace-routing"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _model_entries(options: GenOptions, models: _RunModels) -> list:
    """trace.json entries of the models in role order; a chat-mode API role is known by its served name."""
    return [
        model_manifest(models.checkpoints[role], models.tokenizers[role])
        if role in models.checkpoints
        else endpoint_roles.text_only_model_entry(role, models.api[role], models.names[role])
        for role in options.roles
    ]


def _check_engine_name(stored: dict | None, kind: str, out: Path) -> None:
    """Refuse a trace grown by another engine before starting one (which takes minutes): the rest of
    the engine entry is only known once the engines run, and is compared then."""
    if not stored:
        return
    entries = [stored] if "name" in stored else [entry for entry in stored.values() if isinstance(entry, dict)]
    names = sorted({str(entry.get("name")) for entry in entries} - {"openai"})  # API roles: compared later
    if names and kind not in names:
        raise TraceError(
            f"{out} was written with engine.name = {names[0]!r}, but this run has engine.name = {kind!r}; "
            f"use --backend {names[0]}, or a new output directory"
        )


def _engine_entry(backends: dict) -> dict:
    infos = {role: backend.engine_info() for role, backend in backends.items()}
    first = next(iter(infos.values()))
    return first if all(info == first for info in infos.values()) else infos


def _write_hidden(
    writer: TraceWriter, models: _RunModels, wanted: dict[str, tuple[int, ...]], n_blocks: dict[str, int], report
) -> int:
    """The prompt hidden states at the ``wanted`` layers (by role) that the trace lacks."""
    done = set(
        Trace(writer.root, writer.manifest).scan("hidden").select("problem_id", "model", "layer").collect().iter_rows()
    )
    layers = writer.manifest.hidden_layers_by_model
    for role, role_layers in wanted.items():
        stored = layers.get(role, [])
        layers[role] = [*stored, *(layer for layer in role_layers if layer not in stored)]
    writer.update_manifest(hidden=hidden.manifest_entry(layers, n_blocks))
    written = 0
    for role, model in models.checkpoints.items():
        todo = {
            pid: ids
            for pid, ids in models.root_ids.items()
            if any((pid, role, layer) not in done for layer in wanted[role])
        }
        if not todo:
            continue
        report(stage="hidden", role=role, total=len(todo))
        rows = hidden.prompt_hidden_rows(
            model.path,
            role,
            todo,
            wanted[role],
            on_batch=lambda n, role=role: report(stage="hidden-batch", role=role, n=n),
        )
        writer.append_hidden(rows)
        written += len(rows)
    return written


def _load_trees(
    trace: Trace, problems: list[Problem], root_ids: dict, worlds: int, continuation: dict | None = None
) -> dict[tuple[str, int], Tree]:
    """Trees of this run's problems and worlds, with the steps already stored (a resumed run).

    ``continuation`` maps a chat-mode API role to how its step's (text, finish_reason) becomes prompt ids."""
    continuation = continuation or {}
    trees = {(p.problem_id, w): Tree(p, w, root_ids[p.problem_id]) for p in problems for w in range(worlds)}
    ids = [p.problem_id for p in problems]
    steps = (
        trace.scan("steps")
        .filter(pl.col("problem_id").is_in(ids) & (pl.col("world") < worlds))
        .select(
            "step_id",
            "problem_id",
            "world",
            "path",
            "model",
            "text",
            "n_prompt_tokens",
            "n_gen_tokens",
            "is_final",
            "finish_reason",
        )
        .collect()
    )
    if steps.height == 0:
        return trees
    tokens = trace.scan("tokens").select("step_id", "token_ids")
    rows = steps.join(
        tokens.join(steps.lazy().select("step_id"), on="step_id", how="semi").collect(), on="step_id", how="left"
    )
    for row in rows.iter_rows(named=True):
        if row["token_ids"] is None:
            raise TraceError(f"{trace.root}: step {row['step_id']!r} has no tokens row; run `trace validate`")
        retokenize = continuation.get(row["model"])
        ids = retokenize(row["text"], row["finish_reason"]) if retokenize else list(row["token_ids"])
        trees[(row["problem_id"], row["world"])].steps[row["path"]] = StoredStep(
            row["model"],
            row["text"],
            ids,
            row["n_prompt_tokens"],
            row["n_gen_tokens"],
            row["is_final"],
        )
    return trees


def _record_run(writer: TraceWriter, options: GenOptions, strategy: Strategy) -> None:
    """Remember which expansions and how many worlds this trace holds (not cache-key fields)."""
    expansion = {**strategy.manifest_entry(), "max_steps": options.max_steps}
    if options.routers:
        expansion.update(
            strategy=options.expand,
            routers=[spec.manifest_entry() for spec in options.routers],
            budget_tokens=options.budget_tokens,
        )

    def record(stored):  # merged into trace.json as it is now: shards running at once each add theirs
        expansions = stored.expansions + ([expansion] if expansion not in stored.expansions else [])
        return {"expansions": expansions, "worlds": max(options.worlds, stored.worlds or 0)}

    writer.edit_manifest(record)
