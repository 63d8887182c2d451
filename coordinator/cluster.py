"""The coordinator's transport: one ROUTER socket that turns frames into scheduler events and carries out
the scheduler's actions."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from common import protocol
from common.protocol import Stop
from coordinator.scheduler import Admit, Arrived, Disconnect, Garbled, Scheduler, Send

log = logging.getLogger("coordinator")

STOP_LINGER_MS = 500  # time for the last stop messages to leave before the socket closes


class ClusterError(RuntimeError):
    """The cluster cannot go on (a worker lost, none arriving); the text is one line for the user."""


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

    def __init__(self, bind: str, scheduler: Scheduler, max_message_bytes: int, setup: Callable, context=None):
        self.scheduler = scheduler
        self.setup = setup  # slot -> the messages a newly admitted worker needs first
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer fails loudly
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as error:
            self.socket.close()
            raise ClusterError(f"cannot bind {bind}: {error}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.traffic = Traffic()

    def admit_workers(self, timeout: float) -> None:
        """Wait until every slot has a worker."""
        deadline = time.monotonic() + timeout
        while not self.scheduler.full:
            if not self._pump(deadline):
                have, want = len(self.scheduler.workers), self.scheduler.capacity
                raise ClusterError(f"only {have} of {want} workers registered within {timeout:g} s")

    def run_round(self, requests: dict, timeout: float) -> dict:
        """Send each slot its request and return slot -> products once every slot has answered."""
        self.traffic.rounds += 1
        self._carry_out(self.scheduler.start_round(requests, time.monotonic()))
        deadline = time.monotonic() + timeout
        while not self.scheduler.round_done:
            if not self._pump(deadline):
                slots = sorted({o.slot for o in self.scheduler.outstanding.values()})
                raise ClusterError(f"no answer from worker slots {slots} within {timeout:g} s")
            if self.scheduler.lost:
                raise ClusterError("; ".join(self.scheduler.lost.values()))
        return self.scheduler.results

    def stop(self, reason: str) -> None:
        for peer in list(self.scheduler.workers):
            self._send(peer, Stop(reason))

    def close(self) -> None:
        self.socket.close(linger=STOP_LINGER_MS)

    def _pump(self, deadline: float) -> bool:
        """Handle one incoming frame; False if none came before the deadline."""
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not self.socket.poll(remaining_ms):
            return False
        frames = self.socket.recv_multipart(copy=False)
        peer = frames[0].bytes
        self.traffic.count(self._known(peer), received=sum(len(frame) for frame in frames[1:]))
        if len(frames) != 2:
            event = Garbled(peer, f"{len(frames) - 1} frames instead of 1")
        else:
            try:
                event = Arrived(peer, protocol.decode(frames[1].buffer), time.monotonic())
            except protocol.ProtocolError as error:
                event = Garbled(peer, str(error))
        self._carry_out(self.scheduler.handle(event))
        return True

    def _carry_out(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action.peer, action.message)
            elif isinstance(action, Admit):
                log.info("worker %s joined as slot %d", action.name, action.slot)
                for message in self.setup(action.slot):
                    self._send(action.peer, message)
            elif isinstance(action, Disconnect):
                log.warning("dropped peer %s: %s", action.peer.hex(), action.reason)

    def _known(self, peer: bytes) -> bytes | None:
        return peer if peer in self.scheduler.workers else None

    def _send(self, peer: bytes, message) -> None:
        frame = protocol.encode(message)
        try:
            self.socket.send_multipart([peer, frame])
            self.traffic.count(self._known(peer), sent=len(frame))
        except zmq.ZMQError as error:  # the peer went away; its silence is handled by the round
            log.warning("could not send to %s: %s", peer.hex(), error)
