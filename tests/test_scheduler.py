"""The coordinator's bookkeeping, driven by events with no sockets."""

import numpy as np

from common import settings
from common.protocol import (
    Deregister, Failure, Heartbeat, Register, RegisterAgain, Reject, Result, LaterBackward,
)
from coordinator.scheduler import (
    Admit, Arrived, Disconnect, Expected, Garbled, Refused, Scheduler, Send, Tick, Unreachable,
)

F32 = np.dtype("float32")


def _scheduler_with(workers: int) -> Scheduler:
    scheduler = Scheduler(capacity=workers, version=1, dtype=F32)
    for index in range(workers):
        actions = scheduler.handle(Arrived(bytes([index]), Register(f"w{index}", 1)))
        assert actions == [Admit(bytes([index]), index, f"w{index}")]
    scheduler.started = True  # what the transport does once every slot is filled
    return scheduler


def _round(scheduler: Scheduler, shape=(2, 3)) -> list:
    request = LaterBackward(0, 2, np.zeros(shape, F32))
    requests = {slot: (request, Expected({"error": shape})) for slot in range(scheduler.capacity)}
    return scheduler.start_round(requests, now=0.0)


def test_registration_fills_slots_then_keeps_a_bounded_number_of_standbys():
    scheduler = _scheduler_with(2)
    assert scheduler.ready
    assert scheduler.handle(Arrived(b"late", Register("late", 1))) == [Admit(b"late", None, "late")]
    assert scheduler.standbys == [b"late"]
    for index in range(settings.MAX_STANDBY_WORKERS - 1):
        scheduler.handle(Arrived(b"spare%d" % index, Register(f"spare{index}", 1)))
    actions = scheduler.handle(Arrived(b"one too many", Register("x", 1)))
    assert isinstance(actions[0], Send) and isinstance(actions[0].message, Reject)
    assert len(scheduler.standbys) == settings.MAX_STANDBY_WORKERS
    assert scheduler.handle(Arrived(b"\x00", Register("w0", 1))) == []  # a repeat changes nothing


def test_a_worker_lost_before_the_run_reopens_its_slot():
    scheduler = Scheduler(capacity=2, version=1, dtype=F32)
    scheduler.handle(Arrived(b"a", Register("a", 1)))
    scheduler.handle(Arrived(b"a", Deregister("bye")))
    assert not scheduler.lost and sorted(scheduler.open_slots) == [0, 1]


def test_silence_and_unanswered_requests_lose_a_worker():
    scheduler = _scheduler_with(3)
    _round(scheduler)  # sent at 0.0
    heartbeats = scheduler.handle(Tick(0.1))
    assert sum(isinstance(a, Send) and isinstance(a.message, Heartbeat) for a in heartbeats) == 3
    scheduler.handle(Arrived(b"\x00", Heartbeat(), at=2.9))
    scheduler.handle(Arrived(b"\x01", Heartbeat(), at=2.9))
    dropped = [a for a in scheduler.handle(Tick(3.5)) if isinstance(a, Disconnect)]
    assert [a.peer for a in dropped] == [b"\x02"] and "silent for 3.5 s" in dropped[0].reason
    for now in range(3, int(settings.REQUEST_DEADLINE), 2):  # alive, but never answering
        scheduler.handle(Arrived(b"\x00", Heartbeat(), at=float(now)))
        scheduler.handle(Arrived(b"\x01", Heartbeat(), at=float(now)))
    late = scheduler.handle(Tick(settings.REQUEST_DEADLINE + 0.5))
    assert {a.peer for a in late if isinstance(a, Disconnect)} == {b"\x00", b"\x01"}
    assert set(scheduler.take_lost()) == {0, 1, 2} and not scheduler.lost


def test_a_slot_that_answered_quickly_is_given_less_time_than_one_never_heard():
    """A worker that takes a slot over and only heartbeats holds the round for the floor, not the whole deadline."""
    scheduler = _scheduler_with(2)
    first = _round(scheduler)  # sent at 0.0; slot 0 answers in 50 ms, slot 1 never
    scheduler.handle(Arrived(first[0].peer, Result(first[0].message.request, {"error": np.zeros((2, 3), F32)}),
                             at=0.05))
    assert scheduler.deadline(0) == settings.REQUEST_DEADLINE_FLOOR  # 20 x 50 ms is under the floor
    assert scheduler.deadline(1) == settings.REQUEST_DEADLINE  # no answer yet: the whole deadline
    scheduler.handle(Arrived(b"impostor", Register("w0", 1), at=0.1))
    scheduler.handle(Unreachable(first[0].peer))  # takes slot 0 over as w0's connection ends: its record, its history
    requests = {slot: (LaterBackward(0, 2, np.zeros((2, 3), F32)), Expected({"error": (2, 3)})) for slot in (0, 1)}
    scheduler.start_round(requests, now=1.0)
    for now in np.arange(1.5, 11.5, 1.0):  # alive, but never answering
        for peer in (b"impostor", first[1].peer):
            scheduler.handle(Arrived(peer, Heartbeat(), at=float(now)))
    dropped = [a for a in scheduler.handle(Tick(11.5)) if isinstance(a, Disconnect)]
    assert [a.peer for a in dropped] == [b"impostor"] and "unanswered for 10 s" in dropped[0].reason


def test_a_slow_slot_gets_a_multiple_of_its_slowest_recent_answer():
    scheduler = _scheduler_with(1)
    for answer_seconds in (0.2, 1.2, 0.3):
        sent = _round(scheduler)[0]
        scheduler.handle(Arrived(sent.peer, Result(sent.message.request, {"error": np.zeros((2, 3), F32)}),
                                 at=answer_seconds))
    assert scheduler.deadline(0) == settings.REQUEST_DEADLINE_FACTOR * 1.2
    for _ in range(settings.RECENT_ANSWERS):  # the slow answer ages out
        sent = _round(scheduler)[0]
        scheduler.handle(Arrived(sent.peer, Result(sent.message.request, {"error": np.zeros((2, 3), F32)}), at=0.3))
    assert scheduler.deadline(0) == settings.REQUEST_DEADLINE_FLOOR


def test_answers_to_an_abandoned_round_are_ignored():
    scheduler = _scheduler_with(1)
    first = _round(scheduler)[0]
    _round(scheduler)  # sent again, say after another worker was lost
    assert scheduler.handle(Arrived(first.peer, Result(first.message.request, {}))) == []
    assert scheduler.workers and not scheduler.round_done


def test_deregister_and_unreachable_lose_the_slot_at_once():
    scheduler = _scheduler_with(2)
    scheduler.handle(Arrived(b"\x00", Deregister("interrupted")))
    scheduler.handle(Unreachable(b"\x01"))
    lost = scheduler.take_lost()
    assert "left: interrupted" in lost[0] and "cannot be reached" in lost[1]


def test_a_second_failed_send_to_a_dropped_worker_refuses_nothing():
    """Its farewell, arriving after, must be the refusal that is logged in full, not a failed send."""
    scheduler = _scheduler_with(1)
    assert [type(action) for action in scheduler.handle(Unreachable(b"\x00"))] == [Disconnect]
    assert scheduler.handle(Unreachable(b"\x00")) == []
    assert "sent Deregister without registering" in scheduler.handle(Arrived(b"\x00", Deregister("interrupted")))[-1].reason


def test_wrong_protocol_version_is_rejected():
    scheduler = Scheduler(capacity=1, version=1, dtype=F32)
    actions = scheduler.handle(Arrived(b"old", Register("old", 0)))
    assert "version" in actions[0].message.reason and not scheduler.workers


def test_a_round_numbers_requests_and_completes_on_valid_results():
    scheduler = _scheduler_with(2)
    sends = _round(scheduler)
    assert [s.message.request for s in sends] == [1, 1] and not scheduler.round_done
    assert sends[0].message is sends[1].message  # one message for all: the transport encodes it once
    for index, send in reversed(list(enumerate(sends))):
        scheduler.handle(Arrived(send.peer, Result(send.message.request, {"error": np.full((2, 3), index, F32)})))
        assert scheduler.newly_settled() == [index] and scheduler.newly_settled() == []
    assert scheduler.round_done and scheduler.results[1][0][1]["error"][0, 0] == 1
    assert scheduler.results[1][0][0] is scheduler.workers[sends[1].peer]
    assert [s.message.request for s in _round(scheduler)] == [2, 2]
    late = scheduler.handle(Arrived(sends[0].peer, Result(1, {"error": np.zeros((2, 3), F32)})))
    assert late == [] and not scheduler.results  # an answer to an abandoned round is ignored


def test_a_slot_settles_when_all_its_replicas_have_answered_or_left():
    scheduler = Scheduler(capacity=4, version=1, dtype=F32, replicas=2)
    for index in range(4):
        scheduler.handle(Arrived(bytes([index]), Register(f"w{index}", 1)))
    scheduler.started = True
    sends = _round(scheduler)
    by_slot = {slot: scheduler.peers_of(slot) for slot in (0, 1)}
    answer = {"error": np.zeros((2, 3), F32)}
    scheduler.handle(Arrived(by_slot[0][0], Result(1, answer)))
    assert scheduler.newly_settled() == []  # its replica has not answered
    scheduler.handle(Unreachable(by_slot[0][1]))
    assert scheduler.newly_settled() == [0] and len(scheduler.results[0]) == 1 and not scheduler.lost
    for peer in by_slot[1]:
        scheduler.handle(Arrived(peer, Result(1, answer)))
    assert scheduler.newly_settled() == [1] and len(scheduler.results[1]) == 2 and scheduler.round_done
    assert len(sends) == 4


def test_workers_that_answered_are_kept_on_record_when_they_leave():
    scheduler = _scheduler_with(3)
    sends = _round(scheduler)
    scheduler.handle(Arrived(sends[0].peer, Result(sends[0].message.request, {"error": np.zeros((2, 3), F32)})))
    scheduler.handle(Unreachable(sends[0].peer))  # answered once, then gone
    scheduler.handle(Garbled(sends[1].peer, "not msgpack"))  # gone without answering
    departed = scheduler.departed[sends[0].peer]
    assert list(scheduler.departed) == [sends[0].peer] and sends[0].peer not in scheduler.workers
    assert (departed.slot, departed.answered, departed.left) == (0, 1, "worker w0 cannot be reached")


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
    assert isinstance(scheduler.handle(Garbled(b"stranger", "not msgpack"))[0], Refused)


def test_a_stranger_is_told_once_to_register_again():
    scheduler = _scheduler_with(1)
    first = scheduler.handle(Arrived(b"stranger", Heartbeat()))
    assert isinstance(first[0], Send) and isinstance(first[0].message, RegisterAgain)
    assert isinstance(first[1], Refused) and "Heartbeat without registering" in first[1].reason
    assert [type(a) for a in scheduler.handle(Arrived(b"stranger", Result(1, {})))] == [Refused]
    assert list(scheduler.workers) == [b"\x00"]


def _refusal(actions: list) -> str:
    """The reason of the one Reject among the actions."""
    [reject] = [action.message for action in actions if isinstance(action, Send) and isinstance(action.message, Reject)]
    return reject.reason


def test_a_worker_that_registers_again_keeps_its_slot_once_its_old_connection_falls_silent():
    """A restarted worker, or one that gave up on us during a stall: its registration waits for the old connection."""
    scheduler = _scheduler_with(2)
    sends = _round(scheduler)
    worker = scheduler.workers[b"\x01"]
    assert scheduler.handle(Arrived(b"new", Register("w1", 1), at=1.0)) == []  # w1 on \x01 was heard at 0.0
    scheduler.handle(Arrived(b"\x00", Heartbeat(), at=2.9))
    assert scheduler.workers[b"\x01"] is worker and set(scheduler.claims) == {"w1"}
    heartbeats = scheduler.handle(Tick(1.1))
    assert Send(b"new", Heartbeat()) in heartbeats  # so that it keeps waiting for its welcome
    actions = [action for action in scheduler.handle(Tick(3.1)) if not isinstance(action, Send)]
    assert [type(action) for action in actions] == [Disconnect, Admit] and "w1 silent for 3.1 s" in actions[0].reason
    assert actions[1] == Admit(b"new", 1, "w1", again=True)
    assert scheduler.workers[b"new"] is worker and worker.left is None and not scheduler.claims
    assert scheduler.take_lost() == {1: "worker w1 registered again"}  # its request went with the old connection
    assert list(scheduler.outstanding) == [sends[0].peer]
    assert not [a for a in scheduler.handle(Tick(5.0)) if isinstance(a, Disconnect)]  # heard from as it took over
    refused = scheduler.handle(Arrived(b"\x01", Heartbeat()))  # the old connection is refused, not welcomed back
    assert isinstance(refused[0].message, Reject) and b"\x01" not in scheduler.workers


def test_a_claim_takes_over_at_once_when_the_old_connection_cannot_be_reached_or_leaves():
    scheduler = _scheduler_with(2)
    scheduler.handle(Arrived(b"new0", Register("w0", 1), at=1.0))
    scheduler.handle(Arrived(b"new1", Register("w1", 1), at=1.0))
    assert scheduler.handle(Unreachable(b"\x00"))[1] == Admit(b"new0", 0, "w0", again=True)
    left = scheduler.handle(Arrived(b"\x01", Deregister("restarting"), at=1.1))
    assert left[1] == Admit(b"new1", 1, "w1", again=True)
    assert set(scheduler.workers) == {b"new0", b"new1"}


def test_a_claim_on_a_live_worker_is_refused_and_the_worker_keeps_its_slot():
    """Issue 25, item 3: a peer that registers under a live worker's name must not evict it."""
    scheduler = _scheduler_with(2)
    _round(scheduler)
    scheduler.handle(Arrived(b"impostor", Register("w0", 1), at=1.0))
    stale = scheduler.handle(Arrived(b"\x00", Heartbeat(), at=1.0 + settings.CLAIM_GRACE))
    assert stale == [] and "w0" in scheduler.claims  # read with the claim, so perhaps sent before it
    alive = scheduler.handle(Arrived(b"\x00", Heartbeat(), at=1.6))
    assert "w0 is connected, and alive, on another connection" in _refusal(alive)
    assert alive[0].peer == b"impostor" and not scheduler.claims
    assert scheduler.workers[b"\x00"].slot == 0 and not scheduler.lost and b"\x00" in scheduler.outstanding
    assert b"impostor" not in [a.peer for a in scheduler.handle(Tick(1.7)) if isinstance(a, Send)]


def test_one_claim_waits_per_name_and_a_vanished_claimant_withdraws_it():
    scheduler = _scheduler_with(1)
    scheduler.handle(Arrived(b"first", Register("w0", 1), at=1.0))
    assert scheduler.handle(Arrived(b"first", Register("w0", 1), at=1.1)) == []  # a repeat while it waits
    assert "waiting" in _refusal(scheduler.handle(Arrived(b"second", Register("w0", 1), at=1.2)))
    scheduler.handle(Unreachable(b"first"))
    assert not scheduler.claims and list(scheduler.workers) == [b"\x00"]


def test_a_quarantined_workers_claim_is_refused():
    scheduler = _scheduler_with(1)
    scheduler.handle(Arrived(b"new", Register("w0", 1), at=1.0))
    actions = scheduler.quarantine(scheduler.workers[b"\x00"], "lied")
    assert "quarantined" in _refusal(actions) and not scheduler.workers and 0 in scheduler.lost


CURVE_NAMES = {"KEY-A": "A", "KEY-B": "B"}  # what keys.allowed_names reads from an allow-list folder


def test_with_curve_a_name_is_bound_to_its_key():
    scheduler = Scheduler(capacity=2, version=1, dtype=F32, key_names=CURVE_NAMES)
    assert scheduler.handle(Arrived(b"a", Register("A", 1), key="KEY-A")) == [Admit(b"a", 0, "A")]
    assert "allowed as worker B, not as A" in _refusal(scheduler.handle(Arrived(b"b", Register("A", 1), key="KEY-B")))
    assert "allowed as worker B, not as C" in _refusal(scheduler.handle(Arrived(b"c", Register("C", 1), key="KEY-B")))
    assert list(scheduler.workers) == [b"a"]
    again = scheduler.handle(Arrived(b"a again", Register("A", 1), key="KEY-A"))  # only A holds A's key: no wait
    assert again == [Admit(b"a again", 0, "A", again=True)] and list(scheduler.workers) == [b"a again"]


def test_a_quarantined_workers_name_and_key_are_refused():
    scheduler = Scheduler(capacity=1, version=1, dtype=F32, key_names={"KEY": "liar", "NEW": "new"})
    scheduler.handle(Arrived(b"liar", Register("liar", 1), key="KEY"))
    scheduler.quarantine(scheduler.workers[b"liar"], "lied")
    for peer, name, key in ((b"same name", "liar", None), (b"same key", "liar", "KEY")):
        assert "liar is quarantined" in _refusal(scheduler.handle(Arrived(peer, Register(name, 1), key=key)))
        assert peer not in scheduler.workers
    assert scheduler.handle(Arrived(b"new", Register("new", 1), key="NEW")) == [Admit(b"new", 0, "new")]


def test_returning_workers_get_back_the_slots_they_held():
    scheduler = Scheduler(capacity=3, version=1, dtype=F32, former_slots={"A": 0, "B": 2})
    admitted = [scheduler.handle(Arrived(name.encode(), Register(name, 1)))[0].slot for name in ("B", "new", "A")]
    assert admitted == [2, 1, 0]  # the newcomer takes the slot nobody returns to


def test_a_worker_that_left_can_still_be_quarantined():
    scheduler = _scheduler_with(2)
    send = _round(scheduler)[0]
    scheduler.handle(Arrived(send.peer, Result(send.message.request, {"error": np.zeros((2, 3), F32)})))
    liar = scheduler.results[0][0][0]
    scheduler.handle(Unreachable(send.peer))  # gone before its answer was checked
    assert scheduler.quarantine(liar, "lied") == []
    actions = scheduler.handle(Arrived(b"back", Register(liar.name, 1)))
    assert isinstance(actions[0].message, Reject)


def test_a_lost_worker_that_registers_again_later_is_the_standby_for_its_slot():
    """A partition longer than the heartbeat timeout: the worker is dropped, and comes back as a standby."""
    scheduler = _scheduler_with(3)
    scheduler.handle(Arrived(b"\x00", Heartbeat(), at=3.0))
    scheduler.handle(Arrived(b"\x02", Heartbeat(), at=3.0))
    scheduler.handle(Tick(3.5))  # w1 silent
    assert scheduler.take_lost() == {1: "worker w1 silent for 3.5 s"}
    scheduler.handle(Arrived(b"newcomer", Register("newcomer", 1), at=4.0))
    assert scheduler.handle(Arrived(b"w1 again", Register("w1", 1), at=40.0)) == [Admit(b"w1 again", None, "w1")]
    assert scheduler.standby_for(1) == b"w1 again" and scheduler.former_slot(b"w1 again") == 1
    assert scheduler.standby_for(0) is None and scheduler.former_slot(b"newcomer") is None
