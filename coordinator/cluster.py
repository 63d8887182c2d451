"""The coordinator's side of the wire: turns a transport's frames into scheduler events, carries out the
scheduler's actions, and runs scatter/gather rounds over the admitted workers."""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common import phases, protocol, settings
from common.errors import UserError
from common.protocol import Stop
from coordinator.scheduler import Admit, Arrived, Disconnect, Garbled, Refused, Scheduler, Send, Tick, Unreachable
from coordinator.transport import Incoming

log = logging.getLogger("coordinator")

TICK_INTERVAL = 0.1  # seconds between liveness checks: a tenth of a heartbeat interval is plenty
MAX_COUNTED_PEERS = 100_000  # distinct strangers counted for one summary line; past that the count saturates
MAX_FRAMES_BEFORE_TICK = 1000  # frames read before a due liveness check: a flood cannot stop the clock


class ClusterError(UserError):
    """The cluster cannot go on (all workers lost, none arriving); the text is one line for the user."""


class WorkerLost(Exception):
    """Workers were lost during a round; `lost` maps each of their slots to the reason."""

    def __init__(self, lost: dict):
        super().__init__("; ".join(lost.values()))
        self.lost = lost


@dataclass
class Traffic:
    """What crossed the socket: payload bytes each way (identity frames aside), per peer and in all."""

    rounds: int = 0
    sent: int = 0
    received: int = 0
    by_peer: dict = field(default_factory=dict)  # peer -> [sent, received]

    def count(self, peer: bytes | None, sent: int = 0, received: int = 0) -> None:
        """Add to the totals, and to a peer's own (None for strangers, so they cannot grow this table)."""
        self.sent, self.received = self.sent + sent, self.received + received
        if peer is None:
            return
        totals = self.by_peer.setdefault(peer, [0, 0])
        totals[0], totals[1] = totals[0] + sent, totals[1] + received


class Cluster:
    """Workers registered on a bound ROUTER, and scatter/gather rounds over them."""

    def __init__(self, transport, scheduler: Scheduler, welcome: Callable, clock=phases.NO_CLOCK):
        """`transport`: a coordinator.transport.RouterTransport, or anything with its methods; `clock`: a
        phases.PhaseClock that times encoding, sending, waiting, decoding and the scheduler's checks."""
        self.transport = transport
        self.clock = clock
        self.scheduler = scheduler
        self.welcome = welcome  # slot (-1 for a standby) -> the Welcome a newly admitted worker gets
        self.next_tick = 0.0
        self.traffic = Traffic()
        self.refusals = RefusalLog()

    @property
    def endpoint(self) -> str:
        return self.transport.endpoint

    def admit_workers(self, timeout: float) -> None:
        """Wait until every slot has a worker."""
        deadline = time.monotonic() + timeout
        while not self.scheduler.ready:
            if not self._pump(deadline):
                have, want = len(self.scheduler.workers), self.scheduler.capacity
                raise ClusterError(f"only {have} of {want} workers registered within {timeout:g} s")
        self.scheduler.started = True

    def send_round(self, requests: dict) -> None:
        """Send each slot its request (slot -> (message, Expected)); `gather` takes the answers.

        Raises WorkerLost if a worker was lost between rounds, when nothing was outstanding.
        """
        self.traffic.rounds += 1
        self._start(lambda now: self.scheduler.start_round(requests, now))

    @property
    def round_number(self) -> int:
        """The number the requests of the latest round carry."""
        return self.scheduler.round_number

    def run_sends(self, sends: dict) -> None:
        """A round of one request to each of some workers (peer -> (slot, message, Expected)), until all answered."""
        self._start(lambda now: self.scheduler.start_sends(sends, now))
        self.gather(lambda slot, answers: None)

    def _start(self, start: Callable) -> None:
        if self.scheduler.lost:
            raise WorkerLost(self.scheduler.take_lost())
        self._carry_out(start(time.monotonic()))

    def gather(self, on_settled: Callable) -> None:
        """Wait for the round's answers, handing each slot's to `on_settled(slot, [(Worker, products)])` as soon as
        every worker of the slot has answered, so that the caller's work on them overlaps the wait for the others.

        Raises WorkerLost as soon as any slot's worker is lost (`on_settled` may quarantine one); the caller
        reassigns and sends the round again.
        """
        while True:
            if self.scheduler.lost:
                raise WorkerLost(self.scheduler.take_lost())
            settled = self.scheduler.newly_settled()
            for slot in settled:
                on_settled(slot, self.scheduler.results[slot])
            if not settled:
                if self.scheduler.round_done:
                    return
                self._pump(time.monotonic() + TICK_INTERVAL)

    def idle(self, seconds: float) -> None:
        """Keep heartbeats going both ways for a while with no round under way."""
        deadline = time.monotonic() + seconds
        while self._pump(deadline):
            pass

    @property
    def standbys(self) -> list:
        """Admitted workers that hold no slot yet, in the order they came."""
        return self.scheduler.standbys

    @property
    def replicas(self) -> int:
        return self.scheduler.replicas

    def peers_of(self, slot: int) -> list:
        return self.scheduler.peers_of(slot)

    def take_lost(self) -> dict:
        """Slots lost since the last WorkerLost (slot -> why), taken: the caller recovers them."""
        return self.scheduler.take_lost()

    def standby_for(self, slot: int) -> bytes | None:
        return self.scheduler.standby_for(slot)

    def former_slot(self, peer: bytes) -> int | None:
        return self.scheduler.former_slot(peer)

    def wait_for_return(self, slots: list, timeout: float) -> None:
        """Keep serving the socket until the workers that held these slots are back as standbys, or for `timeout`."""
        deadline = time.monotonic() + timeout
        while any(self.standby_for(slot) is None for slot in slots) and self._pump(deadline):
            pass

    def name_of(self, peer: bytes) -> str:
        return self.scheduler.workers[peer].name

    def assign(self, peer: bytes, slot: int) -> None:
        """Give a standby a slot (its shards are the caller's to send)."""
        self.scheduler.assign(peer, slot)
        log.info("standby %s now serves slot %d", self.scheduler.workers[peer].name, slot)

    def quarantine(self, worker, reason: str) -> None:
        """Drop a Worker for the rest of the run (if it is still here) and refuse its name from now on."""
        peer = self.scheduler.peer_of(worker)
        self._carry_out(self.scheduler.quarantine(worker, reason))
        if peer is not None:
            self._send(peer, Stop(f"quarantined: {reason}"))

    def stop(self, reason: str) -> None:
        for peer in list(self.scheduler.workers):
            self._send(peer, Stop(reason))

    def close(self) -> None:
        self.refusals.flush(time.monotonic())
        self.transport.close()

    def _pump(self, deadline: float) -> bool:
        """Keep the clock ticking until one frame is handled (True) or the deadline passes (False)."""
        while True:
            now = time.monotonic()
            if now >= self.next_tick:
                handled = self._drain()
                self._tick(time.monotonic())
                self.clock.lap("check")
                if handled:
                    return True
            if now >= deadline:
                return False
            frames = self._receive(math.ceil((min(deadline, self.next_tick) - now) * 1000))
            if frames:
                self._handle_frame(frames)
                return True

    def _drain(self) -> bool:
        """Handle the frames already waiting, so that a busy spell of ours is not taken for our workers' silence."""
        for handled in range(MAX_FRAMES_BEFORE_TICK):
            frames = self._receive(0)
            if frames is None:
                return handled > 0
            self._handle_frame(frames)
        return True

    def _tick(self, now: float) -> None:
        self.next_tick = now + TICK_INTERVAL
        self._carry_out(self.scheduler.handle(Tick(now)))
        self.refusals.summarise(now)

    def _receive(self, timeout_ms: int) -> Incoming | None:
        incoming = self.transport.receive(timeout_ms)
        self.clock.lap("wait")
        return incoming

    def _handle_frame(self, incoming: Incoming) -> None:
        peer, frames = incoming.peer, incoming.frames
        self.traffic.count(self._known(peer), received=sum(len(frame) for frame in frames))
        if len(frames) != 1:
            event = Garbled(peer, f"{len(frames)} frames instead of 1")
        else:
            try:
                event = Arrived(peer, protocol.decode(memoryview(frames[0])), time.monotonic(), incoming.key)
            except protocol.ProtocolError as error:
                event = Garbled(peer, str(error))
        self.clock.lap("decode")
        self._carry_out(self.scheduler.handle(event))
        self.clock.lap("check")

    def _carry_out(self, actions: list) -> None:
        frames = {}  # id(message) -> its frame: a message for several workers is encoded once
        for action in actions:
            if isinstance(action, Send):
                frame = frames.get(id(action.message))
                if frame is None:
                    frame = frames[id(action.message)] = protocol.encode(action.message)
                self._send_frame(action.peer, frame)
            elif isinstance(action, Admit):
                role = "a standby" if action.slot is None else f"slot {action.slot}"
                log.info("worker %s %s as %s", action.name, "registered again" if action.again else "joined", role)
                self._send(action.peer, self.welcome(-1 if action.slot is None else action.slot))
            elif isinstance(action, Disconnect):
                log.warning("dropped %s", action.reason)
            elif isinstance(action, Refused):
                self.refusals.add(action, time.monotonic())

    def _known(self, peer: bytes) -> bytes | None:
        return peer if peer in self.scheduler.workers else None

    def _send(self, peer: bytes, message) -> None:
        self._send_frame(peer, protocol.encode(message))

    def _send_frame(self, peer: bytes, frame: bytes) -> None:
        self.clock.lap("encode")
        if self.transport.send(peer, frame):
            self.clock.lap("send")
            self.traffic.count(self._known(peer), sent=len(frame))
        else:  # a peer whose queue is full is as unreachable as one whose connection is gone
            self._carry_out(self.scheduler.handle(Unreachable(peer)))


class RefusalLog:
    """Frames dropped from peers that are not workers: the first of a spell in full, then one summary line
    per interval, so that a flood of garbage cannot flood the log."""

    def __init__(self, interval: float = settings.REFUSAL_LOG_INTERVAL):
        self.interval = interval
        self.spell_started = float("-inf")
        self.frames, self.peers = 0, set()

    def add(self, refused: Refused, now: float) -> None:
        if now - self.spell_started >= self.interval:
            self.summarise(now)
            self.spell_started = now
            log.warning("dropped a frame from peer %s: %s", short_id(refused.peer), refused.reason)
            return
        self.frames += 1
        if len(self.peers) < MAX_COUNTED_PEERS:
            self.peers.add(refused.peer)

    def summarise(self, now: float) -> None:
        """The summary line, once per interval."""
        if now - self.spell_started >= self.interval:
            self.flush(now)

    def flush(self, now: float) -> None:
        if self.frames:
            log.warning(
                "dropped %s more bad frames from %s peers in the last %.0f s",
                f"{self.frames:,}", f"{len(self.peers):,}", now - self.spell_started,
            )
            self.frames, self.peers, self.spell_started = 0, set(), now


def short_id(peer: bytes) -> str:
    """A peer's ZeroMQ identity as 8 hex digits: enough to tell peers apart in a log."""
    return peer.hex()[:8]
