"""Deliberately wrong or dying worker states, for testing that the coordinator copes (run by tests.faulty_worker).
The shipped worker has no such switch."""

import os

import numpy as np

from common.protocol import Result, ReturnRows, Shard
from worker.compute import WorkerState

FLIP_EVERY = 7  # answers between two wrong elements: "once in a while", yet several times per epoch


class FaultyWorkerState(WorkerState):
    """A worker that answers in shape, but wrongly, in one of several ways."""

    def __init__(self, dtype: str, input_divisor: float, wire: str, mode: str):
        super().__init__(dtype, input_divisor, wire)
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

    def rows(self, kind, products: dict) -> dict:
        """Honest products, but the kept first-layer rows sent back at a re-key slightly wrong."""
        return self.skew(kind, products) if kind is ReturnRows else products

    def zeros(self, kind, products: dict) -> dict:
        """Nothing but zeros."""
        return {name: np.zeros_like(array) for name, array in products.items()}


class ExitingWorkerState(WorkerState):
    """A worker that dies the way kill -9 leaves it, at a chosen point of the protocol: on its `count`-th
    compute request, or in the middle (the second chunk) of its `count`-th shard transfer."""

    def __init__(self, dtype: str, input_divisor: float, wire: str, point: str, count: int):
        super().__init__(dtype, input_divisor, wire)
        self.point, self.count = point, count
        self.requests = self.transfers = 0

    def compute(self, request) -> Result:
        if isinstance(request, Shard):
            self.transfers += request.offset == 0 and request.split == "train"
            reached = self.point == "exit-in-transfer" and self.transfers == self.count and request.offset > 0
        else:
            self.requests += 1
            reached = self.point == "exit-at-request" and self.requests == self.count
        if reached:
            os._exit(EXIT_CODE)
        return super().compute(request)


FAULTS = ("skew", "flip", "permute", "stale", "zeros", "rows")
EXITS = ("exit-at-request", "exit-in-transfer")
EXIT_CODE = 9  # as if killed: not 0, so a test can tell the fault fired


def faulty_state(fault: str):
    """The worker state of a fault: MODE for a wrong answer, EXIT:N for a death; ValueError otherwise."""
    mode, _, count = fault.partition(":")
    if mode in FAULTS and not count:
        return lambda dtype, divisor, wire: FaultyWorkerState(dtype, divisor, wire, mode)
    if mode in EXITS and count.isdigit() and int(count) >= 1:
        return lambda dtype, divisor, wire: ExitingWorkerState(dtype, divisor, wire, mode, int(count))
    raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}, or {':N, '.join(EXITS)}:N")

