"""The command lines as a user meets them: real processes, real sockets, and one-line errors."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from common import model, protocol, settings
from common.protocol import Register
from coordinator.config import PRESETS
from common.data import XOR
from tests.conftest import LOOPBACK_ANY_PORT, assert_one_line_error, lines_of, load_model, run_cli, start, wait_for_line

README = Path(__file__).resolve().parent.parent / "README.md"

# What keeps each preset's documented command short here; the options come after the README's, so they win.
PRESET_SHORTENINGS = {
    "default": ("--epochs", "1", "--train-limit", "2000", "--test-limit", "500"),
    "seed": ("--epochs", "1", "--train-limit", "2000", "--test-limit", "500"),  # full batch of 60,000 float64
    "xor": (),  # 5000 one-step epochs of four rows: quick, and the only way to see it learn
    "relu-dropout": ("--epochs", "2"),  # 1,000 images already
    "tanh-softmax": ("--epochs", "2"),
}


def documented_commands() -> dict:
    """preset -> the arguments after `coordinator train` of the README's first command line with that preset."""
    commands = {}
    for line in re.findall(r"^coordinator train ([^#\n]*)", README.read_text(), re.MULTILINE):
        preset = re.search(r"--preset ([\w-]+)", line)
        commands.setdefault(preset[1] if preset else "default", line.split())
    return commands


@pytest.mark.slow
def test_train_on_two_spawned_workers_then_evaluate(train_run):
    done, run_dir = train_run("--spawn", 2, "--train-limit", "1000", "--epochs", "2", "--dtype", "float64")
    assert [line.split()[:2] for line in done.stdout.splitlines()] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert "sees 392 input columns" in done.stderr
    endpoint = re.search(r"waiting for 2 workers on (\S+)", done.stderr)[1]
    assert endpoint == f"ipc://{(run_dir / 'workers.sock').resolve()}", endpoint  # a Unix socket: no network at all
    log = (run_dir / "coordinator.log").read_text()
    assert "INFO coordinator: worker A joined as slot" in log and "sees 392 input columns" in log
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"epoch", "cost", "train_accuracy", "test_accuracy", "seconds"} <= set(history[0])
    assert history[1]["cost"] < history[0]["cost"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train_limit"] == 1000 and config["mode"] == "distributed"
    saved = load_model(run_dir)
    assert {k: v.shape for k, v in saved.items()} == {"w1": (784, 128), "b1": (128,), "w2": (128, 10), "b2": (10,)}
    with np.load(run_dir / "exposure.npz") as exposure:
        assert np.bincount(exposure["column_owners"]).tolist() == [392, 392]
    evaluated = run_cli("coordinator", "evaluate", "--model", run_dir / "model.npz")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.strip() == f"test accuracy {history[-1]['test_accuracy']:.2%}"


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_runs_as_documented(train_run, preset):
    arguments = documented_commands().get(preset)
    assert arguments, f"the README has no `coordinator train --preset {preset}` line"
    done, run_dir = train_run(*arguments, *PRESET_SHORTENINGS[preset])
    assert "epoch " in done.stdout
    if preset == "xor":
        assert done.stdout.count("epoch ") == 10  # every 500th of 5000 epochs
        w1, b1, w2, b2 = load_model(run_dir).values()
        outputs = model.activate(model.activate(XOR.train_images @ w1, b1, "sigmoid") @ w2, b2, "sigmoid")[:, 0]
        assert ((outputs > 0.5) == XOR.train_labels).all(), outputs


@pytest.mark.slow
def test_xor_preset_waits_for_its_two_workers(train_run):
    done, _ = train_run("--preset", "xor", "--bind", LOOPBACK_ANY_PORT, "--wait-timeout", "0.5", expect_ok=False)
    assert_one_line_error(done, 1, "only 0 of 2 workers registered")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, words",
    [
        (("--preset", "xor", "--spawn", "3"), ("3 workers cannot share 2 input columns", "at most 2")),
        (("--hidden", "4", "--workers", "5"), ("5 workers cannot share 784 input columns and 4 hidden units",)),
        (("--hidden", "64,4", "--workers", "5"), ("5 workers cannot share 784 input columns and 64,4 hidden units",
                                                  "at most 4")),
        (("--preset", "xor", "--workers", "6", "--replicas", "2"), ("6 workers cannot share", "at most 4")),
        (("--spawn", "0"), ("--spawn",)),
        (("--workers", "0"), ("--workers",)),
        (("--bind", "tcp://127.0.0.1:99999"), ("--bind", "99999", "65535")),
        (("--bind", "tcp://127.0.0.1:0"), ("--bind", "65535")),
        (("--bind", "tcp://127.0.0.1"), ("--bind", "65535")),
        (("--status-bind", "tcp://127.0.0.1:70000"), ("--status-bind", "65535")),
    ],
)
def test_worker_counts_and_addresses_refused_in_one_line(train_run, args, words):
    done, run_dir = train_run(*args, expect_ok=False)
    assert_one_line_error(done, 2, *words)
    assert not run_dir.exists()


@pytest.mark.slow
def test_seed_preset_settings(train_run):
    _, run_dir = train_run("--preset", "seed", "--local", "--epochs", "1", "--train-limit", "5000",
                           "--test-limit", "100")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["input_divisor"], config["batch_size"], config["learning_rate"]) == (1.0, 60000, 0.05)
    assert (config["dtype"], config["loss"], config["init"], config["seed"]) == ("float64", "mse", "legacy", 402)


@pytest.mark.slow
def test_options_override_a_preset(train_run):
    _, run_dir = train_run("--preset", "seed", "--local", "--epochs", "1", "--train-limit", "100",
                           "--test-limit", "10", "--lr", "0.01", "--dtype", "float32")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["learning_rate"], config["dtype"], config["batch_size"]) == (0.01, "float32", 60000)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, words",
    [
        (("--preset", "nope"), ("unknown preset",)),
        (("--dtype", "float16"), ("dtype must be",)),
        (("--loss", "hinge"), ("loss must be",)),
        (("--epochs", "0", "--lr", "-1"), ("epochs must be", "learning rate must be")),
        (("--loss", "ce"), ("loss ce needs output softmax, not sigmoid",)),
        (("--hidden", "64,x"), ("--hidden '64,x' is not a comma list of unit counts",)),
        (("--hidden", "64,0"), ("hidden layers must have 1..4096 units each",)),
        (("--preset", "xor", "--output", "softmax", "--loss", "ce"), ("softmax needs several outputs; xor has one",)),
    ],
)
def test_bad_settings_fail_in_one_line(train_run, args, words):
    done, _ = train_run("--local", *args, expect_ok=False)
    assert_one_line_error(done, 2, *words)


@pytest.mark.slow
def test_missing_data_folder(train_run, tmp_path):
    done, _ = train_run("--local", "--data", tmp_path / "absent", expect_ok=False)
    assert_one_line_error(done, 2, "does not exist")


@pytest.mark.slow
def test_corrupt_data_folder(train_run, tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03garbage")
    done, _ = train_run("--local", "--data", tmp_path, expect_ok=False)
    assert_one_line_error(done, 2, "train-images-idx3-ubyte")


@pytest.mark.slow
def test_no_workers_arrive(train_run):
    done, run_dir = train_run("--workers", "2", "--bind", LOOPBACK_ANY_PORT, "--wait-timeout", "0.5", expect_ok=False)
    assert_one_line_error(done, 1, "only 0 of 2 workers registered")
    assert not run_dir.exists()  # a failed start leaves nothing behind


@pytest.mark.slow
def test_port_in_use(train_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done, run_dir = train_run("--workers", "1", "--bind", f"tcp://127.0.0.1:{port}", expect_ok=False)
    assert_one_line_error(done, 1, "cannot bind", str(port), "--bind")
    assert not run_dir.exists()


def test_an_internal_error_is_one_line_and_a_traceback_in_the_log(tmp_path, monkeypatch, capsys):
    from coordinator import run
    from coordinator.cli import console_script

    def broken_training(*args, **kwargs):
        logging.getLogger("coordinator").warning("about to fail")  # (in pytest the root logger stays at WARNING)
        raise KeyError("gone")

    monkeypatch.setattr(run, "train", broken_training)
    monkeypatch.setattr(sys, "argv", ["coordinator", "train", "--local", "--quiet", "--run-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit:
        console_script()
    assert exit.value.code == 1
    shown = capsys.readouterr().err
    assert shown.strip().splitlines()[-1].startswith("error: internal: KeyError: 'gone' (traceback in ")
    assert "Traceback" not in shown
    log = (tmp_path / "run" / "coordinator.log").read_text()
    assert "about to fail" in log and "Traceback" in log and 'raise KeyError("gone")' in log


@pytest.mark.slow
def test_evaluate_a_missing_or_bogus_model(tmp_path):
    assert_one_line_error(run_cli("coordinator", "evaluate", "--model", tmp_path / "none.npz"), 2, "cannot read model")
    np.savez(tmp_path / "bogus.npz", w1=np.zeros((784, 5)), b1=np.zeros(6), w2=np.zeros((5, 10)), b2=np.zeros(10),
             input_divisor=np.array(255.0))
    assert_one_line_error(run_cli("coordinator", "evaluate", "--model", tmp_path / "bogus.npz"), 2, "inconsistent")
    np.savez(tmp_path / "pickled.npz", w1=np.array([object()]), b1=np.zeros(6), w2=np.zeros((5, 10)),
             b2=np.zeros(10), input_divisor=np.array(255.0))
    assert_one_line_error(run_cli("coordinator", "evaluate", "--model", tmp_path / "pickled.npz"), 2, "cannot read")
    assert run_cli("coordinator", "keygen", tmp_path / "keys", "--workers", "1").returncode == 0
    done = run_cli("coordinator", "evaluate", "--model", tmp_path / "keys" / "coordinator.key")
    assert_one_line_error(done, 2, "not a model file")
    assert "pickle" not in done.stderr


@pytest.mark.slow
def test_verify_chain_of_a_missing_directory(tmp_path):
    assert_one_line_error(run_cli("coordinator", "verify-chain", tmp_path / "absent"), 2, "does not exist")


@pytest.mark.slow
def test_worker_that_finds_no_coordinator_keeps_trying():
    """A coordinator's port that never answers: the worker says it registers again, and does."""
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.linger = 0
    silent.bind(LOOPBACK_ANY_PORT)
    address = silent.getsockopt_string(zmq.LAST_ENDPOINT)
    worker = start("worker", "--connect", address, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10 * settings.HEARTBEAT_TIMEOUT
        seen = wait_for_line(lines_of(worker.stderr), "registering again", deadline)
        assert seen and "registering again" in seen[-1], seen
        registrations = [protocol.decode(_receive(silent, deadline)[-1]) for _ in range(2)]
        assert all(isinstance(message, Register) for message in registrations)  # the first, and once more
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait()
        context.destroy(linger=0)


def _receive(socket: zmq.Socket, deadline: float) -> list:
    """One message's frames, or a loud failure once the deadline has passed."""
    assert socket.poll(max(0.0, deadline - time.monotonic()) * 1000), "nothing arrived before the deadline"
    return socket.recv_multipart()


def test_workers_table_fits_80_columns():
    from rich.console import Console

    from coordinator.display import workers_table
    from coordinator.status import WorkerStatus

    workers = [WorkerStatus(name, slot, 112, 18, 123456, 0.0123, 123.4, 1_234_567_890, 9_876_543_210)
               for slot, name in enumerate("ABCDEFG")]
    workers.append(WorkerStatus("a-long-hostname.example.org-123456", None, 0, 0, 0, None, 0.0, 0, 0))
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(workers_table(workers))
    lines = console.export_text().splitlines()
    assert lines[0].split() == ["worker", "slot", "pixels", "hidden", "answers", "rtt", "ms", "busy", "s", "sent",
                                "MB", "recv", "MB"]
    assert lines[2].split() == ["A", "0", "112", "18", "123456", "12.3", "123.4", "1234.6", "9876.5"]
    assert len(lines) == 2 + len(workers) and max(map(len, lines)) <= 80


@pytest.mark.slow
def test_a_spawned_worker_that_fails_shows_its_last_lines(train_run, tmp_path):
    assert run_cli("coordinator", "keygen", tmp_path / "keys", "--workers", "2").returncode == 0
    (tmp_path / "keys" / "workers" / "B.key_secret").write_text("not a key\n")
    done, run_dir = train_run("--spawn", "2", "--curve-keys", tmp_path / "keys", "--wait-timeout", "5",
                              expect_ok=False)
    assert_one_line_error(done, 1, "only 1 of 2 workers registered")
    assert re.search(r"spawned worker B exited with code 2; the end of \S+B\.log:\n.*error: cannot read key file",
                     done.stderr), done.stderr[-2000:]
    assert "spawned worker A" not in done.stderr


@pytest.mark.slow
def test_worker_told_to_give_up_exits_after_that_long_without_a_word():
    nobody = f"ipc://@scatterprop-nobody-{os.getpid()}"  # an abstract Unix socket that nothing binds
    done = run_cli("worker", "--connect", nobody, "--give-up-after", "1", timeout=30)
    assert_one_line_error(done, 1, f"no word from {nobody}", "gave up after 1 s")


SMALL_LOCAL = ("--train-limit", "200", "--test-limit", "50", "--epochs", "2")


def _trained(run_dir, *args):
    return run_cli("coordinator", "train", "--local", "--run-dir", run_dir, "--resume-if-exists", *args, *SMALL_LOCAL)


@pytest.mark.slow
def test_resume_if_exists_starts_continues_and_knows_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    started = _trained(run_dir)
    assert started.returncode == 0, started.stderr[-2000:]
    (run_dir / "checkpoints" / "000002.json").unlink()  # as if stopped during epoch 2
    continued = _trained(run_dir)
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert continued.stdout.splitlines()[-1].startswith("epoch 2/2") and "epoch 1/2" not in continued.stdout
    finished = _trained(run_dir)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == f"{run_dir} holds a finished run of 2 epochs: nothing to train"
    changed = _trained(run_dir, "--batch-size", "10")
    assert_one_line_error(changed, 1, "holds a run with other settings (batch_size 32, not 10)")
    assert_one_line_error(run_cli("coordinator", "train", "--local", "--resume-if-exists"), 2, "give --run-dir")


@pytest.mark.slow
def test_resume_if_exists_waits_for_as_many_workers_as_the_plan_has_slots(tmp_path):
    """An orchestrator starts the same command again after the cluster was scaled: the run's plan says how many."""
    run_dir = tmp_path / "run"
    on_five = run_cli("coordinator", "train", "--spawn", "5", "--run-dir", run_dir, *SMALL_LOCAL)
    assert on_five.returncode == 0, on_five.stderr[-2000:]
    (run_dir / "checkpoints" / "000002.json").unlink()  # as if killed during epoch 2
    again = run_cli("coordinator", "train", "--workers", "7", "--bind", LOOPBACK_ANY_PORT, "--wait-timeout", "1",
                    "--run-dir", run_dir, "--resume-if-exists", *SMALL_LOCAL)
    assert_one_line_error(again, 1, "only 0 of 5 workers registered")
