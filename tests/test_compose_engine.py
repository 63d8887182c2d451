"""docker-compose.yml for real: seven workers, one killed, a graceful stop and a second `up`.

Runs on the private Docker engine of conftest's `docker_environment` (tests/engine.py). Skipped where none can
start; with CI=true that fails instead.
"""

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import COMPOSE_FILE
from tests.engine import BRIDGE_ADDRESS, POOL, STEP_TIMEOUT, checked, container_log, wait_for_log

pytestmark = pytest.mark.slow

PROJECT = "scatterprop-test"
EPOCHS = 3
# 12,000 images in batches of 32: an epoch of 375 steps takes a few seconds on seven containers, long
# enough to kill a worker or stop the run in the middle.
SHORT_RUN = {"SCATTERPROP_EPOCHS": str(EPOCHS), "SCATTERPROP_TRAIN_LIMIT": "12000", "SCATTERPROP_TEST_LIMIT": "1000",
             "SCATTERPROP_WAIT_TIMEOUT": "120"}
WORKERS = [f"worker-{letter}" for letter in "abcdefg"]
GRACEFUL_STOP = 8.0  # seconds a `docker-compose stop` may take; Docker's own timeout is 10, then SIGKILL
SIGKILLED = 137
POOL_PREFIX = POOL.split(".0.0/")[0] + "."  # "10.213."


@pytest.fixture
def compose(docker_environment, tmp_path):
    """docker-compose with the short run's override, as a function of its arguments; `down -v` at the end."""
    override = tmp_path / "short-run.yml"
    override.write_text(json.dumps({"services": {"coordinator": {"environment": SHORT_RUN}}}))
    command = ["docker-compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), "-f", str(override)]

    def run(*args) -> str:
        return checked(docker_environment, *command, *args)

    try:
        yield run
    finally:
        run("down", "-v")


def test_containers_reach_the_pool_but_not_the_machine(docker_environment):
    """The fence: the bridge's address answers a container, the machine's own address on its network does not."""
    with socket.create_server(("0.0.0.0", 0)) as listener:
        port = listener.getsockname()[1]
        outside = [address for address in _machine_addresses() if not address.startswith(POOL_PREFIX)]
        reached = {address: _container_connects(docker_environment, address, port)
                   for address in [BRIDGE_ADDRESS.split("/")[0], *outside]}
    assert reached == {address: address.startswith(POOL_PREFIX) for address in reached}, reached


def _machine_addresses() -> list:
    listed = subprocess.run(["ip", "-4", "-o", "address", "show", "scope", "global"], capture_output=True, text=True)
    return [line.split()[3].split("/")[0] for line in listed.stdout.splitlines()]


def _container_connects(environment: dict, address: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2)"
    done = subprocess.run(["docker", "run", "--rm", "python:3.11-slim", "python3", "-c", probe], env=environment,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)
    return done.returncode == 0


def test_seven_workers_one_killed_the_run_finishes_and_reports(compose, docker_environment, tmp_path):
    started = time.monotonic()
    compose("up", "-d", "--no-build")
    coordinator = _container(docker_environment, "coordinator")
    wait_for_log(docker_environment, coordinator, f"epoch 1/{EPOCHS}")
    checked(docker_environment, "docker", "kill", _container(docker_environment, "worker-c"))
    checked(docker_environment, "docker", "wait", *_containers(docker_environment).values())
    print(f"up to the end, one worker killed: {time.monotonic() - started:.1f} s")
    codes = _exit_codes(docker_environment)
    assert codes == {"coordinator": 0, "worker-c": SIGKILLED, **{name: 0 for name in WORKERS if name != "worker-c"}}, (
        codes, container_log(docker_environment, coordinator)[-3000:])
    log = container_log(docker_environment, coordinator)
    assert "Traceback" not in log, log[-3000:]
    print("\n".join(line for line in log.splitlines() if line.startswith("epoch") or "worker C" in line))
    report = compose("run", "--rm", "--no-deps", "coordinator", "coordinator", "report", "/runs/compose")
    assert "/runs/compose/report/" in report, report
    run_dir = _copied_run(docker_environment, compose, tmp_path)
    assert _epochs(run_dir) == list(range(1, EPOCHS + 1))
    assert list((run_dir / "report").glob("*.png")), sorted(run_dir.rglob("*"))


def test_stop_is_graceful_and_up_again_continues_the_run(compose, docker_environment, tmp_path):
    compose("up", "-d", "--no-build")
    coordinator = _container(docker_environment, "coordinator")
    wait_for_log(docker_environment, coordinator, f"epoch 1/{EPOCHS}")
    started = time.monotonic()
    compose("stop")
    stop_seconds = time.monotonic() - started
    print(f"docker-compose stop: {stop_seconds:.1f} s")
    codes = _exit_codes(docker_environment)
    log = container_log(docker_environment, coordinator)
    assert stop_seconds < GRACEFUL_STOP and SIGKILLED not in codes.values(), (stop_seconds, codes, log[-3000:])
    assert codes == {"coordinator": 143, **{name: 0 for name in WORKERS}}, (codes, log[-3000:])
    assert "interrupted: stopped at checkpoint" in log, log[-3000:]
    started = time.monotonic()
    compose("up", "-d", "--no-build")
    checked(docker_environment, "docker", "wait", *_containers(docker_environment).values())
    print(f"second up to the end: {time.monotonic() - started:.1f} s")
    codes = _exit_codes(docker_environment)
    log = container_log(docker_environment, coordinator)
    assert codes == {"coordinator": 0, **{name: 0 for name in WORKERS}}, (codes, log[-3000:])
    assert _epochs(_copied_run(docker_environment, compose, tmp_path)) == list(range(1, EPOCHS + 1))


def _containers(environment: dict) -> dict:
    """Service name -> container id, for the project's containers, running or not."""
    listed = checked(environment, "docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                  "--format", '{{.Label "com.docker.compose.service"}} {{.ID}}')
    return dict(line.split() for line in listed.splitlines())


def _container(environment: dict, service: str) -> str:
    return _containers(environment)[service]


def _exit_codes(environment: dict) -> dict:
    containers = _containers(environment)
    codes = checked(environment, "docker", "inspect", "--format", "{{.State.ExitCode}}", *containers.values()).split()
    return dict(zip(containers, map(int, codes)))


def _copied_run(environment: dict, compose, folder: Path) -> Path:
    """The run in the volume, copied out as the README says."""
    coordinator = compose("ps", "-aq", "coordinator").strip()
    checked(environment, "docker", "cp", f"{coordinator}:/runs/compose", str(folder / "compose"))
    return folder / "compose"


def _epochs(run_dir: Path) -> list:
    return [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
