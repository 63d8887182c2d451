"""The coordinator's bookkeeping: who is admitted in which slot, who is alive, and which request is
outstanding where.

Events in, actions out, no sockets: the transport turns frames and clock ticks into events and
carries out the actions. A worker is lost when it falls silent for the heartbeat timeout, leaves a
request unanswered past its deadline, cannot be reached, deregisters, or sends anything that is not
a valid answer; its slot is then reported in `lost` for the caller to reassign. A worker that
registers again under its own name (it heard nothing from us for a while) keeps its slot on the new
connection; its slot is reported in `lost` too, so that the round, and whatever the worker kept from
earlier rounds, is sent again.

A name is no proof of who registers. With CURVE a worker's key is bound to the name of its allow-list
file, so a registration under its name is that worker. Without CURVE a registration under the name of a
worker on another connection is a `Claim` that waits: it takes over once the old connection is dropped
(a restarted worker's falls silent or cannot be reached), and is refused if the old connection shows
life first. Either comes within the heartbeat timeout.
"""

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from common import settings
from common.protocol import WIRE_PRODUCTS, Deregister, Failure, Heartbeat, Register, RegisterAgain, Reject, Result


BFLOAT16_EXPONENT = 0x7F80  # the exponent bits of a bfloat16
MAX_REMEMBERED_PEERS = 10_000  # connections kept in the replaced and told-to-register sets before they are cleared


@dataclass(frozen=True)
class Arrived:
    """A peer's frame passed the protocol's gate."""

    peer: bytes
    message: object
    at: float = 0.0  # seconds on the transport's monotonic clock
    key: str | None = None  # the peer's CURVE public key (z85), when the socket authenticates


@dataclass(frozen=True)
class Garbled:
    """A peer's frame failed the protocol's gate."""

    peer: bytes
    reason: str


@dataclass(frozen=True)
class Unreachable:
    """A send to the peer failed: its connection is gone."""

    peer: bytes


@dataclass(frozen=True)
class Tick:
    """Time passed."""

    now: float


@dataclass(frozen=True)
class Send:
    peer: bytes
    message: object


@dataclass(frozen=True)
class Admit:
    """Welcome a worker into a slot (None: as a standby); `again` when it registered again on a new connection."""

    peer: bytes
    slot: int | None
    name: str
    again: bool = False


@dataclass(frozen=True)
class Disconnect:
    """A worker was dropped, for a reason worth logging."""

    peer: bytes
    reason: str


@dataclass(frozen=True)
class Refused:
    """A frame from a peer that is not an admitted worker was dropped (strangers can send many: summarise)."""

    peer: bytes
    reason: str


@dataclass(frozen=True)
class Expected:
    """What a valid answer to a request holds: product names and their shapes."""

    shapes: dict  # name -> shape


@dataclass
class Worker:
    name: str
    slot: int | None  # None: a standby, admitted but holding no columns yet
    last_seen: float
    key: str | None = None  # its CURVE public key, when the socket authenticates
    answered: int = 0
    last_round_trip: float | None = None  # seconds from sending its last request to its answer
    busy_seconds: float = 0.0  # all its round trips added up
    left: str | None = None  # why it was dropped, once it was


@dataclass(frozen=True)
class Claim:
    """A registration under the name of a worker on another connection, waiting for that connection to end."""

    peer: bytes
    name: str
    since: float


@dataclass
class Outstanding:
    slot: int
    expected: Expected
    sent_at: float


@dataclass
class Scheduler:
    """Admits `capacity` workers into slots, `replicas` to a slot (later ones wait as standbys), and tracks
    one round at a time."""

    capacity: int
    version: int
    dtype: np.dtype
    heartbeat_timeout: float = settings.HEARTBEAT_TIMEOUT
    replicas: int = 1
    former_slots: dict = field(default_factory=dict)  # name -> the slot it held before a resume, or before it was lost
    key_names: dict = field(default_factory=dict)  # CURVE public key (z85) -> the one name it may register as
    workers: dict = field(default_factory=dict)  # peer -> Worker
    departed: dict = field(default_factory=dict)  # peer -> Worker dropped after answering, for the records
    outstanding: dict = field(default_factory=dict)  # peer -> its Outstanding request of the current round
    results: dict = field(default_factory=dict)  # slot -> [(Worker, products)] of the current round
    reported: set = field(default_factory=set)  # slots of the round already returned by newly_settled
    lost: dict = field(default_factory=dict)  # slot -> why its worker was dropped, until taken
    round_number: int = 0  # every request of the current round carries it; answers to lower ones are late
    last_heartbeat: float = float("-inf")
    started: bool = False  # once all slots were filled, a lost slot is reassigned, not reopened
    wire_dtype: np.dtype | None = None  # of the products in WIRE_PRODUCTS; the run's dtype when exact

    def __post_init__(self):
        slots = self.capacity // self.replicas
        self.open_slots = [slot for _ in range(self.replicas) for slot in range(slots)]  # one of each first
        self.banned = set()  # names and CURVE keys of quarantined workers
        self.wire_dtype = self.dtype if self.wire_dtype is None else self.wire_dtype
        self.replaced = set()  # old connections of workers that registered again
        self.answer_times = {}  # slot -> its recent answers' round trips, in seconds, which set its deadline
        self.told_to_register = set()  # strangers already told to register again, so each is told once
        self.claims = {}  # name -> the Claim waiting for that name's connection to end
        self.clock = 0.0  # the latest time an event carried, for events that carry none
        self.event_handlers = {
            Tick: lambda event: self._tick(event.now),
            Unreachable: self._unreachable,
            Garbled: lambda event: self._drop(event.peer, f"sent a bad frame: {event.reason}"),
            Arrived: self._arrived,
        }
        self.message_handlers = {  # (peer, message, arrival time) -> actions, for admitted workers
            Heartbeat: lambda peer, message, at: [],  # its arrival was the sign of life
            Result: self._result,
            Failure: self._failure,
            Deregister: lambda peer, message, at: self._drop(peer, f"left: {message.reason}"),
        }

    @property
    def ready(self) -> bool:
        return not self.open_slots

    @property
    def round_done(self) -> bool:
        return not self.outstanding

    @property
    def standbys(self) -> list:
        return [peer for peer, worker in self.workers.items() if worker.slot is None]

    def peers_of(self, slot: int) -> list:
        return [peer for peer, worker in self.workers.items() if worker.slot == slot]

    def former_slot(self, peer: bytes) -> int | None:
        """The slot an admitted worker held before it was lost (or before a resume), if any."""
        return self.former_slots.get(self.workers[peer].name)

    def standby_for(self, slot: int) -> bytes | None:
        """A standby that held this slot before it was lost, back under its name: it should get the slot again."""
        return next((peer for peer in self.standbys if self.former_slot(peer) == slot), None)

    def assign(self, peer: bytes, slot: int) -> None:
        self.workers[peer].slot = slot

    def peer_of(self, worker: Worker) -> bytes | None:
        """The connection a worker uses now (it may have registered again since it answered), or None if it left."""
        return next((peer for peer, admitted in self.workers.items() if admitted is worker), None)

    def quarantine(self, worker: Worker, reason: str) -> list:
        """Drop a worker caught computing wrongly, if it has not left already, and refuse its name and key for
        the rest of the run."""
        self.banned |= {worker.name, worker.key} - {None}
        claim = self.claims.pop(worker.name, None)
        refused = [] if claim is None else self._refuse(claim.peer, f"{worker.name} is quarantined")
        peer = self.peer_of(worker)
        return refused + ([] if peer is None else self._drop(peer, f"is quarantined: {reason}"))

    def take_lost(self) -> dict:
        lost, self.lost = self.lost, {}
        return lost

    def start_round(self, requests: dict, now: float) -> list:
        """Send each slot's request to each of the slot's workers; `requests` maps slot -> (message, Expected)."""
        return self.start_sends(
            {peer: (slot, message, expected) for slot, (message, expected) in requests.items() for peer in self.peers_of(slot)},
            now,
        )

    def start_sends(self, sends: dict, now: float) -> list:
        """A round of one request to each of some workers; `sends` maps peer -> (slot, message, Expected).

        Every request of the round carries the round's number, so a message object meant for several workers
        stays one message (and the transport encodes it once).
        """
        self.round_number += 1
        self.results, self.outstanding, self.reported = {}, {}, set()
        numbered, actions = {}, []  # id(message) -> the message with the round's number
        for peer, (slot, message, expected) in sends.items():
            self.outstanding[peer] = Outstanding(slot, expected, now)
            if id(message) not in numbered:
                numbered[id(message)] = dataclasses.replace(message, request=self.round_number)
            actions.append(Send(peer, numbered[id(message)]))
        return actions

    def newly_settled(self) -> list:
        """The round's slots whose every worker has answered (or left, a replica answering), each returned once."""
        waiting = {pending.slot for pending in self.outstanding.values()}
        settled = [slot for slot in self.results if slot not in waiting and slot not in self.reported]
        self.reported.update(settled)
        return settled

    def handle(self, event) -> list:
        """The actions an event calls for: each kind of event, and of worker message, has its handler."""
        return self.event_handlers[type(event)](event)

    def _arrived(self, event: Arrived) -> list:
        message = event.message
        self.clock = max(self.clock, event.at)
        if isinstance(message, Register):  # the one message a peer may send before it is admitted
            return self._register(event.peer, message, event.at, event.key)
        if event.peer not in self.workers:
            return self._stranger(event.peer, f"sent {type(message).__name__} without registering")
        worker = self.workers[event.peer]
        worker.last_seen = event.at
        refused = self._refuse_claim_on(worker, event.at)
        return refused + self.message_handlers.get(type(message), self._unexpected)(event.peer, message, event.at)

    def _unreachable(self, event: Unreachable) -> list:
        """A failed send drops a worker, or withdraws a claim; to a peer already dropped (a second send of the same
        batch) it says nothing, as no frame of the peer's was refused."""
        if event.peer in self.workers:
            return self._drop(event.peer, "cannot be reached")
        self.claims = {name: claim for name, claim in self.claims.items() if claim.peer != event.peer}
        return []

    def _failure(self, peer: bytes, message: Failure, at: float) -> list:
        if message.request < self.round_number:
            return []  # a failure in an abandoned round, which was sent again (perhaps differently)
        return self._drop(peer, f"failed request {message.request}: {message.reason}")

    def _unexpected(self, peer: bytes, message, at: float) -> list:
        return self._drop(peer, f"sent a {type(message).__name__}, which workers do not send")

    def _register(self, peer: bytes, message: Register, now: float, key: str | None) -> list:
        if peer in self.workers or any(claim.peer == peer for claim in self.claims.values()):
            return []  # a repeated registration that crossed our welcome, or that waits as a claim
        problem = self._registration_problem(message, key)
        if problem:
            return self._refuse(peer, problem)
        holder = next((held for held, worker in self.workers.items() if worker.name == message.name), None)
        if holder is not None and key is not None:  # its key is bound to the name: the same worker, for certain
            return self._replace(self.workers.pop(holder), holder, peer)
        if holder is not None:
            self.claims[message.name] = Claim(peer, message.name, now)
            return []
        if len(self.standbys) >= settings.MAX_STANDBY_WORKERS:
            return self._refuse(peer, "no room for more workers")
        slot = self._open_slot_for(message.name)
        self.workers[peer] = Worker(message.name, slot, last_seen=now, key=key)
        return [Admit(peer, slot, message.name)]

    def _registration_problem(self, message: Register, key: str | None) -> str:
        """Why a registration is refused whoever holds its name, or ''."""
        if message.version != self.version:
            return f"protocol version {message.version} is not the coordinator's {self.version}"
        if message.name in self.banned or key in self.banned:
            return f"{message.name} is quarantined"
        if key is not None and self.key_names.get(key) != message.name:
            return f"its key is allowed as worker {self.key_names.get(key)}, not as {message.name}"
        if message.name in self.claims:
            return f"another registration as {message.name} is waiting for that worker's connection to end"
        return ""

    def _replace(self, worker: Worker, old: bytes, peer: bytes) -> list:
        """The same worker on a new connection: it keeps its slot and its record, and starts afresh (new shards,
        and any request it had outstanding is sent again)."""
        worker.last_seen = self.clock
        self.workers[peer] = worker
        _remember(self.replaced, old)
        self.outstanding.pop(old, None)
        if self.started and worker.slot is not None:  # its round, and the operands it kept, went with the old one
            self.lost[worker.slot] = f"worker {worker.name} registered again"
        return [Admit(peer, worker.slot, worker.name, again=True)]

    def _refuse_claim_on(self, worker: Worker, now: float) -> list:
        """A message from a worker whose name is claimed, past the claim's grace, shows it lives: the claim is refused."""
        claim = self.claims.get(worker.name)
        if claim is None or now - claim.since <= settings.CLAIM_GRACE:
            return []
        del self.claims[worker.name]
        return self._refuse(claim.peer, f"worker {worker.name} is connected, and alive, on another connection")

    def _refuse(self, peer: bytes, reason: str) -> list:
        return [Send(peer, Reject(reason)), Refused(peer, f"refused a registration: {reason}")]

    def _stranger(self, peer: bytes, reason: str) -> list:
        """A message from a peer that is not admitted: a replaced connection is refused, others are told once
        to register again (the coordinator restarted, or dropped them)."""
        if peer in self.replaced:
            return [Send(peer, Reject("this worker registered again on another connection")), Refused(peer, reason)]
        if peer in self.told_to_register:
            return [Refused(peer, reason)]
        _remember(self.told_to_register, peer)
        return [Send(peer, RegisterAgain("the coordinator does not know this connection")), Refused(peer, reason)]

    def _open_slot_for(self, name: str) -> int | None:
        """A free slot: the one this worker held before a resume (so it sees no new columns), else one that
        no returning worker will want, else any."""
        if not self.open_slots:
            return None
        unclaimed = [slot for slot in self.open_slots if slot not in self.former_slots.values()]
        former = self.former_slots.get(name)
        slot = former if former in self.open_slots else (unclaimed or self.open_slots)[0]
        self.open_slots.remove(slot)
        return slot

    def _tick(self, now: float) -> list:
        self.clock = max(self.clock, now)
        actions = []
        if now - self.last_heartbeat >= settings.HEARTBEAT_INTERVAL:
            self.last_heartbeat = now
            heartbeat = Heartbeat()  # one message for all: the transport encodes it once
            actions += [Send(peer, heartbeat) for peer in [*self.workers, *(c.peer for c in self.claims.values())]]
        for peer, worker in list(self.workers.items()):
            if now - worker.last_seen > self.heartbeat_timeout:
                actions += self._drop(peer, f"silent for {now - worker.last_seen:.1f} s")
        for peer, pending in list(self.outstanding.items()):
            deadline = self.deadline(pending.slot)
            if now - pending.sent_at > deadline and peer in self.workers:
                actions += self._drop(peer, f"left a request unanswered for {deadline:g} s")
        return actions

    def deadline(self, slot: int) -> float:
        """Seconds a request of this slot may take: a multiple of its slowest recent answer, within the floor and the
        deadline; the deadline itself until the slot has answered."""
        recent = self.answer_times.get(slot)
        if not recent:
            return settings.REQUEST_DEADLINE
        return min(settings.REQUEST_DEADLINE, max(settings.REQUEST_DEADLINE_FLOOR,
                                                  settings.REQUEST_DEADLINE_FACTOR * max(recent)))

    def _result(self, peer: bytes, message: Result, at: float) -> list:
        if message.request < self.round_number:
            return []  # an answer to an abandoned round, which was sent again
        pending = self.outstanding.get(peer)
        if pending is None or message.request != self.round_number:
            return self._drop(peer, f"answered request {message.request}, which it was not given")
        problem = self._invalid(message.products, pending.expected)
        if problem:
            return self._drop(peer, f"request {message.request}: {problem}")
        del self.outstanding[peer]
        worker = self.workers[peer]
        self.results.setdefault(pending.slot, []).append((worker, message.products))
        if pending.expected.shapes:  # a receipt for a shard chunk is no computed answer
            worker.answered += 1
            worker.last_round_trip = at - pending.sent_at
            worker.busy_seconds += worker.last_round_trip
            self.answer_times.setdefault(pending.slot, deque(maxlen=settings.RECENT_ANSWERS)).append(
                worker.last_round_trip)
        return []

    def _invalid(self, products: dict, expected: Expected) -> str:
        """Why a result does not answer its request, or ''."""
        if set(products) != set(expected.shapes):
            return f"products {sorted(products)} instead of {sorted(expected.shapes)}"
        for name, array in products.items():
            dtype = self.wire_dtype if name in WIRE_PRODUCTS else self.dtype
            if array.dtype != dtype or array.shape != expected.shapes[name]:
                return f"{name} is {array.dtype}{list(array.shape)}, not {dtype}{list(expected.shapes[name])}"
            if not _finite(array):
                return f"{name} holds NaN or infinity"
        return ""

    def _drop(self, peer: bytes, reason: str) -> list:
        worker = self.workers.pop(peer, None)
        if worker is None:
            return [Refused(peer, reason)]
        reason = f"worker {worker.name} {reason}"
        self.outstanding.pop(peer, None)
        claim = self.claims.pop(worker.name, None)
        if claim is not None:  # the registration waited for this connection to end: it is the worker now
            return [Disconnect(peer, reason), *self._replace(worker, peer, claim.peer)]
        worker.left = reason
        if worker.answered:  # peers that never computed anything, hostile ones included, leave no record
            self.departed[peer] = worker
        if worker.slot is not None and not self.started:
            self.open_slots.insert(0, worker.slot)
        elif worker.slot is not None and not self.peers_of(worker.slot):  # its replicas carry on otherwise
            self.lost[worker.slot] = reason
        if worker.slot is not None and self.started:  # if it registers again, it should get the slot back
            self.former_slots[worker.name] = worker.slot
        return [Disconnect(peer, reason)]


def _remember(peers: set, peer: bytes) -> None:
    """Add a peer to a set that strangers could otherwise grow without bound."""
    if len(peers) >= MAX_REMEMBERED_PEERS:
        peers.clear()
    peers.add(peer)


def _finite(array: np.ndarray) -> bool:
    """Whether every element is finite, in one BLAS pass: a NaN or infinity makes the sum of squares one too;
    only when the squares overflow are the elements looked at one by one."""
    if array.dtype == np.uint16:  # bfloat16's bits: an exponent of all ones is an infinity or a NaN
        return not np.any((array & BFLOAT16_EXPONENT) == BFLOAT16_EXPONENT)
    flat = array.reshape(-1)
    return bool(np.isfinite(flat @ flat)) or bool(np.isfinite(flat).all())
