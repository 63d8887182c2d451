"""Peers that replay, stall or just hold connections open, against a live coordinator: the run completes with the
one-process weights, no honest worker is evicted, and the coordinator's memory stays bounded."""

import socket

import pytest
import zmq

from common import protocol
from common.protocol import Result
from tests.cluster_harness import Harness, one_process_model
from tests.conftest import load_model, max_difference
from tests.test_fuzz import _rss_mb
from worker.connection import CoordinatorLink
from worker.serve import serve

pytestmark = pytest.mark.slow  # every test here starts real processes

RUN = ("--dtype", "float64", "--train-limit", "1500", "--test-limit", "150", "--batch-size", "10", "--epochs", "2",
       "--seed", "4")
IDLE_CONNECTIONS = 500
RSS_EVERY = 50  # answers between readings of the coordinator's memory
ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32  # ZMTP 3.1


class ReplayingLink(CoordinatorLink):
    """An honest worker whose every answer a second connection sends too, at once, and whose own connection
    repeats its previous answer (a round already over) before each new one."""

    def __init__(self, address: str, name: str, replayer: zmq.Socket, coordinator_pid: int):
        super().__init__(address, name)
        self.replayer, self.previous, self.replayed = replayer, None, 0
        self.coordinator_pid, self.rss = coordinator_pid, []  # the coordinator's MB every RSS_EVERY answers

    def send(self, message) -> None:
        if isinstance(message, Result):
            frame = protocol.encode(message)
            self.replayer.send(frame)
            if self.previous is not None:
                self.socket.send(self.previous)
            self.previous, self.replayed = frame, self.replayed + 1
            if self.replayed % RSS_EVERY == 0:
                self.rss.append(_rss_mb(self.coordinator_pid))
        super().send(message)


def _held_connections(host: str, port: int) -> list:
    """IDLE_CONNECTIONS plain TCP connections that say nothing, one that sends half a ZMTP greeting, and one that
    sends a whole greeting and half of a frame's header; all held open."""
    held = [socket.create_connection((host, port)) for _ in range(IDLE_CONNECTIONS)]
    half_greeting = socket.create_connection((host, port))
    half_greeting.sendall(ZMTP_GREETING[:30])
    half_frame = socket.create_connection((host, port))
    half_frame.sendall(ZMTP_GREETING + b"\x02")  # a long-frame flag, and then none of the 8 length bytes
    return held + [half_greeting, half_frame]


def test_replays_stalled_frames_and_idle_connections_change_nothing(tmp_path):
    (tmp_path / "local").mkdir()
    local = one_process_model(tmp_path / "local", *RUN)
    harness = Harness(tmp_path)
    context, link, held = zmq.Context(), None, []
    try:
        coordinator = harness.start_coordinator("--workers", 3, "--rebalance", "never", *RUN)
        host, port = harness.address.removeprefix("tcp://").rsplit(":", 1)
        held = _held_connections(host, int(port))
        for name in "AB":
            harness.start_worker(name)
        replayer = context.socket(zmq.DEALER)
        replayer.setsockopt(zmq.LINGER, 0)
        replayer.connect(harness.address)
        link = ReplayingLink(harness.address, "C", replayer, coordinator.pid)
        assert serve(link) == "training finished"
        assert harness.finish() == 0, harness.log(coordinator)[-3000:]
        log = harness.log(coordinator)
        assert link.replayed > 100
        assert max_difference(load_model(harness.run_dir), local) < 1e-9
        assert "dropped worker" not in log and "registered again" not in log, log[-3000:]  # nobody evicted
        assert "dropped a frame from peer" in log  # the replaying connection, refused as a stranger
        assert max(link.rss) - link.rss[0] < 40, link.rss
        print(f"hostile peers: {link.replayed} answers replayed twice, {len(held)} connections held; "
              f"coordinator RSS {link.rss[0]:.0f} -> {max(link.rss):.0f} MB")
    finally:
        for connection in held:
            connection.close()
        if link is not None:
            link.close()
        context.destroy(linger=0)
        harness.close()
