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
from dataclasses import dataclass, field

from tracegen.expand import Request
from tracegen.grading import is_final_step
from tracegen.growth import GrowthRun, StoredStep

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


def grow_continuously(run: GrowthRun) -> None:
    """Grow every tree to what the run's strategy asks for, writing round by round as ``run_gen``'s loop would."""
    first = [r for r in run.frontier() if run.fits(r)]
    if first:
        _Streaming(run).grow(first)


class _Streaming:
    """One continuous growth: each request's round, the steps waiting for their scoring pass, and the rounds
    waiting to be written."""

    def __init__(self, run: GrowthRun):
        self.run = run
        self.events: queue.Queue = queue.Queue()
        self.streams: dict = {}  # role -> StepStream
        self.role_order = {role: index for index, role in enumerate(run.backends)}
        self.rounds: dict[int, _Round] = defaultdict(_Round)
        self.next_round = 0  # the first round not written yet
        self.round_of: dict[Request, int] = {}
        self.prompts: dict[Request, list[int]] = {}  # request -> its prompt ids, until it is generated
        self.drafts: dict[Request, tuple] = {}  # request -> (prompt, draft, gen seconds) until it is scored
        self.waiting: dict[tuple, list[Request]] = {}  # (round, role, prompt + step) -> requests sharing one scoring
        self.scored: dict[tuple, list] = {}  # (round, role, prompt + step) -> its scores, until its round is written
        self.to_score: dict[str, list] = defaultdict(list)  # per role, steps waiting for a scoring batch
        self.generating = 0  # requests in the generating engines

    def grow(self, first: list[Request]) -> None:
        self.streams = {
            role: backend.open_stream(self.run.sampling, role, self.events)
            for role, backend in self.run.backends.items()
        }
        reported = time.perf_counter()
        self.progress()
        try:
            self.start(first, 0)
            while self.rounds:
                kind, _, key, payload = self.events.get()
                if kind == "failed":
                    raise payload
                if kind == "generated":
                    self.generated(key, *payload)
                else:
                    self.scored[key] = payload
                    for request in self.waiting.pop(key):
                        self.record(request, payload)
                self.send_to_scoring()
                self.write_finished_rounds()
                if time.perf_counter() - reported > _REPORT_SECONDS:
                    reported = time.perf_counter()
                    self.progress()
        finally:
            for stream in self.streams.values():
                stream.close()

    def start(self, requests: list[Request], number: int) -> None:
        """Send ``requests`` (of round ``number``) to their engines."""
        by_role = defaultdict(list)
        self.generating += len(requests)
        for request in requests:
            self.round_of[request] = number
            self.rounds[number].open += 1
            step_request = self.run.step_request(request)
            self.prompts[request] = list(step_request.prompt_ids)
            by_role[request.model].append((request, step_request))
        for role, items in by_role.items():
            self.streams[role].generate(items)

    def generated(self, request: Request, draft, seconds: float) -> None:
        """Add the step to its tree, start its children, and queue it for its scoring pass."""
        self.generating -= 1
        tree = self.run.tree(request)
        prompt = self.prompts.pop(request)
        final = is_final_step(draft.text, draft.finish_reason)
        tree.steps[request.path] = StoredStep(
            request.model, draft.text, list(draft.token_ids), len(prompt), len(draft.token_ids), final
        )
        self.drafts[request] = (prompt, draft, seconds)
        number = self.round_of[request]
        node = request.path
        if not final and len(node) < self.run.max_steps:
            children = [Request(request.problem_id, request.world, node, m) for m in self.run.strategy.models_at(node)]
            self.start([c for c in children if c.path not in tree.steps and self.run.fits(c)], number + 1)
        sequence = (number, request.model, len(prompt), *prompt, *draft.token_ids)
        if sequence in self.scored:
            self.record(request, self.scored[sequence])
        elif sequence in self.waiting:
            self.waiting[sequence].append(request)
        else:
            self.waiting[sequence] = [request]
            self.to_score[request.model].append((sequence, prompt, list(draft.token_ids)))

    def record(self, request: Request, scores: list) -> None:
        """The scored step as its rows, kept for its round's append."""
        prompt, draft, seconds = self.drafts.pop(request)
        step = draft.scored(scores, seconds)
        step_row, token_row, _ = self.run.step_rows(request, prompt, step)
        number = self.round_of.pop(request)
        self.rounds[number].steps.append((self.role_order[request.model], request, step_row, token_row))
        self.rounds[number].open -= 1
        self.run.summary.new_gen_tokens += len(step.token_ids)

    def send_to_scoring(self) -> None:
        for role, items in self.to_score.items():
            if len(items) >= _SCORE_BATCH or (items and not self.generating):
                self.streams[role].score(items)
                self.to_score[role] = []

    def write_finished_rounds(self) -> None:
        """Append every round that is done and has no unwritten round before it, in order."""
        while self.next_round in self.rounds and self.rounds[self.next_round].open == 0:
            done = sorted(self.rounds.pop(self.next_round).steps, key=lambda item: item[:2])
            self.run.writer.append_steps([item[2] for item in done], [item[3] for item in done])
            for sequence in [s for s in self.scored if s[0] == self.next_round]:
                del self.scored[sequence]
            self.run.summary.new_steps += len(done)
            self.run.summary.rounds += 1
            self.next_round += 1
            self.progress()

    def progress(self) -> None:
        self.run.report(stage="round", requests=sorted(self.round_of), summary=self.run.summary)
