"""The run's status without sockets: round-trip bookkeeping, the per-worker view, and the watch's states."""

import numpy as np
import pytest

from common.exposure import ExposurePlan
from common.protocol import LaterBackward, Register, Result
from coordinator.cluster import Traffic
from coordinator.scheduler import Arrived, Expected, Scheduler
from coordinator.status import RunStatus, RunWatch, worker_statuses
from coordinator.training import EpochReport

F32 = np.dtype("float32")


def _answered_round(scheduler: Scheduler, sent_at: float, answered_at: float) -> None:
    request = (LaterBackward(0, 2, np.zeros((2, 3), F32)), Expected({"error": (2, 3)}))
    for send in scheduler.start_round({0: request}, now=sent_at):
        result = Result(send.message.request, {"error": np.zeros((2, 3), F32)})
        assert scheduler.handle(Arrived(send.peer, result, at=answered_at)) == []


def test_worker_status_adds_up_round_trips_and_bytes():
    scheduler = Scheduler(capacity=1, version=1, dtype=F32)
    scheduler.handle(Arrived(b"peer", Register("A", 1)))
    _answered_round(scheduler, sent_at=10.0, answered_at=10.5)
    _answered_round(scheduler, sent_at=20.0, answered_at=20.25)
    traffic = Traffic()
    traffic.count(b"peer", sent=300, received=120)
    plan = ExposurePlan.random(784, (128,), 1, seed=0)
    (status,) = worker_statuses(scheduler, plan, traffic)
    assert (status.name, status.slot, status.columns, status.hidden_units, status.answered) == ("A", 0, 784, 128, 2)
    assert (status.last_round_trip, status.busy_seconds) == (0.25, 0.75)
    assert (status.sent_bytes, status.received_bytes) == (300, 120)


def test_watch_moves_through_epochs_to_finished():
    seen = []
    watch = RunWatch(RunStatus("waiting for workers", 1, 2, 0, 100, 32), [seen.append])
    watch.batch_done(64)
    assert (seen[-1].state, seen[-1].epoch, seen[-1].step, seen[-1].steps_per_epoch) == ("training", 1, 2, 4)
    watch.epoch_done(EpochReport(1, 0.5, 0.5, 0.5, 1.0))
    assert (seen[-1].epoch, seen[-1].samples) == (2, 0)
    watch.epoch_done(EpochReport(2, 0.4, 0.6, 0.6, 1.0))
    assert seen[-1].state == "finished" and len(seen) == 3


def test_status_survives_json_and_junk_is_refused():
    scheduler = Scheduler(capacity=1, version=1, dtype=F32)
    scheduler.handle(Arrived(b"peer", Register("A", 1)))
    workers = worker_statuses(scheduler, ExposurePlan.random(4, (2,), 1, seed=0), Traffic())
    status = RunStatus("training", 1, 3, 10, 100, 10, workers)
    assert RunStatus.from_json(status.to_json().encode()) == status
    for junk in (b"[1, 2]", b'{"state": "training"}', b"not json"):
        with pytest.raises(ValueError):
            RunStatus.from_json(junk)
