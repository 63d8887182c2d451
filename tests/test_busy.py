"""The README's first command on a machine that is busy with other work: it must not lose its workers."""

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # every test here starts real processes

HOGS = 8  # busy loops on the 2-core reference machine: a load average near 10, as seen when it failed


def test_the_first_command_survives_a_busy_machine(train_run):
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(HOGS)]
    try:
        started = time.monotonic()
        done, run_dir = train_run("--spawn", 7, "--epochs", 1, "--quiet")
        print(f"under {HOGS} busy loops: {time.monotonic() - started:.0f} s")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert "epoch 1/1" in done.stdout
    log = (run_dir / "coordinator.log").read_text()
    assert "dropped" not in log and "registered again" not in log, log[-3000:]
