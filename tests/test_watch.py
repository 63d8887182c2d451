"""Watching a run as a user does: the live display on a terminal, JSON lines, `coordinator status`,
workers.json and `coordinator report`. Real processes on loopback."""

import json
import os
import pty
import subprocess
import time

import numpy as np
import pytest

from tests.cluster_harness import Harness, wait_for
from tests.conftest import LOOPBACK_ANY_PORT, PROCESS_TIMEOUT, assert_one_line_error, lines_of, run_cli, start, wait_for_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHORT_RUN = ("--train-limit", "300", "--test-limit", "100", "--epochs", "2")


def _on_a_terminal(*args, columns: int = 120) -> str:
    """What `coordinator ...` writes to a terminal (a pseudo-terminal here), stdout and stderr together."""
    controller, terminal = pty.openpty()
    process = start("coordinator", *args, env={"COLUMNS": str(columns), "TERM": "xterm"}, stdout=terminal,
                    stderr=terminal)
    os.close(terminal)
    output = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(PROCESS_TIMEOUT) == 0, output.decode(errors="replace")[-3000:]
    return output.decode(errors="replace")


@pytest.mark.slow
def test_live_display_on_a_terminal(tmp_path):
    shown = _on_a_terminal("train", "--spawn", 2, "--bind", LOOPBACK_ANY_PORT, "--run-dir", tmp_path / "run",
                           *SHORT_RUN, "--batch-size", 10)
    assert "samples/s" in shown and "step " in shown  # the progress bar
    assert "rtt ms" in shown and "answers" in shown  # the worker table
    assert "epoch 1/2  cost" in shown and "epoch 2/2  cost" in shown


@pytest.mark.slow
def test_live_display_on_an_80_column_terminal(tmp_path):
    """Headers whole, log levels once, and the spawned workers' lines in their own files, not on the screen."""
    shown = _on_a_terminal("train", "--spawn", 2, "--run-dir", tmp_path / "run", *SHORT_RUN, columns=80)
    assert "joined as slot" in shown and "epoch 2/2  cost" in shown
    assert "INFO:coordinator" not in shown  # the display prints the level; the message does not repeat it
    assert "recv MB" in shown and "answers" in shown and "…" not in shown  # no header cut with an ellipsis
    assert "registered as" not in shown  # what a worker logs when it joins
    for name in "AB":
        assert f"{name} registered as slot" in (tmp_path / "run" / "workers" / f"{name}.log").read_text()


@pytest.mark.slow
def test_quiet_on_a_terminal_prints_lines_only(tmp_path):
    shown = _on_a_terminal("train", "--local", "--quiet", "--run-dir", tmp_path / "run", *SHORT_RUN)
    assert "samples/s" not in shown and "\x1b[?25l" not in shown  # no bar, no hidden cursor
    assert [line.split()[1] for line in shown.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]


@pytest.mark.slow
def test_json_lines(train_run):
    done, run_dir = train_run("--spawn", 1, "--bind", LOOPBACK_ANY_PORT, "--log-format", "json", *SHORT_RUN)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    epochs = [event for event in events if event["event"] == "epoch"]
    assert [event["epoch"] for event in epochs] == [1, 2]
    assert {"cost", "train_accuracy", "test_accuracy", "seconds", "time"} <= set(epochs[0])
    messages = [event["message"] for event in events if event["event"] == "log"]
    assert any(message.startswith("worker A joined") for message in messages), messages


@pytest.mark.slow
def test_status_while_training_then_workers_file_and_report(tmp_path):
    run_dir = tmp_path / "run"
    coordinator = start(
        "coordinator", "train", "--spawn", "2", "--bind", LOOPBACK_ANY_PORT, "--status-bind", LOOPBACK_ANY_PORT,
        "--run-dir", run_dir, "--train-limit", "3000", "--test-limit", "100", "--epochs", "3", "--batch-size", "10",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = lines_of(coordinator.stderr)
        seen = wait_for_line(lines, "status served on ", time.monotonic() + PROCESS_TIMEOUT)
        address = seen[-1].split("status served on ")[1].strip()
        status = _status_once_training(address)
        assert (status["epochs"], len(status["workers"])) == (3, 2)
        assert all(worker["answered"] > 0 and worker["sent_bytes"] > 0 for worker in status["workers"])
        shown = run_cli("coordinator", "status", "--connect", address)
        assert shown.returncode == 0, shown.stderr
        assert "epoch " in shown.stdout and "rtt ms" in shown.stdout
        assert coordinator.wait(PROCESS_TIMEOUT) == 0
    finally:
        coordinator.kill()
        coordinator.wait()
    workers = json.loads((run_dir / "workers.json").read_text())
    assert sorted(worker["name"] for worker in workers) == ["A", "B"]
    assert all(worker["busy_seconds"] > 0 and worker["received_bytes"] > 0 for worker in workers)
    assert_one_line_error(run_cli("coordinator", "status", "--connect", address, "--timeout", "0.5"), 1, "no answer")

    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    done = run_cli("coordinator", "report", run_dir)
    assert done.returncode == 0, done.stderr
    names = {"learning-curves.png", "exposure-map.png", "workers.png"}
    assert {line.split("/")[-1] for line in done.stdout.split()} == names
    for name in names:
        assert (run_dir / "report" / name).read_bytes()[:8] == PNG_MAGIC


def _status_once_training(address: str) -> dict:
    """The first status snapshot taken in the middle of training."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while time.monotonic() < deadline:
        done = run_cli("coordinator", "status", "--connect", address, "--log-format", "json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        if status["state"] == "training" and status["samples"] > 0:
            return status
        time.sleep(0.2)
    raise AssertionError("the coordinator never reported training")


@pytest.mark.slow
def test_report_of_a_run_that_kept_a_standby(tmp_path):
    """A spare worker that never got a slot is in workers.json, and its bar in the report says so."""
    # C comes once training is under way, and the run is long enough for it to be admitted (as a spare, with
    # --rebalance never) before the end, however slowly its process starts.
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", "2", "--rebalance", "never", *SHORT_RUN, "--epochs", "40")
        harness.start_worker("A")
        harness.start_worker("B")
        harness.wait_for_epoch(1)
        harness.start_worker("C")
        wait_for(lambda: "worker C joined as a standby" in harness.log(harness.coordinator), 120, "C to join")
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
    finally:
        harness.close()
    workers = json.loads((harness.run_dir / "workers.json").read_text())
    assert [worker["slot"] for worker in workers] == [0, 1, None]
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    done = run_cli("coordinator", "report", harness.run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (harness.run_dir / "report" / "workers.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_report_without_matplotlib_says_how_to_install_it(tmp_path, train_run):
    _, run_dir = train_run("--local", *SHORT_RUN)
    blocker = tmp_path / "blocker"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    done = run_cli("coordinator", "report", run_dir, env={"PYTHONPATH": str(blocker)})
    assert_one_line_error(done, 1, "matplotlib", "pip install 'scatterprop[plot]'")


@pytest.mark.slow
@pytest.mark.parametrize(
    "program, args, code, words",
    [
        ("coordinator", ("report", "/nonexistent/run"), 1, ("cannot read run directory", "/nonexistent/run")),
        ("coordinator", ("train", "--epochs", "many"), 2, ("--epochs", "valid integer")),
        ("coordinator", ("train", "--no-such-option"), 2, ("No such option",)),
        ("coordinator", ("train", "--log-format", "xml"), 2, ("--log-format",)),
        ("coordinator", ("status", "--connect", "not-an-address"), 1, ("cannot connect to not-an-address",)),
        ("coordinator", ("train", "--workers", "1", "--bind", LOOPBACK_ANY_PORT, "--status-bind", "tcp://nowhere:5556"),
         1, ("cannot bind the status socket",)),
        ("worker", ("--connect", "not-an-address"), 2, ("cannot connect to not-an-address",)),
        ("worker", ("--threads", "0"), 2, ("--threads",)),
    ],
)
def test_user_errors_are_one_line(program, args, code, words):
    assert_one_line_error(run_cli(program, *args), code, *words)


def test_exposure_map_shows_pixels_that_changed_hands(tmp_path):
    """A run directory as issue 3's recovery leaves it: exposure.jsonl records slot 2's pixels handed to slot 0."""
    image = pytest.importorskip("matplotlib.image", reason="the plot extra is not installed")
    from common.exposure import ExposurePlan
    from coordinator.report import final_owners, write_report

    plan = ExposurePlan.random(784, (128, 64), 3, seed=1)  # a deep run: the map is of pixels all the same
    plan.save(tmp_path / "exposure.npz", permutation_seed=5)
    (tmp_path / "history.jsonl").write_text(json.dumps(
        {"epoch": 1, "cost": 0.5, "train_accuracy": 0.5, "test_accuracy": 0.6, "seconds": 1.0}) + "\n")
    handover = {"epoch": 1, "step": 3, "slot": 0, "worker": "A", "reason": "took over columns of a lost worker",
                "columns": sorted([*plan.columns(0).tolist(), *plan.columns(2).tolist()]), "units": [[]]}
    (tmp_path / "exposure.jsonl").write_text(json.dumps(handover) + "\n")
    owners = final_owners(plan.column_owners, [handover])
    assert np.bincount(owners, minlength=3).tolist() == [len(plan.columns(0)) + len(plan.columns(2)),
                                                         len(plan.columns(1)), 0]
    still = write_report(tmp_path, tmp_path / "still")  # the same run before any handover
    (tmp_path / "exposure.jsonl").unlink()
    alone = write_report(tmp_path, tmp_path / "alone")
    moved_width = image.imread(still[1]).shape[1]
    assert moved_width > 1.5 * image.imread(alone[1]).shape[1]  # a second panel: the map at the end
