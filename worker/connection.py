"""A worker's connection to the coordinator: one DEALER socket, registration, heartbeats, reconnection
and framing (the ZeroMQ guide's Paranoid Pirate worker)."""

import logging
import time

import zmq

from common import keys, phases, protocol, settings
from common.protocol import Deregister, Heartbeat, Register, RegisterAgain, Reject, Welcome

log = logging.getLogger("worker")


class Rejected(RuntimeError):
    """The coordinator refused this worker."""


class GaveUp(RuntimeError):
    """The coordinator said nothing for longer than the worker was told to wait."""


class CoordinatorLink:
    """Sends and receives whole messages; the worker's loop never sees a socket, a frame or a heartbeat."""

    def __init__(
        self, address: str, name: str, context: zmq.Context | None = None, curve: tuple | None = None,
        give_up_after: float | None = None, recorder=None, clock=phases.NO_CLOCK,
    ):
        """`curve`: (this worker's key pair file, the coordinator's public key file) to encrypt and authenticate;
        `give_up_after`: seconds without a word from the coordinator after which `receive` raises GaveUp (None: never);
        `recorder`: a common.recording.Recorder that gets every frame but heartbeats, both ways (`worker --record`);
        `clock`: a phases.PhaseClock that times waiting, decoding, encoding and sending.
        """
        self.address = address
        self.name = name
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.give_up_after = give_up_after
        self.recorder = recorder
        self.clock = clock
        self.socket = self.poller = None
        self.welcomed = False
        self.backoff = settings.RECONNECT_BACKOFF[0]
        self._connect()
        self.connected_at = self.silent_since = self.last_heard  # _connect counts the connection as a word heard

    def receive(self):
        """The next message for the worker's loop; re-registers, with backoff, when the coordinator falls silent.

        After a re-registration the loop gets the new Welcome, and must forget what it held.
        """
        while True:
            next_duty = self.last_heard + settings.HEARTBEAT_TIMEOUT  # give up on this connection
            if self.welcomed:
                next_duty = min(next_duty, self.heartbeat_at)
            if self.poller.poll(max(0.0, next_duty - time.monotonic()) * 1000):
                self.clock.lap("wait")
                message = self._read()
                if message is not None:
                    return message
            now = time.monotonic()
            if now - self.last_heard > settings.HEARTBEAT_TIMEOUT:
                self._reconnect(now - self.last_heard)
            elif now >= self.heartbeat_at and self.welcomed:
                self.send(Heartbeat())

    def send(self, message) -> None:
        frame = protocol.encode(message)
        self.clock.lap("encode")
        self.socket.send(frame)
        self.clock.lap("send")
        if self.recorder is not None and not isinstance(message, Heartbeat):
            self.recorder.record("sent", frame)
        self.heartbeat_at = time.monotonic() + settings.HEARTBEAT_INTERVAL  # any message is a sign of life

    def close(self, reason: str = "") -> None:
        """Leave; with a reason, tell the coordinator first so it reassigns this worker's columns at once."""
        if reason and self.welcomed:
            self.send(Deregister(reason))
        self.socket.close(linger=round(settings.FAREWELL_LINGER * 1000) if reason else 0)  # milliseconds

    def _read(self):
        """One frame as a message for the loop, or None for a heartbeat or a frame that fails the gate."""
        frame = self.socket.recv(copy=False)
        self.last_heard, self.backoff = time.monotonic(), settings.RECONNECT_BACKOFF[0]
        try:
            message = protocol.decode(frame.buffer)
        except protocol.ProtocolError as error:
            log.warning("ignored a bad frame from the coordinator: %s", error)
            return None
        finally:
            self.clock.lap("decode")
        if self.recorder is not None and not isinstance(message, Heartbeat):
            self.recorder.record("received", frame.buffer)
        if isinstance(message, Reject):
            raise Rejected(message.reason)
        if isinstance(message, RegisterAgain):
            log.info("registering again: %s", message.reason)
            self._register()
            return None
        self.welcomed = self.welcomed or isinstance(message, Welcome)
        return None if isinstance(message, Heartbeat) else message

    def _connect(self) -> None:
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            keys.make_client(self.socket, *self.curve)
        self.socket.connect(self.address)
        self.poller = zmq.Poller()  # kept: socket.poll() would build one for every message
        self.poller.register(self.socket, zmq.POLLIN)
        self.last_heard = time.monotonic()
        self._register()

    def _register(self) -> None:
        """Introduce this worker; until the welcome it is not admitted (and sends no heartbeats)."""
        self.welcomed = False
        self.send(Register(self.name, settings.PROTOCOL_VERSION))

    def _reconnect(self, silence: float) -> None:
        """Register again after a backoff, or raise GaveUp once the coordinator has been silent too long."""
        if self.last_heard > self.connected_at:  # it spoke on this connection: the silence began then
            self.silent_since = self.last_heard
        if self.curve is not None and not self.welcomed:  # CURVE drops a refused key without a word
            why = (f"no answer from {self.address}: "
                   "the coordinator is not running there, or it refused this worker's key")
        else:
            why = f"no word from {self.address} for {silence:.1f} s"
        wait = self.backoff
        if self.give_up_after is not None:
            left = self.give_up_after - (time.monotonic() - self.silent_since)
            if left <= 0:
                raise GaveUp(f"{why}; gave up after {self.give_up_after:g} s")
            wait = min(wait, left)  # so the last registration is still waited for before giving up
        log.info("%s; registering again in %.1f s", why, wait)
        self.socket.close(linger=0)
        self.welcomed = False  # a stop during the wait must not say goodbye on the closed socket
        time.sleep(wait)
        self.backoff = min(2 * self.backoff, settings.RECONNECT_BACKOFF[1])
        self._connect()
        self.connected_at = self.last_heard
