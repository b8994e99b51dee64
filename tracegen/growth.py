"""What growing step trees keeps and counts: each tree's stored steps, each step's seed and engine request, the
rows a generated step is written as, a run's counts, and the run itself (``GrowthRun``). Shared by round-by-round
growth (``tracegen.gen``) and continuous growth (``tracegen.continuous``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tracegen.backends import StepRequest, StepSampling
from tracegen.closure import ClosureResult
from tracegen.datasets import Problem
from tracegen.expand import Request, Strategy, frontier
from tracegen.grading import Grader, extract_answer, is_final_step
from tracegen.prompts import STEP_DELIMITER
from tracestore.schema import model_char
from tracestore.store import TraceWriter


@dataclass
class GenSummary:
    out: Path
    problems: int
    rounds: int = 0
    new_steps: int = 0
    new_gen_tokens: int = 0
    skipped_context_full: int = 0  # nodes whose prompt leaves no room for a step in the context
    context_full_problems: list[str] = field(default_factory=list)  # the problems those nodes belong to
    seconds: float = 0.0
    hidden_rows: int = 0
    closure: ClosureResult | None = None  # of a closure or online run
    up_to_date: bool = False  # the trace held everything the run asks for: no engine was started


@dataclass
class StoredStep:
    """What growing a tree needs of a step: its tokens (to extend prompts), text and cost counters."""

    model: str
    text: str
    token_ids: list[int]
    n_prompt_tokens: int
    n_gen_tokens: int
    is_final: bool


@dataclass
class Tree:
    """The nodes of one (problem, world) tree, keyed by path."""

    problem: Problem
    world: int
    root_ids: list[int]
    steps: dict[str, StoredStep] = field(default_factory=dict)

    def prompt_ids(self, path: str) -> list[int]:
        ids = list(self.root_ids)
        for end in range(1, len(path) + 1):
            ids.extend(self.steps[path[:end]].token_ids)
        return ids

    def step_texts(self, path: str) -> tuple[str, ...]:
        return tuple(self.steps[path[:end]].text for end in range(1, len(path) + 1))

    def step_request(self, request: Request, seed: int) -> StepRequest:
        """What an engine is sent for ``request`` on this tree: the node's prompt ids, the step's own seed, and
        the question and the path's steps as text (for chat endpoints)."""
        return StepRequest(
            tuple(self.prompt_ids(request.parent_path)),
            request_seed(seed, request),
            self.problem.question,
            self.step_texts(request.parent_path),
        )

    def solution_text(self, path: str) -> str:
        return STEP_DELIMITER.join(self.steps[path[:end]].text for end in range(1, len(path) + 1))

    def processed_by(self, model: str, path: str) -> int:
        """Prefix tokens of node ``path`` whose keys/values ``model`` computed when it last wrote a step on it.

        That is its last step's prompt plus all but the final token it generated (the final sampled
        token is never fed back). Zero if the model has not written a step on this path.
        """
        char = model_char(model)
        for end in range(len(path), 0, -1):
            if path[end - 1] == char:
                step = self.steps[path[:end]]
                return step.n_prompt_tokens + step.n_gen_tokens - 1
        return 0

    def is_final_map(self) -> dict[str, bool]:
        return {path: step.is_final for path, step in self.steps.items()}


@dataclass
class GrowthRun:
    """One `trace gen` run's growth, built once by ``run_gen`` and passed to whatever grows its trees (round by
    round, continuously, closure's rounds): the trees, the engines and how they sample, how a generated step
    becomes rows, where they are written, and the run's counts and progress."""

    trees: dict[tuple[str, int], Tree]  # this run's (problem_id, world) -> its tree
    strategy: Strategy
    max_steps: int
    backends: dict  # role -> Backend
    context_len: int  # tokens a prompt plus its step may take on every backend
    sampling: StepSampling
    seed: int  # --seed, from which every step's seed derives
    grader: Grader
    tokenizers: dict  # role -> tokenizer (a chat-mode API role: the trace's)
    timings: bool  # store each step's measured gen_seconds
    writer: TraceWriter
    summary: GenSummary
    report: Callable  # report(stage=..., **info), see tracegen.progress.GenProgress

    def tree(self, request: Request) -> Tree:
        return self.trees[(request.problem_id, request.world)]

    def frontier(self) -> list[Request]:
        """The steps the strategy asks for at every node of the trees (those that do not fit included)."""
        return frontier({key: tree.is_final_map() for key, tree in self.trees.items()}, self.strategy, self.max_steps)

    def fits(self, request: Request) -> bool:
        """Whether the node's prompt leaves room for a step (a node that fills the context is not grown)."""
        return len(self.tree(request).prompt_ids(request.parent_path)) < self.context_len

    def step_request(self, request: Request) -> StepRequest:
        return self.tree(request).step_request(request, self.seed)

    def step_rows(self, request: Request, prompt, step) -> tuple[dict, dict, StoredStep]:
        """The generated ``step`` (on ``prompt``) as its steps row, its tokens row and what its tree keeps."""
        tokenizer = self.tokenizers[request.model]
        return step_record(request, self.tree(request), prompt, step, self.grader, tokenizer, self.timings)


def request_seed(seed: int, request: Request) -> int:
    """The sampling seed of one step: a function of (--seed, problem, world, node, model) only."""
    key = f"{seed}\0{request.problem_id}\0{request.world}\0{request.parent_path}\0{request.model}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def step_record(
    request: Request, tree: Tree, prompt: list[int], step, grader: Grader, tokenizer, timings: bool
) -> tuple[dict, dict, StoredStep]:
    """A generated step as its steps row, its tokens row and what its tree keeps of it."""
    from tracegen.signals import step_signals

    role = request.model
    signals = step_signals(step, tokenizer)
    final = is_final_step(step.text, step.finish_reason)
    answer = correct = None
    if final:
        earlier = tree.solution_text(request.parent_path)
        solution = earlier + STEP_DELIMITER + step.text if earlier else step.text
        answer = extract_answer(solution) or ""
        correct = grader.grade(answer or None, tree.problem.reference)
    n_gen = len(step.token_ids)
    n_prompt, n_new_prefill = len(prompt), len(prompt) - tree.processed_by(role, request.parent_path)
    if step.usage is not None:  # an API step: what the endpoint billed
        n_prompt = step.usage["prompt_tokens"]
        n_new_prefill = n_prompt - step.usage["cached_tokens"]
    step_row = {
        "step_id": request.step_id,
        "problem_id": request.problem_id,
        "world": request.world,
        "parent_path": request.parent_path,
        "path": request.path,
        "depth": len(request.parent_path),
        "model": role,
        "text": step.text,
        "n_prompt_tokens": n_prompt,
        "n_new_prefill_tokens": n_new_prefill,
        "n_cached_tokens": step.n_cached_tokens,
        "n_gen_tokens": n_gen,
        "finish_reason": step.finish_reason,
        "is_final": final,
        "answer": answer,
        "correct": correct,
        **signals.step_fields,
        "gen_seconds": step.gen_seconds if timings else None,
    }
    token_row = {
        "step_id": request.step_id,
        "token_ids": step.token_ids,
        "logprobs": step.logprobs,
        "max_logits": step.max_logits,
        "topk_ids": step.topk_ids,
        "topk_logprobs": step.topk_logprobs,
        "is_math": signals.is_math,
    }
    ids = step.token_ids if step.continuation_ids is None else step.continuation_ids
    return step_row, token_row, StoredStep(role, step.text, list(ids), len(prompt), n_gen, final)
