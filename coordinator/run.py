"""One training run, in this process or on workers: the library under `coordinator train`."""

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from common import model, phases
from common.data import SPLITS, Dataset
from coordinator.checkpoint import FOLDER as CHECKPOINT_FOLDER
from coordinator.checkpoint import Checkpoint, CheckpointError, Checkpointer, has_checkpoints, stop_between_steps
from coordinator.cluster_options import ClusterOptions
from coordinator.config import OUTPUT_UNITS, TrainingConfig
from coordinator.labels import PrivateLabels
from coordinator.rundir import RunDirectory
from coordinator.status import RunStatus, RunWatch
from coordinator.training import LocalProducts, Progress, Trainer


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
    data = config.load_data()
    start = start or _fresh_start(config, data, run_dir)
    records = RunDirectory(run_dir, start.history)
    records.save_config(config, mode="local" if cluster is None else "distributed")
    if start.labels is not None:
        records.save_labels(start.labels)
    watch = watch_from(config, data, start.progress, [on_status] if on_status else [])
    with products_backend(config, data, cluster, records, start, watch) as products:
        trainer = Trainer(config, start.params, products, data.labels(), dataclasses.replace(start.progress),
                          start.labels)
        trainer.masks.bit_generator.state = start.masks
        checkpoints = Checkpointer(records.path / CHECKPOINT_FOLDER, trainer, start)

        def on_epoch_recorded(report):
            if trainer.private is not None:  # a second stage's draw, made at the epoch's start, is on record
                records.save_labels(trainer.private)
            records.append_history(report)
            watch.epoch_done(report)
            on_epoch(report)
            checkpoints.after_epoch(report)

        def on_batch_watched(samples):
            watch.batch_done(samples)
            if on_batch:
                on_batch(samples)

        with stop_between_steps(checkpoints):
            trainer.train(on_epoch_recorded, on_batch_watched, checkpoints.after_step)
    records.save_model(trainer.params, config)
    return trainer.params


def _fresh_start(config: TrainingConfig, data: Dataset, run_dir: Path) -> Checkpoint:
    """Where a new run starts: fresh parameters, in a directory that holds no other run."""
    if has_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds a run's checkpoints; continue it with --resume")
    params = model.initial_params(
        config.layer_sizes(data), config.init, config.seed, config.dtype, config.uniform_limit, config.normal_std
    )
    masks = model.dropout_masks(config.seed).bit_generator.state
    labels = None if config.label_privacy is None else PrivateLabels.drawn(
        data.train_labels, config.label_privacy, config.label_privacy_stages, OUTPUT_UNITS[config.dataset], config.seed)
    return Checkpoint(params, Progress(), [], dataclasses.asdict(config), masks=masks, labels=labels)


def watch_from(config: TrainingConfig, data: Dataset, progress: Progress, listeners: list) -> RunWatch:
    """A RunWatch of a run about to start (or continue) at `progress`."""
    samples, size = min(progress.step * config.batch_size, len(data.train_labels)), len(data.train_labels)
    status = RunStatus("waiting for workers", progress.epoch, config.epochs, samples, size, config.batch_size)
    return RunWatch(status, listeners)


@contextmanager
def products_backend(config: TrainingConfig, data: Dataset, cluster: ClusterOptions | None, records: RunDirectory,
                     start: Checkpoint | None = None, watch: RunWatch | None = None, clock=phases.NO_CLOCK):
    """LocalProducts, or ClusterProducts over the workers `cluster` asks for; `start` is the checkpoint a resumed
    run continues from, `watch` follows the run for the status and the records, `clock` (a phases.PhaseClock)
    times the rounds."""
    watch = watch or watch_from(config, data, Progress(), [])
    if cluster is None:
        yield LocalProducts({split: model.inputs(data.images(split), config.dtype, config.input_divisor) for split in SPLITS})
        return
    with cluster.products(config, data, records, start, watch, clock) as products:
        yield products
