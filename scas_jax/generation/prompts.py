"""Questions in, prompt token ids out.

A questions file is JSONL (or a TFDS dataset directory built from one by ``scas-jax
dataset build --data FILE``), one question per row: ``id`` (any JSON value, unique in the
file), ``instruction`` (non-empty), optional ``system`` and ``reference_answer``. Every
other field is ignored, so a teacher pool file works as is. :func:`read_questions`
checks the whole file before anything loads a model: a row without ``instruction``, a
row without ``id`` or a duplicated id is an error naming ``file:line``.

The prompt is the chat template applied to ``[system, user]`` with
``add_generation_prompt=True``, tokenized with the tokenizer's default call: exactly
the prompt that scoring and training put before an answer
(:class:`scas_jax.data.chat.ChatEncoder`), so a generated answer reads, to every later
stage, as if the student had written it after that prompt.

``--chat-template chatml|gemma|plain|FILE.jinja`` (``generate`` and ``evaluate``, as for
``score`` and ``train``) replaces the tokenizer's template before any prompt is built
(:func:`scas_jax.data.chat.with_chat_template`); without it a tokenizer that has no
template of its own (a base model) is an error naming the flag.

Stop tokens (:func:`generation_stop_ids`): the sampler's
:func:`~scas_jax.generation.sampler.stop_token_ids` (the tokenizer's EOS and every known
end-of-turn token it has as one token), plus the end marker of a named template:
``<|im_end|>`` for ``chatml`` and ``<end_of_turn>`` for ``gemma``, each of which must be
a single token of the vocabulary (else generation could not stop at the end of a turn:
an error naming the flag). ``plain`` has no end marker: its answers end with the
tokenizer's EOS (the template that scoring and training use appends it), so EOS stops
generation, and a tokenizer without EOS stops only at ``max_new_tokens``. A
``FILE.jinja`` template gets the sampler's stop tokens unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from scas_jax.data.chat import CHAT_TEMPLATE_FLAG, build_messages, with_chat_template
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


def _question_source(path: str | Path):
    """``(file label, PoolFile or None)`` of a ``--questions`` input: a JSONL file, or a
    TFDS dataset of one file (:func:`scas_jax.data.files.dataset_file`)."""
    from scas_jax.data.files import dataset_file

    built = dataset_file(path, "--questions")
    if built is not None:
        return built.path, built
    path = Path(path)
    if not path.is_file():
        raise ScasError(f"--questions {path}: no such file")
    return path, None


def questions_sha256(path: str | Path) -> str:
    """Hex sha256 of a questions file's bytes; for a TFDS dataset, of the file it was
    built from (the same value as for that file)."""
    from scas_jax.data.files import input_sha256
    from scas_jax.scoring.identity import file_sha256

    label, built = _question_source(path)
    return input_sha256(built) if built is not None else file_sha256(label)


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """The first ``limit`` questions of ``path`` (all when None), validated. ``path`` is a
    JSONL file or a TFDS dataset directory of one file (``scas-jax dataset build --data
    FILE``), whose rows are read through Grain: the same questions, in the same order,
    with the source ``file:line`` in errors."""
    from scas_jax.data.files import iter_rows

    path, built = _question_source(path)
    out: list[Question] = []
    seen: dict[str, int] = {}
    for line, row in (iter_rows(built, limit) if built is not None else iter_jsonl(path, limit=limit)):
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


# The end-of-turn marker of each built-in template that has one (``plain`` ends with EOS).
TEMPLATE_END_MARKERS = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>"}


def prompt_texts(tokenizer: Any, questions: Sequence[Question],
                 chat_template: str | None = None) -> list[str]:
    """The chat-template prompt of each question (system + user + generation prompt),
    with the template ``chat_template`` names (None: the tokenizer's own; ScasError
    naming ``--chat-template`` when it has none)."""
    tokenizer = with_chat_template(tokenizer, chat_template)
    texts = []
    for q in questions:
        messages = build_messages({"system": q.system, "instruction": q.instruction, "teacher_output": ""})
        texts.append(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
    return texts


def prompt_ids(tokenizer: Any, questions: Sequence[Question],
               chat_template: str | None = None) -> list[list[int]]:
    """Token ids of :func:`prompt_texts` (one batched tokenizer call)."""
    texts = prompt_texts(tokenizer, questions, chat_template)
    return [list(map(int, ids)) for ids in tokenizer(texts)["input_ids"]]


def generation_stop_ids(tokenizer: Any, chat_template: str | None = None) -> tuple[int, ...]:
    """Stop ids for answers after prompts of ``chat_template`` (see the module docstring):
    :func:`~scas_jax.generation.sampler.stop_token_ids` plus the template's end marker."""
    from scas_jax.generation.sampler import stop_token_ids

    ids = set(stop_token_ids(tokenizer))
    marker = TEMPLATE_END_MARKERS.get(chat_template or "")
    if marker is not None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        tid = vocab.get(marker)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ScasError(
                f"{CHAT_TEMPLATE_FLAG} {chat_template}: the tokenizer has no single token "
                f"{marker!r}, so generation could not stop at the end of a turn; use a template "
                "whose end marker is a token of this tokenizer, or plain (stops at EOS)")
        ids.add(int(tid))
    return tuple(sorted(ids))
