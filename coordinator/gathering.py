"""A round's products assembled from the slots' answers while the others are still to come: no I/O.

A round asks each slot for its share of one or more products. Each is either summed over the slots (every slot
computes the whole product from its own columns or units) or placed (each slot computes some of its rows or
columns). The coordinator hands each slot's trusted answer to the gatherers as soon as it is in, so that the
adding up overlaps the wait for slower workers.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.model import from_wire


@dataclass(frozen=True)
class Summed:
    """A product every slot computes in full from its share of the operands: the slots' partials added up."""

    name: str
    dtype: np.dtype  # of the sum; partials on a narrower wire are widened to it first

    def gatherer(self, slots) -> "SlotOrderSum":
        return SlotOrderSum(self, list(slots))


@dataclass(frozen=True)
class Placed:
    """A product whose rows (axis 0) or columns (axis 1) the slots computed apart: each slot's part placed at its
    own indices, nothing to add."""

    name: str
    dtype: np.dtype
    indices: Callable  # slot -> its indices along `axis`, under the plan of the round
    axis: int = 0

    def gatherer(self, slots) -> "Placement":
        return Placement(self, {slot: self.indices(slot) for slot in slots})


class SlotOrderSum:
    """Partials added in slot order, each as soon as every earlier slot's is in: the sum has the same bits
    whatever order the answers come in, so a run stays reproducible."""

    def __init__(self, spec: Summed, slots: list):
        self.spec = spec
        self.to_add = slots[::-1]  # the next slot to add last, so that it pops
        self.waiting = {}  # slot -> its partial, come before an earlier slot's
        self.total = None

    def add(self, slot: int, products: dict) -> None:
        self.waiting[slot] = products[self.spec.name]
        while self.to_add and self.to_add[-1] in self.waiting:
            partial = from_wire(self.waiting.pop(self.to_add.pop()), self.spec.dtype)
            if self.total is None:
                self.total = partial.copy()  # a frame's buffer may be read-only, and is not ours to keep
            else:
                self.total += partial

    def result(self) -> np.ndarray:
        if self.to_add:
            raise ValueError(f"{self.spec.name}: no answer yet from slots {sorted(set(self.to_add) - set(self.waiting))}")
        return self.total


class Placement:
    """Parts placed into the whole as they come; the order does not matter, as no two overlap."""

    def __init__(self, spec: Placed, indices: dict):
        self.spec = spec
        self.indices = indices  # slot -> its indices along the axis
        self.missing = set(indices)
        self.whole = None

    def add(self, slot: int, products: dict) -> None:
        part = from_wire(products[self.spec.name], self.spec.dtype)
        if self.whole is None:
            shape = list(part.shape)
            shape[self.spec.axis] = sum(len(indices) for indices in self.indices.values())
            self.whole = np.empty(shape, self.spec.dtype)
        self.whole[(slice(None),) * self.spec.axis + (self.indices[slot],)] = part
        self.missing.discard(slot)

    def result(self) -> np.ndarray:
        if self.missing:
            raise ValueError(f"{self.spec.name}: no answer yet from slots {sorted(self.missing)}")
        return self.whole
