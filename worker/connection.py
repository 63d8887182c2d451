"""A worker's connection to the coordinator: one DEALER socket, registration and framing."""

import logging

import zmq

from common import protocol, settings
from common.protocol import Register, Reject, Welcome

log = logging.getLogger("worker")


class Rejected(RuntimeError):
    """The coordinator refused this worker."""


class CoordinatorLink:
    """Sends and receives whole messages; the worker's loop never sees a socket or a frame."""

    def __init__(self, address: str, name: str, context: zmq.Context | None = None):
        self.address = address
        self.name = name
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def register(self) -> Welcome:
        """Introduce this worker, asking again until the coordinator answers."""
        while True:
            self.send(Register(self.name, settings.PROTOCOL_VERSION))
            if self.socket.poll(settings.WORKER_CONNECT_TIMEOUT * 1000):
                answer = self.receive()
                if isinstance(answer, Reject):
                    raise Rejected(answer.reason)
                if isinstance(answer, Welcome):
                    return answer
                log.warning("expected a welcome, got %s; registering again", type(answer).__name__)
            else:
                log.info("no answer from %s yet; registering again", self.address)

    def receive(self):
        """The next valid message; frames that fail the protocol's gate are logged and skipped."""
        while True:
            frame = self.socket.recv(copy=False)
            try:
                return protocol.decode(frame.buffer)
            except protocol.ProtocolError as error:
                log.warning("ignored a bad frame from the coordinator: %s", error)

    def send(self, message) -> None:
        self.socket.send(protocol.encode(message))

    def close(self) -> None:
        self.socket.close(linger=0)
