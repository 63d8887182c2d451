"""Where a run is and how its workers do: one snapshot for the live display, `coordinator status` and
workers.json.

The status is served on a socket of its own (a REP at `--status-bind`), not on the workers' ROUTER.
A status client is then never a candidate worker: it cannot take a slot, touch the scheduler's
bookkeeping, add to the traffic counts or trip the protocol gate into dropping anyone. It cannot stall
training either: a thread answers it from an immutable snapshot that the training loop replaces after
every batch, so the two share nothing mutable. What a client sends is ignored; the answer is always
the latest snapshot as one JSON frame.
"""

import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from common import sockets
from common.errors import UserError
from common.settings import MAX_STATUS_REQUEST_BYTES, STATUS_POLL_INTERVAL
from coordinator.training import batches


class StatusError(UserError):
    """The status socket cannot be bound or a coordinator does not answer."""


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    slot: int | None  # None: a standby
    columns: int  # input pixel columns it holds
    hidden_units: int
    answered: int  # requests answered
    last_round_trip: float | None  # seconds
    busy_seconds: float  # summed round trips: time the coordinator waited on this worker's answers
    sent_bytes: int  # coordinator -> worker
    received_bytes: int  # worker -> coordinator
    left: str | None = None  # why it was dropped; it then holds no columns


@dataclass(frozen=True)
class RunStatus:
    state: str  # "waiting for workers", "training" or "finished"
    epoch: int  # the epoch under way, 1-based
    epochs: int
    samples: int  # training images done in this epoch
    samples_per_epoch: int
    batch_size: int
    workers: tuple = ()  # WorkerStatus, by slot

    @property
    def step(self) -> int:
        return batches(self.samples, self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return batches(self.samples_per_epoch, self.batch_size)

    def summary(self) -> str:
        return (f"{self.state}  epoch {self.epoch}/{self.epochs}  step {self.step}/{self.steps_per_epoch}"
                f"  {len(self.workers)} workers")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: bytes) -> "RunStatus":
        """A snapshot as StatusServer sends it, or ValueError."""
        try:
            fields = json.loads(text)
            workers = tuple(WorkerStatus(**worker) for worker in fields.pop("workers"))
            return cls(**fields, workers=workers)
        except (TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"not a status: {error}") from None


def worker_statuses(scheduler, plan, traffic, departed: bool = False) -> tuple:
    """Each admitted worker's numbers, by slot (standbys last), from the scheduler, the plan and the traffic;
    with `departed`, then those dropped during the run, in the order they left."""
    by_slot = sorted(scheduler.workers.items(), key=lambda item: (item[1].slot is None, item[1].slot or 0))
    statuses = [_status(peer, worker, plan, traffic) for peer, worker in by_slot]
    if departed:
        statuses += [_status(peer, worker, None, traffic) for peer, worker in scheduler.departed.items()]
    return tuple(statuses)


def _status(peer: bytes, worker, plan, traffic) -> WorkerStatus:
    """One worker's numbers; without a plan (a departed worker) it holds no columns or units."""
    sent, received = traffic.by_peer.get(peer, (0, 0))
    columns, units = (len(plan.columns(worker.slot)), plan.units_held(worker.slot)) if plan else (0, 0)
    return WorkerStatus(worker.name, worker.slot, columns, units, worker.answered, worker.last_round_trip,
                        worker.busy_seconds, sent, received, worker.left)


@dataclass
class RunWatch:
    """Follows a run through the trainer's callbacks and hands a fresh RunStatus to every listener."""

    status: RunStatus
    listeners: list = field(default_factory=list)  # callables taking a RunStatus
    workers: Callable[[], tuple] = tuple  # replaced by the cluster's view once its workers are in

    def update(self, **changes) -> None:
        self.status = dataclasses.replace(self.status, workers=self.workers(), **changes)
        for listener in self.listeners:
            listener(self.status)

    def position(self) -> tuple:
        """(epoch, step): where the run is, for the records."""
        return self.status.epoch, self.status.step

    def batch_done(self, samples: int) -> None:
        self.update(state="training", samples=samples)

    def epoch_done(self, report) -> None:
        if report.epoch < self.status.epochs:
            self.update(epoch=report.epoch + 1, samples=0)
        else:
            self.update(state="finished")


class StatusServer:
    """A REP socket answering every request with the latest RunStatus as JSON, from a thread of its own."""

    def __init__(self, bind: str):
        self.socket = zmq.Context.instance().socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_STATUS_REQUEST_BYTES)
        self.endpoint = sockets.bind(self.socket, bind, StatusError, "the status socket ")
        self.answer = b"{}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self.thread.start()  # from here on only the thread touches the socket

    def publish(self, status: RunStatus) -> None:
        self.answer = status.to_json().encode()  # one reference swap: no lock needed

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if self.socket.poll(STATUS_POLL_INTERVAL * 1000):
                self.socket.recv_multipart()
                self.socket.send(self.answer)
        self.socket.close()


def request_status(address: str, timeout: float) -> RunStatus:
    """Ask the status socket at `address` for its latest snapshot."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        socket.send(b"status")
        if not socket.poll(timeout * 1000):
            raise StatusError(f"no answer from {address} within {timeout:g} s (is the coordinator running "
                              "with --status-bind?)")
        return RunStatus.from_json(socket.recv())
    except zmq.ZMQError as error:
        raise StatusError(f"cannot connect to {address}: {error}") from None
    except ValueError:
        raise StatusError(f"{address} did not answer with a coordinator's status") from None
    finally:
        socket.close()
