"""Continuous tree expansion: a child starts as soon as its parent is generated, not when the parent's round ends.

Round by round, every round lasts as long as its longest step while the engine's batch empties. Here each
model's engine is fed request by request (``StepStream``): a finished step is added to its tree at once and its
children join their engines' next step, while the step itself goes through its model's scoring pass. The steps
are the same as the rounds write (each request keeps its own seed; the engines' outputs do not depend on their
batch), and so are the part files: a step belongs to the *round* its parent's round + 1, as in round-by-round
growth, and each round's rows are written as one append in the same order, once the round and every earlier one
is done. A killed run loses at most the rounds not yet written, and resumes as before.
"""

from __future__ import annotations

import queue
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from tracegen.backends import StepRequest, StepSampling
from tracegen.expand import Request, Strategy, frontier
from tracegen.grading import Grader, is_final_step
from tracegen.growth import GenSummary, StoredStep, Tree, request_seed, step_record
from tracestore.store import TraceWriter

_REPORT_SECONDS = 0.5  # how often progress is reported between written rounds
# Scoring is off the critical path: steps wait for it in batches of this many per model (or until no step is
# being generated), as a prefill pass over many sequences costs far less per token than one over a few.
_SCORE_BATCH = 128


def can_stream(backends: dict) -> bool:
    """Whether every backend can take requests one by one (vLLM engines; not the hf or API backends)."""
    return all(hasattr(backend, "open_stream") for backend in backends.values())


@dataclass
class _Round:
    open: int = 0  # its requests not yet generated and scored
    steps: list = field(default_factory=list)  # (role order, request, steps row, tokens row)


def grow_continuously(
    trees: dict[tuple[str, int], Tree],
    strategy: Strategy,
    max_steps: int,
    fits: Callable[[Request], bool],
    backends: dict,
    sampling: StepSampling,
    grader: Grader,
    tokenizers: dict,
    writer: TraceWriter,
    seed: int,
    summary: GenSummary,
    report: Callable,
    *,
    timings: bool = False,
) -> None:
    """Grow every tree to what ``strategy`` asks for, writing round by round as ``run_gen``'s loop would."""
    first = [r for r in frontier({k: t.is_final_map() for k, t in trees.items()}, strategy, max_steps) if fits(r)]
    if not first:
        return
    events: queue.Queue = queue.Queue()
    streams = {role: backend.open_stream(sampling, role, events) for role, backend in backends.items()}
    role_order = {role: index for index, role in enumerate(backends)}
    rounds: dict[int, _Round] = defaultdict(_Round)
    round_of: dict[Request, int] = {}
    prompts: dict[Request, list[int]] = {}  # request -> its prompt ids, until it is generated
    drafts: dict[Request, tuple] = {}  # request -> (prompt, draft, gen seconds) until it is scored
    waiting: dict[tuple, list[Request]] = {}  # (round, role, prompt + step) -> requests sharing one scoring pass
    scored: dict[tuple, list] = {}  # (round, role, prompt + step) -> its scores, until its round is written
    to_score: dict[str, list] = defaultdict(list)  # per role, steps waiting for a scoring batch
    generating = [0]  # requests in the generating engines
    next_round = 0

    def start(requests: list[Request], number: int) -> None:
        by_role = defaultdict(list)
        generating[0] += len(requests)
        for request in requests:
            round_of[request] = number
            rounds[number].open += 1
            tree = trees[(request.problem_id, request.world)]
            prompts[request] = tree.prompt_ids(request.parent_path)
            step_request = StepRequest(
                tuple(prompts[request]),
                request_seed(seed, request),
                tree.problem.question,
                tree.step_texts(request.parent_path),
            )
            by_role[request.model].append((request, step_request))
        for role, items in by_role.items():
            streams[role].generate(items)

    def generated(request: Request, draft, seconds: float) -> None:
        generating[0] -= 1
        tree = trees[(request.problem_id, request.world)]
        prompt = prompts.pop(request)
        final = is_final_step(draft.text, draft.finish_reason)
        tree.steps[request.path] = StoredStep(
            request.model, draft.text, list(draft.token_ids), len(prompt), len(draft.token_ids), final
        )
        drafts[request] = (prompt, draft, seconds)
        number = round_of[request]
        node = request.path
        if not final and len(node) < max_steps:
            children = [Request(request.problem_id, request.world, node, model) for model in strategy.models_at(node)]
            start([c for c in children if c.path not in tree.steps and fits(c)], number + 1)
        sequence = (number, request.model, len(prompt), *prompt, *draft.token_ids)
        if sequence in scored:
            record(request, scored[sequence])
        elif sequence in waiting:
            waiting[sequence].append(request)
        else:
            waiting[sequence] = [request]
            to_score[request.model].append((sequence, prompt, list(draft.token_ids)))

    def record(request: Request, scores: list) -> None:
        prompt, draft, seconds = drafts.pop(request)
        tree = trees[(request.problem_id, request.world)]
        step = draft.scored(scores, seconds)
        step_row, token_row, _ = step_record(request, tree, prompt, step, grader, tokenizers[request.model], timings)
        number = round_of.pop(request)
        rounds[number].steps.append((role_order[request.model], request, step_row, token_row))
        rounds[number].open -= 1
        summary.new_gen_tokens += len(step.token_ids)

    def write(number: int) -> None:
        done = sorted(rounds.pop(number).steps, key=lambda item: item[:2])
        writer.append_steps([item[2] for item in done], [item[3] for item in done])
        for sequence in [s for s in scored if s[0] == number]:
            del scored[sequence]
        summary.new_steps += len(done)
        summary.rounds += 1

    def progress() -> None:
        report(stage="round", requests=sorted(round_of), summary=summary)

    reported = time.perf_counter()
    progress()
    try:
        start(first, 0)
        while rounds:
            kind, role, key, payload = events.get()
            if kind == "failed":
                raise payload
            if kind == "generated":
                generated(key, *payload)
            else:
                scored[key] = payload
                for request in waiting.pop(key):
                    record(request, payload)
            for role, items in to_score.items():
                if len(items) >= _SCORE_BATCH or (items and not generating[0]):
                    streams[role].score(items)
                    to_score[role] = []
            while next_round in rounds and rounds[next_round].open == 0:
                write(next_round)
                next_round += 1
                progress()
            if time.perf_counter() - reported > _REPORT_SECONDS:
                reported = time.perf_counter()
                progress()
    finally:
        for stream in streams.values():
            stream.close()
