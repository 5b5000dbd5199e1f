"""Packing variable-length sequences into a few static batch shapes.

Each sequence goes to the smallest *bucket* length that holds it; within a bucket,
sequences are packed first-fit-decreasing into rows (at most ``max_segments`` per
row; :func:`first_fit`, ``O(n log n)``), the least-filled rows are emptied into the
others where a move or an exchange makes room (:func:`drop_rows`), and rows are
grouped into batches of ``batch_tokens // bucket`` rows (rounded up to
``row_multiple``, e.g. the mesh's data-parallel size). Every batch of a bucket
has the same shape except the bucket's last, which has the fewest rows of the form
``row_multiple * {1, 2, 3, 4, 6, 8, 12, ...}`` that hold its rows (:func:`tail_rows`),
so the jitted scorer compiles a few shapes per bucket, not one per batch, and a short
last batch does not run a full batch of empty rows (docs/benchmarks.md).

The plan depends only on the sequence lengths and the settings, never on timing, so a
resumed run re-creates exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import itertools
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


def drop_rows(rows: list[list[int]], sizes: Sequence[int], capacity: int, max_segments: int,
              tries: int = 4) -> list[list[int]]:
    """``rows`` (of a first fit: item positions into ``sizes``) with its least-filled
    rows emptied into the others where that works. Up to ``tries`` times, each item of
    the least-filled row (the last of equals), largest first, goes

    1. to the fullest other row with room and a segment free for it, else
    2. into a row R in place of a smaller item, which goes to the fullest row (not R)
       with room for it, else
    3. (pools of at most :data:`EXCHANGE_ITEMS` items) into a row R after an item of R
       changes places with a smaller item of another row that has room for the
       difference.

    The row is dropped only when all its items find a place; the first row that cannot
    be emptied ends the search. Deterministic; every row stays within ``capacity`` and
    ``max_segments``; ``O(tries * max_segments * n)`` for ``n`` items (step 3:
    quadratic, hence its bound). First fit decreasing leaves its waste in its last
    rows: 166 GSM8K answers (50 questions) fill 30.2 rows of 1,024 tokens, first fit
    opens 31 rows and this leaves 30 (docs/benchmarks.md)."""
    sizes_np = np.asarray(sizes, np.int64)
    for _ in range(tries):
        if len(rows) < 2:
            break
        row_of = np.empty(len(sizes_np), np.int64)
        row_of[np.fromiter(itertools.chain.from_iterable(rows), np.int64, len(sizes_np))] = \
            np.repeat(np.arange(len(rows)), np.fromiter(map(len, rows), np.int64, len(rows)))
        emptied = _empty_row(rows, row_of, sizes_np, capacity, max_segments)
        if emptied is None:
            break
        rows = emptied
    return rows


def _empty_row(rows, row_of, sizes, capacity, max_segments):
    """``rows`` without their least-filled row, its items placed in the others as
    :func:`drop_rows` says, or None where one of them finds no place. ``row_of[i]``:
    the row of item ``i``."""
    n_rows, big = len(rows), np.iinfo(np.int64).max
    load = np.bincount(row_of, weights=sizes, minlength=n_rows).astype(np.int64)
    e = n_rows - 1 - int(np.argmin(load[::-1]))
    row_of = row_of.copy()
    room = capacity - load
    count = np.bincount(row_of, minlength=n_rows)
    open_ = count < max_segments  # rows that can take one more item
    open_[e] = False  # nothing goes into the row being emptied
    arrived: dict[int, list[int]] = {}  # row -> items that moved into it, in order
    for x in sorted(rows[e], key=lambda i: (-sizes[i], i)):
        sx = int(sizes[x])
        fits = np.where(open_ & (room >= sx), room, big)
        if fits.min() != big:
            moves = [(x, int(np.argmin(fits)))]
        else:
            moves = _make_room(x, sx, e, sizes, row_of, room, open_)
            if moves is None:
                return None
        for item, dest in moves:
            src = int(row_of[item])
            room[src] += sizes[item]
            room[dest] -= sizes[item]
            count[src] -= 1
            count[dest] += 1
            row_of[item] = dest
            arrived.setdefault(dest, []).append(item)
            arrived.setdefault(src, [])
            open_[dest] = count[dest] < max_segments
            open_[src] = src != e and count[src] < max_segments
    out = list(rows)
    for r, came in arrived.items():
        kept = [i for i in rows[r] if row_of[i] == r]
        came = [i for i in dict.fromkeys(came) if row_of[i] == r]  # in order, once
        out[r] = kept + [i for i in came if i not in set(kept)]
    return out[:e] + out[e + 1:]


# Pools of at most this many items also try exchanges of two items between two rows
# (quadratic in the items; a large pool's last row is a negligible part of it).
EXCHANGE_ITEMS = 2048


def _make_room(x, sx, e, sizes, row_of, room, open_):
    """``[(item, destination row), ...]`` that end with item ``x`` (``sx`` tokens, in
    row ``e``) in another row: steps 2 and 3 of :func:`drop_rows`; None where neither
    works. The row R left fullest wins (then the lowest item positions)."""
    big = np.iinfo(np.int64).max
    # step 2: a smaller y of row R (not e) leaves for the open row with the most room outside R
    rooms = np.where(open_, room, -1)
    best = int(np.argmax(rooms))
    second = np.max(np.delete(rooms, best)) if len(rooms) > 1 else -1
    room_elsewhere = np.where(row_of == best, second, rooms[best])
    ok = (sizes < sx) & (row_of != e) & (room[row_of] + sizes >= sx) & (sizes <= room_elsewhere)
    if ok.any():
        y = int(np.argmin(np.where(ok, room[row_of] + sizes - sx, big)))
        r, sy = int(row_of[y]), int(sizes[y])
        fits = np.where(open_ & (room >= sy), room, big)
        fits[r] = big
        return [(y, int(np.argmin(fits))), (x, r)]
    # step 3: a of an open row R and a smaller b of another row S change places
    items = np.flatnonzero(row_of != e)
    if len(items) > EXCHANGE_ITEMS:
        return None
    a, b = items[:, None], items[None, :]
    ra, rb = row_of[a], row_of[b]
    gain = sizes[a] - sizes[b]  # the room R gains and S gives
    ok = (ra != rb) & open_[ra] & (room[ra] + gain >= sx) & (room[rb] >= gain)
    if not ok.any():
        return None
    i, j = np.unravel_index(int(np.argmin(np.where(ok, room[ra] + gain - sx, big))), ok.shape)
    ia, ib = int(items[i]), int(items[j])
    r, s = int(row_of[ia]), int(row_of[ib])
    return [(ia, s), (ib, r), (x, r)]


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
        sizes_b = [lengths[i] for i in order]
        rows = drop_rows(first_fit(sizes_b, b, max_segments), sizes_b, b, max_segments)
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
