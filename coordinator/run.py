"""One training run, in this process or on workers: the library under `coordinator train`."""

import dataclasses
import logging
import secrets
import signal
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from common import keys, model, settings
from common.data import Dataset, load_dataset
from common.exposure import ExposurePlan
from common.protocol import Welcome
from coordinator.checkpoint import Checkpoint, CheckpointError, Checkpointer, Interrupted
from coordinator.checkpoint import FOLDER as CHECKPOINT_FOLDER
from coordinator.checkpoint import latest as latest_checkpoint
from coordinator.cluster import Cluster, ClusterError
from coordinator.config import TrainingConfig
from coordinator.distributed import ClusterFirstLayer, ClusterProducts
from coordinator.rundir import ModelError, RunDirectory, load_model
from coordinator.scheduler import Scheduler
from coordinator.spawn import LocalWorkers, local_address, spawn_workers
from coordinator.status import RunStatus, RunWatch, StatusServer, worker_statuses
from coordinator.training import LocalProducts, Progress, Trainer
from coordinator.verify import Verifier, inputs_for

log = logging.getLogger("coordinator")

XOR_ROWS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.uint8)
XOR_LABELS = np.array([0, 1, 1, 0], np.uint8)
SPLITS = ("train", "test")
WORKER_LOGS = "workers"  # RUN_DIR/workers/NAME.log: what each spawned worker printed
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}  # what the log says for each


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
    second_layer_here: bool = False  # the coordinator computes the second layer: one round per step, not three


def load_data(config: TrainingConfig) -> Dataset:
    """The run's images and labels, cut to the configured limits."""
    if config.dataset == "xor":
        return Dataset(XOR_ROWS, XOR_LABELS, XOR_ROWS, XOR_LABELS)
    full = load_dataset(Path(config.data) if config.data else None)
    train, test = slice(config.train_limit), slice(config.test_limit)
    return Dataset(full.train_images[train], full.train_labels[train], full.test_images[test], full.test_labels[test])


def images_of(data: Dataset, split: str) -> np.ndarray:
    return data.train_images if split == "train" else data.test_images


def labels_of(data: Dataset) -> dict:
    return {"train": data.train_labels, "test": data.test_labels}


def layer_sizes(config: TrainingConfig, data: Dataset) -> tuple:
    """(inputs, hidden, outputs): one output for the two-class XOR rows, one per digit otherwise."""
    return data.train_images.shape[1], config.hidden, 1 if config.dataset == "xor" else 10


def has_checkpoints(run_dir: Path) -> bool:
    return any((Path(run_dir) / CHECKPOINT_FOLDER).glob("*.json"))


def resume_point(run_dir: Path) -> tuple:
    """(config, last checkpoint) of a run to continue, or CheckpointError."""
    start = latest_checkpoint(Path(run_dir) / CHECKPOINT_FOLDER)
    try:
        config = TrainingConfig(**start.config)
    except TypeError as error:
        raise CheckpointError(f"the last checkpoint's config does not fit this version: {error}") from None
    return config, start


def train(
    config: TrainingConfig,
    run_dir: Path,
    cluster: ClusterOptions | None,
    on_epoch: Callable,
    on_batch: Callable | None = None,
    start: Checkpoint | None = None,
    on_status: Callable | None = None,
) -> model.Params:
    """Train as configured (from a checkpoint if given), locally when `cluster` is None, writing the run directory.

    `on_epoch` gets each EpochReport, `on_batch` the images done in the epoch, `on_status` a RunStatus
    after every batch.
    """
    data = load_data(config)
    sizes = layer_sizes(config, data)
    if start is None:
        if has_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds a run's checkpoints; continue it with --resume")
        params = model.initial_params(sizes, config.init, config.seed, config.dtype)
        start = Checkpoint(params, Progress(), [], dataclasses.asdict(config))
    records = RunDirectory(run_dir, start.history)
    records.save_config(config, mode="local" if cluster is None else "distributed")
    trainer = None
    watch = _unstarted_watch(config, data, [on_status] if on_status else [])

    def position() -> tuple:
        progress = trainer.progress if trainer else start.progress
        return progress.epoch, progress.step

    with products_backend(config, data, sizes, cluster, records, start, watch, position) as products:
        trainer = Trainer(config, start.params, products, labels_of(data), dataclasses.replace(start.progress))
        checkpoints = Checkpointer(records.path / CHECKPOINT_FOLDER, trainer, start)

        def on_epoch_recorded(report):
            records.append_history(report)
            watch.epoch_done(report)
            on_epoch(report)
            checkpoints.after_epoch(report)

        def on_batch_watched(samples):
            watch.batch_done(samples)
            if on_batch:
                on_batch(samples)

        with _stop_between_steps(checkpoints):
            trainer.train(on_epoch_recorded, on_batch_watched, checkpoints.after_step)
    records.save_model(trainer.params, config.input_divisor)
    return trainer.params


def _unstarted_watch(config: TrainingConfig, data: Dataset, listeners: list) -> RunWatch:
    """A RunWatch of a run before its first batch."""
    samples = len(data.train_labels)
    return RunWatch(RunStatus("waiting for workers", 1, config.epochs, 0, samples, config.batch_size), listeners)


@contextmanager
def _stop_between_steps(checkpoints: Checkpointer):
    """Make the first Ctrl-C or SIGTERM a checkpoint and a stop after the current step; a second one stops at once.

    SIGTERM is how `docker stop`, `docker-compose stop` and `kill` ask; the Interrupted that ends the run
    carries the signal, so the exit code can say which (128 + its number, as a shell reports).
    """
    requests = []

    def request_stop(signal_number, frame):
        if checkpoints.stop_requested:
            raise KeyboardInterrupt
        checkpoints.stop_requested = True
        requests.append(signal_number)
        log.warning("%s: checkpointing after this step (again to stop at once)", STOP_SIGNALS[signal_number])

    previous = {number: signal.signal(number, request_stop) for number in STOP_SIGNALS}
    try:
        yield
    except Interrupted as stop:
        stop.signal = requests[0]
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def products_backend(
    config, data, sizes, cluster_options, records, start: Checkpoint | None = None, watch: RunWatch | None = None,
    position: Callable = lambda: (1, 0),
):
    """LocalProducts, or ClusterProducts over workers admitted (or spawned) as `cluster_options` say.

    `start` is the checkpoint a resumed run continues from, `watch` follows the workers for the status,
    and `position` says (epoch, step) for the run directory's exposure and quarantine records.
    """
    if cluster_options is None:
        yield LocalProducts({s: model.inputs(images_of(data, s), config.dtype, config.input_divisor) for s in SPLITS})
        return
    watch = watch or _unstarted_watch(config, data, [])
    with _allow_list(cluster_options.curve_keys), _cluster_products(
        config, data, sizes, cluster_options, records, start, watch, position
    ) as products:
        yield products


@contextmanager
def _allow_list(curve_keys: Path | None):
    if curve_keys is None:
        yield
        return
    with keys.allow_list(curve_keys, zmq.Context.instance()):
        yield


@contextmanager
def _cluster_products(config, data, sizes, options: ClusterOptions, records, start, watch, position):
    """Workers computing the products; a checkpoint's plan and secret shuffles continue where it left off."""
    inputs, hidden, _ = sizes
    permutation_seed = secrets.randbits(128)
    slots = options.workers // options.replicas
    former_slots = {}
    if start is None or start.plan is None:
        plan = ExposurePlan.random(inputs, hidden, slots, config.seed)
        records.save_exposure(plan, permutation_seed)
    else:
        plan = start.plan.renumbered()
        holders = records.last_holders()
        former_slots = {holders[old]: new for new, old in enumerate(start.plan.slots) if old in holders}
        if len(plan.slots) != slots:
            workers = len(plan.slots) * options.replicas
            raise ClusterError(f"the run's exposure plan has {len(plan.slots)} worker slots; resume with {workers} workers")
    scheduler = Scheduler(
        options.workers, settings.PROTOCOL_VERSION, np.dtype(config.dtype), options.heartbeat_timeout, options.replicas,
        former_slots, wire_dtype=model.wire_dtype(config.wire, config.dtype),
    )
    try:
        cluster = Cluster(
            options.bind, scheduler, _largest_reply_bytes(config, inputs),
            welcome=lambda slot: Welcome(slot, config.dtype, config.input_divisor, config.wire), curve_keys=options.curve_keys,
        )
    except ClusterError as error:  # only binding fails here
        raise ClusterError(f"{error}; is another coordinator running? choose another address with --bind") from None
    address = local_address(cluster.endpoint)
    spawned = (
        spawn_workers(options.workers, address, records.path / WORKER_LOGS, options.curve_keys) if options.spawn
        else LocalWorkers()
    )
    status_server = None
    try:
        if options.status_bind:
            status_server = StatusServer(options.status_bind)
            watch.listeners.append(status_server.publish)
            log.info("status served on %s", status_server.endpoint)
            watch.update()
        if options.curve_keys is None:  # said once the sockets are up, so a bad option stays a one-line error
            log.warning("no --curve-keys: anyone who can reach the port can join as a worker, and traffic is not encrypted")
        log.info("waiting for %d workers on %s", options.workers, cluster.endpoint)
        cluster.admit_workers(options.wait_timeout)
        images = {split: images_of(data, split) for split in SPLITS}
        verifier = Verifier(
            options.verify, options.verify_rate, np.random.default_rng(secrets.randbits(128)),
            inputs_for(images, config.dtype, config.input_divisor), model.wire_roundoff(config.wire),
        )
        kind = ClusterFirstLayer if options.second_layer_here else ClusterProducts
        products = kind(
            cluster, plan, images, permutation_seed, options.rebalance, verifier, config.wire,
            on_exposure=lambda *change: records.append_exposure(*position(), *change),
            on_quarantine=lambda *caught: records.append_quarantine(*position(), *caught),
        )
        if start is not None and start.permutations is not None:  # the resumed run sends the shuffles the interrupted one would have
            products.permutations.bit_generator.state = start.permutations
        watch.workers = lambda: worker_statuses(scheduler, products.plan, cluster.traffic)
        yield products
        records.save_workers(worker_statuses(scheduler, products.plan, cluster.traffic, departed=True))
        cluster.stop("training finished")
    except (Interrupted, KeyboardInterrupt):
        cluster.stop("the coordinator was interrupted")
        raise
    finally:
        cluster.close()
        if status_server:
            status_server.close()
        spawned.stop()


def _largest_reply_bytes(config: TrainingConfig, inputs: int) -> int:
    """A first-layer result of every input column and a full chunk, with room for msgpack's maps."""
    itemsize = np.dtype(config.dtype).itemsize
    return (inputs + config.chunk_rows) * config.hidden * itemsize + 65536


def evaluate_model(model_path: Path, data_dir: Path | None) -> float:
    """The test accuracy of a saved model on an MNIST-format folder."""
    params, input_divisor = load_model(model_path)
    data = load_dataset(data_dir)
    if params.w1.shape[0] != data.test_images.shape[1]:
        raise ModelError(f"model {model_path} takes {params.w1.shape[0]} inputs, the images have {data.test_images.shape[1]}")
    config = TrainingConfig(dtype=params.w1.dtype.name, input_divisor=input_divisor)
    products = LocalProducts({"test": model.inputs(data.test_images, config.dtype, input_divisor)})
    return Trainer(config, params, products, {"test": data.test_labels}).accuracy("test")
