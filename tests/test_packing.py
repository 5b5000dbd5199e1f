"""The packing planner: first fit in O(n log n) places every item exactly where a
row-by-row first fit does, within the segment limit; its least-filled rows are emptied
into the others where that works; a large pool is planned."""

from __future__ import annotations

import random

import pytest

from scas_jax.data.packing import drop_rows, first_fit, plan_batches, tail_rows


def _row_by_row(sizes, capacity, max_segments):
    rows, free = [], []
    for j, n in enumerate(sizes):
        for r, room in enumerate(free):
            if room >= n and len(rows[r]) < max_segments:
                rows[r].append(j)
                free[r] -= n
                break
        else:
            rows.append([j])
            free.append(capacity - n)
    return rows


def test_first_fit_places_like_the_row_by_row_scan():
    rng = random.Random(0)
    for _ in range(400):
        capacity = rng.choice([1, 8, 64, 1024])
        max_segments = rng.choice([1, 2, 3, 16])
        sizes = [rng.randint(1, capacity) for _ in range(rng.randint(0, 150))]
        if rng.random() < 0.5:
            sizes.sort(reverse=True)  # first fit decreasing, as the planner uses it
        rows = first_fit(sizes, capacity, max_segments)
        assert rows == _row_by_row(sizes, capacity, max_segments)
        assert sorted(j for r in rows for j in r) == list(range(len(sizes)))
        assert all(sum(sizes[j] for j in r) <= capacity and len(r) <= max_segments for r in rows)


def test_first_fit_rejects_an_item_larger_than_a_row():
    with pytest.raises(ValueError, match="item 1: size 9 outside 1..8"):
        first_fit([3, 9], 8, 4)


def test_plan_of_a_large_pool():
    """200k answers of 20..700 tokens: every item planned once, rows within the bucket
    and the segment limit (a quadratic planner needed minutes here)."""
    rng = random.Random(1)
    lengths = [rng.randint(20, 700) for _ in range(200_000)]
    plans = plan_batches(lengths, max_length=4096, batch_tokens=16384, max_segments=16, row_multiple=8)
    items = sorted(i for p in plans for i in p.items)
    assert items == list(range(len(lengths)))
    for p in plans:
        assert len(p.rows) % 8 == 0
        assert all(sum(lengths[i] for i in r) <= p.length and len(r) <= 16 for r in p.rows)
    assert {p.length for p in plans} == {1024}


def test_last_batch_of_a_bucket_has_the_fewest_rows_that_hold_it():
    """Full batches of ``per_batch`` rows; each bucket's last batch has the smallest
    ``row_multiple * {1, 2, 3, 4, 6, 8, 12, ...}`` rows holding its rows: never more
    than a third empty past two row groups, and few shapes per bucket."""
    assert [tail_rows(r, 16) for r in range(1, 17)] == [1, 2, 3, 4, 6, 6, 8, 8] + [12] * 4 + [16] * 4
    assert [tail_rows(r, 12, 4) for r in (1, 4, 5, 8, 9, 12)] == [4, 4, 8, 8, 12, 12]
    assert tail_rows(40, 48) == 48 and tail_rows(17, 20) == 20  # never past a full batch
    assert sorted({tail_rows(r, 64) for r in range(1, 65)}) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    for n_rows, row_multiple, want in ((9, 1, [4, 4, 1]), (10, 1, [4, 4, 2]), (11, 1, [4, 4, 3]),
                                        (5, 2, [4, 2]), (2, 1, [2])):
        lengths = [1000] * n_rows  # one sequence a 1024-token row
        plans = plan_batches(lengths, max_length=1024, batch_tokens=4096, row_multiple=row_multiple)
        assert [len(p.rows) for p in plans] == want
        assert sorted(i for p in plans for i in p.items) == list(range(n_rows))
        assert all(len(p.rows) % row_multiple == 0 for p in plans)
    lengths = [3000] * 3 + [1000] * 5  # two buckets, each with its own last batch
    plans = plan_batches(lengths, max_length=4096, batch_tokens=8192)
    assert [(p.length, len(p.rows)) for p in plans] == [(1024, 6), (4096, 2), (4096, 1)]


def _check_rows(rows, sizes, capacity, max_segments):
    assert sorted(j for r in rows for j in r) == list(range(len(sizes)))
    assert all(r and sum(sizes[j] for j in r) <= capacity and len(r) <= max_segments for r in rows)


def test_drop_rows_keeps_every_item_once_within_the_limits():
    """Random pools: never more rows than first fit, every item once, every row within
    capacity and the segment limit, the same rows on a second call; some pools lose a
    row."""
    rng = random.Random(3)
    dropped = 0
    for _ in range(300):
        capacity = rng.choice([16, 64, 1024])
        max_segments = rng.choice([2, 3, 16])
        sizes = sorted((rng.randint(1, capacity) for _ in range(rng.randint(1, 120))), reverse=True)
        ffd = first_fit(sizes, capacity, max_segments)
        rows = drop_rows([list(r) for r in ffd], sizes, capacity, max_segments)
        _check_rows(rows, sizes, capacity, max_segments)
        assert len(rows) <= len(ffd)
        assert rows == drop_rows([list(r) for r in ffd], sizes, capacity, max_segments)
        dropped += len(ffd) - len(rows)
    assert dropped > 0


def test_drop_rows_each_way_of_making_room():
    """Capacity 10. Item 4 (3 tokens) alone in the least-filled row, rows of 7 + 1 and
    6 + 2 with room 2 each: it takes the place of item 1, which moves to the other row
    (moving item 3 instead would leave a row less full); with two segments a row
    cannot take a third item, so the row stays. Then 6 + 3 and 7 + 2 with item 4 (2
    tokens) alone: no room, no smaller item, so item 1 (3 tokens) and item 3 (2
    tokens) change places and item 4 joins item 3."""
    sizes = [7, 1, 6, 2, 3]
    rows = drop_rows([[0, 1], [2, 3], [4]], sizes, 10, 16)
    assert rows == [[0, 4], [2, 3, 1]]
    assert drop_rows([[0, 1], [2, 3], [4]], sizes, 10, 2) == [[0, 1], [2, 3], [4]]
    sizes = [6, 3, 7, 2, 2]  # rows of 9 and 9, item 4 (2 tokens) alone
    rows = drop_rows([[0, 1], [2, 3], [4]], sizes, 10, 16)
    _check_rows(rows, sizes, 10, 16)
    assert rows == [[0, 3, 4], [2, 1]]


def test_plan_drops_a_first_fit_row():
    """Lengths whose first fit decreasing opens a third 1,024-token row that two rows
    hold (550 + 300 + 150 and 500 + 350 + 150): the plan has two rows, not three."""
    lengths = [150, 550, 300, 500, 150, 350]  # 2,000 tokens
    assert len(first_fit(sorted(lengths, reverse=True), 1024, 16)) == 3
    plans = plan_batches(lengths, max_length=1024, batch_tokens=4096)
    assert [len(p.rows) for p in plans] == [2]
    assert sorted(sum(lengths[i] for i in r) for r in plans[0].rows) == [1000, 1000]
    assert sorted(i for p in plans for i in p.items) == list(range(len(lengths)))
