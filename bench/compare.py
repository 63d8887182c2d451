"""The benchmark's plan: floor and cluster side by side per batch size, and the time to reach an accuracy."""

import statistics

import numpy as np

from bench.session import EpochMeasure, PeakMemory, Session
from bench.traffic import minimum_epoch_bytes
from coordinator.config import TrainingConfig

MIB = 1024 * 1024


def speed_rows(config: TrainingConfig, clusters: list, repeats: int, epochs: int, rows: int, sizes: tuple,
               floor_threads: int | None) -> list:
    """One local row and one row per (workers, second layer here, verify mode) in `clusters`, for the batch size
    in `config`."""
    floor = Session(config, 0, blas_threads=floor_threads)
    floor_seconds, cluster_rows = [], []
    for workers, second_layer_here, verify in clusters:
        cluster = Session(config, workers, second_layer_here, verify=verify)
        pairs = [(_measured(floor, epochs).seconds, _measured(cluster, epochs)) for _ in range(repeats)]
        floor_seconds += [floor_time for floor_time, _ in pairs]
        minimum = minimum_epoch_bytes(rows, config.batch_size, sizes, workers, np.dtype(config.dtype).itemsize,
                                      second_layer_here)
        row = _cluster_row(pairs, cluster.finish(), minimum, steps=-(-rows // config.batch_size))
        cluster_rows.append({"batch_size": config.batch_size, "workers": workers, "verify": verify,
                             "second_layer": "coordinator" if second_layer_here else "workers", **row})
    memory = floor.finish()
    local_row = {
        "measure": "epoch", "mode": "local", "workers": 0, "batch_size": config.batch_size, "second_layer": "local",
        "verify": "-",
        "floor_blas_threads": floor_threads,
        "epoch_seconds": statistics.median(floor_seconds), "ratio_to_floor": 1.0, "rounds_per_step": 0.0,
        "bytes_per_epoch": 0, "min_bytes_per_epoch": 0,
        "coordinator_peak_rss_mb": memory.coordinator_mb, "worker_peak_rss_mb": None,
    }
    return [local_row, *cluster_rows]


def _cluster_row(pairs: list, memory: PeakMemory, minimum_bytes: int, steps: int) -> dict:
    """A cluster configuration's figures from its (floor seconds, cluster EpochMeasure) pairs."""
    seconds = statistics.median(measure.seconds for _, measure in pairs)
    last = pairs[-1][1]  # traffic is the same every epoch
    return {
        "measure": "epoch", "mode": "cluster", "epoch_seconds": seconds,
        "ratio_to_floor": seconds / statistics.median(floor_time for floor_time, _ in pairs),
        "rounds_per_step": last.rounds / steps, "bytes_per_epoch": last.bytes, "min_bytes_per_epoch": minimum_bytes,
        "coordinator_peak_rss_mb": memory.coordinator_mb, "worker_peak_rss_mb": memory.worker_mb,
    }


def accuracy_rows(config: TrainingConfig, workers: int, targets: tuple) -> list:
    """Seconds and epochs until the test accuracy first reaches each target, locally and on `workers`."""
    return [_time_to_accuracy(config, count, targets) for count in (0, workers)]


def _time_to_accuracy(config: TrainingConfig, workers: int, targets: tuple) -> dict:
    session, elapsed, reached, history = Session(config, workers), 0.0, {}, []
    for epoch in range(1, config.epochs + 1):
        measure = session.epoch()
        elapsed += measure.seconds
        history.append(measure.test_accuracy)
        for target in targets:
            if target not in reached and measure.test_accuracy >= target:
                reached[target] = (elapsed, epoch)
        if len(reached) == len(targets):
            break
    session.finish()
    row = {"measure": "accuracy", "mode": "cluster" if workers else "local", "workers": workers,
           "batch_size": config.batch_size, "test_accuracy_by_epoch": history}
    for target in targets:
        seconds, epochs = reached.get(target, (None, None))
        row[f"seconds_to_{round(target * 100)}"] = seconds
        row[f"epochs_to_{round(target * 100)}"] = epochs
    return row


def _measured(session: Session, epochs: int) -> EpochMeasure:
    """The mean of `epochs` consecutive epochs."""
    measures = [session.epoch() for _ in range(epochs)]
    return EpochMeasure(
        sum(m.seconds for m in measures) / epochs, measures[-1].test_accuracy,
        sum(m.bytes for m in measures) // epochs, sum(m.rounds for m in measures) // epochs,
    )
