"""The coordinator's cluster with its workers in this process: the real Cluster, Scheduler and products backend
over a transport that hands each frame, through the protocol's gate, to a real WorkerState and queues its answer.

A script says at which frame a worker dies. A dead worker deregisters at once, where a killed process is found a
heartbeat timeout later: the scheduler drops it the same way, so every moment of a loss can be tried in
milliseconds.
"""

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from common import protocol, settings
from common.protocol import Deregister, Heartbeat, Register, Stop, Welcome
from coordinator.cluster import Cluster
from coordinator.distributed import ClusterProducts, LocalLaterLayersProducts
from coordinator.scheduler import Scheduler
from coordinator.transport import Incoming
from coordinator.verify import Verifier, inputs_for
from worker.compute import WorkerState
from worker.serve import _answer


@dataclass(frozen=True)
class Death:
    """`name` dies at the `frame`-th frame it is sent (heartbeats and welcomes aside, from 1), before computing
    it, or just after its answer has left."""

    name: str
    frame: int
    answered: bool


class MemoryTransport:
    endpoint = "memory"

    def __init__(self, names: list, deaths: tuple = ()):
        self.inbox = deque()  # what the coordinator's socket would receive next
        self.states = {}  # peer -> its WorkerState, from its welcome on
        self.frames = Counter()  # peer -> compute and shard frames it was sent
        self.deaths = {death.name.encode(): death for death in deaths}
        self.dead = set()
        for name in names:
            self.inbox.append(Incoming(name.encode(), [protocol.encode(Register(name, settings.PROTOCOL_VERSION))]))

    def send(self, peer: bytes, frame: bytes) -> bool:
        if peer in self.dead:
            return False  # ROUTER_MANDATORY's refusal
        message = protocol.decode(frame)
        if isinstance(message, Welcome):
            self.states[peer] = WorkerState(message.dtype, message.input_divisor, message.wire)
        if isinstance(message, (Welcome, Heartbeat, Stop)):
            return True
        self.frames[peer] += 1
        death = self.deaths.get(peer)
        dies = death is not None and death.frame == self.frames[peer]
        if not (dies and not death.answered):
            self.inbox.append(Incoming(peer, [protocol.encode(_answer(self.states[peer], message))]))
        if dies:
            self.dead.add(peer)
            self.inbox.append(Incoming(peer, [protocol.encode(Deregister("killed"))]))
        return True

    def receive(self, timeout_ms: int) -> Incoming | None:
        return self.inbox.popleft() if self.inbox else None

    def close(self) -> None:
        pass


def cluster_products(transport: MemoryTransport, config, data, plan, workers: int, later_layers_here: bool):
    """The products backend a distributed run of `config` uses, over `transport`, with every answer checked."""
    scheduler = Scheduler(workers, settings.PROTOCOL_VERSION, np.dtype(config.dtype))
    cluster = Cluster(transport, scheduler, lambda slot: Welcome(slot, config.dtype, config.input_divisor, config.wire))
    cluster.admit_workers(timeout=1.0)
    images = {"train": data.train_images, "test": data.test_images}
    verifier = Verifier("all", 1.0, np.random.default_rng(1), inputs_for(images, config.dtype, config.input_divisor),
                        config.dtype)
    kind = LocalLaterLayersProducts if later_layers_here else ClusterProducts
    return kind(cluster, plan, images, 2, True, verifier, config.wire, on_exposure=lambda *change: None,
                on_quarantine=lambda *caught: None, on_keys=lambda *keys: None, rekey_steps=config.rekey_steps)
