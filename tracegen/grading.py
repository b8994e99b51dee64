"""Final answers: where a solution ends, what answer it gives, and whether that answer is right.

Answers are taken from the last ``\\boxed{...}`` (braces may nest) or, failing that, a GSM8K
``#### N`` line. Math datasets are graded with the ``math-verify`` library; the toy world with
its exact integer grader; multiple choice by math-verify's letter extraction.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from functools import lru_cache
from pathlib import Path

from tracestore.errors import TraceError

ANSWER_MARKER = "\\boxed{"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_ANSWER = re.compile(r"####\s*([^\n]+?)\s*$", re.MULTILINE)
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$")


def is_final_step(text: str, finish_reason: str) -> bool:
    """A step ends the solution when the model stopped (EOS) or wrote the answer marker."""
    return finish_reason == "eos" or ANSWER_MARKER in text


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``, nested braces included; None if there is none."""
    answer = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    answer = text[start:position].strip()
                    break
    return answer


def extract_answer(text: str) -> str | None:
    """The solution's final answer: the last ``\\boxed{}``, else the last ``#### N`` line."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    found = _GSM8K_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


class Grader:
    """Decides whether an extracted answer equals the reference. ``name``/``version`` go to the manifest."""

    name: str
    version: str

    def grade(self, answer: str | None, reference: str) -> bool:
        raise NotImplementedError

    def manifest_entry(self) -> dict:
        return {"name": self.name, "version": self.version}


class MathVerifyGrader(Grader):
    name = "math-verify"

    def __init__(self):
        self.version = importlib.metadata.version("math-verify")

    def grade(self, answer: str | None, reference: str) -> bool:
        if answer is None or not answer.strip():
            return False
        from math_verify import verify

        predicted = _parse_math("\\boxed{" + answer + "}")
        return bool(predicted) and bool(verify(_parse_math("$" + reference + "$"), predicted))


class ChoiceGrader(Grader):
    """Multiple choice: the letter math-verify finds in the answer must be the reference letter."""

    name = "math-verify-choice"

    def __init__(self):
        self.version = importlib.metadata.version("math-verify")

    def grade(self, answer: str | None, reference: str) -> bool:
        if answer is None:
            return False
        from math_verify import StringExtractionConfig, parse

        text = answer.strip().strip("()").strip()
        unwrapped = _TEXT_WRAPPER.match(text)
        if unwrapped:
            text = unwrapped.group(1).strip().strip("()").strip()
        config = [StringExtractionConfig(strings=tuple(_LETTERS), lowercase=False)]
        found = parse(text, config)
        return bool(found) and found[-1] == reference.strip().upper()


class ToyGrader(Grader):
    """The toy world's exact integer grader (``data.toy.task.grade``)."""

    name = "toy-exact"

    def __init__(self):
        from data.toy import task

        source = hashlib.sha256(Path(task.__file__).read_bytes()).hexdigest()[:16]
        self.version = f"data.toy.task.grade@{source}"
        self._grade = task.grade

    def grade(self, answer: str | None, reference: str) -> bool:
        return self._grade(answer, reference)


class ExactGrader(Grader):
    """Exact match: the answer equals the reference once surrounding whitespace is stripped."""

    name = "exact"
    version = "1"

    def grade(self, answer: str | None, reference: str) -> bool:
        return answer is not None and answer.strip() == reference.strip()


# Graders by the name trace.json records (``grader.name``); `trace regrade --grader` takes these names.
GRADERS = {grader.name: grader for grader in (MathVerifyGrader, ChoiceGrader, ExactGrader, ToyGrader)}

_GRADERS = {
    "toy": ToyGrader,
    "mmlu": ChoiceGrader,
    "gsm8k": MathVerifyGrader,
    "math500": MathVerifyGrader,
    "omnimath": MathVerifyGrader,
}


@lru_cache(maxsize=4096)
def _parse_math(text: str):
    from math_verify import parse

    return parse(text)


def grader_named(name: str) -> Grader:
    """The grader trace.json names ``name`` (math-verify, math-verify-choice, exact, toy-exact)."""
    if name not in GRADERS:
        raise TraceError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}")
    return GRADERS[name]()


def grader_for(dataset_name: str) -> Grader:
    if dataset_name not in _GRADERS:
        raise TraceError(f"no grader for dataset {dataset_name!r}; known: {', '.join(sorted(_GRADERS))}")
    return _GRADERS[dataset_name]()
