"""Continuous tree expansion (tracegen/continuous.py) on the toy models, without vLLM: a stream over the hf backend
that answers in a shuffled order must write the same part files as growing round by round."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tracebuild import toy_gen_options

from tracegen.backends import load_backend
from tracegen.backends.base import Draft
from tracegen.gen import run_gen
from tracegen.models import resolve_model


class ShuffledStream:
    """``StepStream``'s contract over one hf backend: each request is generated alone when it is asked for, and the
    results of each call arrive on the event queue in a shuffled order (as an engine finishes them)."""

    def __init__(self, backend, sampling, role: str, events, rng: random.Random, log: list):
        self.backend, self.sampling, self.role, self.events, self.rng, self.log = (
            backend,
            sampling,
            role,
            events,
            rng,
            log,
        )
        self.steps = {}

    def generate(self, items):
        results = []
        for key, request in items:
            [step] = self.backend.generate_steps([request], self.sampling)
            self.steps[(tuple(request.prompt_ids), tuple(step.token_ids))] = step
            draft = Draft(step.token_ids, step.text, step.finish_reason, step.max_logits, step.n_cached_tokens)
            results.append(("generated", self.role, key, (draft, step.gen_seconds)))
        self.rng.shuffle(results)
        for event in results:
            self.events.put(event)
        self.log.append(("generate", self.role, len(items)))

    def score(self, items):
        results = []
        for key, prompt, token_ids in items:
            step = self.steps[(tuple(prompt), tuple(token_ids))]
            scores = [
                ([token, *ids], [logprob, *logprobs])
                for token, ids, logprob, logprobs in zip(
                    step.token_ids, step.topk_ids, step.logprobs, step.topk_logprobs
                )
            ]
            results.append(("scored", self.role, key, scores))
        self.rng.shuffle(results)
        for event in results:
            self.events.put(event)
        self.log.append(("score", self.role, len(items)))

    def close(self):
        self.log.append(("close", self.role, 0))


class Streaming:
    """An hf backend that also streams (``open_stream``), so that ``run_gen`` grows continuously on it."""

    def __init__(self, backend, seed: int, log: list):
        self.backend, self.rng, self.log = backend, random.Random(seed), log

    def open_stream(self, sampling, role, events):
        return ShuffledStream(self.backend, sampling, role, events, self.rng, self.log)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def one_at_a_time():
    """The toy models on hf, generating every request alone (as the stream does), so the schedules can differ."""
    return {
        role: load_backend("hf", resolve_model(f"toy-{role}", role).path, max_batch_size=1)
        for role in ("small", "large")
    }


def part_bytes(root: Path) -> list[tuple[str, bytes]]:
    return [
        (path.relative_to(root).as_posix(), path.read_bytes())
        for table in ("steps", "tokens")
        for path in sorted((root / table).glob("part-*"))
    ]


OPTIONS = dict(limit=2, seed=5, max_steps=4)


@pytest.fixture(scope="module")
def round_by_round(one_at_a_time, tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds") / "t"
    return out, run_gen(toy_gen_options(out, **OPTIONS), backends=one_at_a_time)


@pytest.mark.parametrize("order_seed", [0, 1])
def test_continuous_growth_writes_the_parts_of_round_by_round_growth(
    one_at_a_time, round_by_round, tmp_path, order_seed
):
    rounds_out, rounds = round_by_round
    log: list = []
    streaming = {role: Streaming(backend, order_seed, log) for role, backend in one_at_a_time.items()}
    options = toy_gen_options(tmp_path / "continuous", **OPTIONS)
    continuous = run_gen(options, backends=streaming)
    assert (continuous.rounds, continuous.new_steps, continuous.new_gen_tokens) == (
        rounds.rounds,
        rounds.new_steps,
        rounds.new_gen_tokens,
    )
    assert rounds.rounds >= 3 and len(part_bytes(rounds_out)) == 2 * rounds.rounds
    assert part_bytes(tmp_path / "continuous") == part_bytes(rounds_out)
    generate_calls = [n for kind, _, n in log if kind == "generate"]
    assert len(generate_calls) > 2 * rounds.rounds  # children were asked for one parent at a time, not by round
    assert sum(n for kind, _, n in log if kind == "score") <= rounds.new_steps  # equal steps are scored once
    assert sorted(role for kind, role, _ in log if kind == "close") == ["large", "small"]
    again = run_gen(options, backends=streaming)  # a finished trace: nothing to grow, nothing rewritten
    assert again.new_steps == 0 and part_bytes(tmp_path / "continuous") == part_bytes(rounds_out)
