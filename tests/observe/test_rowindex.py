"""The IPv4 row index against a dict, through insertions, removals and growth."""

from __future__ import annotations

import random

import numpy as np

from leafguard.observe.rowindex import MIN_SLOTS, RowIndex


def test_the_index_answers_as_a_dict_does_through_adds_removes_and_growth() -> None:
    rows = 5000
    k1 = np.zeros(rows, dtype=np.uint64)
    k2 = np.zeros(rows, dtype=np.int64)
    index = RowIndex(k1, k2)
    rnd = random.Random(7)
    # Few distinct high address bits and ports: keys collide in their home slots, so probing and the backward
    # shift of removals are exercised, as are keys whose k1 needs all 64 bits.
    keys = [((rnd.getrandbits(3) << 61) | rnd.getrandbits(12), (rnd.getrandbits(6) << 8) | 6) for _ in range(3000)]
    keys = list(dict.fromkeys(keys))
    expected: dict[tuple[int, int], int] = {}
    free = list(range(rows))
    all1 = np.array([k[0] for k in keys], dtype=np.uint64)
    all2 = np.array([k[1] for k in keys], dtype=np.int64)
    for step in range(40_000):
        key = rnd.choice(keys)
        if key in expected:
            if rnd.random() < 0.5:
                row = expected.pop(key)
                index.remove(row)
                free.append(row)
        else:
            row = free.pop()
            k1[row], k2[row] = key
            index.add(row, *key)
            expected[key] = row
        if step % 4000 == 0 or step == 39_999:
            assert index.get_many(all1, all2).tolist() == [expected.get(k, -1) for k in keys]
            assert all(index.get(*k) == expected.get(k) for k in keys)
            assert sorted(index.rows().tolist()) == sorted(expected.values())
            assert len(index) == len(expected)
    assert index.size > MIN_SLOTS  # it grew
    assert 2 * len(index) <= index.size
