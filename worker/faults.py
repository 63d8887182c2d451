"""Deliberately wrong workers, for testing that the coordinator's checks catch them (`worker --fault MODE`)."""

import numpy as np

from common.protocol import Result
from worker.compute import WorkerState

FLIP_EVERY = 7  # answers between two wrong elements: "once in a while", yet several times per epoch


class FaultyWorkerState(WorkerState):
    """A worker that answers in shape, but wrongly, in one of several ways."""

    def __init__(self, dtype: str, input_divisor: float, mode: str):
        super().__init__(dtype, input_divisor)
        self.corrupt = getattr(self, mode)
        self.answers = 0
        self.previous = {}  # request kind -> the products of its last answer

    def compute(self, request) -> Result:
        honest = super().compute(request)
        if not honest.products:  # a shard chunk's receipt: nothing to get wrong
            return honest
        self.answers += 1
        products = self.corrupt(type(request), honest.products)
        self.previous[type(request)] = honest.products
        return Result(honest.request, products)

    def skew(self, kind, products: dict) -> dict:
        """Every element slightly wrong."""
        return {name: array * array.dtype.type(1.001) for name, array in products.items()}

    def flip(self, kind, products: dict) -> dict:
        """One element wrong, every FLIP_EVERY answers."""
        if self.answers % FLIP_EVERY:
            return products
        flipped = {name: array.copy() for name, array in products.items()}
        for array in flipped.values():
            if array.size:
                array.flat[self.answers % array.size] += 1
        return flipped

    def permute(self, kind, products: dict) -> dict:
        """The rows of every product in the wrong order."""
        return {name: np.roll(array, 1, axis=0) for name, array in products.items()}

    def stale(self, kind, products: dict) -> dict:
        """The products of the previous request of the same kind, where they fit."""
        previous = self.previous.get(kind, {})
        return {
            name: previous[name] if name in previous and previous[name].shape == array.shape else array
            for name, array in products.items()
        }

    def zeros(self, kind, products: dict) -> dict:
        """Nothing but zeros."""
        return {name: np.zeros_like(array) for name, array in products.items()}


FAULTS = ("skew", "flip", "permute", "stale", "zeros")
