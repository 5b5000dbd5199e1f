"""SFT data for training: read, tokenize with the chat template, mask, pack to fixed shapes.

Rows are ``{"system", "instruction", "output"}`` (what ``scas-jax select`` writes;
``teacher_output`` is accepted too), from a JSONL file or from a LLaMA-Factory
``dataset_info.json`` plus a dataset name.

Loss mask. Each row is encoded by :class:`scas_jax.data.chat.ChatEncoder`, so the
prompt/answer boundary ``n_prompt`` is exactly the one scoring uses. The loss covers
every position ``p >= n_prompt`` of the full chat text, *including* the template's
end-of-turn token(s) after the answer (``<|im_end|>`` and the newline after it for
ChatML): the student must learn to stop. Unlike scoring's ``answer_mask``, special
tokens are therefore not removed. Token ``p`` is predicted from position ``p - 1``, so
the host stores, per sequence, ``targets[p] = ids[p + 1]`` and ``weights[p] =
answer[p + 1]``; the last position of a sequence predicts nothing. No mask is ever
derived from a token id (id 0 is a real token in Llama vocabularies).

Packing. Per epoch, the example order is a permutation drawn from ``(seed, epoch)``;
examples are then placed first-fit (in that order) into rows of ``seq_len`` tokens with
segment ids ``1..k`` (0 on padding) and positions restarting at 0, and rows are grouped
into batches of ``batch_size`` rows (the last batch padded with empty rows). Every
batch therefore has the shape ``[batch_size, seq_len]``, and the whole plan depends
only on the lengths, the seed and the epoch: a resumed run rebuilds it exactly from
the step index alone.

Inputs. ``--data`` is a JSONL file, a LLaMA-Factory ``dataset_info.json`` (or its
directory), or a TFDS dataset directory built by ``scas-jax dataset build --data FILE``,
read through Grain into exactly the rows, in exactly the order, of the JSONL file it was
built from (so the plan, the batches and the losses are the same). Every process reads
every row and builds the same plan (packing places each example by all the lengths
before it); each process then transfers only the rows its devices hold
(:func:`scas_jax.training.step.put_batch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from scas_jax.data.chat import ChatEncoder, RowError
from scas_jax.data.jsonl import iter_jsonl, read_json
from scas_jax.data.packing import BatchPlan, materialise
from scas_jax.errors import ScasError

BATCH_KEYS = ("tokens", "targets", "weights")
# rows still open for first-fit at any time (bounds the packing cost on large files)
MAX_OPEN_ROWS = 256


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence. ``tokens``, ``targets``: int32[T]; ``weights``: float32[T]
    (1 where ``targets[p]`` is an answer token, see module docstring)."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "targets": self.targets, "weights": self.weights}


@dataclasses.dataclass
class DataStats:
    rows: int = 0
    examples: int = 0
    dropped_long: int = 0
    errors: int = 0
    answer_tokens: int = 0
    tokens: int = 0
    error_examples: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ reading


def resolve_dataset(path: str | Path, dataset: str = "") -> Path:
    """The JSONL file behind ``path``: itself, or the entry of a ``dataset_info.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset_info.json"
    if not path.exists():
        raise ScasError(f"{path}: no such file")
    if path.name != "dataset_info.json":
        return path
    info = read_json(path)
    if not isinstance(info, dict) or not info:
        raise ScasError(f"{path}: expected a non-empty mapping of dataset names")
    if not dataset:
        if len(info) != 1:
            raise ScasError(
                f"{path}: holds {len(info)} datasets ({', '.join(sorted(info))}); "
                "choose one with dataset=NAME"
            )
        dataset = next(iter(info))
    if dataset not in info:
        raise ScasError(f"{path}: no dataset {dataset!r} (has: {', '.join(sorted(info))})")
    entry = info[dataset]
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    if not file_name:
        raise ScasError(f"{path}: dataset {dataset!r} has no file_name")
    cols = entry.get("columns") or {}
    expected = {"system": "system", "prompt": "instruction", "response": "output"}
    for role, col in cols.items():
        if role in expected and col != expected[role]:
            raise ScasError(
                f"{path}: dataset {dataset!r} maps {role!r} to column {col!r}; "
                f"only the columns select writes ({expected[role]!r}) are supported"
            )
    target = path.parent / file_name
    if not target.exists():
        raise ScasError(f"{path}: dataset {dataset!r} points to missing file {target}")
    return target


def read_rows(path: str | Path, dataset: str = "") -> tuple[Path, list[tuple[int, dict]]]:
    """``(jsonl path, [(line number, row)])``; an empty file is an error.

    ``path`` may be a TFDS dataset directory of one file (``scas-jax dataset build --data
    FILE``; :func:`scas_jax.data.files.dataset_file`): its records are read through a
    Grain ``MapDataset`` and give the same ``(line, row)`` list as the JSONL file it was
    built from; the path returned is then ``<version dir>/<source file name>``, so errors
    still name the source ``file:line``. Every process reads every row (the packing plan
    depends on all lengths; see the module docstring)."""
    from scas_jax.data.files import dataset_file, iter_rows

    built = dataset_file(path, "--data")
    if built is not None:
        if dataset:
            raise ScasError(f"dataset={dataset!r} names an entry of a LLaMA-Factory dataset_info.json, "
                            f"but {path} is a TFDS dataset: drop dataset=")
        rows = list(iter_rows(built))
        if not rows:
            raise ScasError(f"{built.path}: no rows to train on (the dataset is empty)")
        return built.path, rows
    jsonl = resolve_dataset(path, dataset)
    rows = list(iter_jsonl(jsonl))
    if not rows:
        raise ScasError(f"{jsonl}: no rows to train on (the file is empty)")
    return jsonl, rows


# ------------------------------------------------------------------ encoding


def example_from_ids(ids: np.ndarray, n_prompt: int) -> Example:
    """Targets and weights of one sequence (see module docstring)."""
    ids = np.asarray(ids, np.int32)
    t = ids.shape[0]
    answer = np.arange(t) >= max(n_prompt, 1)  # position 0 is never predicted
    targets = np.zeros(t, np.int32)
    targets[:-1] = ids[1:]
    weights = np.zeros(t, np.float32)
    weights[:-1] = answer[1:]
    return Example(ids, targets, weights)


def encode_examples(
    rows: Sequence[tuple[int, dict]],
    encoder: ChatEncoder,
    seq_len: int,
    drop_long: bool,
    where: str,
) -> tuple[list[Example], DataStats]:
    """Tokenize rows; error rows are counted, over-long rows dropped (or an error)."""
    stats = DataStats(rows=len(rows))
    results = encoder.encode_rows([row for _, row in rows])
    examples: list[Example] = []
    for (line, _), res in zip(rows, results):
        if isinstance(res, RowError):
            stats.errors += 1
            if len(stats.error_examples) < 5:
                stats.error_examples.append(f"{where}:{line}: {res.message}")
            continue
        if res.length > seq_len:
            if not drop_long:
                raise ScasError(
                    f"{where}:{line}: {res.length} tokens exceed seq_len={seq_len} "
                    "(raise seq_len or set drop_long=true)"
                )
            stats.dropped_long += 1
            continue
        ex = example_from_ids(res.ids, res.n_prompt)
        stats.answer_tokens += int(ex.weights.sum())
        stats.tokens += ex.length
        examples.append(ex)
    stats.examples = len(examples)
    if not examples:
        detail = "; ".join(stats.error_examples)
        raise ScasError(
            f"{where}: no usable rows ({stats.rows} read, {stats.errors} without an answer or "
            f"failing the chat template, {stats.dropped_long} longer than seq_len={seq_len})"
            + (f": {detail}" if detail else "")
        )
    return examples, stats


def load_examples(path, tokenizer, seq_len: int, drop_long: bool = True, dataset: str = "",
                  rows: tuple[Path, list[tuple[int, dict]]] | None = None):
    """Read and encode an SFT file: ``(examples, stats)``. ``rows``: what
    :func:`read_rows` already returned for ``path`` (read once, validated early)."""
    if tokenizer is None:
        raise ScasError("the student has no tokenizer; training needs its chat template")
    jsonl, read = rows if rows is not None else read_rows(path, dataset)
    return encode_examples(read, ChatEncoder(tokenizer), seq_len, drop_long, str(jsonl))


# ------------------------------------------------------------------ packing


def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int, max_segments: int) -> list[tuple[int, ...]]:
    """First-fit of the items in ``order`` into rows of ``seq_len`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # indices into rows, oldest first
    for i in order:
        n = lengths[i]
        for r in open_rows:
            if free[r] >= n and len(rows[r]) < max_segments:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
            open_rows.append(len(rows) - 1)
            if len(open_rows) > MAX_OPEN_ROWS:
                open_rows.pop(0)
        open_rows = [r for r in open_rows if free[r] > 0 and len(rows[r]) < max_segments]
    return [tuple(r) for r in rows]


def epoch_plan(
    lengths: Sequence[int], seq_len: int, batch_size: int, max_segments: int, seed: int, epoch: int
) -> list[BatchPlan]:
    """The batches of one epoch (deterministic in ``seed`` and ``epoch``)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    rows = pack_rows(lengths, order, seq_len, max_segments)
    plans = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        chunk += [()] * (batch_size - len(chunk))
        plans.append(BatchPlan(seq_len, tuple(chunk)))
    return plans


def make_batch(plan: BatchPlan, examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Arrays ``[batch_size, seq_len]``: tokens, targets, positions, segment_ids (int32)
    and weights (float32)."""
    if not plan.items:
        n, t = len(plan.rows), plan.length
        out = {k: np.zeros((n, t), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        out["weights"] = np.zeros((n, t), np.float32)
        return out
    return materialise(plan, [e.as_dict() for e in examples], BATCH_KEYS)


class BatchStream:
    """Batches by global step: step ``k`` is a pure function of the data, settings and seed.

    Epoch ``e``'s plan is built when first needed; ``steps_per_epoch(e)`` may differ
    slightly between epochs (packing depends on the order).
    """

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int,
                 max_segments: int, seed: int):
        self.examples = list(examples)
        self.lengths = [e.length for e in self.examples]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.max_segments, self.seed = max_segments, seed
        self._plans: dict[int, list[BatchPlan]] = {}

    def plan(self, epoch: int) -> list[BatchPlan]:
        if epoch not in self._plans:
            self._plans[epoch] = epoch_plan(
                self.lengths, self.seq_len, self.batch_size, self.max_segments, self.seed, epoch
            )
        return self._plans[epoch]

    def steps_for_epochs(self, epochs: int) -> int:
        return sum(len(self.plan(e)) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index)`` of global step ``step`` (0-based)."""
        epoch = 0
        while step >= len(self.plan(epoch)):
            step -= len(self.plan(epoch))
            epoch += 1
        return epoch, step

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, idx = self.locate(step)
        return make_batch(self.plan(epoch)[idx], self.examples)

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for step in range(start, stop):
            yield step, self.batch(step)

    def fingerprint(self) -> str:
        """A hash of the encoded data, stored in checkpoints so a resume on other data fails."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(e.tokens.tobytes())
            h.update(e.weights.tobytes())
        return h.hexdigest()[:16]


def eval_batches(examples: Sequence[Example], seq_len: int, rows_per_batch: int,
                 max_segments: int) -> list[dict[str, np.ndarray]]:
    """Held-out batches ``[rows_per_batch, seq_len]`` in file order (no shuffling)."""
    lengths = [e.length for e in examples]
    rows = pack_rows(lengths, range(len(examples)), seq_len, max_segments)
    out = []
    for k in range(0, len(rows), rows_per_batch):
        chunk = rows[k : k + rows_per_batch]
        chunk += [()] * (rows_per_batch - len(chunk))
        out.append(make_batch(BatchPlan(seq_len, tuple(chunk)), examples))
    return out
