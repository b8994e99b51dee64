"""Continuous tree expansion (tracegen/continuous.py) without vLLM: the fake backend's stream, whose engine loop
finishes requests out of order (as their lengths and a seeded shuffle say), must write the same part files as
growing round by round."""

from __future__ import annotations

from pathlib import Path

import pytest
from tracebuild import toy_gen_options

from tracegen.backends import load_backend
from tracegen.gen import run_gen
from tracegen.models import resolve_model


class LoggedStream:
    """A stream that logs each call (kind, role, number of items) before passing it on."""

    def __init__(self, stream, role: str, log: list):
        self.stream, self.role, self.log = stream, role, log

    def generate(self, items):
        self.log.append(("generate", self.role, len(items)))
        self.stream.generate(items)

    def score(self, items):
        self.log.append(("score", self.role, len(items)))
        self.stream.score(items)

    def close(self):
        self.stream.close()
        self.log.append(("close", self.role, 0))


class Logged:
    """A streaming backend whose streams log their calls."""

    def __init__(self, backend, log: list):
        self.backend, self.log = backend, log

    def open_stream(self, sampling, role, events):
        return LoggedStream(self.backend.open_stream(sampling, role, events), role, self.log)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def fake_backends(kind: str = "fake", **engine_kwargs) -> dict:
    return {
        role: load_backend(kind, resolve_model(f"toy-{role}", role).path, **engine_kwargs)
        for role in ("small", "large")
    }


def part_bytes(root: Path) -> list[tuple[str, bytes]]:
    return [
        (path.relative_to(root).as_posix(), path.read_bytes())
        for table in ("steps", "tokens")
        for path in sorted((root / table).glob("part-*"))
    ]


OPTIONS = dict(limit=6, seed=5, max_steps=4)


@pytest.fixture(scope="module")
def round_by_round(tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds") / "t"
    return out, run_gen(toy_gen_options(out, **OPTIONS, backend="fake"), backends=fake_backends())


@pytest.mark.parametrize("order_seed", [0, 1])
def test_continuous_growth_writes_the_parts_of_round_by_round_growth(round_by_round, tmp_path, order_seed):
    rounds_out, rounds = round_by_round
    log: list = []
    streaming = {
        role: Logged(backend, log) for role, backend in fake_backends("fake-stream", order_seed=order_seed).items()
    }
    options = toy_gen_options(tmp_path / "continuous", **OPTIONS, backend="fake-stream")
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


def test_continuous_growth_resumes_what_a_shorter_run_left(round_by_round, tmp_path):
    """`trace gen --backend fake-stream` grows continuously: a run cut after its first rounds (max_steps 2), resumed
    to the full depth, holds, part by part, what growing round by round to the full depth writes."""
    rounds_out, rounds = round_by_round
    out = tmp_path / "resumed"
    cut = run_gen(toy_gen_options(out, **{**OPTIONS, "max_steps": 2}, backend="fake-stream"))
    resumed = run_gen(toy_gen_options(out, **OPTIONS, backend="fake-stream"))
    assert resumed.new_steps == rounds.new_steps - cut.new_steps > 0
    assert part_bytes(out) == part_bytes(rounds_out)
