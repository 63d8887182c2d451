"""Checkpoints: the hash chain names a broken link, and a resumed run ends where an uninterrupted one does."""

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common import cli, model
from common.exposure import ExposurePlan
from common.model import Params
from coordinator import checkpoint, run
from coordinator import cli as coordinator_cli
from coordinator.checkpoint import Checkpoint, read_chain, resume_point
from coordinator.config import PRESETS
from coordinator.training import Progress
from tests.cluster_harness import Harness, wait_for
from tests.conftest import LOOPBACK_ANY_PORT, PROCESS_TIMEOUT, load_model, max_difference, run_cli, start

TOLERANCE = 1e-6
# 2,000 images in batches of 20: 100 steps an epoch, checkpointed every 25 steps and after each epoch.
RUN = ("--dtype", "float64", "--train-limit", "2000", "--test-limit", "500", "--batch-size", "20", "--epochs", "4",
       "--seed", "3", "--checkpoint-every", "25")
SPAWNED = ("--spawn", "2", "--bind", LOOPBACK_ANY_PORT)


def _chain_of_three(folder: Path) -> None:
    prev = None
    for number in (1, 2, 3):
        params = Params([np.full(shape, number, np.float64) for shape in ((4, 3), (3, 2))],
                        [np.full(shape, number, np.float64) for shape in ((3,), (2,))])
        state = Checkpoint(params, Progress(1, number), [], {}, None, steps=number, number=number)
        prev = checkpoint.save(folder, state, prev)


def _edit_metadata(path: Path) -> None:
    metadata = json.loads(path.read_text())
    metadata["cost"] = 1.5
    path.write_text(json.dumps(metadata))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(data)


def _remove(path: Path) -> None:
    path.unlink()
    path.with_suffix(".npz").unlink()


@pytest.mark.parametrize(
    "tamper, broken",
    [
        (lambda folder: _flip_a_byte(folder / "000002.npz"), "checkpoint 000002 is broken: 000002.npz"),
        (lambda folder: _edit_metadata(folder / "000002.json"), "checkpoint 000002 is broken: its metadata was"),
        (lambda folder: _remove(folder / "000002.json"), "checkpoint 000003 is broken: expected checkpoint 000002"),
    ],
)
def test_chain_names_the_first_broken_link(tmp_path, tamper, broken):
    _chain_of_three(tmp_path)
    links, problem = read_chain(tmp_path)
    assert (len(links), problem) == (3, None)
    tamper(tmp_path)
    links, problem = read_chain(tmp_path)
    assert problem.startswith(broken), problem
    assert len(links) == 1


def test_a_chain_from_before_dropout_continues_with_a_new_mask_generator(tmp_path):
    _chain_of_three(tmp_path / checkpoint.FOLDER)
    prev = None
    for path in sorted((tmp_path / checkpoint.FOLDER).glob("*.json")):  # as the version before wrote them
        metadata = json.loads(path.read_text())
        del metadata["masks"]
        metadata["prev"] = prev
        metadata["sha256"] = prev = checkpoint.metadata_sha256(metadata)
        path.write_text(checkpoint.metadata_text(metadata))
    links, broken = read_chain(tmp_path / checkpoint.FOLDER)
    assert (len(links), broken) == (3, None)
    config, start = resume_point(tmp_path)
    assert start.masks == model.dropout_masks(config.seed).bit_generator.state


def _coordinator_says(monkeypatch, capsys, *args) -> tuple:
    """(exit code, stderr) of the coordinator's command line run in this process, as its console script runs it."""
    monkeypatch.setattr(sys, "argv", ["coordinator", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        cli.run(coordinator_cli.app, "coordinator")
    return exit.value.code, capsys.readouterr().err


@pytest.mark.slow  # 20,496 flips through the chain, 2,562 through both commands: about a minute
def test_every_flipped_byte_of_a_checkpoint_is_named_by_resume_and_verify_chain(tmp_path, monkeypatch, capsys):
    """Any one bit flipped, in either file of the last checkpoint of a real run, is named by the chain; any one byte
    by both commands. JSON alone takes some changed bytes for the same metadata (4 of 11,936 single-bit flips of
    such a .json did: the last digit of a 17-digit float changed by one reads as the same float), so the text
    must be exactly what was written."""
    run_dir = tmp_path / "run"
    config = replace(PRESETS["xor"].config, epochs=2, checkpoint_epochs=1)
    run.train(config, run_dir, None, on_epoch=lambda report: None)
    folder = run_dir / checkpoint.FOLDER
    last = sorted(folder.glob("000002.*"))
    assert [path.suffix for path in last] == [".json", ".npz"]
    named = "checkpoint 000002 is broken"
    for path in last:
        intact = path.read_bytes()
        for offset in range(len(intact)):
            for bit in range(8):
                path.write_bytes(_flipped(intact, offset, bit))
                assert read_chain(folder)[1].startswith(named), (path.name, offset, bit)
            path.write_bytes(_flipped(intact, offset, offset % 8))  # each bit position in turn
            verified = _coordinator_says(monkeypatch, capsys, "verify-chain", run_dir)
            resumed = _coordinator_says(monkeypatch, capsys, "train", "--resume", run_dir, "--local")
            for code, stderr in (verified, resumed):
                assert code == 1 and stderr.startswith(f"error: {named}"), (path.name, offset, stderr)
        path.write_bytes(intact)
    assert _coordinator_says(monkeypatch, capsys, "verify-chain", run_dir)[0] == 0


def _flipped(data: bytes, offset: int, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[offset] ^= 1 << bit
    return bytes(flipped)


def test_a_half_written_checkpoint_is_not_a_link(tmp_path):
    _chain_of_three(tmp_path)
    (tmp_path / "000004.npz").write_bytes(b"cut short by a crash")
    assert checkpoint.latest(tmp_path).number == 3


def test_a_resumed_plan_numbers_its_slots_from_zero_in_the_same_order():
    plan = ExposurePlan(np.array([2, 1, 2, 1, 4]), (np.array([4, 1, 2]), np.array([1, 2, 4, 4])))
    renumbered = plan.renumbered()
    assert renumbered.slots == [0, 1, 2]
    for old, new in zip(plan.slots, renumbered.slots):
        assert np.array_equal(plan.columns(old), renumbered.columns(new))
        for layer in (2, 3):
            assert np.array_equal(plan.units(old, layer), renumbered.units(new, layer))


class Crash(Exception):
    pass


# Checkpointed every 3 steps and crashed at the 4th or 5th step of epoch 3, so resumed from its 3rd step: the XOR
# rows one at a time, and 200 images in batches of 20 with dropout, whose masks must go on as they would have, with
# one hidden layer and with two (a mask for each).
DROPOUT_RUN = replace(PRESETS["relu-dropout"].config, epochs=4, train_limit=200, test_limit=50, batch_size=20,
                      dtype="float64", checkpoint_epochs=1, checkpoint_every=3)
CRASHED_RUNS = {
    "xor": (replace(PRESETS["xor"].config, epochs=5, batch_size=1, checkpoint_epochs=1, checkpoint_every=3), 4),
    "dropout": (DROPOUT_RUN, 100),
    "deep-dropout": (replace(DROPOUT_RUN, hidden=(48, 24)), 100),
}


@pytest.mark.parametrize("crashed", CRASHED_RUNS)
def test_local_run_resumed_after_a_crash_is_bit_for_bit_the_same(tmp_path, crashed):
    config, crash_after_rows = CRASHED_RUNS[crashed]
    whole = run.train(config, tmp_path / "whole", None, on_epoch=lambda report: None)

    def crash_in_epoch_three(rows_done):
        if rows_done == crash_after_rows and len((tmp_path / "cut" / "history.jsonl").read_text().splitlines()) == 2:
            raise Crash

    with pytest.raises(Crash):
        run.train(config, tmp_path / "cut", None, on_epoch=lambda report: None, on_batch=crash_in_epoch_three)
    resumed_config, start = resume_point(tmp_path / "cut")
    assert resumed_config == config and (start.progress.epoch, start.progress.step) == (3, 3)
    resumed = run.train(resumed_config, tmp_path / "cut", None, on_epoch=lambda report: None, start=start)
    for name, array in whole.arrays().items():
        assert np.array_equal(array, resumed.arrays()[name]), name
    histories = [(tmp_path / d / "history.jsonl").read_text().splitlines() for d in ("whole", "cut")]
    for ours, theirs in zip(*histories, strict=True):
        ours, theirs = json.loads(ours), json.loads(theirs)
        assert {**ours, "seconds": 0} == {**theirs, "seconds": 0}


def _start_training(run_dir: Path, *args) -> subprocess.Popen:
    """A coordinator leading its own process group, which its spawned workers join, as in a terminal."""
    return start("coordinator", "train", "--run-dir", run_dir, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, start_new_session=True)


def _when_first_checkpoint_appears(process: subprocess.Popen, run_dir: Path) -> None:
    _until(lambda: any((run_dir / "checkpoints").glob("*.json")), process, "the first checkpoint")


def _until(condition, process: subprocess.Popen, what: str) -> None:
    """Until `condition` holds, failing loudly if `process` ends first or the deadline passes."""

    def holds() -> bool:
        if process.poll() is not None:
            said = process.stderr.read()[-2000:] if process.stderr else ""
            raise AssertionError(f"exited with {process.returncode} before {what}: {said}")
        return condition()

    wait_for(holds, PROCESS_TIMEOUT, what)


def _children(pid: int) -> list:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _resume(run_dir: Path) -> subprocess.CompletedProcess:
    done = run_cli("coordinator", "train", "--resume", run_dir, *SPAWNED)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_cli("coordinator", "train", "--run-dir", run_dir, *SPAWNED, *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "anyone who can reach the port can join" in done.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("rekey", ["every-step", "every-epoch"])  # checkpoints end a period of kept rows
def test_killed_coordinator_resumes_to_the_same_weights(tmp_path, uninterrupted, rekey):
    run_dir = tmp_path / "run"
    coordinator = _start_training(run_dir, *SPAWNED, *RUN, "--rekey", rekey)
    _when_first_checkpoint_appears(coordinator, run_dir)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.communicate()
    assert not (run_dir / "model.npz").exists()
    done = _resume(run_dir)
    assert max_difference(load_model(run_dir), load_model(uninterrupted)) < TOLERANCE
    assert done.stdout.splitlines()[-1].startswith("epoch 4/4")
    history = [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3, 4]
    verified = run_cli("coordinator", "verify-chain", run_dir)
    assert verified.returncode == 0 and verified.stdout.startswith("chain intact"), verified


def _last_checkpoint_slots(run_dir: Path) -> tuple:
    """(the worker slots of the plan in the last checkpoint, the steps it was taken after)."""
    links, _ = read_chain(run_dir / "checkpoints")
    with np.load(run_dir / "checkpoints" / f"{links[-1]['checkpoint']:06d}.npz") as saved:
        return np.unique(saved["column_owners"]).tolist(), links[-1]["steps"]


def _slot_held_by(run_dir: Path, worker: str) -> int:
    records = map(json.loads, (run_dir / "exposure.jsonl").read_text().splitlines())
    return next(record["slot"] for record in records if record["worker"] == worker)


def _worker_named(coordinator_pid: int, name: str) -> int:
    for pid in _children(coordinator_pid):
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if arguments[arguments.index(b"--name") + 1] == name.encode():
            return pid
    raise AssertionError(f"no spawned worker named {name}")


# Two hidden layers with dropout on two workers, checkpointed every 10 of an epoch's 30 steps.
DEEP_RUN = ("--dtype", "float64", "--train-limit", "600", "--test-limit", "100", "--batch-size", "20", "--epochs", "3",
            "--seed", "4", "--hidden", "32,16", "--activation", "relu", "--output", "softmax", "--loss", "ce",
            "--dropout", "0.3", "--checkpoint-every", "10")


@pytest.mark.slow
def test_killed_deep_run_with_dropout_resumes_to_the_same_weights(tmp_path):
    """The plan's owners of both hidden layers and the masks' generator come back from the checkpoint, so the
    resumed run ends with the weights of a run that was never stopped: to rounding, not bit for bit, as each run
    draws its own secret shuffles and a product's rounding may depend on where its column falls (the local run
    resumes bit for bit, above); a mask drawn out of turn would be off by far more."""
    whole = tmp_path / "whole"
    done = run_cli("coordinator", "train", "--run-dir", whole, *SPAWNED, *DEEP_RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    coordinator = _start_training(run_dir, *SPAWNED, *DEEP_RUN)
    _when_first_checkpoint_appears(coordinator, run_dir)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.communicate()
    links, _ = read_chain(run_dir / "checkpoints")
    with np.load(run_dir / "checkpoints" / f"{links[-1]['checkpoint']:06d}.npz") as saved:
        assert {"w3", "b3", "unit_owners1", "unit_owners2"} <= set(saved.files)
    assert links[-1]["steps"] < 90 and not (run_dir / "model.npz").exists()
    _resume(run_dir)
    resumed, uninterrupted = load_model(run_dir), load_model(whole)
    assert list(resumed) == ["w1", "b1", "w2", "b2", "w3", "b3"]
    assert max_difference(resumed, uninterrupted) < 1e-12


@pytest.mark.slow
def test_resume_after_a_worker_was_lost_keeps_the_reassigned_plan(tmp_path, uninterrupted):
    """Three workers, one killed, the plan spread over two; the coordinator killed; resumed on two."""
    run_dir = tmp_path / "run"
    coordinator = _start_training(run_dir, "--spawn", "3", "--bind", LOOPBACK_ANY_PORT, *RUN)
    _when_first_checkpoint_appears(coordinator, run_dir)
    killed_slot = _slot_held_by(run_dir, "B")  # workers register in any order, so B may hold any slot
    os.kill(_worker_named(coordinator.pid, "B"), signal.SIGKILL)
    _until(lambda: len(_last_checkpoint_slots(run_dir)[0]) < 3, coordinator, "a checkpoint of the plan without B")
    coordinator.send_signal(signal.SIGKILL)
    coordinator.communicate()
    slots, steps = _last_checkpoint_slots(run_dir)
    assert slots == sorted({0, 1, 2} - {killed_slot}) and steps < 400, (slots, killed_slot, steps)
    _resume(run_dir)
    assert max_difference(load_model(run_dir), load_model(uninterrupted)) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [
    (lambda pid: os.killpg(pid, signal.SIGINT), 130),  # a Ctrl-C in a terminal reaches the whole group
    (lambda pid: os.kill(pid, signal.SIGTERM), 143),  # `docker stop` signals the container's first process only
], ids=["ctrl-c", "sigterm"])
def test_stop_request_checkpoints_stops_the_workers_and_exits_128_plus_signal(tmp_path, uninterrupted, stop, code):
    run_dir = tmp_path / "run"
    coordinator = _start_training(run_dir, *SPAWNED, *RUN)
    _when_first_checkpoint_appears(coordinator, run_dir)
    workers = _children(coordinator.pid)
    stop(coordinator.pid)
    _, stderr = coordinator.communicate(timeout=PROCESS_TIMEOUT)
    assert coordinator.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: stopped at checkpoint"), stderr[-2000:]
    assert len(workers) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in workers)
    links, broken = read_chain(run_dir / "checkpoints")
    assert broken is None and links[-1]["steps"] < 400
    _resume(run_dir)
    assert max_difference(load_model(run_dir), load_model(uninterrupted)) < TOLERANCE


@pytest.mark.slow
def test_verify_chain_names_a_tampered_checkpoint(tmp_path, uninterrupted):
    run_dir = shutil.copytree(uninterrupted, tmp_path / "run")
    assert len(list((run_dir / "checkpoints").glob("*.json"))) == 16  # 3 in each epoch, and its end
    _flip_a_byte(run_dir / "checkpoints" / "000006.npz")
    done = run_cli("coordinator", "verify-chain", run_dir)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: checkpoint 000006 is broken"), done.stderr
    refused = run_cli("coordinator", "train", "--resume", run_dir, "--local")
    assert refused.returncode == 1 and refused.stderr.startswith("error: checkpoint 000006 is broken")


@pytest.mark.slow
def test_resume_errors_are_one_line(tmp_path, uninterrupted):
    nothing = run_cli("coordinator", "train", "--resume", tmp_path, "--local")
    assert (nothing.returncode, nothing.stderr.strip()) == (1, f"error: no checkpoints in {tmp_path / 'checkpoints'}")
    overridden = run_cli("coordinator", "train", "--resume", uninterrupted, "--epochs", "9", "--local")
    assert overridden.returncode == 2 and overridden.stderr.startswith("error: --resume continues the run")
    again = run_cli("coordinator", "train", "--run-dir", uninterrupted, "--local")
    assert again.returncode == 1 and "already holds a run's checkpoints" in again.stderr
    copy = shutil.copytree(uninterrupted, tmp_path / "copy")
    (copy / "checkpoints" / "000016.json").unlink()  # unfinished: a finished run is not started at all
    other_plan = run_cli("coordinator", "train", "--resume", copy, "--spawn", "3", "--bind", LOOPBACK_ANY_PORT)
    assert other_plan.returncode == 1 and "has 2 worker slots" in other_plan.stderr


@pytest.mark.slow
def test_workers_reconnect_on_their_own_to_a_resumed_coordinator(tmp_path, uninterrupted):
    harness = Harness(tmp_path)
    try:
        first = harness.start_coordinator("--workers", 2, *RUN)
        workers = [harness.start_worker(name) for name in "AB"]
        _when_first_checkpoint_appears(first, harness.run_dir)
        first.kill()
        first.wait()
        harness.resume_coordinator("--workers", 2)
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        assert max_difference(load_model(harness.run_dir), load_model(uninterrupted)) < TOLERANCE
        for worker in workers:  # the same processes, never restarted, registered with the new coordinator
            assert "registering again" in harness.log(worker)
            assert harness.log(worker).count("registered as slot") == 2
        seen = {}
        for record in harness.exposure_records():  # each got back the very columns it held: nobody saw more
            seen.setdefault(record["worker"], set()).add(tuple(record["columns"]))
        assert {name: len(columns) for name, columns in seen.items()} == {"A": 1, "B": 1}
    finally:
        harness.close()
