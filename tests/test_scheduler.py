"""The coordinator's bookkeeping, driven by events with no sockets."""

import numpy as np

from common.protocol import Failure, Register, Reject, Result, SecondBackward, Stop
from coordinator.scheduler import Admit, Arrived, Disconnect, Expected, Garbled, Scheduler, Send

F32 = np.dtype("float32")


def _scheduler_with(workers: int) -> Scheduler:
    scheduler = Scheduler(capacity=workers, version=1, dtype=F32)
    for index in range(workers):
        actions = scheduler.handle(Arrived(bytes([index]), Register(f"w{index}", 1)))
        assert actions == [Admit(bytes([index]), index, f"w{index}")]
    return scheduler


def _round(scheduler: Scheduler, shape=(2, 3)) -> list:
    request = SecondBackward(0, np.zeros(shape, F32))
    return scheduler.start_round({slot: (request, Expected({"error": shape})) for slot in range(scheduler.capacity)})


def test_registration_fills_slots_then_refuses():
    scheduler = _scheduler_with(2)
    assert scheduler.full
    actions = scheduler.handle(Arrived(b"late", Register("late", 1)))
    assert isinstance(actions[0], Send) and isinstance(actions[0].message, Reject)
    assert scheduler.handle(Arrived(b"\x00", Register("w0", 1))) == []  # a repeat changes nothing


def test_wrong_protocol_version_is_rejected():
    scheduler = Scheduler(capacity=1, version=1, dtype=F32)
    actions = scheduler.handle(Arrived(b"old", Register("old", 0)))
    assert "version" in actions[0].message.reason and not scheduler.workers


def test_a_round_numbers_requests_and_completes_on_valid_results():
    scheduler = _scheduler_with(2)
    sends = _round(scheduler)
    assert [s.message.request for s in sends] == [1, 2] and not scheduler.round_done
    for index, send in enumerate(sends):
        scheduler.handle(Arrived(send.peer, Result(send.message.request, {"error": np.full((2, 3), index, F32)})))
    assert scheduler.round_done and scheduler.results[1]["error"][0, 0] == 1


def _answer_is_refused(products: dict, request_offset: int = 0) -> str:
    scheduler = _scheduler_with(1)
    send = _round(scheduler)[0]
    actions = scheduler.handle(Arrived(send.peer, Result(send.message.request + request_offset, products)))
    assert isinstance(actions[-1], Disconnect) and not scheduler.workers and 0 in scheduler.lost
    return actions[-1].reason


def test_results_that_do_not_answer_the_request_drop_the_worker():
    assert "not float32[2, 3]" in _answer_is_refused({"error": np.zeros((3, 2), F32)})
    assert "float64" in _answer_is_refused({"error": np.zeros((2, 3))})
    assert "NaN" in _answer_is_refused({"error": np.full((2, 3), np.nan, F32)})
    assert "NaN or infinity" in _answer_is_refused({"error": np.full((2, 3), np.inf, F32)})
    assert "products" in _answer_is_refused({"partial": np.zeros((2, 3), F32)})
    assert "not given" in _answer_is_refused({"error": np.zeros((2, 3), F32)}, request_offset=7)


def test_failures_garbage_and_strangers():
    scheduler = _scheduler_with(2)
    _round(scheduler)
    assert isinstance(scheduler.handle(Arrived(b"\x00", Failure(1, "no")))[0], Disconnect)
    assert isinstance(scheduler.handle(Garbled(b"\x01", "not msgpack"))[0], Disconnect)
    assert not scheduler.workers and not scheduler.outstanding and set(scheduler.lost) == {0, 1}
    assert isinstance(scheduler.handle(Arrived(b"stranger", Stop("x")))[0], Disconnect)
    assert isinstance(scheduler.handle(Arrived(b"stranger", Result(1, {})))[0], Disconnect)
