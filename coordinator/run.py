"""One training run, in this process or on workers: the library under `coordinator train`."""

import logging
import secrets
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import model, settings
from common.data import Dataset, load_dataset
from common.exposure import ExposurePlan
from common.protocol import Shard, Welcome
from coordinator.cluster import Cluster
from coordinator.config import TrainingConfig
from coordinator.distributed import ClusterFirstLayer, ClusterProducts
from coordinator.rundir import ModelError, RunDirectory, load_model
from coordinator.scheduler import Scheduler
from coordinator.spawn import local_address, spawn_workers, stop_workers
from coordinator.training import LocalProducts, Trainer

log = logging.getLogger("coordinator")

XOR_ROWS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.uint8)
XOR_LABELS = np.array([0, 1, 1, 0], np.uint8)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ClusterOptions:
    bind: str
    workers: int
    spawn: bool  # start the workers as local processes
    wait_timeout: float  # seconds to wait for them to register
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


def train(
    config: TrainingConfig,
    run_dir: Path,
    cluster: ClusterOptions | None,
    on_epoch: Callable,
    on_batch: Callable | None = None,
) -> model.Params:
    """Train as configured, locally when `cluster` is None, writing the run directory as it goes."""
    data = load_data(config)
    sizes = layer_sizes(config, data)
    params = model.initial_params(sizes, config.init, config.seed, config.dtype)
    records = RunDirectory(run_dir)
    records.save_config(config, mode="local" if cluster is None else "distributed")

    def on_epoch_recorded(report):
        records.append_history(report)
        on_epoch(report)

    with products_backend(config, data, sizes, cluster, records) as products:
        Trainer(config, params, products, labels_of(data)).train(on_epoch_recorded, on_batch)
    records.save_model(params, config.input_divisor)
    return params


@contextmanager
def products_backend(config, data, sizes, cluster_options, records):
    """LocalProducts, or ClusterProducts over workers admitted (or spawned) as `cluster_options` say."""
    if cluster_options is None:
        yield LocalProducts({s: model.inputs(images_of(data, s), config.dtype, config.input_divisor) for s in SPLITS})
        return
    with _cluster_products(config, data, sizes, cluster_options, records) as products:
        yield products


@contextmanager
def _cluster_products(config, data, sizes, options: ClusterOptions, records: RunDirectory):
    inputs, hidden, _ = sizes
    plan = ExposurePlan.random(inputs, hidden, options.workers, config.seed)
    permutation_seed = secrets.randbits(128)
    records.save_exposure(plan, permutation_seed)

    def setup(slot: int) -> list:
        """A new worker's welcome and its columns of each split, sent once for the run."""
        columns = plan.columns(slot)
        shards = [Shard(s, np.ascontiguousarray(images_of(data, s)[:, columns])) for s in SPLITS]
        return [Welcome(slot, config.dtype, config.input_divisor), *shards]

    scheduler = Scheduler(options.workers, settings.PROTOCOL_VERSION, np.dtype(config.dtype))
    cluster = Cluster(options.bind, scheduler, _largest_reply_bytes(config, inputs), setup)
    processes = spawn_workers(options.workers, local_address(cluster.endpoint)) if options.spawn else []
    try:
        log.info("waiting for %d workers on %s", options.workers, cluster.endpoint)
        cluster.admit_workers(options.wait_timeout)
        for peer, worker in sorted(scheduler.workers.items(), key=lambda item: item[1].slot):
            log.info(
                "worker %s sees %d input columns and %d hidden units",
                worker.name, len(plan.columns(worker.slot)), len(plan.units(worker.slot)),
            )
        products = ClusterFirstLayer if options.second_layer_here else ClusterProducts
        yield products(cluster, plan, permutation_seed)
        cluster.stop("training finished")
    finally:
        cluster.close()
        stop_workers(processes)


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
