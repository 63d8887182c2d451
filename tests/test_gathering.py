"""A round's products gathered from answers in whatever order they come."""

import itertools

import numpy as np
import pytest

from common.model import to_wire
from coordinator.gathering import Placed, Summed

SLOTS = [0, 1, 2, 3]


def _partials(dtype=np.float32) -> dict:
    """Partials whose float32 sum depends on the order they are added in."""
    rng = np.random.default_rng(3)
    return {slot: (rng.standard_normal((5, 7)) * 10.0 ** rng.integers(-4, 4, (5, 7))).astype(dtype) for slot in SLOTS}


def test_a_sum_has_the_same_bits_whatever_order_the_partials_come_in():
    partials = _partials()
    in_slot_order = partials[0] + partials[1] + partials[2] + partials[3]
    sums = set()
    for order in itertools.permutations(SLOTS):
        gatherer = Summed("partial", np.dtype(np.float32)).gatherer(SLOTS)
        for slot in order:
            gatherer.add(slot, {"partial": partials[slot]})
        total = gatherer.result()
        assert np.array_equal(total, in_slot_order)
        sums.add(total.tobytes())
    assert len(sums) == 1
    orders = {(partials[a] + partials[b] + partials[c] + partials[d]).tobytes() for a, b, c, d in
              itertools.permutations(SLOTS)}
    assert len(orders) > 1  # so the test above could fail: the order does change float32 sums


def test_partials_on_a_narrow_wire_are_widened_before_they_are_added():
    partials = {slot: to_wire(part, "bfloat16") for slot, part in _partials().items()}
    gatherer = Summed("partial", np.dtype(np.float32)).gatherer(SLOTS)
    for slot in reversed(SLOTS):
        gatherer.add(slot, {"partial": partials[slot]})
    assert gatherer.result().dtype == np.float32


def test_a_sum_is_refused_before_every_slot_is_in():
    gatherer = Summed("partial", np.dtype(np.float32)).gatherer(SLOTS)
    gatherer.add(1, {"partial": _partials()[1]})
    with pytest.raises(ValueError, match=r"slots \[0, 2, 3\]"):
        gatherer.result()


def test_rows_and_columns_are_placed_at_each_slots_indices():
    indices = {0: np.array([3, 0]), 1: np.array([1]), 2: np.array([4, 2])}
    whole = np.arange(5 * 3, dtype=np.float64).reshape(5, 3)
    rows = Placed("gradient", np.dtype(np.float64), indices.get).gatherer(indices)
    columns = Placed("error", np.dtype(np.float64), indices.get, axis=1).gatherer(indices)
    for slot in (2, 0, 1):
        rows.add(slot, {"gradient": whole[indices[slot]]})
        columns.add(slot, {"error": whole.T[:, indices[slot]]})
    assert np.array_equal(rows.result(), whole) and np.array_equal(columns.result(), whole.T)
    partial = Placed("gradient", np.dtype(np.float64), indices.get).gatherer(indices)
    partial.add(0, {"gradient": whole[indices[0]]})
    with pytest.raises(ValueError, match=r"slots \[1, 2\]"):
        partial.result()
