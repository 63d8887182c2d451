"""The coordinator's socket: one bound ROUTER that moves whole frames to and from workers, and nothing else.

coordinator.cluster drives it, and the conformance probe talks to one worker through it; anything with the same
methods can stand in for it (the round-recovery tests run the real cluster, scheduler and worker state over one in
memory). The bench's echo router alone keeps a bare pyzmq socket: it measures the floor this is compared with.
"""

from dataclasses import dataclass
from pathlib import Path

import zmq

from common import keys, sockets
from common.errors import UserError

STOP_LINGER_MS = 500  # time for the last stop messages to leave before the socket closes


class TransportError(UserError):
    """The socket cannot be bound; the text is one line for the user."""


@dataclass(frozen=True)
class Incoming:
    """The frames of one message from a peer, identity removed."""

    peer: bytes
    frames: list  # zmq.Frame or bytes: one for a well-formed message
    key: str | None = None  # the sender's CURVE public key (z85), when the socket authenticates


class RouterTransport:
    def __init__(self, bind: str, max_message_bytes: int, context=None, curve_keys: Path | None = None):
        self.socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer fails loudly
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if curve_keys is not None:
            keys.make_server(self.socket, curve_keys)
        self.endpoint = sockets.bind(self.socket, bind, TransportError,
                                     when_in_use="is another coordinator running? choose another address with --bind")
        self.authenticates = curve_keys is not None
        self.poller = zmq.Poller()  # kept: socket.poll() would build one for every frame
        self.poller.register(self.socket, zmq.POLLIN)

    def send(self, peer: bytes, frame: bytes) -> bool:
        """Queue one frame for a peer; False if the peer is gone or its queue is full. Never blocks."""
        try:
            self.socket.send_multipart([peer, frame], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # with ROUTER_MANDATORY: gone (EHOSTUNREACH) or its queue is full (EAGAIN)
            return False

    def receive(self, timeout_ms: int) -> Incoming | None:
        """The next message, taken without polling when it is already here (answers come in bursts)."""
        try:
            return self._incoming(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            pass
        if timeout_ms > 0 and self.poller.poll(timeout_ms):
            return self._incoming(self.socket.recv_multipart(copy=False))
        return None

    def close(self) -> None:
        self.socket.close(linger=STOP_LINGER_MS)

    def _incoming(self, frames: list) -> Incoming:
        key = (frames[-1].get("User-Id") or None) if self.authenticates else None  # as pyzmq's authenticator names it
        return Incoming(frames[0].bytes, frames[1:], key)
