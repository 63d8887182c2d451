"""One measured mode kept alive in its own process between timed epochs, so each mode's memory is its own.

The parent drives it over a pipe: every "epoch" command runs one epoch and answers with an EpochMeasure;
"finish" answers with the peak memory and ends the session. The floor and the cluster run alternate
epochs this way, so a change in the machine's load hits both sides of a ratio alike. A mode is a context
manager, run in the child, that warms up and yields the function that times one epoch and the one that
waits between epochs (a cluster's coordinator must keep its heartbeats going meanwhile, or its workers,
hearing nothing while the other modes take their turns, would register again).
"""

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.bench import echo
from coordinator.bench.traffic import epoch_batches, round_bytes
from common import model, phases
from coordinator import run
from coordinator.cluster_options import ClusterOptions
from coordinator.config import TrainingConfig
from coordinator.distributed import ClusterProducts
from coordinator.rundir import RunDirectory
from coordinator.spawn import LOOPBACK_ANY_PORT, spawn_endpoint
from coordinator.training import Trainer
from worker.cli import BLAS_THREAD_VARIABLES

REGISTER_TIMEOUT = 120.0  # seconds for spawned workers to start on a loaded machine
WARMUP_STEPS = 20  # steps before timing: imports, first allocations and BLAS start-up are paid here
COMMAND_WAIT = 0.05  # seconds between looks for the parent's next command


@dataclass(frozen=True)
class EpochMeasure:
    seconds: float
    test_accuracy: float | None
    bytes: int  # sent plus received by the coordinator, identity frames aside
    rounds: int  # synchronous scatter/gather rounds
    coordinator_phases: dict = field(default_factory=dict)  # phase -> seconds of the epoch (see common.phases)
    worker_phases: dict = field(default_factory=dict)  # phase -> seconds of the epoch, summed over the workers
    cpu_seconds: float | None = None  # CPU time of the epoch in the trainer's (or router's) process, every thread's
    worker_cpu_seconds: float | None = None  # CPU time of the epoch, summed over the workers' processes


@dataclass(frozen=True)
class PeakMemory:
    coordinator_mb: float
    worker_mb: float | None  # the largest of the workers'


class Session:
    """The parent's handle on a mode running in a child process; `label` names it in the child's errors."""

    def __init__(self, label: str, mode: Callable, arguments: tuple, blas_threads: int | None = None):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited sockets or pages
        self.label = label
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, mode, arguments), daemon=True)
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
            raise RuntimeError(f"{self.label}: {answer}")
        return answer


def training_session(
    config: TrainingConfig, workers: int, later_layers_here: bool = True, blas_threads=None, verify: str = "sample",
    spawn_transport: str = "ipc",
) -> Session:
    """A trainer: local when `workers` is 0, else a cluster of that many spawned workers, reached over a Unix
    socket as `coordinator train --spawn` does (`spawn_transport` "ipc"), or over TCP loopback ("tcp")."""
    label = f"{workers} workers" if workers else "local"
    return Session(label, _trained_epochs, (config, workers, later_layers_here, verify, spawn_transport), blas_threads)


def transport_session(rows: int, batch_size: int, sizes: tuple, workers: int, itemsize: int,
                      later_layers_here: bool, rows_travel: bool = True) -> Session:
    """Only the messages a cluster's epoch's steps move, with their sizes, through echo workers (see coordinator.bench.echo);
    with `rows_travel` False, those of kept rows between re-keys."""
    arguments = (rows, batch_size, sizes, workers, itemsize, later_layers_here, rows_travel)
    return Session(f"transport, {workers} workers", _echoed_epochs, arguments)


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


def _serve(connection, mode: Callable, arguments: tuple) -> None:
    try:
        with mode(*arguments) as (timed_epoch, wait):
            connection.send("ready")
            while _next_command(connection, wait) == "epoch":
                connection.send(timed_epoch())
            connection.send(PeakMemory(_peak_rss_mb(os.getpid()), _largest_worker_rss_mb()))
    except Exception as error:  # the parent raises it, with the child's text and the session's label
        connection.send(RuntimeError(str(error)))


def _next_command(connection, wait: Callable) -> str:
    while not connection.poll():
        wait(COMMAND_WAIT)
    return connection.recv()


@contextmanager
def _trained_epochs(config: TrainingConfig, workers: int, later_layers_here: bool, verify: str, spawn_transport: str):
    data = config.load_data()
    sizes = config.layer_sizes(data)
    params = model.initial_params(sizes, config.init, config.seed, config.dtype)
    with tempfile.TemporaryDirectory() as scratch:
        options = None
        if workers:
            endpoint = LOOPBACK_ANY_PORT if spawn_transport == "tcp" else spawn_endpoint(Path(scratch))
            options = ClusterOptions(
                endpoint, workers, True, REGISTER_TIMEOUT, later_layers_here=later_layers_here, verify=verify
            )
        os.environ[phases.PHASES_DIR_VARIABLE] = scratch  # read by the workers spawned below
        clock = phases.PhaseClock()
        with run.products_backend(config, data, options, RunDirectory(Path(scratch)), clock=clock) as products:
            trainer = Trainer(config, params, products, data.labels())
            warmup_rows = np.arange(min(WARMUP_STEPS * config.batch_size, len(data.train_labels)), dtype=np.int32)
            for start in range(0, len(warmup_rows), config.batch_size):
                trainer.train_batch(warmup_rows[start : start + config.batch_size])
            products.epoch_ended()  # so that a timed epoch is a whole period of rows kept every epoch
            cluster = products.cluster if isinstance(products, ClusterProducts) else None  # the one-process floor has none
            yield lambda: _timed_epoch(trainer, cluster, clock, Path(scratch)), cluster.idle if cluster else time.sleep


def _timed_epoch(trainer: Trainer, cluster, clock: phases.PhaseClock, phases_dir: Path) -> EpochMeasure:
    traffic = cluster.traffic if cluster else None
    before = (traffic.sent + traffic.received, traffic.rounds) if traffic else (0, 0)
    workers_before = phases.read_shared(phases_dir)
    cpu_started, worker_cpu_started = time.process_time(), _children_cpu_seconds()
    clock.lap("wait")  # the time between epochs is not the epoch's
    started = time.perf_counter()  # right after the lap, so that the phases and the seconds span the same time
    phases_before = (clock.seconds(), workers_before)
    report = trainer.run_epoch()
    trainer.products.epoch_ended()  # where kept rows are re-keyed every epoch
    clock.lap("math")  # the epoch's last stretch: its end and its report
    seconds = time.perf_counter() - started
    cpu_seconds, worker_cpu_seconds = time.process_time() - cpu_started, _children_cpu_seconds() - worker_cpu_started
    phases_after = (clock.seconds(), phases.read_shared(phases_dir))
    after = (traffic.sent + traffic.received, traffic.rounds) if traffic else (0, 0)
    coordinator, workers = (
        {phase: after_[phase] - before_[phase] for phase in names}
        for before_, after_, names in zip(phases_before, phases_after, (phases.COORDINATOR_PHASES, phases.WORKER_PHASES))
    )
    return EpochMeasure(
        seconds, report.test_accuracy, after[0] - before[0], after[1] - before[1],
        coordinator if cluster else {}, workers if cluster else {}, cpu_seconds, worker_cpu_seconds if cluster else None,
    )


@contextmanager
def _echoed_epochs(rows: int, batch_size: int, sizes: tuple, workers: int, itemsize: int, later_layers_here: bool,
                   rows_travel: bool):
    batches = epoch_batches(rows, batch_size)
    steps = {  # batch size -> its step's rounds of request frames, made before any timing
        batch: [echo.requests(request, reply, workers)
                for request, reply in round_bytes(batch, sizes, workers, itemsize, later_layers_here, None, rows_travel)]
        for batch in set(batches)
    }
    epoch = [steps[batch] for batch in batches]
    with echo.EchoRouter(LOOPBACK_ANY_PORT, workers, REGISTER_TIMEOUT) as router:
        for rounds in epoch[:WARMUP_STEPS]:
            router.run_step(rounds)
        yield lambda: _timed_echo_epoch(router, epoch), time.sleep  # echo workers keep no heartbeat


def _timed_echo_epoch(router: echo.EchoRouter, epoch: list) -> EpochMeasure:
    """`epoch`: each step's rounds of request frames."""
    cpu_started, worker_cpu_started = time.process_time(), _children_cpu_seconds()
    start = time.perf_counter()
    moved = sum(router.run_step(rounds) for rounds in epoch)
    seconds = time.perf_counter() - start
    return EpochMeasure(seconds, None, moved, sum(map(len, epoch)), cpu_seconds=time.process_time() - cpu_started,
                        worker_cpu_seconds=_children_cpu_seconds() - worker_cpu_started)


def memory_mb(pid: int, field: str) -> float:
    """A memory figure of a process's /proc status, in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"no {field} for process {pid}")


def _peak_rss_mb(pid: int) -> float:
    return memory_mb(pid, "VmHWM")


def _largest_worker_rss_mb() -> float | None:
    """The largest peak resident memory among this process's children (the spawned workers), in MiB."""
    return max((_peak_rss_mb(pid) for pid in children(os.getpid())), default=None)


def _children_cpu_seconds() -> float:
    """The CPU time so far of this process's children (the spawned or echo workers), every thread's, in seconds:
    each thread's schedstat counts nanoseconds, where /proc/PID/stat counts 10 ms ticks."""
    nanoseconds = 0
    for pid in children(os.getpid()):
        for task in Path(f"/proc/{pid}/task").iterdir():
            nanoseconds += int((task / "schedstat").read_text().split()[0])  # time on a CPU (proc(5))
    return nanoseconds / 1e9


def children(pid: int) -> list:
    """A process's children's process ids (each of its threads lists those it started)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]
