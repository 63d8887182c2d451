"""How a run uses workers: the options of `coordinator train` that concern them, their checks, and the cluster they
build (a bound socket, admitted or spawned workers, and the products backend over them)."""

import dataclasses
import logging
import secrets
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from common import keys, model, phases, settings
from common.data import SPLITS, Dataset
from common.exposure import ExposurePlan
from common.protocol import Welcome
from coordinator.checkpoint import Checkpoint, Interrupted
from coordinator.cluster import Cluster, ClusterError
from coordinator.config import INPUT_COLUMNS, TrainingConfig
from coordinator.distributed import ClusterProducts, LocalLaterLayersProducts
from coordinator.rundir import RunDirectory
from coordinator.scheduler import Scheduler
from coordinator.spawn import LocalWorkers, local_address, spawn_workers
from coordinator.status import RunWatch, StatusServer, worker_statuses
from coordinator.training import BackendState
from coordinator.transport import RouterTransport
from coordinator.verify import Verifier, inputs_for

log = logging.getLogger("coordinator")

WORKER_LOGS = "workers"  # RUN_DIR/workers/NAME.log: what each spawned worker printed


@dataclass(frozen=True)
class ClusterOptions:
    bind: str
    workers: int
    spawn: bool  # start the workers as local processes
    wait_timeout: float  # seconds to wait for them to register
    _: dataclasses.KW_ONLY  # the rest by name: they are many, and several share a type
    heartbeat_timeout: float = settings.HEARTBEAT_TIMEOUT
    rebalance: bool = True  # late workers get columns at the next epoch, or wait as standbys
    verify: str = "sample"  # Freivalds-check "all", a secret "sample", or "off"
    verify_rate: float = settings.VERIFY_RATE
    replicas: int = 1  # workers computing each slot's products, compared with each other
    curve_keys: Path | None = None  # a `coordinator keygen` folder: encrypt, and admit only its workers
    status_bind: str | None = None  # where to serve the read-only status (see coordinator.status); None: nowhere
    later_layers_here: bool = True  # the coordinator computes the later layers: 1 round a step, not 1 + 2 per layer

    @property
    def slots(self) -> int:
        return self.workers // self.replicas

    def problems(self, config: TrainingConfig) -> list:
        """Why these workers cannot share this network's columns and units, as one-line texts."""
        if self.workers % self.replicas:
            return [f"{self.workers} workers cannot form replicas of {self.replicas}"]
        if self.slots > config.most_slots():
            most = config.most_slots() * self.replicas
            hidden = ",".join(map(str, config.hidden))
            return [f"{self.workers} workers cannot share {INPUT_COLUMNS[config.dataset]} input columns and {hidden} "
                    f"hidden units (each needs one of every layer's); use at most {most} (--workers or --spawn)"]
        return []

    @contextmanager
    def products(self, config: TrainingConfig, data: Dataset, records: RunDirectory, start: Checkpoint | None,
                 watch: RunWatch, clock=phases.NO_CLOCK):
        """ClusterProducts over the admitted (or spawned) workers; a checkpoint's plan and secret shuffles continue
        where it left off. `watch` follows the workers for the status, and says where the run is for the records."""
        plan, permutation_seed, former_slots = self._plan(config, data, records, start)
        key_names = {} if self.curve_keys is None else keys.allowed_names(self.curve_keys)
        scheduler = Scheduler(self.workers, settings.PROTOCOL_VERSION, np.dtype(config.dtype), self.heartbeat_timeout,
                              self.replicas, former_slots, key_names,
                              wire_dtype=model.wire_dtype(config.wire, config.dtype))
        with self._allow_list(), self._cluster(config, data, scheduler, clock) as cluster, self._spawned(cluster, records), \
                self._status(watch):
            try:
                log.info("waiting for %d workers on %s", self.workers, cluster.endpoint)
                cluster.admit_workers(self.wait_timeout)
                products = self._backend(config, data, cluster, plan, permutation_seed, records, watch, clock)
                if start is not None:
                    products.restore(BackendState(start.permutations, start.plan))
                watch.workers = lambda: worker_statuses(scheduler, products.plan, cluster.traffic)
                yield products
                records.save_workers(worker_statuses(scheduler, products.plan, cluster.traffic, departed=True))
                cluster.stop("training finished")
            except (Interrupted, KeyboardInterrupt):
                cluster.stop("the coordinator was interrupted")
                raise

    def _plan(self, config: TrainingConfig, data: Dataset, records: RunDirectory, start: Checkpoint | None) -> tuple:
        """(exposure plan, permutation seed, name -> slot held before a resume): fresh, or the checkpoint's."""
        permutation_seed = secrets.randbits(128)
        if start is None or start.plan is None:
            inputs, *hidden, _ = config.layer_sizes(data)
            plan = ExposurePlan.random(inputs, tuple(hidden), self.slots, config.seed)
            records.save_exposure(plan, permutation_seed, config)
            return plan, permutation_seed, {}
        if len(start.plan.slots) != self.slots:
            workers = len(start.plan.slots) * self.replicas
            raise ClusterError(f"the run's exposure plan has {len(start.plan.slots)} worker slots; resume with {workers} workers")
        holders = records.last_holders()
        former_slots = {holders[old]: new for new, old in enumerate(start.plan.slots) if old in holders}
        return start.plan.renumbered(), permutation_seed, former_slots

    def _allow_list(self):
        return nullcontext() if self.curve_keys is None else keys.allow_list(self.curve_keys, zmq.Context.instance())

    @contextmanager
    def _cluster(self, config: TrainingConfig, data: Dataset, scheduler: Scheduler, clock):
        transport = RouterTransport(self.bind, _largest_reply_bytes(config, data.train_images.shape[1]),
                                    curve_keys=self.curve_keys)
        cluster = Cluster(transport, scheduler,
                          welcome=lambda slot: Welcome(slot, config.dtype, config.input_divisor, config.wire), clock=clock)
        try:
            yield cluster
        finally:
            cluster.close()

    @contextmanager
    def _spawned(self, cluster: Cluster, records: RunDirectory):
        """The spawned workers, if asked for, stopped when the run ends."""
        address = local_address(cluster.endpoint)
        spawned = (
            spawn_workers(self.workers, address, records.path / WORKER_LOGS, self.curve_keys) if self.spawn
            else LocalWorkers()
        )
        try:
            yield
        finally:
            spawned.stop()

    @contextmanager
    def _status(self, watch: RunWatch):
        """The read-only status socket, if asked for; then the warning about an open door, once the sockets are up
        (so that a bad option stays a one-line error)."""
        status_server = StatusServer(self.status_bind) if self.status_bind else None
        if status_server:
            watch.listeners.append(status_server.publish)
            log.info("status served on %s", status_server.endpoint)
            watch.update()
        if self.curve_keys is None:
            log.warning("no --curve-keys: anyone who can reach the port can join as a worker, and traffic is not encrypted")
        try:
            yield
        finally:
            if status_server:
                status_server.close()

    def _backend(self, config, data, cluster, plan, permutation_seed, records, watch, clock) -> ClusterProducts:
        images = {split: data.images(split) for split in SPLITS}
        verifier = Verifier(
            self.verify, self.verify_rate, np.random.default_rng(secrets.randbits(128)),
            inputs_for(images, config.dtype, config.input_divisor), config.dtype, model.wire_roundoff(config.wire),
        )
        kind = LocalLaterLayersProducts if self.later_layers_here else ClusterProducts
        return kind(
            cluster, plan, images, permutation_seed, self.rebalance, verifier, config.wire,
            on_exposure=lambda *change: records.append_exposure(*watch.position(), *change),
            on_quarantine=lambda *caught: records.append_quarantine(*watch.position(), *caught),
            on_keys=records.append_keys,
            rekey_steps=config.rekey_steps, clock=clock,
        )


def _largest_reply_bytes(config: TrainingConfig, inputs: int) -> int:
    """A first-layer result of every input column and a full chunk, or a later layer's of every unit of its input and
    a full chunk, whichever could be larger, with room for msgpack's maps."""
    itemsize = np.dtype(config.dtype).itemsize
    widest = max(config.hidden)
    return (max(inputs, widest) + config.chunk_rows) * widest * itemsize + 65536
