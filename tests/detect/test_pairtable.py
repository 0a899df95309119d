"""The TCP rules' port-pair table against an OrderedDict, the table it replaced: the same pairs, in the same order,
with what was stored for each, through additions to a full table, removals out of order and compactions."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leafguard.detect.pairtable import PairTable

Pair = tuple[bytes, int, bytes, int]


def _pairs(rnd: random.Random, n: int) -> list[Pair]:
    # Few addresses and ports, so keys share their home slots (probing and the backward shift of removals are
    # exercised), addresses with the top bit set (k1 needs all 64 bits), and some IPv6 pairs in the same order.
    v4 = [bytes([rnd.choice((10, 250)), 0, 0, rnd.randrange(4)]) for _ in range(8)]
    v6 = [bytes([0xFE, 0x80]) + bytes(13) + bytes([i]) for i in range(3)]
    out: list[Pair] = []
    for _ in range(n):
        ips = v6 if rnd.random() < 0.1 else v4
        out.append((rnd.choice(ips), rnd.randrange(2) << 15 | rnd.randrange(4), rnd.choice(ips), rnd.randrange(4)))
    return list(dict.fromkeys(out))


def _run(seed: int, cap: int, slack: int, steps: int) -> None:
    rnd = random.Random(seed)
    pairs = _pairs(rnd, 400)
    table = PairTable(cap, slack)
    ids = table.column(np.int64)
    model: OrderedDict[Pair, int] = OrderedDict()
    for step in range(steps):
        pair = rnd.choice(pairs)
        if rnd.random() < 0.3:
            # An end: the pair leaves, wherever it is in the order.
            pos = table.find(*pair)
            assert (pos >= 0) == (pair in model)
            if pos >= 0:
                assert ids[pos] == model.pop(pair)
                table.remove(pos)
            continue
        # An opening, as the rules do it: the oldest goes first when full (even if this pair is in the table).
        if len(model) >= cap:
            oldest = table.oldest()
            _, value = model.popitem(last=False)
            assert ids[oldest] == value
            table.remove(oldest)
        pos, added = table.put(*pair)
        assert added == (pair not in model)
        if added:
            ids[pos] = step
            model[pair] = step
        assert ids[pos] == model[pair]
        assert len(table) == len(model)
    order = table.positions()
    assert [ids[p] for p in order.tolist()] == list(model.values())
    assert all(table.find(*p) < 0 for p in pairs if p not in model)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 40), st.integers(0, 8))
def test_the_table_keeps_the_pairs_and_order_an_ordered_dict_keeps(seed: int, cap: int, slack: int) -> None:
    _run(seed, cap, slack, 600)


def test_a_full_table_through_many_compactions() -> None:
    _run(1, 300, 16, 20_000)


def test_adding_to_a_full_table_is_refused() -> None:
    table = PairTable(1)
    table.put(b"\x0a\x00\x00\x01", 1, b"\x0a\x00\x00\x02", 2)
    with pytest.raises(OverflowError):
        table.put(b"\x0a\x00\x00\x01", 1, b"\x0a\x00\x00\x02", 3)
