import pytest

from data.toy.task import (
    DEFAULT_LEVEL,
    LEVELS,
    apply,
    extract_boxed,
    generate,
    grade,
    parse_question,
    repair_text,
    step_is_valid,
    step_text,
    verify_steps,
)


def test_generator_is_deterministic_per_seed():
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)


def test_train_and_test_pools_are_disjoint():
    train = {p.question for p in generate(2000, split="train")}
    test = {p.question for p in generate(300, split="test")}
    assert len(test) == 300
    assert not train & test


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_levels_have_their_shape_and_stay_in_range(level):
    spec = LEVELS[level]
    for p in generate(50, level=level):
        assert len(p.ops) == spec.n_ops
        assert all(0 <= v < 10**spec.digits for v in p.running_values())
        assert len(p.solution_steps()) == spec.n_ops


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_verifier_accepts_every_reference_solution(level):
    for p in generate(50, level=level):
        steps = p.solution_steps()
        assert all(verify_steps(p.question, steps)), p.solution()
        assert grade(extract_boxed(steps[-1]), str(p.answer))


def test_reference_solution_format():
    p = generate(1, level=DEFAULT_LEVEL)[0]
    start, ops = parse_question(p.question)
    assert (start, tuple(ops)) == (p.start, p.ops)
    *middle, last = p.solution().split("\n\n")
    assert all("\\boxed" not in s for s in middle)
    assert last.endswith("\\boxed{" + str(p.answer) + "}")


def corruptions(step: str):
    """Every single-character change of a digit or operator, plus structural breakages."""
    for i, ch in enumerate(step):
        if ch.isdigit():
            for d in "0123456789":
                if d != ch:
                    yield step[:i] + d + step[i + 1 :]
        elif ch in "+-":
            yield step[:i] + ("-" if ch == "+" else "+") + step[i + 1 :]
    yield step.replace("=", "")
    yield step + "0"


def test_verifier_rejects_corrupted_steps():
    checked = 0
    for p in generate(60, level=DEFAULT_LEVEL):
        steps = p.solution_steps()
        for k, step in enumerate(steps):
            for bad in corruptions(step):
                assert not step_is_valid(p.question, steps[:k], bad), (p.question, steps[:k], bad)
                checked += 1
    assert checked > 1000


def test_a_step_that_continues_correctly_from_a_mistake_is_valid_on_its_own():
    for p in generate(200, level=DEFAULT_LEVEL):
        op1, b1 = p.ops[1]
        wrong = p.running_values()[1] + 1
        if apply(wrong, op1, b1) in range(100):
            break
    correct_first = p.solution_steps()[0]
    first = correct_first.rsplit(" ", 1)[0] + f" {wrong}"
    second = step_text(wrong, op1, b1, is_last=False)
    assert verify_steps(p.question, [first, second]) == [False, True]
    assert verify_steps(p.question, [correct_first, second]) == [True, False]


def wrong_result(step: str) -> str:
    """``step`` with its result off by one (a wrong step whose result is wrong)."""
    head, result = step.rsplit(" ", 1)
    digits = result.removeprefix("\\boxed{").removesuffix("}")
    return step.replace(f"so {result}", f"so {result.replace(digits, str(int(digits) + 1))}")


@pytest.mark.parametrize("level", [2, 3, 4])
def test_a_repair_after_a_wrong_step_is_valid_and_the_solution_goes_on_from_it(level):
    checked = 0
    for p in generate(40, level=level):
        steps = p.solution_steps()
        for k in range(len(steps)):
            wrong = wrong_result(steps[k])
            solution = steps[:k] + [wrong] + p.repair_steps(k)
            assert p.repair_steps(k)[0] == repair_text(p.running_values()[k], *p.ops[k], is_last=k == len(steps) - 1)
            assert verify_steps(p.question, solution) == [True] * k + [False] + [True] * (len(steps) - k)
            assert grade(extract_boxed(solution[-1]), str(p.answer))
            checked += 1
    assert checked == 40 * LEVELS[level].n_ops


def test_a_needless_repair_of_a_right_step_is_valid_on_its_own():
    """Every number in it is right; that a model should not write one is measured on the model
    (scripts/toy/evaluate.py needless_repairs), not ruled out by the verifier."""
    for p in generate(30, level=DEFAULT_LEVEL):
        steps = p.solution_steps()
        for k in range(len(steps)):
            solution = steps[: k + 1] + p.repair_steps(k)
            assert all(verify_steps(p.question, solution)), solution


def test_verifier_rejects_wrong_repairs():
    """A repair must redo the previous step's operation, from the value that step should have started from,
    written exactly (its box only when that operation is the last); it cannot open a solution."""
    checked = 0
    for p in generate(60, level=DEFAULT_LEVEL):
        steps, values, last = p.solution_steps(), p.running_values(), len(p.ops) - 1
        assert not step_is_valid(p.question, [], repair_text(p.start, *p.ops[0], is_last=False))
        for k in range(len(steps)):
            before, wrong = steps[:k] + [wrong_result(steps[k])], values[k + 1] + 1
            repair = p.repair_steps(k)[0]
            assert step_is_valid(p.question, before, repair)
            bad = list(corruptions(repair)) + [repair_text(values[k], *p.ops[k], is_last=k != last)]
            if apply(wrong, *p.ops[k]) in range(100):  # redone from the wrong step's result
                bad.append(repair_text(wrong, *p.ops[k], is_last=k == last))
            if k < last and apply(values[k], *p.ops[k + 1]) in range(100):  # the next operation
                bad.append(repair_text(values[k], *p.ops[k + 1], is_last=k + 1 == last))
            for text in set(bad) - {repair}:
                assert not step_is_valid(p.question, before, text), (p.question, before, text)
                checked += 1
    assert checked > 1000


def test_boxed_only_on_the_last_step():
    p = generate(1, level=DEFAULT_LEVEL)[0]
    steps = p.solution_steps()
    (op, b), start = p.ops[0], p.start
    assert not step_is_valid(p.question, [], step_text(start, op, b, is_last=True))
    unboxed = steps[-1].replace("\\boxed{", "").rstrip("}")
    assert not step_is_valid(p.question, steps[:-1], unboxed)


def test_step_text_spells_out_carries_and_borrows():
    assert step_text(37, "+", 45, is_last=False) == "37+45: 7+5=12, 3+4+1=8, so 82"
    assert step_text(82, "-", 18, is_last=False) == "82-18: 12-8=4, 8-1-1=6, so 64"
    assert step_text(64, "+", 9, is_last=True) == "64+9: 4+9=13, 6+0+1=7, so \\boxed{73}"
    assert step_text(50, "-", 20, is_last=False) == "50-20: 0-0=0, 5-2=3, so 30"


def test_grading_is_exact():
    assert grade("42", "42") and grade(" 42 ", "42")
    assert not grade("41", "42")
    assert not grade(None, "42")
    assert not grade("forty-two", "42")
    assert extract_boxed("a \\boxed{3} then \\boxed{7}") == "7"
    assert extract_boxed("no box") is None


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown toy split"):
        generate(1, split="validation")
    with pytest.raises(ValueError, match="unknown toy level"):
        generate(1, level=99)
    with pytest.raises(ValueError, match="distinct test problems"):
        generate(10_000, level=1)
    with pytest.raises(ValueError, match="not a toy question"):
        parse_question("What is 2+2?")
