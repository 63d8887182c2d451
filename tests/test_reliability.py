"""Workers die, stall, leave and arrive mid-run; the run completes with the undisturbed run's weights."""

import json
import os
import re
import signal
import time

import pytest

from tests.cluster_harness import Harness, one_process_model, wait_for
from tests.conftest import LOOPBACK_ANY_PORT, load_model, max_difference
from tests.faults import EXIT_CODE

pytestmark = pytest.mark.slow  # every test here starts real processes

TOLERANCE = 1e-6
# float64 so that "same weights" can be checked tightly; 3 epochs of 300 steps each.
RUN = ("--dtype", "float64", "--train-limit", "3000", "--test-limit", "300", "--batch-size", "10", "--epochs", "3",
       "--seed", "5")
WATCHED = ("--status-bind", LOOPBACK_ANY_PORT)  # so a test can wait for a step of the run
# Two hidden layers with dropout: 5 compute requests a step (first layer; forward of layers 2 and 3; backward of
# layers 3 and 2), 100 steps an epoch.
DEEP_RUN = ("--later-layers", "workers", "--dtype", "float64", "--train-limit", "1000", "--test-limit", "100",
            "--batch-size", "10", "--epochs", "2", "--seed", "5", "--hidden", "24,16", "--activation", "relu",
            "--output", "softmax", "--loss", "ce", "--dropout", "0.3")


@pytest.fixture
def harness(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict:
    """The one-process run, which the distributed run matches to 1e-9 when nothing goes wrong."""
    return one_process_model(tmp_path_factory.mktemp("local"), *RUN)


def _start_cluster(harness: Harness, workers: int, *args) -> list:
    harness.start_coordinator("--workers", workers, *RUN, *args)
    return [harness.start_worker(chr(ord("A") + index)) for index in range(workers)]


def _completes_like_undisturbed(harness: Harness, undisturbed: dict) -> str:
    assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
    difference = max_difference(load_model(harness.run_dir), undisturbed)
    print(f"max weight difference from the undisturbed run: {difference:.2e}")
    assert difference < TOLERANCE
    return harness.log(harness.coordinator)


def test_two_workers_killed_at_different_times(harness, undisturbed):
    workers = _start_cluster(harness, 7, *WATCHED)
    harness.wait_for_step(2, 1)  # into the second epoch
    workers[2].kill()
    harness.wait_for_step(3, 1)
    workers[5].kill()
    log = _completes_like_undisturbed(harness, undisturbed)
    assert log.count("reassigning slot") == 2
    records = harness.exposure_records()
    takeovers = [r for r in records if r["reason"].startswith("took over columns")]
    assert {r["epoch"] for r in takeovers} == {2, 3}
    lost_columns = next(set(r["columns"]) for r in records if r["worker"] == "C")
    handed_over = set().union(*(r["columns"] for r in takeovers if r["epoch"] == 2))
    assert lost_columns <= handed_over and all(r["worker"] != "C" for r in takeovers)
    workers = json.loads((harness.run_dir / "workers.json").read_text())
    survivors, departed = workers[:5], workers[5:]  # admitted workers by slot, then those that left
    assert sorted(w["name"] for w in survivors) == ["A", "B", "D", "E", "G"]
    assert all(w["answered"] > 0 and w["columns"] > 0 and w["left"] is None for w in survivors)
    assert [w["name"] for w in departed] == ["C", "F"]  # in the order they were lost
    assert all(w["answered"] > 0 and w["columns"] == 0 and w["left"].startswith(f"worker {w['name']} ") for w in departed)


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.05])
def test_a_worker_leaves_and_another_is_killed_just_after(harness, undisturbed, delay):
    """Ctrl-C on one worker (it deregisters), kill -9 on another a moment later: the recovery of the first
    must survive the loss of the second, whenever it comes."""
    workers = _start_cluster(harness, 7)
    harness.wait_for_epoch(1)
    workers[1].send_signal(signal.SIGINT)
    time.sleep(delay)
    workers[4].kill()
    log = _completes_like_undisturbed(harness, undisturbed)
    assert "worker B " in log and "worker E " in log


@pytest.mark.parametrize(
    "faults",
    [
        {"B": "exit-in-transfer:1"},
        {"B": "exit-at-request:40", "E": "exit-in-transfer:2"},
        {"B": "exit-at-request:40", "E": "exit-at-request:40"},
    ],
    ids=["during-provisioning", "during-a-recovery", "two-in-one-round"],
)
def test_workers_that_vanish_at_any_point_of_the_protocol(harness, undisturbed, faults):
    """Workers that die as kill -9 leaves them: mid shard transfer at the start, mid transfer of the columns
    they take over from a lost worker, or two in the same round."""
    harness.start_coordinator("--workers", 7, *RUN)
    workers = {name: harness.start_worker(name, fault=faults.get(name)) for name in "ABCDEFG"}
    log = _completes_like_undisturbed(harness, undisturbed)
    for name in faults:
        assert workers[name].wait(10) == EXIT_CODE, f"the fault of {name} never fired"
        assert f"worker {name} " in log
    survivors = json.loads((harness.run_dir / "workers.json").read_text())[: 7 - len(faults)]
    assert sorted(w["name"] for w in survivors) == sorted(set("ABCDEFG") - set(faults))


def test_workers_lost_in_later_layers_rounds_of_a_deep_run(harness, tmp_path_factory):
    """B dies on its 44th request, step 9's backward of layer 3, while layers 3 and 2 both wait for their backward;
    C on its 76th, step 15's forward of layer 3 (B's recovery sent C two extra requests: the forwards of layers 2
    and 3 again), while layer 2 waits. Each time every layer still to go backward gets its operands again."""
    undisturbed = one_process_model(tmp_path_factory.mktemp("deep-local"), *DEEP_RUN)
    harness.start_coordinator("--workers", 3, *DEEP_RUN)
    faults = {"B": "exit-at-request:44", "C": "exit-at-request:76"}
    workers = {name: harness.start_worker(name, fault=faults.get(name))
               for name in "ABC"}
    assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
    for name in faults:
        assert workers[name].wait(10) == EXIT_CODE, f"the fault of {name} never fired"
    assert max_difference(load_model(harness.run_dir), undisturbed) < TOLERANCE
    takeovers = [r for r in harness.exposure_records() if r["reason"].startswith("took over columns")]
    assert {r["step"] for r in takeovers} == {8, 14}  # the steps done before each loss
    assert all(len(r["units"]) == 2 for r in takeovers)  # the units of both hidden layers moved with the columns


def test_stalled_worker_is_declared_lost_within_the_timeout(harness, undisturbed):
    workers = _start_cluster(harness, 3, "--heartbeat-timeout", "2", *WATCHED)
    harness.wait_for_step(2, 1)
    workers[1].send_signal(signal.SIGSTOP)
    log = _completes_like_undisturbed(harness, undisturbed)
    silences = [float(s) for s in re.findall(r"worker B silent for ([\d.]+) s", log)]
    assert silences and silences[0] <= 2.0 + 0.3  # declared lost within the timeout, plus one tick


def test_late_worker_gets_columns_at_the_next_epoch(harness, undisturbed):
    _start_cluster(harness, 2)
    harness.wait_for_epoch(1)
    harness.start_worker("late")
    log = _completes_like_undisturbed(harness, undisturbed)
    assert "worker late joined as a standby" in log
    joined = [r for r in harness.exposure_records() if r["worker"] == "late"]
    assert joined and joined[0]["epoch"] >= 2 and joined[0]["step"] == 0
    assert 250 <= len(joined[0]["columns"]) <= 262  # a third of 784, taken from the other two


def test_with_rebalance_never_a_late_worker_waits_and_takes_over_a_loss(harness, undisturbed):
    workers = _start_cluster(harness, 2, "--rebalance", "never")
    harness.wait_for_epoch(1)
    harness.start_worker("spare")
    harness.wait_for_log(harness.coordinator, "worker spare joined as a standby")
    workers[0].kill()
    _completes_like_undisturbed(harness, undisturbed)
    spare = [r for r in harness.exposure_records() if r["worker"] == "spare"]
    assert len(spare) == 1 and spare[0]["reason"].startswith("took over a lost worker's slot")
    assert len(spare[0]["columns"]) == 392  # exactly the lost slot: nobody else's view widened


@pytest.mark.parametrize("stop, code, reason", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 0, "terminated"),  # `docker stop`: leaving on request is no failure
], ids=["ctrl-c", "sigterm"])
def test_worker_stopped_deregisters(harness, undisturbed, stop, code, reason):
    workers = _start_cluster(harness, 3)
    harness.wait_for_epoch(1)
    workers[0].send_signal(stop)
    assert workers[0].wait(10) == code
    log = _completes_like_undisturbed(harness, undisturbed)
    # Its farewell arrives; when the coordinator's next send to it fails first, it is dropped as unreachable.
    assert f"worker A left: {reason}" in log or "sent Deregister without registering" in log
    assert "worker A silent" not in log  # dropped at once, not after the heartbeat timeout


def test_spawned_workers_do_not_outlive_a_killed_coordinator(harness):
    coordinator = harness.start_coordinator("--spawn", 2, *RUN)
    harness.wait_for_epoch(1)
    children = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent_of(pid) == coordinator.pid]
    assert len(children) == 2
    coordinator.kill()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _parent_of(str(pid)) is not None
                             and not _is_zombie(pid) for pid in children), 10, "spawned workers to exit")


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_worker_waits_quietly_for_a_coordinator_that_comes_up_late(tmp_path, undisturbed):
    # The worker needs the address before the coordinator exists: a named socket of its own, where a TCP port
    # picked now could be taken by then.
    harness = Harness(tmp_path, bind=f"ipc://@scatterprop-test-{os.getpid()}-late")
    worker = harness.start_worker("early")
    harness.wait_for_log(worker, "registering again")  # past the heartbeat timeout, and said so
    busy_seconds = _cpu_seconds(worker.pid)
    assert busy_seconds < 1.0, f"an idle worker burned {busy_seconds} s of CPU"
    try:
        harness.start_coordinator("--workers", 1, *RUN)
        _completes_like_undisturbed(harness, undisturbed)
    finally:
        harness.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _columns_seen(harness: Harness) -> dict:
    """worker name -> every distinct set of input columns it was sent, in the order they came."""
    seen = {}
    for record in harness.exposure_records():
        columns = seen.setdefault(record["worker"], [])
        if set(record["columns"]) not in columns:
            columns.append(set(record["columns"]))
    return seen


def test_a_registration_under_a_live_workers_name_is_refused(harness, undisturbed):
    """Issue 25, item 3: without CURVE, a second `worker --name B` must not evict the live B."""
    _start_cluster(harness, 3, *WATCHED)
    harness.wait_for_step(1, 50)
    impostor = harness.start_worker("B")
    assert impostor.wait(30) == 1
    last_line = harness.log(impostor).strip().splitlines()[-1]
    assert last_line == "error: the coordinator refused this worker: worker B is connected, and alive, on another connection"
    log = _completes_like_undisturbed(harness, undisturbed)
    assert "dropped worker" not in log and "registered again" not in log
    assert {name: len(columns) for name, columns in _columns_seen(harness).items()} == {"A": 1, "B": 1, "C": 1}


LONGER_RUN = (*RUN[:RUN.index("--epochs")], "--epochs", "8", "--seed", "5")  # room for an epoch after a rejoin


def test_a_worker_cut_off_past_the_timeout_comes_back_to_its_own_columns(harness, tmp_path_factory):
    """Issue 25, item 4, on loopback: B stops for 6 s, is dropped as silent and its columns go to A and C; once it runs
    again it registers again, waits as a standby, and at the next epoch gets back exactly the columns it had."""
    undisturbed = one_process_model(tmp_path_factory.mktemp("longer-local"), *LONGER_RUN)
    harness.start_coordinator("--workers", 3, *LONGER_RUN, *WATCHED)
    workers = [harness.start_worker(name) for name in "ABC"]
    harness.wait_for_step(1, 50)
    workers[1].send_signal(signal.SIGSTOP)
    harness.wait_for_log(harness.coordinator, "worker B silent")
    time.sleep(3)
    workers[1].send_signal(signal.SIGCONT)
    log = _completes_like_undisturbed(harness, undisturbed)
    assert "worker B joined as a standby" in log and "standby B now serves slot" in log
    seen = _columns_seen(harness)
    assert len(seen["B"]) == 1, "B was sent columns it did not hold before it was cut off"
    reasons = [record["reason"] for record in harness.exposure_records() if record["worker"] == "B"]
    assert reasons == ["initial plan", "got its own columns back"]


def test_every_worker_keeps_its_slot_through_a_stall_of_the_coordinator(harness, undisturbed):
    """A coordinator stopped for 8 s: every worker gives up on its connection and registers again on a new one,
    and each gets its own slot back (on main, all were found unreachable first and the run ended)."""
    _start_cluster(harness, 3, *WATCHED)
    harness.wait_for_step(1, 50)
    harness.coordinator.send_signal(signal.SIGSTOP)
    time.sleep(8)
    harness.coordinator.send_signal(signal.SIGCONT)
    _completes_like_undisturbed(harness, undisturbed)
    assert {name: len(columns) for name, columns in _columns_seen(harness).items()} == {"A": 1, "B": 1, "C": 1}
