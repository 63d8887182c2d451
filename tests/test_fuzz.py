"""Ten thousand hostile frames against a live coordinator: the run completes with the right weights, nothing
from the network is executed, and the coordinator's memory stays bounded."""

import os
import pickle
import random
import socket

import msgpack
import numpy as np
import pytest
import zmq

from common import protocol
from common.protocol import Register, Result
from tests.cluster_harness import Harness
from tests.conftest import load_model, max_difference
from tests.test_protocol import Exploit, array_map
from worker.connection import CoordinatorLink
from worker.serve import serve

pytestmark = pytest.mark.slow  # every test here starts real processes

FRAMES = 10_000
FRAMES_PER_ANSWER = 8  # the fuzzing worker answers 3 rounds x 200 steps x 3 epochs after the first: 1800 > 10,000 / 8
RUN = ("--later-layers", "workers", "--dtype", "float64", "--train-limit", "2000", "--test-limit", "200", "--batch-size",
       "10", "--epochs", "4", "--seed", "9")


def _hostile_frames(rng: random.Random, marker: str):
    """An endless mix of garbage, truncations and well-formed lies."""
    honest = [
        protocol.encode(Register("fuzz", 1)),
        protocol.encode(Result(rng.randrange(1, 10**6), {"partial": np.full((10, 128), np.nan)})),
        protocol.encode(Result(rng.randrange(1, 10**6), {"partial": np.zeros((3, 3), np.float32)})),
    ]
    pickled = pickle.dumps(Exploit(marker))
    makers = [
        lambda: rng.randbytes(rng.randrange(0, 300)),
        lambda: rng.choice(honest)[: rng.randrange(1, 40)],  # truncated msgpack
        lambda: msgpack.packb({"kind": rng.choice(["exec", "eval", "", "__import__"]), "x": 1}),
        lambda: msgpack.packb({"kind": "result", "request": 1, "products": {"p": array_map(pickled, "|O", [1], b"O")}}),
        lambda: msgpack.packb({"kind": "result", "request": 1, "products": {"p": array_map(b"\0" * 8, [["a", "<f8"]], [1], b"V")}}),
        lambda: msgpack.packb({"kind": "result", "request": 1, "products": {"p": array_map(b"\0" * 7, "<f8", [1])}}),
        lambda: msgpack.packb({"kind": "register", "name": "x", "version": rng.randrange(3, 99)}),
        lambda: msgpack.packb({"kind": "heartbeat"}),
        lambda: msgpack.packb({"kind": "failure", "request": rng.randrange(10**6), "reason": "no"}),
        lambda: rng.choice(honest),
        lambda: bytes(b ^ 0xFF if rng.random() < 0.05 else b for b in rng.choice(honest)),  # bit flips
    ]
    while True:
        yield rng.choice(makers)()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class Fuzzer:
    """Eight hostile peers sending FRAMES frames, a few at a time, at a coordinator's address."""

    def __init__(self, address: str, pid: int, marker: str, context: zmq.Context):
        self.address, self.pid, self.rng = address, pid, random.Random(1)
        self.frames = _hostile_frames(self.rng, marker)
        self.peers = [context.socket(zmq.DEALER) for _ in range(8)]
        for peer in self.peers:
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(address)
        self.sent, self.rss_after_warmup, self.rss_at_end = 0, None, None

    def send(self, count: int) -> None:
        host, port = self.address.removeprefix("tcp://").rsplit(":", 1)
        for _ in range(min(count, FRAMES - self.sent)):
            peer = self.rng.choice(self.peers)
            if self.rng.random() < 0.01:  # not ZeroMQ at all
                with socket.create_connection((host, int(port))) as raw:
                    raw.sendall(self.rng.randbytes(64))
            elif self.rng.random() < 0.01:
                peer.send_multipart([b"one", b"frame too many"])
            elif self.rng.random() < 0.002:
                peer.send(b"\0" * 8_000_000)  # over ZMQ_MAXMSGSIZE: the connection is cut
            else:
                peer.send(next(self.frames))
            self.sent += 1
            if self.sent == 1000:
                self.rss_after_warmup = _rss_mb(self.pid)
            if self.sent == FRAMES:
                self.rss_at_end = _rss_mb(self.pid)


class FuzzingLink(CoordinatorLink):
    """An honest worker that sends a share of the hostile frames before each answer after the first epoch: the run
    cannot end before the fuzzing does, however fast the machine."""

    def __init__(self, address: str, name: str, fuzzer: Fuzzer, warmed_up):
        super().__init__(address, name)
        self.fuzzer, self.warmed_up = fuzzer, warmed_up

    def send(self, message) -> None:
        if isinstance(message, Result) and self.warmed_up():
            self.fuzzer.send(FRAMES_PER_ANSWER)
        super().send(message)


def test_fuzzed_coordinator_finishes_the_run_correctly(tmp_path):
    harness = Harness(tmp_path)
    marker = str(tmp_path / "executed")
    context = zmq.Context()
    link = None
    try:
        local = Harness(tmp_path / "local")
        (tmp_path / "local").mkdir()
        local.start_coordinator("--local", *RUN)
        assert local.finish() == 0
        coordinator = harness.start_coordinator("--workers", 3, "--rebalance", "never", *RUN)
        for name in "AB":
            harness.start_worker(name)
        fuzzer = Fuzzer(harness.address, coordinator.pid, marker, context)
        link = FuzzingLink(harness.address, "C", fuzzer, lambda: harness.epochs_done() >= 1)
        assert serve(link) == "training finished"
        assert fuzzer.sent == FRAMES, f"the run ended after {fuzzer.sent} frames: give it more steps"
        assert harness.finish() == 0, harness.log(coordinator)[-3000:]
        assert max_difference(load_model(harness.run_dir), load_model(local.run_dir)) < 1e-6
        assert not os.path.exists(marker)
        rss_after_warmup, rss_at_end = fuzzer.rss_after_warmup, fuzzer.rss_at_end
        assert rss_at_end - rss_after_warmup < 40, (rss_after_warmup, rss_at_end)
        drops = [line for line in harness.log(coordinator).splitlines() if "dropped" in line]
        assert any("more bad frames from" in line for line in drops), drops  # summarised, not one line each
        assert len(drops) <= 20 and max(map(len, drops)) < 200, drops
        print(f"fuzz: {fuzzer.sent} frames, coordinator RSS {rss_after_warmup:.0f} -> {rss_at_end:.0f} MB, "
              f"{len(drops)} log lines")
    finally:
        if link is not None:
            link.close()
        context.destroy(linger=0)
        harness.close()
