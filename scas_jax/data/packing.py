"""Packing variable-length sequences into a few static batch shapes.

Each sequence goes to the smallest *bucket* length that holds it; within a bucket,
sequences are packed first-fit-decreasing into rows (at most ``max_segments`` per
row), and rows are grouped into batches of ``batch_tokens // bucket`` rows (rounded
up to ``row_multiple``, e.g. the mesh's data-parallel size). Every batch of a bucket
has the same shape, so the jitted scorer compiles at most once per bucket.

The plan depends only on the sequence lengths and the settings, never on timing, so a
resumed run re-creates exactly the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Short sequences share 1024-token rows: with segment-aware blockwise attention a long
# packed row costs little more than its sequences alone, and one shape fills batches.
DEFAULT_BUCKETS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """One batch: ``rows[r]`` lists the item indices packed into row ``r`` in order."""

    length: int
    rows: tuple[tuple[int, ...], ...]

    @property
    def items(self) -> list[int]:
        return [i for row in self.rows for i in row]


def bucket_lengths(max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[int]:
    """The buckets in use: those below ``max_length``, then ``max_length`` itself."""
    return [b for b in buckets if b < max_length] + [max_length]


def plan_batches(
    lengths: Sequence[int],
    *,
    max_length: int,
    batch_tokens: int,
    max_segments: int = 16,
    row_multiple: int = 1,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> list[BatchPlan]:
    """Plan batches for items of the given lengths (every length must be <= max_length)."""
    sizes = bucket_lengths(max_length, buckets)
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if not 0 < n <= max_length:
            raise ValueError(f"item {i}: length {n} outside 1..{max_length}")
        b = next(s for s in sizes if s >= n)
        by_bucket.setdefault(b, []).append(i)
    plans = []
    for b in sorted(by_bucket):
        order = sorted(by_bucket[b], key=lambda i: (-lengths[i], i))
        rows: list[list[int]] = []
        free: list[int] = []
        for i in order:  # first fit decreasing
            for r, room in enumerate(free):
                if room >= lengths[i] and len(rows[r]) < max_segments:
                    rows[r].append(i)
                    free[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                free.append(b - lengths[i])
        per_batch = max(1, batch_tokens // b)
        per_batch = -(-per_batch // row_multiple) * row_multiple
        for k in range(0, len(rows), per_batch):
            chunk = [tuple(r) for r in rows[k : k + per_batch]]
            chunk += [()] * (per_batch - len(chunk))
            plans.append(BatchPlan(b, tuple(chunk)))
    return plans


def materialise(plan: BatchPlan, seqs: Sequence[dict], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``[rows, length]`` for one planned batch.

    ``seqs[i]`` maps each name in ``keys`` to a 1-D array of item ``i``'s length
    (tokens, masks). Adds ``positions`` (restarting at 0 per item) and ``segment_ids``
    (1.. per row, 0 on padding).
    """
    n_rows, t = len(plan.rows), plan.length
    out = {k: np.zeros((n_rows, t), dtype=np.asarray(seqs[plan.items[0]][k]).dtype)
           for k in keys} if plan.items else {k: np.zeros((n_rows, t), np.int32) for k in keys}
    out["positions"] = np.zeros((n_rows, t), np.int32)
    out["segment_ids"] = np.zeros((n_rows, t), np.int32)
    for r, row in enumerate(plan.rows):
        o = 0
        for s, i in enumerate(row):
            item = seqs[i]
            n = len(item[keys[0]])
            for k in keys:
                out[k][r, o : o + n] = item[k]
            out["positions"][r, o : o + n] = np.arange(n)
            out["segment_ids"][r, o : o + n] = s + 1
            o += n
    return out


def padding_stats(plans: Sequence[BatchPlan], lengths: Sequence[int]) -> dict:
    """Real vs padded token counts over a plan."""
    real = sum(lengths[i] for p in plans for i in p.items)
    total = sum(p.length * len(p.rows) for p in plans)
    return {"real_tokens": int(real), "padded_tokens": int(total),
            "padding_fraction": float(1 - real / total) if total else 0.0,
            "batches": len(plans), "shapes": sorted({(len(p.rows), p.length) for p in plans})}
