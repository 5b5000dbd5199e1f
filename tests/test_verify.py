"""The rule-based judge on a table of answer formats, and `scas-jax verify`."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.cli import main as cli
from scas_jax.judging.equivalence import parse_number
from scas_jax.judging.extract import extract_final_answer
from scas_jax.judging.judge import judge
from scas_jax.judging.verify import verify

EXTRACTION = [
    ("so the total is \\boxed{42}.", "42", "boxed"),
    ("\\boxed{\\frac{1}{2}} and later \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", "boxed"),
    ("x = \\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt{3}}{2}", "boxed"),
    ("$\\boxed{1,000}$", "1,000", "boxed"),
    ("\\fbox{7}", "7", "boxed"),
    ("\\boxed 5", "5", "boxed"),
    ("She makes 9 * 2 = $18.\n#### 18", "18", "####"),
    ("#### 3\nextra #### 4 \n", "4", "####"),
    ("He has 13 eggs\nA: 26", "26", "A:"),
    ("Work\nAnswer: $1,200.50", "$1,200.50", "A:"),
    ("Work\nFinal answer: 7 apples", "7 apples", "A:"),
    ("So the answer is 12.5. Next we check.", "12.5", "answer is"),
    ("The final answer is: \\frac{7}{2}", "\\frac{7}{2}", "answer is"),
    ("Hence the answer is $5.", "$5", "answer is"),
    ("#### 9\nThe answer is 10", "9", "####"),  # priority: #### over 'The answer is'
]


@pytest.mark.parametrize("text, answer, marker", EXTRACTION)
def test_extraction(text, answer, marker):
    got = extract_final_answer(text)
    assert (got.answer, got.marker) == (answer, marker)


@pytest.mark.parametrize("text", ["", "   ", None, "2 + 2 = 4 so four", "\\boxed{unbalanced"])
def test_no_final_answer(text):
    assert extract_final_answer(text) is None


NUMBERS = [
    ("18", Fraction(18), False),
    ("1,234,567", Fraction(1234567), False),
    ("-3", Fraction(-3), False),
    ("0.50", Fraction(1, 2), False),
    (".5", Fraction(1, 2), False),
    ("3/4", Fraction(3, 4), False),
    ("\\frac{3}{4}", Fraction(3, 4), False),
    ("\\dfrac{-3}{4}", Fraction(-3, 4), False),
    ("-\\frac{1}{8}", Fraction(-1, 8), False),
    ("\\frac12", Fraction(1, 2), False),
    ("1 1/2", Fraction(3, 2), False),
    ("2\\frac{1}{4}", Fraction(9, 4), False),
    ("25%", Fraction(25), True),
    ("12.5\\%", Fraction(25, 2), True),
    ("40 percent", Fraction(40), True),
    ("$18", Fraction(18), False),
    ("\\$1,200.50", Fraction(240100, 200), False),
    ("-$5", Fraction(-5), False),
    ("$2.50.", Fraction(5, 2), False),
    ("18 dollars", Fraction(18), False),
    ("5 cm^2", Fraction(5), False),
    ("60 km/h", Fraction(60), False),
    ("90^\\circ", Fraction(90), False),
    ("\\text{14 hours}", Fraction(14), False),
    ("x = 7", Fraction(7), False),
    ("$3$", Fraction(3), False),
]


@pytest.mark.parametrize("text, value, percent", NUMBERS)
def test_parse_number(text, value, percent):
    got = parse_number(text)
    assert got is not None and (got.value, got.percent) == (value, percent)


@pytest.mark.parametrize("text", ["five", "3 + 4", "1,00", "10+John's age", "5 apples and 3 pears", "1/0", "", "2, 3"])
def test_not_a_single_number(text):
    assert parse_number(text) is None


JUDGE = [
    # (solution, reference, verdict)
    ("#### 1,000", "1000", True),
    ("A: 26", "18", False),
    ("The answer is $18.00.", "18", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{2}{4}}", "1/2", True),
    ("A: 25%", "25", True),            # GSM8K writes percentages without the sign
    ("A: 25%", "0.25", True),          # and 25% is 0.25
    ("A: 25%", "2.5", False),
    ("A: 0.3333333", "1/3", True),     # within relative 1e-6
    ("A: 0.33", "1/3", False),
    ("A: 18 eggs", "18", True),
    ("A: -4", "4", False),
    ("\\boxed{B}", "B", True),         # multiple choice, string match
    ("\\boxed{b}", "C", False),        # different plain words/letters
    ("\\boxed{x^2+1}", "x^2 + 1", True),
    ("\\boxed{1+x^2}", "x^2+1", None),  # expressions that differ textually: undecided
    ("A: 10+John's age", "50", None),    # not a single number
    ("no marker at all, 18", "18", None),
    ("A: 18", "", None),                 # no reference
    ("A: 18", None, None),
    ("A: 18", "#### 18", True),          # a reference given as a full solution
]


@pytest.mark.parametrize("solution, reference, expected", JUDGE)
def test_judge_table(solution, reference, expected):
    verdict = judge(solution, reference)
    assert verdict.correct is expected, verdict.reason
    if expected is None:
        assert verdict.reason.startswith("undecided")


def test_judge_reasons_are_readable():
    assert judge("A: 26", "18").reason == "numeric (A:): 26 != reference 18"
    assert judge("#### 1,000", "1000").reason == "numeric (####): 1000 = reference 1000"
    assert judge("A: 25%", "25").reason == "numeric (A:): 25% = reference 25"
    assert judge("A: 25%", "0.25").reason == "numeric (A:): 25% = reference 0.25 (equal as a percentage)"
    assert judge("A: 26", "18").answer == "26"


# --- the verify command ----------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_verify_writes_flags_and_counts_agreement(tmp_path: Path):
    pool = tmp_path / "pool"
    pool.mkdir()
    write_jsonl(pool / "t_teacher_responses.jsonl", [
        {"id": 1, "teacher_output": "A: 5", "reference_answer": "5", "teacher_correct": True},
        {"id": 2, "teacher_output": "A: 6", "reference_answer": "5", "teacher_correct": True},   # flag wrong
        {"id": 3, "teacher_output": "no answer", "reference_answer": "5", "is_correct": False},
        {"id": 4, "output": "\\boxed{7}", "answer": "7"},                                          # no flag
    ])
    m = verify(pool, tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "t_teacher_responses.jsonl")
    assert [r["teacher_correct"] for r in rows] == [True, False, None, True]
    assert [r.get("teacher_correct_previous", "-") for r in rows] == [True, True, "-", "-"]
    assert [r["judge_answer"] for r in rows] == ["5", "6", None, "7"]
    assert rows[2]["judge_reason"].startswith("undecided: no final answer found")
    assert rows[1]["id"] == 2 and rows[1]["reference_answer"] == "5"
    assert m["teachers"] == {"t": {"rows": 4, "correct": 2, "incorrect": 1, "undecided": 1, "accuracy": 0.5}}
    a = m["agreement_with_input_flags"]
    assert (a["compared_rows"], a["agree"], a["undecided"], a["decided_rows"]) == (3, 1, 1, 2)
    assert a["agreement"] == round(1 / 3, 6) and a["agreement_on_decided"] == 0.5
    assert a["confusion"] == {"flag_correct/judge_correct": 1, "flag_correct/judge_incorrect": 1,
                              "flag_incorrect/judge_undecided": 1}
    assert [(d["id"], d["line"], d["flag"], d["judge"]) for d in a["disagreements"]] == [(2, 2, True, False), (3, 3, False, None)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "t_teacher_responses.jsonl", "teacher_accuracy.json", "verify_manifest.json"]
    accuracy = json.loads((tmp_path / "out" / "teacher_accuracy.json").read_text())
    assert accuracy == {"t": {"correct": 2, "incorrect": 1, "undecided": 1, "total": 4, "accuracy": 0.5}}



def test_verify_bad_input(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["verify", "--input-dir", str(empty), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no pool files" in capsys.readouterr().err
    (empty / "t.jsonl").write_text("")
    assert cli(["verify", "--input-dir", str(empty), "--output-dir", str(tmp_path / "o")]) == 2
    assert "empty pool" in capsys.readouterr().err
    write_jsonl(empty / "t.jsonl", [{"id": 1, "teacher_output": "A: 1"}])
    assert cli(["verify", "--input-dir", str(empty), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no row of" in capsys.readouterr().err
    assert cli(["verify", "--input-dir", str(empty), "--output-dir", str(empty)]) == 2
    assert not (tmp_path / "o").exists()


def test_verify_on_the_gsm8k_pool(tmp_path: Path, capsys):
    """Measured agreement with the pool's flags (docs/verify.md explains the 12 undecided rows)."""
    assert cli(["verify", "--input-dir", str(GSM8K_POOL), "--output-dir", str(tmp_path / "v")]) == 0
    m = json.loads((tmp_path / "v" / "verify_manifest.json").read_text())
    a = m["agreement_with_input_flags"]
    assert (a["compared_rows"], a["agree"], a["undecided"], a["decided_rows"]) == (7914, 7902, 12, 7902)
    assert a["agreement_on_decided"] == 1.0
    assert a["confusion"] == {"flag_correct/judge_correct": 4639, "flag_incorrect/judge_incorrect": 3263,
                              "flag_incorrect/judge_undecided": 12}
    undecided = sorted((d["teacher"], d["id"]) for d in a["disagreements"])
    assert undecided == sorted([
        ("gpt3_175b_finetuning", "gsm8k-test-0005"), ("gpt3_175b_finetuning", "gsm8k-test-0048"),
        ("gpt3_175b_finetuning", "gsm8k-test-0150"), ("gpt3_175b_finetuning", "gsm8k-test-0162"),
        ("gpt3_175b_finetuning", "gsm8k-test-0756"), ("gpt3_175b_finetuning", "gsm8k-test-0931"),
        ("gpt3_175b_verification", "gsm8k-test-0852"), ("gpt3_6b_finetuning", "gsm8k-test-0150"),
        ("gpt3_6b_finetuning", "gsm8k-test-0593"), ("gpt3_6b_finetuning", "gsm8k-test-0633"),
        ("gpt3_6b_finetuning", "gsm8k-test-0936"), ("gpt3_6b_verification", "gsm8k-test-1264"),
    ])
    assert m["teachers"]["gpt3_175b_verification"] == {"rows": 1319, "correct": 742, "incorrect": 576,
                                                       "undecided": 1, "accuracy": 0.562547}
    assert "agreement with the input's flags: 7902/7914" in capsys.readouterr().out
