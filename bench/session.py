"""One trainer kept alive in its own process between timed epochs, so each mode's memory is its own.

The parent drives it over a pipe: every "epoch" command runs one epoch and answers with an EpochMeasure;
"finish" answers with the peak memory and ends the session. The floor and the cluster run alternate
epochs this way, so a change in the machine's load hits both sides of a ratio alike.
"""

import multiprocessing
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import model
from coordinator import run
from coordinator.config import TrainingConfig
from coordinator.rundir import RunDirectory
from coordinator.training import Trainer
from worker.cli import BLAS_THREAD_VARIABLES

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
REGISTER_TIMEOUT = 120.0  # seconds for spawned workers to start on a loaded machine
WARMUP_STEPS = 20  # steps before timing: imports, first allocations and BLAS start-up are paid here


@dataclass(frozen=True)
class EpochMeasure:
    seconds: float
    test_accuracy: float | None
    bytes: int  # sent plus received by the coordinator, identity frames aside
    rounds: int  # synchronous scatter/gather rounds


@dataclass(frozen=True)
class PeakMemory:
    coordinator_mb: float
    worker_mb: float | None  # the largest of the workers'


class Session:
    """The parent's handle on a trainer running in a child process: local when `workers` is 0."""

    def __init__(
        self, config: TrainingConfig, workers: int, second_layer_here: bool = False, blas_threads=None,
        verify: str = "sample",
    ):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited sockets or pages
        self.connection, child_end = context.Pipe()
        arguments = (child_end, config, workers, second_layer_here, verify)
        self.process = context.Process(target=_serve, args=arguments, daemon=True)
        with _blas_threads(blas_threads):
            self.process.start()
        self._expect(self.connection.recv())  # ready once warmed up

    def epoch(self) -> EpochMeasure:
        self.connection.send("epoch")
        return self._expect(self.connection.recv())

    def finish(self) -> PeakMemory:
        self.connection.send("finish")
        memory = self._expect(self.connection.recv())
        self.process.join()
        return memory

    def _expect(self, answer):
        if isinstance(answer, BaseException):
            self.process.join()
            raise answer
        return answer


@contextmanager
def _blas_threads(threads: int | None):
    """Start a child with this many BLAS threads (None: the library's default), read when it imports numpy."""
    saved = {name: os.environ.get(name) for name in BLAS_THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in BLAS_THREAD_VARIABLES if threads is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _serve(connection, config: TrainingConfig, workers: int, second_layer_here: bool, verify: str) -> None:
    try:
        _run_session(connection, config, workers, second_layer_here, verify)
    except Exception as error:  # the parent raises it, with the child's text
        connection.send(RuntimeError(f"{'local' if not workers else f'{workers} workers'}: {error}"))


def _run_session(connection, config: TrainingConfig, workers: int, second_layer_here: bool, verify: str) -> None:
    data = run.load_data(config)
    sizes = run.layer_sizes(config, data)
    params = model.initial_params(sizes, config.init, config.seed, config.dtype)
    options = None
    if workers:
        options = run.ClusterOptions(
            LOOPBACK_ANY_PORT, workers, True, REGISTER_TIMEOUT, second_layer_here=second_layer_here, verify=verify
        )
    with tempfile.TemporaryDirectory() as scratch:
        with run.products_backend(config, data, sizes, options, RunDirectory(Path(scratch))) as products:
            trainer = Trainer(config, params, products, run.labels_of(data))
            warmup_rows = np.arange(min(WARMUP_STEPS * config.batch_size, len(data.train_labels)), dtype=np.int32)
            for start in range(0, len(warmup_rows), config.batch_size):
                trainer.train_batch(warmup_rows[start : start + config.batch_size])
            connection.send("ready")
            while connection.recv() == "epoch":
                connection.send(_timed_epoch(trainer, getattr(products, "cluster", None)))
            connection.send(PeakMemory(_peak_rss_mb(os.getpid()), _largest_worker_rss_mb()))


def _timed_epoch(trainer: Trainer, cluster) -> EpochMeasure:
    traffic = cluster.traffic if cluster else None
    before = (traffic.sent + traffic.received, traffic.rounds) if traffic else (0, 0)
    report = trainer.run_epoch()
    after = (traffic.sent + traffic.received, traffic.rounds) if traffic else (0, 0)
    return EpochMeasure(report.seconds, report.test_accuracy, after[0] - before[0], after[1] - before[1])


def _peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"no VmHWM for process {pid}")


def _largest_worker_rss_mb() -> float | None:
    """The largest peak resident memory among this process's children (the spawned workers), in MiB."""
    children = [
        int(pid)
        for task in Path(f"/proc/{os.getpid()}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    return max((_peak_rss_mb(pid) for pid in children), default=None)
