"""The coordinator's bookkeeping: who is admitted in which slot, and which request is outstanding where.

Events in, actions out, no sockets: the transport turns frames into events and carries out actions.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from common.protocol import Failure, Register, Reject, Result


@dataclass(frozen=True)
class Arrived:
    """A peer's frame passed the protocol's gate."""

    peer: bytes
    message: object
    at: float = 0.0  # seconds on the transport's monotonic clock


@dataclass(frozen=True)
class Garbled:
    """A peer's frame failed the protocol's gate."""

    peer: bytes
    reason: str


@dataclass(frozen=True)
class Send:
    peer: bytes
    message: object


@dataclass(frozen=True)
class Admit:
    """Welcome a worker into a slot and give it that slot's shards."""

    peer: bytes
    slot: int
    name: str


@dataclass(frozen=True)
class Disconnect:
    """Forget a peer, for a reason worth logging."""

    peer: bytes
    reason: str


@dataclass(frozen=True)
class Expected:
    """What a valid answer to a request holds: product names and their shapes."""

    shapes: dict  # name -> shape


@dataclass
class Worker:
    name: str
    slot: int
    answered: int = 0
    last_round_trip: float | None = None  # seconds from sending its last request to its answer
    busy_seconds: float = 0.0  # all its round trips added up


@dataclass
class Outstanding:
    peer: bytes
    slot: int
    expected: Expected
    sent_at: float


@dataclass
class Scheduler:
    """Admits up to `capacity` workers and tracks one scatter/gather round at a time."""

    capacity: int
    version: int
    dtype: np.dtype
    workers: dict = field(default_factory=dict)  # peer -> Worker
    outstanding: dict = field(default_factory=dict)  # request number -> Outstanding
    results: dict = field(default_factory=dict)  # slot -> products of the current round
    lost: dict = field(default_factory=dict)  # slot -> why its worker was dropped
    next_request: int = 1

    @property
    def full(self) -> bool:
        return len(self.workers) == self.capacity

    @property
    def round_done(self) -> bool:
        return not self.outstanding

    def peer_of(self, slot: int) -> bytes:
        return next(peer for peer, worker in self.workers.items() if worker.slot == slot)

    def start_round(self, requests: dict, now: float = 0.0) -> list:
        """Number each slot's request and send it; `requests` maps slot -> (message, Expected)."""
        self.results, actions = {}, []
        for slot, (message, expected) in requests.items():
            peer = self.peer_of(slot)
            self.outstanding[self.next_request] = Outstanding(peer, slot, expected, now)
            actions.append(Send(peer, dataclasses.replace(message, request=self.next_request)))
            self.next_request += 1
        return actions

    def handle(self, event) -> list:
        if isinstance(event, Garbled):
            return self._drop(event.peer, f"sent a bad frame: {event.reason}")
        message = event.message
        if isinstance(message, Register):
            return self._register(event.peer, message)
        if event.peer not in self.workers:
            return [Disconnect(event.peer, f"sent {type(message).__name__} without registering")]
        if isinstance(message, Result):
            return self._result(event.peer, message, event.at)
        if isinstance(message, Failure):
            return self._drop(event.peer, f"failed request {message.request}: {message.reason}")
        return self._drop(event.peer, f"sent a {type(message).__name__}, which workers do not send")

    def _register(self, peer: bytes, message: Register) -> list:
        if peer in self.workers:
            return []  # a repeated registration that crossed our welcome
        if message.version != self.version:
            reason = f"protocol version {message.version} is not the coordinator's {self.version}"
            return [Send(peer, Reject(reason)), Disconnect(peer, reason)]
        if self.full:
            return [Send(peer, Reject("the cluster is full")), Disconnect(peer, "arrived when full")]
        slot = min(set(range(self.capacity)) - {w.slot for w in self.workers.values()})
        self.workers[peer] = Worker(message.name, slot)
        return [Admit(peer, slot, message.name)]

    def _result(self, peer: bytes, message: Result, at: float) -> list:
        pending = self.outstanding.get(message.request)
        if pending is None or pending.peer != peer:
            return self._drop(peer, f"answered request {message.request}, which it was not given")
        problem = self._invalid(message.products, pending.expected)
        if problem:
            return self._drop(peer, f"request {message.request}: {problem}")
        del self.outstanding[message.request]
        self.results[pending.slot] = message.products
        worker = self.workers[peer]
        worker.answered += 1
        worker.last_round_trip = at - pending.sent_at
        worker.busy_seconds += worker.last_round_trip
        return []

    def _invalid(self, products: dict, expected: Expected) -> str:
        """Why a result does not answer its request, or ''."""
        if set(products) != set(expected.shapes):
            return f"products {sorted(products)} instead of {sorted(expected.shapes)}"
        for name, array in products.items():
            if array.dtype != self.dtype or array.shape != expected.shapes[name]:
                return f"{name} is {array.dtype}{list(array.shape)}, not {self.dtype}{list(expected.shapes[name])}"
            if not np.isfinite(array).all():
                return f"{name} holds NaN or infinity"
        return ""

    def _drop(self, peer: bytes, reason: str) -> list:
        worker = self.workers.pop(peer, None)
        if worker is not None:
            self.lost[worker.slot] = f"worker {worker.name} {reason}"
            self.outstanding = {n: o for n, o in self.outstanding.items() if o.peer != peer}
        return [Disconnect(peer, reason)]
