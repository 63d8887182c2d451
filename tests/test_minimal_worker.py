"""The minimal worker written from docs/PROTOCOL.md trains alongside ours to the one-process run's weights, in a
network with two hidden layers, whose two later layers' operands it must keep apart."""

import subprocess
import sys
import time

import pytest

from tests.bad_workers import MINIMAL_WORKER
from tests.conftest import LOOPBACK_ANY_PORT, PROCESS_TIMEOUT, lines_of, load_model, max_difference, wait_for_line
from tests.test_equivalence import SMALL_RUN, TOLERANCE

MINIMAL_WORKERS = 3  # of 7: the others are `python -m worker`
DEEP_RUN = (*SMALL_RUN, "--hidden", "64,32")


@pytest.mark.slow
def test_seven_workers_some_minimal_match_local(train_run, tmp_path):
    _, local_dir = train_run("--local", *DEEP_RUN)
    run_dir = tmp_path / "distributed"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "train", "--workers", "7", "--bind", LOOPBACK_ANY_PORT, "--quiet",
         "--run-dir", str(run_dir), *DEEP_RUN],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    workers = []
    try:
        lines = lines_of(coordinator.stderr)
        seen = wait_for_line(lines, "waiting for 7 workers on", time.monotonic() + PROCESS_TIMEOUT)
        endpoint = seen[-1].split()[-1]
        for index in range(7):
            name = f"W{index}"
            command = ([sys.executable, str(MINIMAL_WORKER), endpoint, name] if index < MINIMAL_WORKERS
                       else [sys.executable, "-m", "worker", "--connect", endpoint, "--name", name])
            workers.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        assert coordinator.wait(PROCESS_TIMEOUT) == 0, "".join(wait_for_line(lines, "never", time.monotonic() + 1))
        assert [worker.wait(PROCESS_TIMEOUT) for worker in workers] == [0] * 7  # all stopped cleanly
    finally:
        for process in [coordinator, *workers]:
            process.kill()
            process.wait()
    difference = max_difference(load_model(run_dir), load_model(local_dir))
    print(f"largest difference from the local run: {difference:.3g}")
    assert difference < TOLERANCE
