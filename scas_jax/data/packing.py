"""Packing variable-length sequences into a few static batch shapes.

Each sequence goes to the smallest *bucket* length that holds it; within a bucket,
sequences are packed first-fit-decreasing into rows (at most ``max_segments`` per
row; :func:`first_fit`, ``O(n log n)``), and rows are grouped into batches of ``batch_tokens // bucket`` rows (rounded
up to ``row_multiple``, e.g. the mesh's data-parallel size). Every batch of a bucket
has the same shape except the bucket's last, which has the fewest rows of the form
``row_multiple * {1, 2, 3, 4, 6, 8, 12, ...}`` that hold its rows (:func:`tail_rows`),
so the jitted scorer compiles a few shapes per bucket, not one per batch, and a short
last batch does not run a full batch of empty rows (docs/benchmarks.md).

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


def first_fit(sizes: Sequence[int], capacity: int, max_segments: int) -> list[list[int]]:
    """First fit, in ``O(n log n)``: item ``j`` (in the given order) goes to the first row
    (in opening order) with room ``>= sizes[j]`` and fewer than ``max_segments`` items,
    or opens a new row. Returns the rows as lists of item positions.

    The same placement as scanning the rows one by one, found by descending a max-tree
    of the rows' free room (a full row has room -1). Every row not opened yet has room
    ``capacity``, so the first row that fits is either an open row or the next new one.
    Every size must be in ``1..capacity``.
    """
    n = len(sizes)
    if n == 0:
        return []
    leaves = 1
    while leaves < n:
        leaves *= 2
    tree = [capacity] * (2 * leaves)  # tree[1] is the root; leaves at [leaves, 2 * leaves)
    count = [0] * n
    rows: list[list[int]] = []
    for j, size in enumerate(sizes):
        if not 0 < size <= capacity:
            raise ValueError(f"item {j}: size {size} outside 1..{capacity}")
        node = 1
        while node < leaves:  # the leftmost leaf with room >= size
            node = 2 * node if tree[2 * node] >= size else 2 * node + 1
        r = node - leaves
        if r == len(rows):
            rows.append([])
        rows[r].append(j)
        count[r] += 1
        tree[node] = tree[node] - size if count[r] < max_segments else -1
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def tail_rows(rows: int, per_batch: int, row_multiple: int = 1) -> int:
    """Rows of a bucket's last batch holding ``rows`` real rows (``1 <= rows <=
    per_batch``): the smallest ``row_multiple * m`` with ``m`` in 1, 2, 3, 4, 6, 8, 12,
    ... (``2**k`` or ``3 * 2**k``) that is at least ``rows``, and at most ``per_batch``
    (a multiple of ``row_multiple``). So a last batch is at most a third empty rows
    (a half with one or two row groups) and a bucket has at most ``2 * log2(per_batch
    / row_multiple) + 1`` batch shapes however many rows its runs end with."""
    groups = -(-rows // row_multiple)
    m = next(m for m in _row_groups() if m >= groups)
    return min(m * row_multiple, per_batch)


def _row_groups():
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (``2**k`` and ``3 * 2**k``)."""
    yield 1
    k = 2
    while True:
        yield k
        yield k * 3 // 2
        k *= 2


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
        rows = first_fit([lengths[i] for i in order], b, max_segments)
        rows = [[order[j] for j in row] for row in rows]
        per_batch = max(1, batch_tokens // b)
        per_batch = -(-per_batch // row_multiple) * row_multiple
        for k in range(0, len(rows), per_batch):
            chunk = [tuple(r) for r in rows[k : k + per_batch]]
            chunk += [()] * (tail_rows(len(chunk), per_batch, row_multiple) - len(chunk))
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
