"""The run directory survives kills and a full disk: every file is whole or absent, the trained model is never lost,
and a resume ends with the weights of an undisturbed run."""

import json
import os
import random
import signal
import subprocess
import time
import zipfile

import numpy as np
import pytest

from coordinator.files import whole_lines, write_atomically
from tests.conftest import assert_one_line_error, load_model, max_difference, run_cli, start

# A one-process run with a checkpoint every 4 steps: most moments of it are spent writing one.
RUN = ("--local", "--dtype", "float64", "--train-limit", "6000", "--test-limit", "300", "--epochs", "4",
       "--checkpoint-every", "4", "--quiet")


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def fails_halfway(file):
        file.write(b"new, but")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as raised:
        write_atomically(path, fails_halfway)
    assert raised.value.filename == str(path) and path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_a_line_cut_short_is_left_out(tmp_path):
    path = tmp_path / "exposure.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c"')
    assert whole_lines(path) == ['{"a": 1}', '{"b": 2}']


def every_file_whole(run_dir) -> None:
    for path in run_dir.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            assert zipfile.is_zipfile(path), path
        elif path.suffix == ".jsonl":
            for line in whole_lines(path):
                json.loads(line)


@pytest.mark.slow
def test_random_kills_lose_nothing(tmp_path, train_run):
    _, undisturbed = train_run(*RUN)
    run_dir = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    with start("coordinator", "train", "--run-dir", run_dir, *RUN, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL) as process:
        _kill_at_random(process, run_dir, rng)
        kills += 1
    while True:
        every_file_whole(run_dir)
        with start("coordinator", "train", "--resume", run_dir, "--local", stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, text=True) as process:
            if kills < 5 and _kill_at_random(process, run_dir, rng):
                kills += 1
                continue
            assert process.wait(300) == 0, process.stderr.read()[-2000:]
            break
    every_file_whole(run_dir)
    assert not list(run_dir.rglob("*.tmp"))
    assert kills >= 3
    assert max_difference(load_model(run_dir), load_model(undisturbed)) == 0.0  # one process: bit for bit
    done = run_cli("coordinator", "verify-chain", run_dir)
    assert done.returncode == 0, done.stderr


def _kill_at_random(process, run_dir, rng) -> bool:
    """SIGKILL the run once it has written a checkpoint of its own, at a random moment; False if it finished first."""
    def checkpoints():
        return len(list((run_dir / "checkpoints").glob("*.json")))

    before, deadline = checkpoints(), time.monotonic() + 120
    while checkpoints() == before and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    return True


@pytest.mark.slow
def test_a_resume_writes_back_a_model_lost_at_the_end(train_run):
    _, run_dir = train_run(*RUN)
    trained = load_model(run_dir)
    for damage in ("empty", "missing", "stale temporary"):
        model = run_dir / "model.npz"
        if damage == "empty":
            model.write_bytes(b"")
        elif damage == "missing":
            model.unlink()
        else:
            (run_dir / "model.npz.tmp").write_bytes(b"half a model")
            (run_dir / "checkpoints" / "000099.npz.tmp").write_bytes(b"half a checkpoint")
        done = run_cli("coordinator", "train", "--resume", run_dir)
        assert done.returncode == 0, done.stderr
        assert "nothing to train" in done.stdout
        assert ("wrote" in done.stdout) == (damage != "stale temporary"), (damage, done.stdout)
        assert max_difference(load_model(run_dir), trained) == 0.0
        assert not list(run_dir.rglob("*.tmp"))
    evaluated = run_cli("coordinator", "evaluate", "--model", run_dir / "model.npz")
    assert evaluated.returncode == 0 and "test accuracy" in evaluated.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, which `grow` enlarges to hold the whole run (190 checkpoints of 0.8 MB); root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], check=True)

    def grow():
        subprocess.run(["mount", "-o", "remount,size=512m", mount], check=True)

    try:
        yield mount, grow
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_that_says_what_is_safe_and_how_to_go_on(small_disk, train_run):
    mount, grow = small_disk
    _, undisturbed = train_run(*RUN)
    run_dir = mount / "run"
    done = run_cli("coordinator", "train", "--run-dir", run_dir, *RUN)
    assert_one_line_error(done, 1, "No space left on device", "the run is safe up to checkpoint",
                          f"coordinator train --resume {run_dir}")
    assert "internal" not in done.stderr
    every_file_whole(run_dir)
    grow()
    resumed = run_cli("coordinator", "train", "--resume", run_dir, "--local")
    assert resumed.returncode == 0, resumed.stderr
    assert max_difference(load_model(run_dir), load_model(undisturbed)) == 0.0
    assert np.load(run_dir / "model.npz")["w1"].shape == (784, 128)
