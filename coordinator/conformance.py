"""Conformance checks for a worker written in any language (docs/PROTOCOL.md): the library under
`coordinator conformance`.

A Probe binds a ROUTER as a coordinator would and waits for one worker; `run_checks` then drives it
through the protocol with small known operands (registration, chunked shards, every compute request,
register_again with a new dtype, a bad request, an idle spell, stop) and judges each step. The expected
products come from common/model.py, the same functions the coordinator's one-process run uses.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common import model, protocol, settings
from common.protocol import (
    Failure, FirstLayer, Heartbeat, KeptFirstLayer, Register, RegisterAgain, Reject, Result, ReturnRows, LaterBackward,
    LaterForward, Shard, Stop, Welcome,
)
from coordinator.shards import chunk_rows
from coordinator.transport import RouterTransport

ANSWER_TIMEOUT = 5.0  # seconds to wait for an answer: the operands are tiny, so nearly all of this is slack
IDLE_SECONDS = 2.5  # the heartbeat check's idle spell: five of the worker's heartbeat intervals
LONGEST_SILENCE = settings.HEARTBEAT_TIMEOUT / 2  # an idle worker this quiet is one late packet from being dropped
STOP_SILENCE = 2.0  # seconds a stopped worker must stay quiet: four of its heartbeat intervals
CROSSING_TIME = 0.2  # seconds after our stop in which a message may have crossed it on the way, not ignored it
ROUNDING = 1000  # allowed error, in units of the dtype's epsilon times the largest expected value
COLUMNS, HIDDEN, UNITS, OUTPUTS = 6, 5, 4, 3  # k, H, j, O of the known operands
LATER_LAYERS = {2: (UNITS, HIDDEN), 3: (HIDDEN - 2, OUTPUTS)}  # layer -> (units j of its input, its outputs)
SPLIT_ROWS = {"train": 10, "test": 7}
CHUNK_ROWS = 4  # rows per shard chunk: several chunks per split
ANY_SIZE = -1  # ZMQ_MAXMSGSIZE's "no limit": a frame too large is the worker's defect to report, not to cut


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


class Probe:
    """A coordinator's socket (coordinator.transport) for one worker: numbered requests, its answers, and heartbeats
    while waiting."""

    def __init__(self, bind: str, context=None):
        self.transport = RouterTransport(bind, ANY_SIZE, context)
        self.endpoint = self.transport.endpoint
        self.peer = None  # the worker's identity, once it registered
        self.heartbeating = True  # we stop heartbeating after our stop, as a coordinator would
        self.next_heartbeat = 0.0
        self.next_request = 1

    def close(self) -> None:
        self.transport.close()

    def wait_for_registration(self, timeout: float):
        """The first Register from any peer, or None; its sender becomes the worker under test."""
        deadline = time.monotonic() + timeout
        while (arrived := self._receive(deadline, any_peer=True)) is not None:
            peer, message = arrived
            if isinstance(message, Register):
                self.peer = peer
                return message
        return None

    def send(self, message) -> None:
        self.transport.send(self.peer, protocol.encode(message))  # a worker gone is found by the wait for its answer

    def request(self, message):
        """Send a request under a fresh number; the worker's answer to it (Result, Failure, or a ProtocolError),
        or None after ANSWER_TIMEOUT."""
        number, self.next_request = self.next_request, self.next_request + 1
        self.send(dataclasses.replace(message, request=number))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while (message := self.next_message(deadline)) is not None:
            if isinstance(message, protocol.ProtocolError) or getattr(message, "request", None) == number:
                return message
        return None

    def next_message(self, deadline: float):
        """The worker's next message (a ProtocolError for a bad frame), or None at the deadline."""
        arrived = self._receive(deadline)
        return None if arrived is None else arrived[1]

    def _receive(self, deadline: float, any_peer: bool = False):
        """(peer, message) of the next frame from the worker (from anyone with `any_peer`), heartbeating meanwhile."""
        while True:
            now = time.monotonic()
            if self.peer is not None and self.heartbeating and now >= self.next_heartbeat:
                self.send(Heartbeat())
                self.next_heartbeat = now + settings.HEARTBEAT_INTERVAL
            wake = min(deadline, self.next_heartbeat) if self.peer is not None and self.heartbeating else deadline
            if now >= deadline:
                return None
            incoming = self.transport.receive(math.ceil(max(0.0, wake - now) * 1000))
            if incoming is None:
                continue
            peer, frames = incoming.peer, incoming.frames
            if not any_peer and peer != self.peer:
                continue  # another program knocking: not the worker under test
            try:
                if len(frames) != 1:
                    raise protocol.ProtocolError(f"{len(frames)} frames instead of 1")
                return peer, protocol.decode(memoryview(frames[0]))
            except protocol.ProtocolError as error:
                return peer, error


@dataclass
class Operands:
    """Known images and operands in one dtype, and the products the protocol says they give."""

    dtype: str
    divisor: float
    images: dict  # split -> (n, k) uint8

    @classmethod
    def random(cls, dtype: str, divisor: float, seed: int) -> "Operands":
        rng = np.random.default_rng(seed)
        return cls(dtype, divisor, {split: rng.integers(0, 256, (rows, COLUMNS), np.uint8)
                                    for split, rows in SPLIT_ROWS.items()})

    def inputs(self, split: str) -> np.ndarray:
        return model.inputs(self.images[split], self.dtype, self.divisor)

    def array(self, rng: np.random.Generator, *shape) -> np.ndarray:
        return rng.standard_normal(shape).astype(self.dtype)


def shard_chunks(images: dict, rows_per_chunk: int) -> list:
    """Every split's images as Shard chunks, in order (request numbers are the Probe's to give)."""
    return [
        Shard(0, split, start, len(images[split]), images[split][start:stop])
        for split, start, stop in chunk_rows(images, rows_per_chunk)
    ]


def run_checks(probe: Probe, wait_timeout: float, report: Callable[[Check], None]) -> list:
    """Drive the worker that connects to `probe` through every check, reporting each as it is judged."""
    checks = []

    def judge(name: str, problem: str, success: str) -> None:
        checks.append(Check(name, not problem, problem or success))
        report(checks[-1])

    registration = probe.wait_for_registration(wait_timeout)
    judge("register", *_registration(probe, registration, wait_timeout))
    session = Session(probe, registration.name if registration else "")
    for name, step in session.steps():
        judge(name, *(step() if checks[0].passed else (f"not run: {checks[0].detail}", "")))
    return checks


def _registration(probe: Probe, registration, wait_timeout: float) -> tuple:
    """(problem or "", success text) of the registration; a wrong version is rejected, as by the coordinator."""
    if registration is None:
        return f"no worker registered within {wait_timeout:g} s", ""
    if registration.version != settings.PROTOCOL_VERSION:
        reason = f"protocol version {registration.version} is not the coordinator's {settings.PROTOCOL_VERSION}"
        probe.send(Reject(reason))
        return reason, ""
    return "", f"{registration.name!r} registered with protocol version {registration.version}"


class Session:
    """The checks after registration, in the order they run; each returns (problem or "", success text)."""

    def __init__(self, probe: Probe, name: str):
        self.probe = probe
        self.name = name
        self.rng = np.random.default_rng(15)
        self.operands = Operands.random("float64", 255.0, seed=1)
        self.later_operands = {}  # layer -> (activations, weights) of its last later_forward sent

    def steps(self) -> list:
        return [
            ("shards", self.shards),
            ("first_layer forward", lambda: self.first_layer(forward=True, gradient=False)),
            ("first_layer gradient", lambda: self.first_layer(forward=False, gradient=True)),
            ("first_layer gradient then forward", lambda: self.first_layer(forward=True, gradient=True)),
            ("kept rows", self.kept_rows),
            ("later_forward", self.later_forward),
            ("later_backward", self.later_backward),
            ("register_again", self.register_again),
            ("bad request", self.bad_request),
            ("heartbeats", self.heartbeats),
            ("stop", self.stop),
        ]

    def shards(self) -> tuple:
        """A transfer of wrong pixels cut short, then the real one restarted at offset 0 with one chunk repeated:
        the products that follow show whether the worker kept the right rows."""
        cut_short = shard_chunks({"train": 255 - self.operands.images["train"]}, CHUNK_ROWS)[:2]
        chunks = [*cut_short, *shard_chunks(self.operands.images, CHUNK_ROWS)]
        chunks.insert(len(cut_short) + 2, chunks[len(cut_short) + 1])  # sent again, as after an abandoned round
        problem = self._welcome_and_send(chunks)
        return problem, f"{len(chunks)} chunks (a restart at offset 0, a repeat) each answered by an empty result"

    def first_layer(self, forward: bool, gradient: bool) -> tuple:
        operands, rng = self.operands, self.rng
        split = "test" if forward and not gradient else "train"
        rows = np.array([6, 0, 3, 3], np.int32) if forward else None
        weights = operands.array(rng, COLUMNS, HIDDEN) if forward else None
        error_rows = np.array([1, 9, 4, 4, 0], np.int32) if gradient else None
        error = operands.array(rng, len(error_rows), HIDDEN) if gradient else None
        learning_rate = 0.7
        expected_gradient, _, expected_partial = model.first_layer(
            weights, None if rows is None else operands.inputs(split)[rows],
            None if error_rows is None else operands.inputs("train")[error_rows], error, learning_rate,
        )
        expected = {name: array for name, array in (("gradient", expected_gradient), ("partial", expected_partial))
                    if array is not None}
        answer = self.probe.request(FirstLayer(0, weights, split, rows, error_rows, error, learning_rate))
        return _answer_problem(answer, expected, operands.dtype), f"{_shapes(expected)} as expected"

    def kept_rows(self) -> tuple:
        """A re-key with two steps and a forward product, then the rows the worker kept, stepped by both."""
        operands, rng, learning_rate = self.operands, self.rng, 0.7
        kept = operands.array(rng, COLUMNS, HIDDEN)
        error_rows = [np.array(rows, np.int32) for rows in ([1, 9, 4], [0, 2, 2, 7])]
        errors = [operands.array(rng, len(rows), HIDDEN) for rows in error_rows]
        rows = np.array([5, 1], np.int32)
        requests = [KeptFirstLayer(0, kept, "train", None, error_rows[0], errors[0], learning_rate),
                    KeptFirstLayer(0, None, "test", rows, error_rows[1], errors[1], learning_rate)]
        for request in requests:
            forward_inputs = None if request.rows is None else operands.inputs(request.split)[request.rows]
            _, kept, partial = model.first_layer(kept, forward_inputs, operands.inputs("train")[request.error_rows],
                                                 request.error, learning_rate)
            expected = {} if partial is None else {"partial": partial}
            problem = _answer_problem(self.probe.request(request), expected, operands.dtype)
            if problem:
                return f"kept_first_layer: {problem}", ""
        problem = _answer_problem(self.probe.request(ReturnRows(0)), {"weights": kept}, operands.dtype)
        return problem and f"return_rows: {problem}", "a re-key, two steps and a forward product on the kept rows"

    def later_forward(self) -> tuple:
        """Two later layers' forward products, one after the other, as a network with two hidden layers sends them."""
        for layer, (units, outputs) in LATER_LAYERS.items():
            activations = self.rng.uniform(0, 1, (4, units)).astype(self.operands.dtype)
            weights = self.operands.array(self.rng, units, outputs)
            self.later_operands[layer] = (activations, weights)
            expected = {"partial": model.later_forward(activations, weights)}
            problem = _answer_problem(self.probe.request(LaterForward(0, layer, activations, weights)), expected,
                                      self.operands.dtype)
            if problem:
                return f"layer {layer}: {problem}", ""
        return "", f"layers {', '.join(map(str, LATER_LAYERS))}: partial products as expected"

    def later_backward(self) -> tuple:
        """The two layers' backward products, the last layer first: each from the operands the worker kept of that
        layer's later_forward, not of the last one."""
        for layer in sorted(self.later_operands, reverse=True):
            activations, weights = self.later_operands[layer]
            error = self.operands.array(self.rng, len(activations), weights.shape[1])
            gradient, backpropagated = model.later_backward(activations, weights, error)
            expected = {"gradient": gradient, "error": backpropagated}
            problem = _answer_problem(self.probe.request(LaterBackward(0, layer, error)), expected, self.operands.dtype)
            if problem:
                return f"layer {layer}: {problem}", ""
        return "", f"layers {', '.join(map(str, sorted(self.later_operands, reverse=True)))}: gradients and errors, " \
                   "each from its own layer's kept operands"

    def register_again(self) -> tuple:
        """register_again, then a new session in float32 with raw pixels: the worker must forget the old one."""
        self.probe.send(RegisterAgain("the conformance checks start a new session"))
        deadline = time.monotonic() + ANSWER_TIMEOUT
        message = self.probe.next_message(deadline)
        while message is not None and not isinstance(message, Register):
            message = self.probe.next_message(deadline)
        if message is None:
            return f"no register within {ANSWER_TIMEOUT:g} s of register_again", ""
        if message.name != self.name:
            return f"registered again as {message.name!r}, not {self.name!r}", ""
        self.operands = Operands.random("float32", 1.0, seed=2)
        problem = self._welcome_and_send(shard_chunks(self.operands.images, CHUNK_ROWS))
        problem = problem or self.first_layer(forward=True, gradient=True)[0]
        return problem, "registered again, took new shards and computed in the new welcome's float32"

    def bad_request(self) -> tuple:
        rows = np.array([SPLIT_ROWS["train"] + 5], np.int32)  # past the end of the split
        weights = np.zeros((COLUMNS, HIDDEN), self.operands.dtype)
        answer = self.probe.request(FirstLayer(0, weights, "train", rows, None, None, 1.0))
        if isinstance(answer, Failure):
            return "", f"rows out of range answered by a failure ({answer.reason})"
        return f"rows out of range answered by {_described(answer)}, not a failure", ""

    def heartbeats(self) -> tuple:
        """An idle spell: the worker must speak often enough for the coordinator not to drop it."""
        start = last = time.monotonic()
        end, heartbeats, longest, others = start + IDLE_SECONDS, 0, 0.0, []
        while (message := self.probe.next_message(end)) is not None:
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            if isinstance(message, Heartbeat):
                heartbeats += 1
            else:
                others.append(_described(message))
        longest = max(longest, end - last)
        summary = f"{heartbeats} heartbeats in {IDLE_SECONDS:g} s idle, longest silence {longest:.2f} s"
        if others:
            return f"{summary}; also sent {', '.join(others)}", ""
        if longest > LONGEST_SILENCE:
            return f"{summary} (more than {LONGEST_SILENCE:g} s)", ""
        return "", summary

    def stop(self) -> tuple:
        """After a stop the worker must fall silent; what it sent before it read the stop may still arrive."""
        self.probe.send(Stop("the conformance checks are done"))
        self.probe.heartbeating = False
        sent = time.monotonic()
        while (message := self.probe.next_message(sent + STOP_SILENCE)) is not None:
            if time.monotonic() - sent > CROSSING_TIME:
                return f"sent {_described(message)} {time.monotonic() - sent:.2f} s after stop", ""
        return "", f"silent for {STOP_SILENCE:g} s after stop"

    def _welcome_and_send(self, chunks: list) -> str:
        """Welcome the worker in slot 0 and send it shard chunks; the first problem, or ""."""
        self.probe.send(Welcome(0, self.operands.dtype, self.operands.divisor, "exact"))
        for chunk in chunks:
            problem = _answer_problem(self.probe.request(chunk), {}, self.operands.dtype)
            if problem:
                return f"chunk at {chunk.split} row {chunk.offset}: {problem}"
        return ""


def _answer_problem(answer, expected: dict, dtype: str) -> str:
    """Why an answer is not a result holding exactly the expected products, or ""."""
    if not isinstance(answer, Result):
        return f"answered by {_described(answer)}, not a result"
    if set(answer.products) != set(expected):
        return f"products {sorted(answer.products)} instead of {sorted(expected)}"
    for name, want in expected.items():
        got = answer.products[name]
        if got.dtype != np.dtype(dtype) or got.shape != want.shape:
            return f"{name} is {got.dtype}{list(got.shape)}, expected {dtype}{list(want.shape)}"
        allowed = ROUNDING * np.finfo(dtype).eps * max(1.0, float(np.abs(want).max(initial=0)))
        if not np.all(np.abs(got - want) <= allowed):
            return f"{name} differs from the expected product by up to {float(np.abs(got - want).max()):.3g}"
    return ""


def _shapes(products: dict) -> str:
    return ", ".join(f"{name} {list(array.shape)}" for name, array in products.items()) or "no products"


def _described(message) -> str:
    if message is None:
        return f"nothing within {ANSWER_TIMEOUT:g} s"
    if isinstance(message, protocol.ProtocolError):
        return f"a bad frame ({message})"
    return f"a {protocol.KIND_OF[type(message)]}"
