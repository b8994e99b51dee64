"""The toy arithmetic task: a seeded problem generator, exact step solutions,
an exact step verifier and exact answer grading.

A problem is a left-to-right chain of additions and subtractions, e.g.
``Compute 37+45-18+9.``; its reference solution writes one operation per step,
steps separated by ``"\\n\\n"``, the last one boxing the answer. Each step spells
out its units and tens columns (carry and borrow included), so every character
a model writes is a small local computation::

    37+45: 7+5=12, 3+4+1=8, so 82

    82-18: 12-8=4, 8-1-1=6, so 64

    64+9: 4+9=13, 6+0+1=7, so \\boxed{73}

A step may instead repair the step before it: ``Redo `` and that step's operation written exactly
right from the running value it should have started from (``repair_text``); the solution goes on from
the repair's result. The reference solution has none; models write one after a wrong step::

    37+45: 7+5=12, 3+4+1=8, so 72

    Redo 37+45: 7+5=12, 3+4+1=8, so 82

    82-18: 12-8=4, 8-1-1=6, so 64

Running values stay in ``[0, 10**digits)`` with ``digits <= 2``.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

STEP_DELIMITER = "\n\n"
REPAIR_PREFIX = "Redo "  # starts a repair step
EXHAUSTED_AFTER = 20_000  # draws without a new question before a level counts as used up
TEST_BUCKET = 8  # a question belongs to the held-out pool iff hash % TEST_BUCKET == 0


@dataclass(frozen=True)
class Level:
    n_ops: int
    digits: int


LEVELS: dict[int, Level] = {
    1: Level(n_ops=2, digits=1),
    2: Level(n_ops=2, digits=2),
    3: Level(n_ops=3, digits=2),
    4: Level(n_ops=4, digits=2),
}
DEFAULT_LEVEL = 3
SPLIT_SEEDS = {"train": 1, "test": 2}


@dataclass(frozen=True)
class ToyProblem:
    problem_id: str
    level: int
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def question(self) -> str:
        return "Compute " + str(self.start) + "".join(f"{op}{b}" for op, b in self.ops) + "."

    def running_values(self) -> list[int]:
        values = [self.start]
        for op, b in self.ops:
            values.append(apply(values[-1], op, b))
        return values

    @property
    def answer(self) -> int:
        return self.running_values()[-1]

    def solution_steps(self) -> list[str]:
        values = self.running_values()
        last = len(self.ops) - 1
        return [step_text(values[k], op, b, is_last=k == last) for k, (op, b) in enumerate(self.ops)]

    def solution(self) -> str:
        return STEP_DELIMITER.join(self.solution_steps())

    def repair_steps(self, k: int) -> list[str]:
        """What should follow a wrong step for operation ``k`` written after the reference steps before it:
        the repair of operation ``k``, then the reference steps after it."""
        a, (op, b) = self.running_values()[k], self.ops[k]
        return [repair_text(a, op, b, is_last=k == len(self.ops) - 1), *self.solution_steps()[k + 1 :]]


def step_text(a: int, op: str, b: int, is_last: bool) -> str:
    """The exact text of one step: the operation, its units and tens columns, and the result."""
    a_tens, a_units = divmod(a, 10)
    b_tens, b_units = divmod(b, 10)
    if op == "+":
        units_sum = a_units + b_units
        units = f"{a_units}+{b_units}={units_sum}"
        carry = "+1" if units_sum >= 10 else ""
        tens = f"{a_tens}+{b_tens}{carry}={a_tens + b_tens + (units_sum >= 10)}"
    else:
        borrow = a_units < b_units
        top = a_units + 10 * borrow
        units = f"{top}-{b_units}={top - b_units}"
        tens = f"{a_tens}-{b_tens}{'-1' if borrow else ''}={a_tens - b_tens - borrow}"
    result = str(apply(a, op, b))
    if is_last:
        result = "\\boxed{" + result + "}"
    return f"{a}{op}{b}: {units}, {tens}, so {result}"


def repair_text(a: int, op: str, b: int, is_last: bool) -> str:
    """The exact text of a repair step: the previous step's operation redone from the value ``a`` it should
    have started from."""
    return REPAIR_PREFIX + step_text(a, op, b, is_last)


def is_repair(step: str) -> bool:
    return step.lstrip().startswith(REPAIR_PREFIX)


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown operator {op!r}")


def _draw(rng: random.Random, level: Level) -> tuple[int, tuple[tuple[str, int], ...]]:
    top = 10**level.digits - 1
    start = rng.randint(1, top)
    value, ops = start, []
    for _ in range(level.n_ops):
        can_add, can_sub = value < top, value > 0
        op = rng.choice("+-") if can_add and can_sub else ("+" if can_add else "-")
        b = rng.randint(1, top - value) if op == "+" else rng.randint(1, value)
        ops.append((op, b))
        value = apply(value, op, b)
    return start, tuple(ops)


def _in_test_pool(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "little") % TEST_BUCKET == 0


def generate(n: int, split: str = "test", level: int = DEFAULT_LEVEL, seed: int = 0) -> list[ToyProblem]:
    """``n`` distinct problems of one level; train and test pools are disjoint by question hash."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown toy split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown toy level {level}; choose one of {sorted(LEVELS)}")
    rng = random.Random(f"toy/{split}/{level}/{seed}")
    want_test = split == "test"
    problems: list[ToyProblem] = []
    seen: set[str] = set()
    draws_since_new = 0
    while len(problems) < n:
        if draws_since_new > EXHAUSTED_AFTER:
            raise ValueError(f"toy level {level} has only {len(problems)} distinct {split} problems; asked for {n}")
        start, ops = _draw(rng, LEVELS[level])
        q = ToyProblem("", level, start, ops).question
        draws_since_new += 1
        if q in seen or _in_test_pool(q) != want_test:
            continue
        seen.add(q)
        draws_since_new = 0
        problems.append(ToyProblem(f"toy-{split}-L{level}-{len(problems):05d}", level, start, ops))
    return problems


_QUESTION = re.compile(r"^Compute (\d+)((?:[+-]\d+)+)\.$")
_OPERATION = re.compile(r"([+-])(\d+)")
_NUMBER = r"(0|[1-9]\d*)"
_STEP = re.compile(rf"^(?:{REPAIR_PREFIX})?{_NUMBER}([+-]){_NUMBER}: .*, so (?:\\boxed\{{{_NUMBER}\}}|{_NUMBER})$")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    m = _QUESTION.match(question.strip())
    if not m:
        raise ValueError(f"not a toy question: {question!r}")
    return int(m.group(1)), [(op, int(b)) for op, b in _OPERATION.findall(m.group(2))]


def extract_boxed(text: str) -> str | None:
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def step_result(step: str) -> int | None:
    """The number a step (or a repair step) ends with, if it has the shape of a step."""
    m = _STEP.match(step.strip())
    if not m:
        return None
    return int(m.group(4) if m.group(4) is not None else m.group(5))


def step_is_valid(question: str, previous_steps: list[str], step: str) -> bool:
    """Is ``step`` exactly a right next step, given the steps written so far?

    An operation step must continue from the previous step's result (the starting number for the
    first step), apply the question's next operation (the next after the operation steps so far), and
    be written exactly as ``step_text`` writes it (every column right, the box only on the last
    operation). A repair step must redo the previous operation step's operation from the value that
    step should have started from, written exactly as ``repair_text`` writes it; the next step goes on
    from the repair's result. A step is judged on its own: one that continues correctly from an earlier
    mistake is valid, and so is a needless repair of a right step (every number in it is right).
    """
    start, ops = parse_question(question)
    done, value, repair_from = 0, start, None  # operation steps so far; where the next starts; the last's start
    for previous in previous_steps:
        if not is_repair(previous):
            done, repair_from = done + 1, value
        value = step_result(previous)
    k, a, write = (done - 1, repair_from, repair_text) if is_repair(step) else (done, value, step_text)
    if not 0 <= k < len(ops) or a is None:
        return False
    op, b = ops[k]
    return apply(a, op, b) in range(100) and step.strip() == write(a, op, b, is_last=k == len(ops) - 1)


def verify_steps(question: str, steps: list[str]) -> list[bool]:
    """Per-step validity of a whole solution."""
    return [step_is_valid(question, steps[:k], step) for k, step in enumerate(steps)]


def grade(answer: str | None, reference: str) -> bool:
    """Exact integer equality; anything unparsable is wrong."""
    if answer is None:
        return False
    try:
        return int(answer.strip()) == int(reference.strip())
    except ValueError:
        return False
