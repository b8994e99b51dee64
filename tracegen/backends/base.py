"""What tree expansion sees of a generation engine: token-id prompts in, step records out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tracegen.prompts import STEP_DELIMITER
from tracestore.errors import TraceError


@dataclass(frozen=True)
class StepSampling:
    """Per-request sampling settings shared by every request of a batch."""

    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    max_step_tokens: int = 256
    topk: int = 5  # alternatives recorded per position (ids + log-probabilities)
    delimiter: str = STEP_DELIMITER  # matched on decoded text; ends a step and is not kept in its text


@dataclass(frozen=True)
class StepRequest:
    """Continue the prefix ``prompt_ids`` by one step, sampling with ``seed``."""

    prompt_ids: tuple[int, ...]
    seed: int
    question: str | None = None  # chat endpoints get text: the question and the steps on the path so far
    steps: tuple[str, ...] = ()


@dataclass
class GeneratedStep:
    """One step as the engine wrote it, with the per-token signals routers read.

    ``token_ids`` holds every generated token, including the one(s) that produced the delimiter
    (a merged token such as ".\\n\\n" may carry more text) and a final EOS token; a child's prompt
    is its parent's prompt ids + these ids. ``text`` is the decoded text up to the first
    delimiter, without it (special tokens skipped).
    """

    token_ids: list[int]
    text: str
    finish_reason: str  # "delimiter" | "eos" | "length"
    logprobs: list[float]  # exact log-softmax of the raw logits at each sampled token
    max_logits: list[float] | None  # raw (pre-softmax, pre-temperature) max logit per position; None from APIs
    topk_ids: list[list[int]]  # per position, the topk most likely ids, best first
    topk_logprobs: list[list[float]]  # their exact log-probabilities
    n_cached_tokens: int  # prompt tokens served from the engine's prefix cache
    gen_seconds: float  # this request's share of the batch's generation wall time
    token_texts: list[str] | None = None  # per token, where ids are unknown (closed APIs): its text
    usage: dict | None = None  # an endpoint's billed prompt_tokens, cached_tokens, completion_tokens
    continuation_ids: list[int] | None = None  # what a child's prompt adds, where it is not token_ids (chat APIs)


@dataclass
class Draft:
    """A generated step before its exact scoring pass (a streaming backend's first result): what growing the tree
    needs of it."""

    token_ids: list[int]
    text: str
    finish_reason: str
    max_logits: list[float]
    n_cached_tokens: int

    def scored(self, position_scores: list, gen_seconds: float) -> GeneratedStep:
        """The step with its exact log-probabilities: per token, ([the token, top-k ids], [its log-prob, top-k
        log-probs])."""
        return GeneratedStep(
            token_ids=self.token_ids,
            text=self.text,
            finish_reason=self.finish_reason,
            logprobs=[entry[1][0] for entry in position_scores],
            max_logits=self.max_logits,
            topk_ids=[entry[0][1:] for entry in position_scores],
            topk_logprobs=[entry[1][1:] for entry in position_scores],
            n_cached_tokens=self.n_cached_tokens,
            gen_seconds=gen_seconds,
        )


class Backend(Protocol):
    name: str
    max_total_tokens: int  # a prompt plus its step never exceeds this many tokens

    def generate_steps(self, requests: list[StepRequest], sampling: StepSampling) -> list[GeneratedStep]:
        """One step for every request, in request order, as one engine batch."""
        ...

    def engine_info(self) -> dict:
        """Engine name, version and every flag that can change an output, for the manifest."""
        ...

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Exact log-probability of every continuation token after its prompt (teacher forcing; for scorers)."""
        ...

    def next_token_logprobs(self, prompts: list[list[int]], topk: int) -> list[dict[int, float]]:
        """Exact log-probabilities of the ``topk`` likeliest next tokens after each prompt (for scorers)."""
        ...

    def close(self) -> None:
        """Release the engine (its processes and memory) now rather than at interpreter exit."""
        ...


def check_batch(
    requests: Sequence[StepRequest],
    sampling: StepSampling,
    *,
    max_total_tokens: int,
    vocab_size: int,
    max_topk: int,
) -> None:
    """Raise TraceError, naming the field or request, for anything the engines would reject or misread."""
    checks = [
        (sampling.temperature >= 0, f"temperature must be >= 0, got {sampling.temperature}"),
        (0 < sampling.top_p <= 1, f"top_p must be in (0, 1], got {sampling.top_p}"),
        (sampling.max_step_tokens >= 1, f"max_step_tokens must be at least 1, got {sampling.max_step_tokens}"),
        (1 <= sampling.topk <= max_topk, f"topk must be between 1 and {max_topk}, got {sampling.topk}"),
        (bool(sampling.delimiter), "the step delimiter must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise TraceError(message)
    for index, request in enumerate(requests):
        if not request.prompt_ids:
            raise TraceError(f"request {index} has an empty prompt")
        if len(request.prompt_ids) >= max_total_tokens:
            raise TraceError(
                f"request {index} has a {len(request.prompt_ids)}-token prompt; this engine needs prompts "
                f"shorter than {max_total_tokens} tokens to leave room for a step"
            )
        low, high = min(request.prompt_ids), max(request.prompt_ids)
        if low < 0 or high >= vocab_size:
            raise TraceError(
                f"request {index} has token id {low if low < 0 else high} outside the model's vocabulary "
                f"(0..{vocab_size - 1})"
            )


def batch_shares(seconds: float, token_counts: Sequence[int]) -> list[float]:
    """Split a batch's wall time over its requests in proportion to the tokens each generated."""
    total = sum(token_counts)
    return [seconds * n / total for n in token_counts]
