"""Chat-template tokenization with the reference's exact boundaries and masks.

Per row (method page, steps 1-3 and 5):

1. messages = system (``row["system"]``, or "You are a helpful assistant." when missing
   or empty), user = instruction, assistant = ``teacher_output`` (else ``output``);
   non-string values are turned into strings, as the reference does.
2. ``prompt = apply_chat_template(messages[:-1], tokenize=False,
   add_generation_prompt=True)``, ``full = apply_chat_template(messages, tokenize=False,
   add_generation_prompt=False)``, each tokenized with the tokenizer's default call
   (``tokenizer(text)["input_ids"]``; here one batched call over many texts, which gives
   the same ids: :func:`batch_ids`).
3. ``n_prompt = len(prompt_ids)``; when ``len(full_ids) >= n_prompt > 0`` and
   ``full_ids[:n_prompt] != prompt_ids``, ``n_prompt`` becomes the length of their common
   prefix (the reference applies the fallback only in that case, so a full text shorter
   than the prompt keeps ``n_prompt`` and fails below). ``n_answer = len(full_ids) -
   n_prompt`` must be > 0, else the row is an error row.

Masks of :class:`Encoded` (all ``bool[T]`` over ``ids``, position ``p`` in ``0..T-1``):

* ``special[p]``: ``ids[p]`` is in :func:`special_token_ids` (``all_special_ids``, the ids
  of ``additional_special_tokens``/``extra_special_tokens``, and ``<|im_start|>`` /
  ``<|im_end|>`` when in the vocabulary and not the unknown id).
* ``question_mask = (p < n_prompt) & ~special`` and ``answer_mask = (p >= n_prompt) &
  ~special``: the positions of the SIMILARITY metrics (AA, AQ, QQ). Position 0 is
  included when it is a non-special question token (or answer token when n_prompt == 0):
  the reference gathers every masked activation row, position 0 too.
* ``nll_question_mask`` / ``nll_answer_mask``: the same masks with position 0 cleared.
  ``nll[p] = -log softmax(logits[p-1])[ids[p]]`` exists only for ``p >= 1``, and the
  reference drops position 0 from both NLL means. With a ChatML template position 0 is
  ``<|im_start|>`` (special), so the two families differ only for templates that start
  with an ordinary token.

The per-sequence counts are therefore ``q_count = question_mask.sum()`` and
``q_nll_count = nll_question_mask.sum()`` (and likewise for the answer).

:class:`ChatEncoder` holds no mutable state besides the tokenizer, so one encoder can be
used from one background thread while the device computes (Hugging Face fast tokenizers
must not be called from several threads at once).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from scas_jax.data.rows import missing_fields_error, row_answer
from scas_jax.errors import ScasError

DEFAULT_SYSTEM = "You are a helpful assistant."
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# ----------------------------------------------------------------- named chat templates
#
# A base model (Gemma 3 270M's GGUF, say) has no chat template, yet scoring and training
# need a prompt/answer boundary. ``--chat-template NAME|FILE.jinja`` names one; the
# boundary rules above apply unchanged to every template. None of these writes a BOS
# token: the tokenizer's default call adds its own where it is configured to.
#
# chatml: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message; the generation
#   prompt is ``<|im_start|>assistant\n``.
# gemma:  Gemma's turns: the system text opens the first user turn
#   (``<start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n``), the answer is
#   ``<start_of_turn>model\n{answer}<end_of_turn>\n``; the generation prompt is
#   ``<start_of_turn>model\n``.
# plain:  a question/answer format for base models without chat tokens:
#   ``{system}\n\nQuestion: {user}\nAnswer:\n`` is the prompt, and the full text adds
#   ``{answer}`` and the tokenizer's EOS token (when it has one), so a model trained on
#   it learns to stop.
CHAT_TEMPLATES = {  # all text is written by {{ }} expressions: immune to Jinja's whitespace trimming
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "gemma": (
        "{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
        "{% elif m['role'] == 'user' %}"
        "{{ '<start_of_turn>user\\n' + ns.system + m['content'] + '<end_of_turn>\\n' }}"
        "{% set ns.system = '' %}"
        "{% else %}{{ '<start_of_turn>model\\n' + m['content'] + '<end_of_turn>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "plain": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\nAnswer:\\n' }}"
        "{% else %}{{ m['content'] + (eos_token or '') }}{% endif %}"
        "{% endfor %}"
    ),
}
CHAT_TEMPLATE_FLAG = "--chat-template"
CHAT_TEMPLATE_HELP = (
    "chat template for the prompt/answer boundary: chatml, gemma, plain (a question/answer "
    "format for base models) or a FILE.jinja; default: the tokenizer's own"
)


def _template_file(choice: str, flag: str) -> Path:
    path = Path(choice)
    if not path.is_file():
        raise ScasError(
            f"{flag} {choice!r}: not one of {', '.join(CHAT_TEMPLATES)} and not an existing "
            "file (FILE.jinja)"
        )
    return path


def chat_template_label(choice: str | None, flag: str = CHAT_TEMPLATE_FLAG) -> str:
    """What a manifest records for ``choice``: ``"tokenizer"`` (its own template), a
    built-in name, or ``"file:PATH sha256:HEX"``. Checks the choice (ScasError naming
    ``flag``); loads no tokenizer."""
    if not choice:
        return "tokenizer"
    if choice in CHAT_TEMPLATES:
        return choice
    path = _template_file(choice, flag)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"file:{path} sha256:{digest}"


def with_chat_template(tokenizer: Any, choice: str | None, flag: str = CHAT_TEMPLATE_FLAG,
                       name: str | None = None) -> Any:
    """``tokenizer`` using the template ``choice`` names (a shallow copy; the caller's
    tokenizer is left as it was), or ``tokenizer`` itself for ``None``/``""`` when it has
    a template of its own. ScasError naming ``flag`` when it has none and none is named."""
    if not choice:
        if not getattr(tokenizer, "chat_template", None):
            who = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise ScasError(
                f"tokenizer {who!r} has no chat template; name one with {flag} "
                f"{'|'.join(CHAT_TEMPLATES)}|FILE.jinja (SCAS needs a prompt/answer boundary)"
            )
        return tokenizer
    if choice in CHAT_TEMPLATES:
        text = CHAT_TEMPLATES[choice]
    else:
        text = _template_file(choice, flag).read_text(encoding="utf-8")
    out = copy.copy(tokenizer)
    out.chat_template = text
    return out


def batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]`` (``list[str]`` -> one ``list[int]`` a text).

    A fast tokenizer's call is its Rust backend's ``encode_batch`` plus offsets, masks
    and a ``BatchEncoding`` that are dropped here; when the call provably reduces to the
    backend's (the backend truncates and pads nothing and its special-token splitting is
    the tokenizer's setting), the ids come from ``encode_batch_fast`` (no offsets: same
    ids, ~30% faster on GSM8K answers, docs/benchmarks.md). Any other tokenizer: its own
    call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if (fast is None or not texts or backend.truncation is not None or backend.padding is not None
            or bool(getattr(tokenizer, "split_special_tokens", False))
            != bool(getattr(backend, "encode_special_tokens", False))):
        return tokenizer(texts)["input_ids"]
    return [e.ids for e in fast(texts, add_special_tokens=True)]


@dataclass(frozen=True)
class Encoded:
    """One tokenized row.

    ids: int32[T], the ids of the full text (the sequence the student reads).
    n_prompt: the prompt/answer boundary, 0 <= n_prompt < T.
    question_mask, answer_mask: bool[T], similarity positions (position 0 included).
    nll_question_mask, nll_answer_mask: bool[T], NLL positions (position 0 excluded).
    """

    ids: np.ndarray
    n_prompt: int
    question_mask: np.ndarray
    answer_mask: np.ndarray
    nll_question_mask: np.ndarray
    nll_answer_mask: np.ndarray

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_answer(self) -> int:
        return self.length - self.n_prompt


@dataclass(frozen=True)
class RowError:
    """A row that cannot be scored; ``message`` becomes its ``scas_scoring_error``."""

    message: str


def build_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """System, user and assistant messages of a candidate row (method page step 1)."""
    system = str(row.get("system") or DEFAULT_SYSTEM)
    instruction = str(row.get("instruction") or "")
    answer = str(row_answer(row) or "")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": answer},
    ]


def special_token_ids(tokenizer: Any) -> np.ndarray:
    """Sorted int64 ids treated as special (method page step 5)."""
    ids: set[int] = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    for attr in ("additional_special_tokens", "extra_special_tokens"):
        tokens = getattr(tokenizer, attr, None)
        if isinstance(tokens, dict):
            tokens = list(tokens.values())
        if tokens:
            converted = tokenizer.convert_tokens_to_ids([str(t) for t in tokens])
            ids.update(int(i) for i in converted if i is not None)
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in _CHATML_TOKENS:
        try:
            tid = tokenizer.convert_tokens_to_ids(token)
        except Exception:  # a tokenizer without this token may raise
            continue
        if tid is not None and tid != unk:
            ids.add(int(tid))
    return np.array(sorted(ids), dtype=np.int64)


def prompt_key(messages: list[dict[str, str]]) -> bytes:
    """16-byte digest of a row's system and user texts: what its prompt depends on."""
    system, user = messages[0]["content"], messages[1]["content"]
    blob = f"{len(system)}:{system}{user}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(blob, digest_size=16).digest()


def split_safe_tokens(tokenizer: Any) -> tuple[list[str], set[int], int] | None:
    """``(added token texts, their ids, longest text length)`` when ``tokenizer(a + b)``
    is ``tokenizer(a) + tokenizer(b)`` whenever ``a`` ends with a matched added token
    and no added token text spans the junction; else None.

    That holds for a Hugging Face fast tokenizer whose added tokens are matched on the
    raw text (``normalized``, ``lstrip``, ``rstrip``, ``single_word`` all false), with no
    normalizer, a byte-level pre-tokenizer without a prefix space (or none), and a
    post-processor that adds no token to a single text: the added tokens split the text
    first and every piece between them is pre-tokenized and encoded on its own.
    """
    import json as _json

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return None
    try:
        spec = _json.loads(backend.to_str())
        if spec.get("normalizer") is not None:
            return None
        pre = spec.get("pre_tokenizer")
        if pre is not None and not (pre.get("type") == "ByteLevel"
                                    and not pre.get("add_prefix_space", True)):
            return None
        added = list(backend.get_added_tokens_decoder().items())
        if not added or any(t.normalized or t.lstrip or t.rstrip or t.single_word
                            for _, t in added):
            return None
        if tokenizer("")["input_ids"] or (tokenizer("x y")["input_ids"]
                                          != tokenizer("x y", add_special_tokens=False)["input_ids"]):
            return None
    except Exception:  # any surprise: the plain path
        return None
    texts = [t.content for _, t in added if t.content]
    return texts, {int(i) for i, _ in added}, max(len(t) for t in texts)


def _last_added_end(text: str, split: tuple[list[str], set[int], int]) -> int:
    """End of the last added-token text in ``text`` (0 when none)."""
    return max((text.rfind(t) + len(t) for t in split[0] if t in text), default=0)


def _head_matches(full: str, head: tuple, split: tuple[list[str], set[int], int]) -> bool:
    """``full`` starts with the head text (by digest) and no added-token text spans its end."""
    cut, digest = head[0], head[1]
    if len(full) <= cut or hashlib.blake2b(full[:cut].encode("utf-8", "surrogatepass"),
                                           digest_size=16).digest() != digest:
        return False
    longest = split[2]
    lo = max(0, cut - longest + 1)
    window, c = full[lo:cut + longest - 1], cut - lo
    for t in split[0]:
        st = window.find(t)
        while st != -1 and st < c:
            if st + len(t) > c:
                return False
            st = window.find(t, st + 1)
    return True


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prompt_boundary(prompt_ids: Sequence[int], full_ids: Sequence[int]) -> int:
    """n_prompt of step 3, with the reference's common-prefix fallback."""
    n_prompt = len(prompt_ids)
    if isinstance(prompt_ids, np.ndarray):  # the same test, in numpy
        if 0 < n_prompt <= len(full_ids) and not np.array_equal(
                np.asarray(full_ids[:n_prompt], dtype=np.int64), prompt_ids):
            n_prompt = common_prefix_len(prompt_ids.tolist(), list(full_ids))
        return n_prompt
    if 0 < n_prompt <= len(full_ids) and list(full_ids[:n_prompt]) != list(prompt_ids):
        n_prompt = common_prefix_len(prompt_ids, full_ids)
    return n_prompt


def build_masks(
    ids: np.ndarray, n_prompt: int, special_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(question, answer, nll_question, nll_answer) bool[T] masks; see module docstring."""
    not_special = ~np.isin(ids, special_ids)
    pos = np.arange(ids.shape[0])
    question = (pos < n_prompt) & not_special
    answer = (pos >= n_prompt) & not_special
    nll_q = question.copy()
    nll_a = answer.copy()
    if ids.shape[0]:
        nll_q[0] = False
        nll_a[0] = False
    return question, answer, nll_q, nll_a


class ChatEncoder:
    """Encodes candidate rows for one student tokenizer.

    ``encode_rows(rows)`` -> one :class:`Encoded` or :class:`RowError` per row, with one
    batched template render and one batched tokenizer call per ``batch_size`` rows.
    """

    def __init__(self, tokenizer: Any, name: str | None = None):
        self.tokenizer = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise ScasError(
                f"tokenizer {self.name!r} has no chat template; name one with "
                f"{CHAT_TEMPLATE_FLAG} {'|'.join(CHAT_TEMPLATES)}|FILE.jinja (SCAS needs a "
                "prompt/answer boundary)"
            )
        self.special_ids = special_token_ids(tokenizer)

    def texts(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, full) texts of step 2."""
        messages = build_messages(row)
        prompt = self.tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )
        return prompt, full

    def encode(self, row: dict[str, Any]) -> Encoded | RowError:
        return self.encode_rows([row])[0]

    def encode_ids(self, prompt_ids: Sequence[int], full_ids: Sequence[int]) -> Encoded | RowError:
        """Boundary and masks from already tokenized prompt and full texts."""
        n_prompt = prompt_boundary(prompt_ids, full_ids)
        n_answer = len(full_ids) - n_prompt
        if n_answer <= 0:
            return RowError(
                f"Answer length is non-positive (n_answer={n_answer}). "
                "Check chat-template token boundaries."
            )
        ids = np.asarray(full_ids, dtype=np.int32)
        q, a, nq, na = build_masks(ids, n_prompt, self.special_ids)
        return Encoded(ids, n_prompt, q, a, nq, na)

    def encode_rows(
        self, rows: Iterable[dict[str, Any]], batch_size: int = 512
    ) -> list[Encoded | RowError]:
        """One result per row, in order."""
        out: list[Encoded | RowError] = []
        for batch in self.iter_batches(rows, batch_size):
            out.extend(batch)
        return out

    def iter_batches(
        self, rows: Iterable[dict[str, Any]], batch_size: int = 512,
        prompt_cache: dict | None = None,
    ) -> Iterator[list[Encoded | RowError]]:
        """Lazily encode ``rows`` (any iterable) ``batch_size`` at a time, in order; for a
        producer thread feeding the device.

        ``prompt_cache``: a dict this encoder fills with the prompt ids of every distinct
        (system, instruction) it renders (keyed by a 16-byte digest), so the prompt of a
        question answered by several teachers is rendered and tokenized once. The results
        are identical with and without it (the prompt is a function of those two texts).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == batch_size:
                yield self._encode_batch(batch, prompt_cache)
                batch = []
        if batch:
            yield self._encode_batch(batch, prompt_cache)

    def _render(self, messages: list[dict[str, str]], prompt: bool) -> str:
        if prompt:
            return self.tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False)

    def _encode_batch(self, rows: list[dict[str, Any]],
                      prompt_cache: dict | None = None) -> list[Encoded | RowError]:
        """With ``prompt_cache``: per distinct (system, instruction), the prompt's ids and,
        when :func:`split_safe_tokens` allows it, the ids of the prompt's head ``P`` (up to
        the end of its last added token, e.g. ``...<|im_start|>``); a full text that starts
        with ``P`` and has no added token across that point is then tokenized as
        ``ids(P) + ids(rest)``, which the tokenizer's added-token split makes identical to
        ``ids(full)`` (only the answer's part is tokenized per row)."""
        if prompt_cache is None:
            return self._encode_batch_plain(rows)
        if not hasattr(self, "_split"):
            self._split = split_safe_tokens(self.tokenizer)
        results: list[Encoded | RowError | None] = [None] * len(rows)
        texts: list[str] = []
        fulls: list[tuple[int, str, bytes]] = []  # (row, full text, prompt key)
        new_prompts: dict[bytes, tuple[int, int, int]] = {}  # key -> (prompt idx, head idx, cut)
        for i, row in enumerate(rows):
            error = missing_fields_error(row)
            if error is not None:
                results[i] = RowError(error)
                continue
            messages = build_messages(row)
            key = prompt_key(messages)
            try:  # same order as texts(): the prompt first, then the full text
                if key not in prompt_cache and key not in new_prompts:
                    prompt = self._render(messages, True)
                    cut = _last_added_end(prompt, self._split) if self._split else 0
                    new_prompts[key] = (len(texts), len(texts) + 1 if cut else -1, cut)
                    texts.append(prompt)
                    if cut:
                        texts.append(prompt[:cut])
                full = self._render(messages, False)
            except Exception as exc:  # a template may reject a row; keep it as an error row
                results[i] = RowError(f"chat template failed: {exc}")
                continue
            fulls.append((i, full, key))
        if new_prompts:  # the prompts (and heads) of new questions, in one call
            ids = batch_ids(self.tokenizer, texts)
            for key, (k, h, cut) in new_prompts.items():
                head = None
                if cut and ids[h] and ids[h][-1] in self._split[1]:
                    text = texts[k][:cut]
                    head = (cut, hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                                 digest_size=16).digest(),
                            np.asarray(ids[h], dtype=np.int32))
                prompt_cache[key] = (np.asarray(ids[k], dtype=np.int32), head)
        bodies: list[str] = []
        plan: list[tuple[int, Any, int]] = []  # (row, head ids or None, text index)
        for i, full, key in fulls:
            head = prompt_cache[key][1]
            if head is not None and _head_matches(full, head, self._split):
                plan.append((i, head[2], len(bodies)))
                bodies.append(full[head[0]:])
                self.split_rows = getattr(self, "split_rows", 0) + 1
            else:
                plan.append((i, None, len(bodies)))
                bodies.append(full)
        if bodies:
            ids = batch_ids(self.tokenizer, bodies)
            for (i, head_ids, k), (_, _, key) in zip(plan, fulls):
                full_ids = ids[k] if head_ids is None else np.concatenate(
                    [head_ids, np.asarray(ids[k], dtype=np.int32)])
                results[i] = self.encode_ids(prompt_cache[key][0], full_ids)
        return results  # type: ignore[return-value]

    def _encode_batch_plain(self, rows: list[dict[str, Any]]) -> list[Encoded | RowError]:
        results: list[Encoded | RowError | None] = [None] * len(rows)
        texts: list[str] = []
        slots: list[int] = []
        for i, row in enumerate(rows):
            error = missing_fields_error(row)
            if error is not None:
                results[i] = RowError(error)
                continue
            try:
                prompt, full = self.texts(row)
            except Exception as exc:  # a template may reject a row; keep it as an error row
                results[i] = RowError(f"chat template failed: {exc}")
                continue
            texts.extend((prompt, full))
            slots.append(i)
        if texts:
            ids = batch_ids(self.tokenizer, texts)
            for k, i in enumerate(slots):
                results[i] = self.encode_ids(ids[2 * k], ids[2 * k + 1])
        return results  # type: ignore[return-value]
