"""Answer extraction and grading: math-verify equivalences, GSM8K markers, toy exactness, letters."""

from __future__ import annotations

import pytest

from data.toy import task
from tracegen.datasets import load_dataset
from tracegen.grading import extract_answer, extract_boxed, grader_for, is_final_step
from tracestore.errors import TraceError


def test_boxed_extraction_handles_nesting_and_takes_the_last():
    assert extract_boxed("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{3} then \\boxed{\\sqrt{\\frac{a}{b}}}") == "\\sqrt{\\frac{a}{b}}"
    assert extract_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed("unfinished \\boxed{12") is None
    assert extract_boxed("no answer") is None


def test_gsm8k_marker_is_the_fallback():
    assert extract_answer("She pays 3*6 = 18.\n#### 1,018\n") == "1018"
    assert extract_answer("#### 5\n so \\boxed{6}") == "6"
    assert extract_answer("nothing") is None


def test_final_step_rule():
    assert is_final_step("so the answer is \\boxed{4}", "delimiter")
    assert is_final_step("I am done", "eos")
    assert not is_final_step("2+2=4", "delimiter")
    assert not is_final_step("2+2=4", "length")


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac12", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("18.00", "18", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("17", "18", False),
        ("\\frac{1}{3}", "0.5", False),
        ("", "1", False),
        (None, "1", False),
    ],
)
def test_math_verify_equivalences(answer, reference, expected):
    assert grader_for("math500").grade(answer, reference) is expected


def test_gsm8k_reference_graded_against_boxed_answers():
    grader = grader_for("gsm8k")
    problem = load_dataset("gsm8k", split="test", limit=1).problems[0]
    assert grader.grade(extract_answer("She makes \\boxed{\\$18} a day."), problem.reference)
    assert grader.grade(extract_answer("#### 18"), problem.reference)
    assert not grader.grade(extract_answer("\\boxed{16}"), problem.reference)


def test_toy_grading_is_exact_integer_equality():
    grader = grader_for("toy")
    problem = task.generate(1, split="test", seed=0)[0]
    solution = problem.solution()
    assert grader.grade(extract_answer(solution), str(problem.answer))
    assert not grader.grade(
        extract_answer(solution.replace(f"{{{problem.answer}}}", f"{{{problem.answer + 1}}}")), str(problem.answer)
    )
    assert not grader.grade("0.5e2", "50")  # math-verify would say yes; the toy grader is exact
    assert grader.name == "toy-exact" and grader.version.startswith("data.toy.task.grade@")


def test_multiple_choice_letters():
    grader = grader_for("mmlu")
    assert grader.grade("B", "B") and grader.grade("(B)", "B") and grader.grade("\\text{B}", "B")
    assert not grader.grade("C", "B") and not grader.grade(None, "B")


def test_manifest_entry_and_unknown_dataset():
    entry = grader_for("gsm8k").manifest_entry()
    assert entry["name"] == "math-verify" and entry["version"].count(".") >= 1
    with pytest.raises(TraceError, match="no grader"):
        grader_for("imagenet")
