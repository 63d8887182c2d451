"""`coordinator conformance` passes our worker and the minimal one, and fails each bad worker on the right checks."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.conformance import Probe, run_checks
from tests.bad_workers import MINIMAL_WORKER
from tests.conftest import LOOPBACK_ANY_PORT, PROCESS_TIMEOUT, lines_of, wait_for_line

BAD_WORKERS = Path(__file__).resolve().parent / "bad_workers.py"
REGISTRATION_TIMEOUT = 60  # seconds: a worker process starting on two busy cores
COMPUTE_CHECKS = {"first_layer forward", "first_layer gradient", "first_layer gradient then forward", "kept rows",
                  "later_forward", "later_backward", "register_again"}
WORKERS = {
    "ours": [sys.executable, "-m", "worker", "--connect"],
    "minimal": [sys.executable, str(MINIMAL_WORKER)],
    "wrong-shape": [sys.executable, str(BAD_WORKERS), "wrong-shape"],
    "no-heartbeat": [sys.executable, str(BAD_WORKERS), "no-heartbeat"],
    "ignore-stop": [sys.executable, str(BAD_WORKERS), "ignore-stop"],
}
FAILING = {"ours": set(), "minimal": set(), "wrong-shape": COMPUTE_CHECKS, "no-heartbeat": {"heartbeats"},
           "ignore-stop": {"stop"}}


def _name_option(worker: str) -> list:
    return ["--name", worker] if worker == "ours" else [worker]


@pytest.mark.slow
@pytest.mark.parametrize("worker", list(WORKERS))
def test_checks_pass_and_fail_as_they_should(worker):
    probe = Probe(LOOPBACK_ANY_PORT)
    process = subprocess.Popen([*WORKERS[worker], probe.endpoint, *_name_option(worker)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        checks = run_checks(probe, REGISTRATION_TIMEOUT, report=print)
        if not FAILING[worker] & {"stop"}:
            assert process.wait(PROCESS_TIMEOUT) == 0  # it stopped cleanly, on its own
    finally:
        probe.close()
        process.kill()
        process.wait()
    assert {check.name for check in checks if not check.passed} == FAILING[worker], [str(c) for c in checks]
    assert len(checks) == 12


@pytest.mark.slow
def test_command_prints_one_line_per_check_and_fails_on_any_failure():
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "conformance", "--bind", LOOPBACK_ANY_PORT, "--wait-timeout", "60"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    worker = None
    try:
        lines = lines_of(coordinator.stdout)
        endpoint = wait_for_line(lines, "waiting for a worker on", _deadline())[-1].split()[-1]
        worker = subprocess.Popen([*WORKERS["no-heartbeat"], endpoint, "nh"], stdin=subprocess.DEVNULL)
        seen = wait_for_line(lines, "checks passed", _deadline())
        assert coordinator.wait(PROCESS_TIMEOUT) == 1
    finally:
        for process in (coordinator, worker):
            if process is not None:
                process.kill()
                process.wait()
    verdicts = [line.split()[0] for line in seen[:-1]]
    assert verdicts == ["PASS"] * 10 + ["FAIL", "PASS"], seen
    assert seen[-3].startswith("FAIL heartbeats: 0 heartbeats in 2.5 s idle")
    assert seen[-1] == "11 of 12 checks passed\n"


def test_command_refuses_an_address_it_cannot_bind():
    done = subprocess.run([sys.executable, "-m", "coordinator", "conformance", "--bind", "tcp://256.0.0.1:5599"],
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot bind tcp://256.0.0.1:5599") and done.stderr.count("\n") == 1


def _deadline() -> float:
    return time.monotonic() + REGISTRATION_TIMEOUT
