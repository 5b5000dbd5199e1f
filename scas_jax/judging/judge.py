"""The rule-based math judge: final answer versus reference, three-valued."""

from __future__ import annotations

import re
from dataclasses import dataclass

from scas_jax.judging.equivalence import fmt, normalise_text, numbers_equal, parse_number
from scas_jax.judging.extract import extract_final_answer

_WORD = re.compile(r"^[a-z]+$")


@dataclass(frozen=True)
class Verdict:
    """``correct`` is True, False or None (undecided); ``reason`` says why."""

    correct: bool | None
    reason: str
    answer: str | None = None  # the extracted final answer


def reference_text(reference: object) -> str | None:
    """The reference's final answer: its marked answer when it is a full solution, else itself."""
    if reference is None:
        return None
    if isinstance(reference, bool):
        return None
    text = str(reference).strip()
    if not text:
        return None
    marked = extract_final_answer(text)
    return marked.answer if marked is not None and marked.answer else text


def judge(solution: object, reference: object) -> Verdict:
    """Compare the final answer of ``solution`` with ``reference``."""
    ref = reference_text(reference)
    if ref is None:
        return Verdict(None, "undecided: no reference answer")
    found = extract_final_answer(solution)
    if found is None:
        return Verdict(None, "undecided: no final answer found (no \\boxed{}, ####, 'A:' or 'The answer is')")
    answer = found.answer
    if not answer:
        return Verdict(None, f"undecided: empty final answer after {found.marker}", answer)
    ref_num = parse_number(ref)
    pred_num = parse_number(answer)
    if ref_num is not None and pred_num is not None:
        ok, how = numbers_equal(pred_num, ref_num)
        rel = "=" if ok else "!="
        return Verdict(
            ok,
            f"numeric ({found.marker}): {fmt(pred_num.value)}{'%' if pred_num.percent else ''} {rel} "
            f"reference {fmt(ref_num.value)}{'%' if ref_num.percent else ''}" + (f" ({how})" if ok and how != "equal" else ""),
            answer,
        )
    if normalise_text(answer) == normalise_text(ref):
        return Verdict(True, f"string match ({found.marker})", answer)
    if ref_num is not None:
        return Verdict(None, f"undecided: final answer {answer!r} ({found.marker}) is not a single number; reference is {ref!r}", answer)
    if pred_num is not None:
        return Verdict(None, f"undecided: reference {ref!r} is not a number; final answer is {answer!r}", answer)
    a, r = normalise_text(answer), normalise_text(ref)
    if _WORD.match(a) and _WORD.match(r):
        return Verdict(False, f"different words ({found.marker}): {answer!r} != {ref!r}", answer)
    return Verdict(None, f"undecided: cannot decide whether {answer!r} equals {ref!r}", answer)
