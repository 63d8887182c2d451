"""The benchmark's plan: floor and cluster side by side per batch size, and the time to reach an accuracy."""

import statistics

import numpy as np

from coordinator.bench.session import EpochMeasure, PeakMemory, Session, training_session, transport_session
from coordinator.bench.traffic import epoch_batches, minimum_epoch_bytes
from coordinator.config import TrainingConfig



def speed_rows(config: TrainingConfig, clusters: list, repeats: int, epochs: int, rows: int, sizes: tuple,
               floor_threads: int | None, transport: bool) -> list:
    """One local row and one row per (workers, later layers here, verify mode, spawn transport, rekey) in `clusters`,
    for the batch size in `config`; with `transport`, after the first cluster row of each (workers, later layers here,
    rows kept or not) its bare transport row (the same messages through echo workers, see coordinator.bench.echo)."""
    floor = training_session(config, 0, blas_threads=floor_threads)
    itemsize, steps = np.dtype(config.dtype).itemsize, len(epoch_batches(rows, config.batch_size))
    floor_measures, measured_rows, echoed = [], [], set()
    for workers, later_layers_here, verify, spawn_transport, rekey in clusters:
        cluster_config = config.with_overrides(rekey=rekey)
        rows_travel = cluster_config.rekey_steps == 1
        sessions = {"cluster": training_session(cluster_config, workers, later_layers_here, verify=verify,
                                                spawn_transport=spawn_transport)}
        if transport and (workers, later_layers_here, rows_travel) not in echoed:
            echoed.add((workers, later_layers_here, rows_travel))
            sessions["transport"] = transport_session(rows, config.batch_size, sizes, workers, itemsize,
                                                      later_layers_here, rows_travel)
        turns = [  # the floor, then each session: load changes hit every side of a ratio alike
            (_measured(floor, epochs), {mode: _measured(session, epochs) for mode, session in sessions.items()})
            for _ in range(repeats)
        ]
        floor_measures += [floor_measure for floor_measure, _ in turns]
        minimum = minimum_epoch_bytes(rows, config.batch_size, sizes, workers, itemsize, later_layers_here,
                                      cluster_config.rekey_steps)
        for mode, session in sessions.items():
            pairs = [(floor_measure, measures[mode]) for floor_measure, measures in turns]
            row = _measured_row(mode, pairs, session.finish(), minimum, steps)
            measured_rows.append({"batch_size": config.batch_size, "workers": workers,
                                  "verify": verify if mode == "cluster" else "-", "rekey": rekey,
                                  "spawn_transport": spawn_transport if mode == "cluster" else "tcp",
                                  "later_layers": "coordinator" if later_layers_here else "workers", **row})
    memory = floor.finish()
    local_row = {
        "measure": "epoch", "mode": "local", "workers": 0, "batch_size": config.batch_size, "later_layers": "local",
        "verify": "-", "spawn_transport": "-", "rekey": "-",
        "floor_blas_threads": floor_threads,
        "epoch_seconds": statistics.median(m.seconds for m in floor_measures), "ratio_to_floor": 1.0,
        "cpu_ms_per_step": _ms_per_step([m.cpu_seconds for m in floor_measures], steps),
        "cpu_ratio_to_floor": 1.0, "rounds_per_step": 0.0,
        "bytes_per_epoch": 0, "min_bytes_per_epoch": 0,
        "coordinator_peak_rss_mb": memory.coordinator_mb, "worker_peak_rss_mb": None,
    }
    return [local_row, *measured_rows]


def _measured_row(mode: str, pairs: list, memory: PeakMemory, minimum_bytes: int, steps: int) -> dict:
    """A cluster or transport configuration's figures from its (floor's EpochMeasure, its EpochMeasure) pairs."""
    seconds = statistics.median(measure.seconds for _, measure in pairs)
    coordinator_cpu, worker_cpu = (_ms_per_step([getattr(measure, name) for _, measure in pairs], steps)
                                   for name in ("cpu_seconds", "worker_cpu_seconds"))
    cpu = None if coordinator_cpu is None else coordinator_cpu + (worker_cpu or 0.0)
    floor_cpu = _ms_per_step([floor.cpu_seconds for floor, _ in pairs], steps)
    last = pairs[-1][1]  # traffic is the same every epoch
    return {
        "measure": "epoch", "mode": mode, "epoch_seconds": seconds,
        "ratio_to_floor": seconds / statistics.median(floor.seconds for floor, _ in pairs),
        "cpu_ms_per_step": cpu, "cpu_ratio_to_floor": None if cpu is None else cpu / floor_cpu,
        "coordinator_cpu_ms_per_step": coordinator_cpu, "worker_cpu_ms_per_step": worker_cpu,
        "rounds_per_step": last.rounds / steps, "steps": steps, "bytes_per_epoch": last.bytes,
        "min_bytes_per_epoch": minimum_bytes, "coordinator_peak_rss_mb": memory.coordinator_mb, "worker_peak_rss_mb": memory.worker_mb,
        "coordinator_ms_per_step": _per_step([m.coordinator_phases for _, m in pairs], steps),
        "worker_ms_per_step": _per_step([m.worker_phases for _, m in pairs], steps),
    }


def _ms_per_step(seconds: list, steps: int) -> float | None:
    """The median of the repeats' seconds as milliseconds per step (None where nothing was measured)."""
    return None if seconds[0] is None else statistics.median(seconds) / steps * 1000


def _per_step(epochs: list, steps: int) -> dict:
    """phase -> milliseconds per step, the median over the repeats' epochs (empty where nothing was timed)."""
    if not epochs or not epochs[0]:
        return {}
    return {phase: statistics.median(epoch[phase] for epoch in epochs) / steps * 1000 for phase in epochs[0]}


def accuracy_rows(config: TrainingConfig, workers: int, targets: tuple) -> list:
    """Seconds and epochs until the test accuracy first reaches each target, locally and on `workers`."""
    return [_time_to_accuracy(config, count, targets) for count in (0, workers)]


def _time_to_accuracy(config: TrainingConfig, workers: int, targets: tuple) -> dict:
    session, elapsed, reached, history = training_session(config, workers), 0.0, {}, []
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
    figures = []  # per target: when it was first reached, if it was
    for target in targets:
        seconds, epochs = reached.get(target, (None, None))
        figures.append({"target": target, "seconds": seconds, "epochs": epochs})
    return {"measure": "accuracy", "mode": "cluster" if workers else "local", "workers": workers,
            "batch_size": config.batch_size, "test_accuracy_by_epoch": history, "reached": figures}


def _measured(session: Session, epochs: int) -> EpochMeasure:
    """The mean of `epochs` consecutive epochs."""
    measures = [session.epoch() for _ in range(epochs)]
    return EpochMeasure(
        sum(m.seconds for m in measures) / epochs, measures[-1].test_accuracy,
        sum(m.bytes for m in measures) // epochs, sum(m.rounds for m in measures) // epochs,
        _mean_phases([m.coordinator_phases for m in measures]), _mean_phases([m.worker_phases for m in measures]),
        *(_mean([getattr(m, name) for m in measures]) for name in ("cpu_seconds", "worker_cpu_seconds")),
    )


def _mean(values: list) -> float | None:
    return None if values[0] is None else sum(values) / len(values)


def _mean_phases(epochs: list) -> dict:
    return {phase: sum(epoch[phase] for epoch in epochs) / len(epochs) for phase in epochs[0]}
