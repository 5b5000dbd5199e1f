"""The SFT-ready output row and the LLaMA-Factory ``dataset_info.json`` entry."""

from __future__ import annotations

from typing import Any

from scas_jax.data.rows import row_answer, row_teacher
from scas_jax.selection.strategies import Choice

DEFAULT_SYSTEM = "You are a helpful assistant."
LLAMA_FACTORY_COLUMNS = {"system": "system", "prompt": "instruction", "response": "output"}


def output_row(choice: Choice, score_key: str | None) -> dict[str, Any]:
    """One selected answer in the reference's field order.

    ``system`` falls back to the scoring default when missing or empty, so the student
    is trained on the prompt it was scored with; ``dataset`` falls back to
    ``source_dataset``; ``split`` and ``reference_output`` are None and ``category`` is
    "" when the row lacks them (the reference's values).
    """
    row = choice.candidate.row
    answer = row_answer(row) or ""
    dataset = row.get("dataset")
    if dataset is None:
        dataset = row.get("source_dataset")
    return {
        "id": row.get("id"),
        "dataset": dataset,
        "split": row.get("split"),
        "system": row.get("system") or DEFAULT_SYSTEM,
        "instruction": row.get("instruction", ""),
        "output": answer,
        "teacher_output": answer,
        "reference_answer": row.get("reference_answer") or row.get("answer"),
        "reference_output": row.get("reference_output"),
        "category": row.get("category", ""),
        "teacher_name": row_teacher(row, choice.candidate.teacher),  # as the row spells it
        "score_key": score_key,
        "score_value": choice.candidate.score,
        "score_rank": choice.rank,
        "group": choice.group,
    }


def dataset_info(names: list[str]) -> dict[str, Any]:
    """``{"<name>": {"file_name": "<name>.jsonl", "columns": ...}}`` for each dataset name."""
    return {name: {"file_name": f"{name}.jsonl", "columns": dict(LLAMA_FACTORY_COLUMNS)} for name in names}
