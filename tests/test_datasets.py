"""Dataset loaders on the shipped benchmark copies, sniffing, multiple choice, toy, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.toy import task
from tracegen.datasets import MAX_LINE_BYTES, load_dataset
from tracestore.errors import TraceError

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "benchmarks"
GSM8K_TEST = BENCHMARKS / "gsm8k_test.jsonl"
MATH500 = BENCHMARKS / "math500_test.jsonl"


def first_records(path: Path, n: int) -> list[dict]:
    with open(path) as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def test_gsm8k_by_name_and_by_path_agree():
    by_name = load_dataset("gsm8k", split="test", limit=20)
    by_path = load_dataset(str(GSM8K_TEST), limit=20)
    assert by_name.name == by_path.name == "gsm8k"
    assert by_path.split == "test"  # from the file name
    assert [p.row() for p in by_name.problems] == [p.row() for p in by_path.problems]
    records = first_records(GSM8K_TEST, 20)
    for index, (problem, record) in enumerate(zip(by_name.problems, records)):
        assert problem.problem_id == f"gsm8k-test-{index:05d}"
        assert problem.question == record["question"]
        assert record["answer"].rstrip().endswith("#### " + record["answer"].split("#### ")[-1])
        assert problem.reference == record["answer"].split("####")[-1].strip().replace(",", "")
    assert by_name.problems[0].reference == "18"


def test_gsm8k_references_drop_thousands_commas():
    dataset = load_dataset("gsm8k", split="train")
    assert len(dataset.problems) == 7473
    with_commas = [p for p in dataset.problems if "," in p.meta["solution"].split("####")[-1]]
    assert with_commas and all(p.reference.replace(".", "").lstrip("-").isdigit() for p in with_commas)


def test_math500_fields_and_unique_ids():
    dataset = load_dataset(str(MATH500))
    assert dataset.name == "math500" and len(dataset.problems) == 500
    records = first_records(MATH500, 3)
    first = dataset.problems[0]
    assert first.problem_id == records[0]["unique_id"]
    assert first.question == records[0]["problem"]
    assert first.reference == records[0]["answer"]
    meta = json.loads(first.row()["meta"])
    assert meta["level"] == records[0]["level"] and meta["subject"] == records[0]["subject"]
    assert len({p.problem_id for p in dataset.problems}) == 500


def test_omnimath_and_multiple_choice_sniffed(tmp_path):
    omni = tmp_path / "omni.jsonl"
    omni.write_text(
        json.dumps(
            {
                "problem": "Find $x$.",
                "answer": "\\frac{3}{4}",
                "domain": ["Algebra"],
                "difficulty": 4.5,
                "solution": "...",
            }
        )
        + "\n"
    )
    dataset = load_dataset(str(omni))
    assert dataset.name == "omnimath" and dataset.problems[0].problem_id == "omnimath-test-00000"
    assert json.loads(dataset.problems[0].row()["meta"])["difficulty"] == 4.5

    mmlu = tmp_path / "mmlu_validation.jsonl"
    mmlu.write_text(
        json.dumps({"question": "2+2=?", "choices": ["3", "4", "5"], "answer": 1})
        + "\n"
        + json.dumps({"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": "a"})
        + "\n"
    )
    dataset = load_dataset(str(mmlu))
    assert dataset.name == "mmlu" and dataset.split == "validation"
    assert dataset.problems[0].question == "2+2=?\n\nA. 3\nB. 4\nC. 5"
    assert [p.reference for p in dataset.problems] == ["B", "A"]


def test_toy_dataset_matches_the_generator():
    dataset = load_dataset("toy", split="train", limit=7, level=2)
    expected = task.generate(7, split="train", level=2, seed=0)
    assert [p.problem_id for p in dataset.problems] == [p.problem_id for p in expected]
    assert [p.question for p in dataset.problems] == [p.question for p in expected]
    assert [p.reference for p in dataset.problems] == [str(p.answer) for p in expected]
    # a longer run keeps the same hash, so a larger --limit can extend an existing trace
    assert load_dataset("toy", split="train", limit=30, level=2).file_hash == dataset.file_hash
    assert load_dataset("toy", split="test", limit=7, level=2).file_hash != dataset.file_hash


def test_malformed_line_names_file_and_line(tmp_path):
    lines = first_records(GSM8K_TEST, 3)
    bad = tmp_path / "gsm8k_test.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n" + '{"question": "x", "answer": \n')
    with pytest.raises(TraceError, match=r"gsm8k_test.jsonl, line 3: not valid JSON"):
        load_dataset(str(bad))
    no_marker = tmp_path / "no_marker.jsonl"
    no_marker.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"question": "q", "answer": "42"}) + "\n")
    with pytest.raises(TraceError, match=r"no_marker.jsonl, line 2: field 'answer' does not end with '#### N'"):
        load_dataset(str(no_marker))
    missing_field = tmp_path / "m.jsonl"
    missing_field.write_text(json.dumps({"problem": "p", "answer": "1", "level": 1}) + '\n{"problem": "q"}\n')
    with pytest.raises(TraceError, match=r"m.jsonl, line 2: missing field 'answer'"):
        load_dataset(f"math500={missing_field}")


def test_bad_dataset_specs(tmp_path):
    with pytest.raises(TraceError, match="neither a dataset name"):
        load_dataset("no-such-dataset")
    unknown = tmp_path / "u.jsonl"
    unknown.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(TraceError, match="cannot tell the dataset format"):
        load_dataset(str(unknown))
    with pytest.raises(TraceError, match="unknown toy split"):
        load_dataset("toy", split="validation")
    with pytest.raises(TraceError, match="--level applies to the toy dataset only"):
        load_dataset("gsm8k", level=2)


def test_a_byte_that_is_not_utf8_is_named_with_its_line_and_only_lines_read_matter(tmp_path):
    # issue 13, item 8
    lines = [json.dumps(record).encode() for record in first_records(GSM8K_TEST, 3)]
    bad = tmp_path / "gsm8k_test.jsonl"
    bad.write_bytes(lines[0] + b"\n" + lines[1][:20] + b"\xff" + lines[1][20:] + b"\n" + lines[2] + b"\n")
    with pytest.raises(TraceError, match=r"gsm8k_test.jsonl, line 2: not UTF-8 \(byte 0xff at byte 21 of the line\)"):
        load_dataset(str(bad))
    assert len(load_dataset(str(bad), limit=1).problems) == 1  # past --limit nothing is decoded


def test_a_line_longer_than_the_bound_is_refused_before_it_is_parsed(tmp_path):
    record = first_records(GSM8K_TEST, 1)[0]
    long = tmp_path / "gsm8k_test.jsonl"
    padded = {**record, "question": "x" * (MAX_LINE_BYTES + 10)}
    long.write_text(json.dumps(record) + "\n" + json.dumps(padded) + "\n")
    with pytest.raises(TraceError, match=r"gsm8k_test.jsonl, line 2: longer than 1,048,576 bytes"):
        load_dataset(str(long))
    at_the_bound = {**record, "question": "x" * (MAX_LINE_BYTES - len(json.dumps(record)) - 10)}
    long.write_text(json.dumps(at_the_bound) + "\n")
    assert len(load_dataset(str(long)).problems) == 1
