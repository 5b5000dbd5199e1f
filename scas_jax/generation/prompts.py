"""Questions in, prompt token ids out.

A questions file is JSONL, one question per row: ``id`` (any JSON value, unique in the
file), ``instruction`` (non-empty), optional ``system`` and ``reference_answer``. Every
other field is ignored, so a teacher pool file works as is. :func:`read_questions`
checks the whole file before anything loads a model: a row without ``instruction``, a
row without ``id`` or a duplicated id is an error naming ``file:line``.

The prompt is the chat template applied to ``[system, user]`` with
``add_generation_prompt=True``, tokenized with the tokenizer's default call: exactly
the prompt that scoring and training put before an answer
(:class:`scas_jax.data.chat.ChatEncoder`), so a generated answer reads, to every later
stage, as if the student had written it after that prompt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from scas_jax.data.chat import build_messages
from scas_jax.data.jsonl import iter_jsonl
from scas_jax.data.rows import id_key
from scas_jax.errors import ScasError


@dataclasses.dataclass(frozen=True)
class Question:
    id: Any
    instruction: str
    system: str | None
    reference_answer: Any
    source: str  # "file:line"

    @property
    def key(self) -> str:
        return id_key(self.id)


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """The first ``limit`` questions of ``path`` (all when None), validated."""
    path = Path(path)
    if not path.is_file():
        raise ScasError(f"--questions {path}: no such file")
    out: list[Question] = []
    seen: dict[str, int] = {}
    for line, row in iter_jsonl(path, limit=limit):
        where = f"{path}:{line}"
        if "id" not in row or row["id"] is None:
            raise ScasError(f"{where}: missing field 'id'")
        instruction = row.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ScasError(f"{where}: missing or empty field 'instruction'")
        key = id_key(row["id"])
        if key in seen:
            raise ScasError(f"{where}: duplicate id {key} (first at line {seen[key]})")
        seen[key] = line
        system = row.get("system")
        out.append(Question(row["id"], instruction, str(system) if system else None,
                            row.get("reference_answer"), where))
    if not out:
        raise ScasError(f"--questions {path}: no questions")
    return out


def prompt_texts(tokenizer: Any, questions: Sequence[Question]) -> list[str]:
    """The chat-template prompt of each question (system + user + generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ScasError("the student's tokenizer has no chat template; generation needs one")
    texts = []
    for q in questions:
        messages = build_messages({"system": q.system, "instruction": q.instruction, "teacher_output": ""})
        texts.append(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
    return texts


def prompt_ids(tokenizer: Any, questions: Sequence[Question]) -> list[list[int]]:
    """Token ids of :func:`prompt_texts` (one batched tokenizer call)."""
    texts = prompt_texts(tokenizer, questions)
    return [list(map(int, ids)) for ids in tokenizer(texts)["input_ids"]]
