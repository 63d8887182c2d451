"""Bare transport: echo workers that answer each request with as many bytes as it asks for, and the ROUTER
that drives them with a cluster step's rounds. No msgpack, no numpy, no compute: what ZeroMQ alone costs.

A request is one frame that opens with HEADER bytes, the size of the wanted reply (little-endian), padded to
the request's size; a reply is one frame of that many zero bytes. An empty frame is READY from a worker, STOP to one.

`python -m coordinator.bench.echo ADDRESS` runs one echo worker.
"""

import functools
import subprocess
import sys

import zmq

from coordinator.spawn import child_of_coordinator, wait_or_kill

HEADER = 8  # bytes: the reply size a request asks for
READY = STOP = b""  # shorter than any request


def requests(request_bytes: float, reply_bytes: float, workers: int) -> list:
    """One round's request frames, one a worker, from per-worker average sizes: whole bytes that add up to
    `workers` times each average (a request is never shorter than its header)."""
    return [
        reply.to_bytes(HEADER, "little").ljust(max(request, HEADER), b"\0")
        for request, reply in zip(_shares(request_bytes, workers), _shares(reply_bytes, workers))
    ]


def _shares(average: float, parts: int) -> list:
    """`parts` whole numbers that differ by at most one and add up to `parts * average`, rounded."""
    total = round(parts * average)
    return [total * (part + 1) // parts - total * part // parts for part in range(parts)]


class EchoRouter:
    """A bound ROUTER with `workers` local echo processes connected, each with its own context and DEALER: bare
    pyzmq on purpose, not coordinator.transport, since it is the floor the cluster's transport is measured against."""

    def __init__(self, bind: str, workers: int, timeout: float):
        """`bind`: a loopback endpoint; `timeout`: seconds of silence (at start-up or in a round) after which the
        workers count as gone."""
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished worker fails loudly
        self.socket.setsockopt(zmq.RCVTIMEO, round(timeout * 1000))  # a dead worker fails loudly, not a hang
        self.socket.bind(bind)
        address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "coordinator.bench.echo", address], preexec_fn=child_of_coordinator,
                             stdin=subprocess.DEVNULL)
            for _ in range(workers)
        ]
        self.peers = []  # identities, from each READY
        try:
            for _ in range(workers):
                self.peers.append(self._receive()[0].bytes)
        except BaseException:
            self.close()
            raise

    def run_round(self, frames: list) -> int:
        """Send each worker its request frame and wait for every reply; the payload bytes sent plus received."""
        for peer, frame in zip(self.peers, frames):
            self.socket.send_multipart([peer, frame], copy=False)  # zero-copy: the frames are made once, never changed
        return sum(map(len, frames)) + sum(len(self._receive()[1]) for _ in self.peers)

    def run_step(self, rounds: list) -> int:
        """Each round's frames in turn; the payload bytes sent plus received."""
        return sum(self.run_round(frames) for frames in rounds)

    def close(self) -> None:
        """Stop the workers, wait for them to leave (killing the late ones), and close the socket."""
        for peer in self.peers:
            try:
                self.socket.send_multipart([peer, STOP])
            except zmq.ZMQError:  # its connection is gone: the wait below finds out why
                pass
        wait_or_kill(self.processes)
        self.context.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def _receive(self) -> list:
        try:
            return self.socket.recv_multipart(copy=False)
        except zmq.Again:
            raise RuntimeError("an echo worker fell silent") from None


def serve(address: str) -> None:
    """An echo worker: connect, say READY, then answer each request until STOP."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    socket.send(READY)
    reply_of_size = functools.cache(bytes)  # each reply size is allocated once and sent without a copy
    while len(request := socket.recv(copy=False)) >= HEADER:
        socket.send(reply_of_size(int.from_bytes(request.buffer[:HEADER], "little")), copy=False)
    context.destroy(linger=0)


if __name__ == "__main__":
    serve(sys.argv[1])
