"""`coordinator bench` on a tiny configuration: it runs, and its JSON holds every key with sane values; the least
traffic per round, and the echo workers that move it."""

import json
import os
import subprocess
import sys
import time

import pytest

from coordinator.bench import echo
from coordinator.bench.session import training_session
from common import settings
from coordinator.config import TrainingConfig
from coordinator.bench.traffic import ROW_NUMBER_BYTES, minimum_step_bytes, round_bytes
from tests.conftest import LOOPBACK_ANY_PORT, run_cli

KEYS = {"mode", "workers", "batch_size", "epoch_seconds", "ratio_to_floor", "cpu_ms_per_step", "cpu_ratio_to_floor",
        "rounds_per_step", "bytes_per_epoch", "min_bytes_per_epoch", "coordinator_peak_rss_mb", "worker_peak_rss_mb"}
# first layer (with the last step's gradient), the later layer's forward and backward; or the first layer alone
ROUNDS_PER_STEP = {"workers": 3, "coordinator": 1}
ECHO_TIMEOUT = 60.0  # seconds; echo workers that take longer to start or answer are hung


@pytest.mark.slow
def test_bench_writes_json_for_floor_cluster_and_transport(tmp_path):
    out = tmp_path / "results.json"
    done = run_cli("coordinator", "bench", "--workers", "2", "--batch-sizes", "64", "--epochs", "1", "--repeats", "1",
                   "--train-limit", "640", "--later-layers", "workers,coordinator", "--verify", "off,all", "--profile",
                   "--rekey", "every-step", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    placements = [(r["mode"], r["later_layers"], r["verify"], r["workers"]) for r in rows]
    assert placements == [
        ("local", "local", "-", 0),
        ("cluster", "workers", "off", 2), ("transport", "workers", "-", 2), ("cluster", "workers", "all", 2),
        ("cluster", "coordinator", "off", 2), ("transport", "coordinator", "-", 2),
        ("cluster", "coordinator", "all", 2),
    ]
    for row in rows:
        assert KEYS <= set(row) and row["batch_size"] == 64
        assert row["epoch_seconds"] > 0 and row["coordinator_peak_rss_mb"] > 0
    for row in rows[1:]:  # the transport moves what the cluster moves, in as many rounds
        assert row["bytes_per_epoch"] >= row["min_bytes_per_epoch"] > 0
        assert row["bytes_per_epoch"] <= 1.05 * row["min_bytes_per_epoch"]
        assert row["rounds_per_step"] == ROUNDS_PER_STEP[row["later_layers"]]
        assert row["worker_peak_rss_mb"] > 0
    assert "| cluster | coordinator | all | ipc | every-step | 2 | 64 |" in done.stdout
    assert "| transport | workers | - | tcp | every-step | 2 | 64 |" in done.stdout
    for row in (r for r in rows if r["mode"] == "cluster"):  # the step profile accounts for the coordinator's time
        step_ms = row["epoch_seconds"] * 1000 / row["steps"]
        assert 0.8 * step_ms <= sum(row["coordinator_ms_per_step"].values()) <= 1.05 * step_ms, row
        assert row["worker_ms_per_step"]["compute"] > 0
    for row in rows[1:]:  # CPU time: the coordinator's (or router's) within what its cores allow, and the workers'
        step_ms = row["epoch_seconds"] * 1000 / row["steps"]
        assert 0 < row["coordinator_cpu_ms_per_step"] <= 1.1 * (os.cpu_count() or 1) * step_ms, row
        assert row["worker_cpu_ms_per_step"] > 0
        assert row["cpu_ms_per_step"] == row["coordinator_cpu_ms_per_step"] + row["worker_cpu_ms_per_step"]
    assert rows[0]["cpu_ms_per_step"] > 0 and rows[0]["cpu_ratio_to_floor"] == 1.0
    assert "| 2 | 64 | coordinator | ipc | every-step |" in done.stdout  # a row of the profile table


@pytest.mark.slow
def test_bench_with_kept_rows_moves_the_least_the_design_allows(tmp_path):
    """With --rekey, W1's rows travel once a re-key instead of every step: the minimum counts that, and the
    measured traffic (re-keys included, once an epoch or every 5 of its 10 steps) stays within 5% of it."""
    out = tmp_path / "results.json"
    done = run_cli("coordinator", "bench", "--workers", "2", "--batch-sizes", "64", "--repeats", "1", "--train-limit", "640",
                   "--later-layers", "coordinator", "--verify", "off", "--rekey", "every-epoch,5", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["rekey"]) for r in rows] == [
        ("local", "-"), ("cluster", "every-epoch"), ("transport", "every-epoch"), ("cluster", "5"),
    ]
    every_epoch, _, every_five = rows[1:]
    assert every_epoch["min_bytes_per_epoch"] < every_five["min_bytes_per_epoch"]
    for row in (every_epoch, every_five):  # the transport row moves the steps' messages, not the re-keys
        assert row["min_bytes_per_epoch"] <= row["bytes_per_epoch"] <= 1.05 * row["min_bytes_per_epoch"], row


@pytest.mark.slow
def test_bench_without_transport(tmp_path):
    out = tmp_path / "results.json"
    done = run_cli("coordinator", "bench", "--workers", "1", "--batch-sizes", "64", "--repeats", "1", "--train-limit", "128",
                   "--no-transport", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["mode"] for row in json.loads(out.read_text())] == ["local", "cluster"]


@pytest.mark.slow
def test_a_cluster_session_keeps_its_workers_through_a_long_wait_between_epochs():
    """While the other modes take their turns the cluster's coordinator waits; its workers must not give it up."""
    session = training_session(TrainingConfig(batch_size=64, train_limit=640, test_limit=0), 2)
    try:
        session.epoch()
        time.sleep(settings.HEARTBEAT_TIMEOUT + 1)
        assert session.epoch().rounds == 10  # one round a step, the later layers here
    finally:
        session.finish()


@pytest.mark.parametrize("batch, sizes, workers, itemsize", [
    (128, (784, 128, 10), 7, 4), (1000, (784, 128, 10), 7, 8), (17, (784, 100, 10), 3, 4), (1, (13, 5, 3), 7, 4),
    (128, (784, 256, 128, 10), 7, 4), (32, (784, 64, 32, 16, 10), 2, 8),
])
@pytest.mark.parametrize("later_layers_here", [False, True])
def test_rounds_add_up_to_the_minimum_step(batch, sizes, workers, itemsize, later_layers_here):
    inputs, hidden = sizes[:2]
    formula = 2 * inputs * hidden + 2 * workers * batch * hidden  # the docstring's, term by term
    later_layers = list(zip(sizes[1:-1], sizes[2:]))  # (units of its input, its outputs) of each later layer
    if not later_layers_here:
        formula += sum(2 * batch * units + 2 * units * outputs + 2 * workers * batch * outputs
                       for units, outputs in later_layers)
    formula = formula * itemsize + ROW_NUMBER_BYTES * workers * batch
    rounds = round_bytes(batch, sizes, workers, itemsize, later_layers_here)
    assert len(rounds) == (1 if later_layers_here else 1 + 2 * len(later_layers))
    assert round(workers * sum(request + reply for request, reply in rounds)) == formula
    assert minimum_step_bytes(batch, sizes, workers, itemsize, later_layers_here) == formula


def test_echo_requests_share_whole_bytes_and_ask_for_their_reply():
    frames = echo.requests(9362.3, 731.4, 7)  # 65536 and 5120 bytes in all
    assert sum(map(len, frames)) == 65536 and max(map(len, frames)) - min(map(len, frames)) <= 1
    assert sum(int.from_bytes(frame[:echo.HEADER], "little") for frame in frames) == 5120
    assert [len(frame) for frame in echo.requests(2.0, 40.0, 3)] == [echo.HEADER] * 3  # never shorter than the header


@pytest.mark.slow
def test_echo_workers_answer_with_the_asked_size_and_leave():
    frames = echo.requests(1000.0, 333.5, 3)
    with echo.EchoRouter(LOOPBACK_ANY_PORT, 3, ECHO_TIMEOUT) as router:
        assert router.run_step([frames, frames]) == 2 * (3000 + round(3 * 333.5))
    assert [process.returncode for process in router.processes] == [0, 0, 0]  # each left on STOP, none killed


def test_the_coordinator_fit_is_a_line_through_its_busy_time_per_step():
    from coordinator.bench.cli import coordinator_fits

    def row(workers, busy):
        phases = {"math": busy / 2, "build": busy / 2, "wait": 100.0}
        return {"measure": "epoch", "workers": workers, "batch_size": 128, "later_layers": "workers",
                "rekey": "every-step", "coordinator_ms_per_step": phases}

    fits = coordinator_fits([row(2, 3.0), row(4, 5.0), row(7, 8.0), {"measure": "accuracy"}])
    fixed, per_worker = fits[(128, "workers", "every-step")]
    assert (fixed, per_worker) == (pytest.approx(1.0), pytest.approx(1.0))  # 1 + 1 N, the wait left out


def test_the_cpu_time_of_child_processes_is_counted():
    from coordinator.bench.session import _children_cpu_seconds

    before = _children_cpu_seconds()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                             "while time.process_time() < end: pass\ninput()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while _children_cpu_seconds() - before < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _children_cpu_seconds() - before >= 0.25  # the child's 0.3 s, read while it still runs
    finally:
        busy.communicate(b"\n", timeout=30)


def test_the_time_to_accuracy_table_has_a_pair_of_columns_per_target():
    from coordinator.bench.cli import markdown

    reached = [{"target": 0.97, "seconds": 2.54, "epochs": 4}, {"target": 0.975, "seconds": None, "epochs": None}]
    table = markdown([{"measure": "accuracy", "mode": "local", "workers": 0, "reached": reached}]).splitlines()
    assert table[-3] == "| mode | workers | s to 97.0% | epochs to 97.0% | s to 97.5% | epochs to 97.5% |"
    assert table[-1] == "| local | 0 | 2.5 | 4 | - | - |" and table[-2].count("|") == table[-1].count("|")


@pytest.mark.slow
def test_the_soak_reads_every_process_and_stops_the_run():
    done = run_cli("coordinator.bench.soak", "--seconds", "6", "--interval", "1", "--workers", "2",
                   "--options", "--train-limit 600 --test-limit 100", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    readings = [line for line in done.stdout.splitlines() if " s  coordinator " in line]
    assert len(readings) >= 3 and len(readings[-1].split("workers")[1].split()) == 2, done.stdout  # both workers
    assert "the coordinator grew" in done.stdout.splitlines()[-1]
