"""store/free_list.py: ids go out lowest first, come back lowest on top, are counted per
holder, and a bad release changes nothing."""

from __future__ import annotations

import pytest

from kvsqueeze.store.free_list import FreeList, PoolExhausted


def test_runs_go_out_lowest_first_and_freed_ids_are_reused_lowest_first():
    ids = FreeList(8)
    assert ids.allocate(3) == [0, 1, 2] and ids.allocate(2) == [3, 4]
    ids.release([4, 1, 3])
    assert ids.free_ids() == [1, 3, 4, 5, 6, 7]
    assert ids.allocate(2) == [1, 3]


def test_a_shared_id_is_free_only_after_its_last_holder():
    ids = FreeList(4)
    (a,) = ids.allocate(1)
    ids.share([a])
    assert ids.holders(a) == 2
    ids.release([a])
    assert ids.holders(a) == 1 and a not in ids.free_ids()
    ids.release([a])
    assert ids.holders(a) == 0 and ids.num_free == 4


def test_bad_calls_are_refused_and_change_nothing():
    ids = FreeList(4, "page")
    ids.allocate(2)
    with pytest.raises(PoolExhausted, match="asked for 3 pages, 2 of 4 are free"):
        ids.allocate(3)
    with pytest.raises(ValueError, match="page 0 is released but was not allocated"):
        ids.release([1, 0, 0])  # 0 has one holder, released twice
    assert ids.holders(0) == 1 and ids.holders(1) == 1 and ids.num_free == 2
    with pytest.raises(ValueError, match="page 3 is shared but was not allocated"):
        ids.share([0, 3])
    assert ids.holders(0) == 1
    assert ids.allocate(0) == [] and ids.allocate(2) == [2, 3]
