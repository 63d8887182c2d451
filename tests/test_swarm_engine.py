"""deploy/swarm/stack.yml for real: a single-node swarm scaled up and down mid-run, its coordinator killed and started
again by swarm, and a wrong key path that stops a service at start with one line.

Runs on the private Docker engine of conftest's `docker_environment` (tests/engine.py), with the image the compose
test built. Skipped where no engine can start; with CI=true that fails instead.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, load_model, max_difference, run_cli
from tests.engine import STEP_TIMEOUT, checked, container_log, machine_restored, wait_for_log
from worker.cli import BLAS_THREAD_VARIABLES

pytestmark = pytest.mark.slow

STACK_FILE = Path(__file__).resolve().parent.parent / "deploy" / "swarm" / "stack.yml"
STACK = "scatterprop"
SWARM_POOL = "10.123.0.0/16"  # overlay networks: apart from the engine's 10.213.0.0/16 and multi-host's 10.77.0.0/24
NODE_ADDRESS = "127.0.0.1"  # the one node talks to itself only
KEYS = 9  # worker key pairs, as deploy/README.md makes them: enough for `scale =9`
EPOCHS = 20
# Short epochs (188 steps of 32, about 2 s on seven containers with the later layers on the workers, half that with
# the default), so that standbys soon get columns at an epoch's end, and many of them, so that the run is still going
# after two scalings and an epoch's checkpoint (each takes a few seconds); in float64, to compare the weights.
SHORT_RUN = {"SCATTERPROP_EPOCHS": str(EPOCHS), "SCATTERPROP_TRAIN_LIMIT": "6000", "SCATTERPROP_TEST_LIMIT": "1000",
             "SCATTERPROP_DTYPE": "float64", "SCATTERPROP_WAIT_TIMEOUT": "120", "SCATTERPROP_LATER_LAYERS": "workers"}
TOLERANCE = 1e-6  # the README's for a resumed run against an uninterrupted one
SIGKILLED = 137


@pytest.fixture(scope="module")
def swarm(docker_environment):
    """The engine as a single-node swarm, its node labelled to hold the run; left, with the firewall put back."""
    environment = docker_environment
    with machine_restored():
        checked(environment, "docker", "swarm", "init", "--advertise-addr", NODE_ADDRESS,
                "--listen-addr", f"{NODE_ADDRESS}:2377", "--data-path-addr", NODE_ADDRESS,
                "--default-addr-pool", SWARM_POOL, "--default-addr-pool-mask-length", "24")
        try:
            node = checked(environment, "docker", "node", "ls", "--quiet").strip()
            checked(environment, "docker", "node", "update", "--label-add", "scatterprop.runs=true", node)
            yield environment
        finally:
            subprocess.run(["docker", "swarm", "leave", "--force"], env=environment, capture_output=True)
            # the bridge swarm made for its containers' way out, which leaving keeps
            subprocess.run(["docker", "network", "rm", "docker_gwbridge"], env=environment, capture_output=True)


@pytest.fixture
def stack(swarm, tmp_path):
    """`deploy(override)`: the stack file beside fresh keys, with a second file of `override`; removed at the end,
    its volume with it."""
    folder = tmp_path / "stack"
    folder.mkdir()
    shutil.copy(STACK_FILE, folder)
    made = run_cli("coordinator", "keygen", folder / "keys", "--workers", KEYS)
    assert made.returncode == 0, made.stderr

    def deploy(override: dict) -> None:
        (folder / "override.yml").write_text(json.dumps(override))
        checked(swarm, "docker", "stack", "deploy", "-c", folder / STACK_FILE.name, "-c", folder / "override.yml",
                STACK)

    try:
        yield deploy
    finally:
        started = time.monotonic()
        subprocess.run(["docker", "stack", "rm", STACK], env=swarm, capture_output=True)
        _wait(lambda: not _listed(swarm, "ps", "-a") and not _listed(swarm, "network", "ls"), "the stack to go")
        subprocess.run(["docker", "volume", "rm", f"{STACK}_runs"], env=swarm, capture_output=True)
        print(f"stack removed in {time.monotonic() - started:.1f} s")


def test_scaled_up_then_down_then_its_coordinator_killed_the_run_ends_as_one_process_would(stack, swarm, tmp_path):
    started = time.monotonic()
    stack({"services": {"coordinator": {"environment": SHORT_RUN}}})
    # The overlay networks come from the test's pool (the way out, docker_gwbridge, from the engine's fenced one).
    subnets = checked(swarm, "docker", "network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                      "ingress", f"{STACK}_cluster").split()
    assert subnets and all(subnet.startswith(SWARM_POOL.split(".0.0/")[0] + ".") for subnet in subnets), subnets
    first = _coordinator(swarm)
    wait_for_log(swarm, first, "shards sent")  # training has begun on seven workers
    checked(swarm, "docker", "service", "scale", f"{STACK}_worker=9")  # returns once the two are running
    _wait_for_status(swarm, first, lambda status: len(_slots(status)) == 9, "the standbys to get columns")
    print(f"9 workers hold columns after {time.monotonic() - started:.1f} s")
    checked(swarm, "docker", "service", "scale", f"{STACK}_worker=5")
    losses = _wait_for_status(swarm, first, lambda status: len(_slots(status)) == 5, "four workers to be lost")
    print(f"5 workers hold columns after {time.monotonic() - started:.1f} s, in epoch {losses['epoch']}")
    # The epoch's end checkpoints the plan of five slots, which the next coordinator must resume with: a step of the
    # next epoch comes after that checkpoint.
    killed_in = _wait_for_status(swarm, first, lambda status: status["state"] != "training" or (
        status["epoch"] > losses["epoch"] and status["samples"] > 0), "a step of the next epoch")
    assert killed_in["state"] == "training", f"the run ended before the kill: {killed_in}"
    checked(swarm, "docker", "kill", first)
    killed = time.monotonic()
    second = _coordinator(swarm, other_than=first)
    print(f"swarm started the coordinator again {time.monotonic() - killed:.1f} s after the kill")
    code = int(checked(swarm, "docker", "wait", second))
    print(f"the run ended {time.monotonic() - started:.1f} s after the deploy")
    log = container_log(swarm, second)
    assert int(_state(swarm, first, "ExitCode")) == SIGKILLED and code == 0, (code, log[-3000:])
    assert "waiting for 5 workers" in log and "Traceback" not in log, log[-3000:]
    resumed = [int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("epoch ")]
    assert resumed == list(range(killed_in["epoch"], EPOCHS + 1)), log[-3000:]  # from the checkpoint, not afresh
    print("\n".join(line for line in container_log(swarm, first).splitlines() + log.splitlines()
                    if line.startswith("epoch") or "reassigning" in line or "rebalanced" in line))
    checked(swarm, "docker", "cp", f"{second}:/runs/swarm", str(tmp_path / "swarm"))
    history = (tmp_path / "swarm" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == list(range(1, EPOCHS + 1))

    local = tmp_path / "local"  # the very same settings, in one process
    one_thread = dict.fromkeys(BLAS_THREAD_VARIABLES, "1")  # a second BLAS thread spins on busy cores: 55 s, not 3 s
    reference = run_cli("coordinator", "train", "--local", "--run-dir", local,
                        env={**_settings(), **SHORT_RUN, **one_thread})
    assert reference.returncode == 0, reference.stderr[-3000:]
    difference = max_difference(load_model(tmp_path / "swarm"), load_model(local))
    print(f"largest weight difference from the one-process run: {difference:.1e}")
    assert difference < TOLERANCE


def test_a_wrong_key_path_stops_each_service_at_start_with_one_line(stack, swarm):
    stack({"services": {
        "coordinator": {"environment": {"SCATTERPROP_CURVE_KEYS": "/run/secrets/coordinator-keys"}},
        "worker": {"environment": {"SCATTERPROP_CURVE_SECRET_KEY": "/run/secrets/{{.Task.Slot}}.key_secret"},
                   "deploy": {"replicas": 1}},
    }})
    failures = {"coordinator": "/run/secrets/coordinator-keys/allowed is not a folder of allowed worker keys",
                "worker": "cannot read key file /run/secrets/1.key_secret"}
    for service, error in failures.items():
        # The oldest container: the one swarm makes next is not started yet, which `docker wait` does not wait for.
        first = _wait(lambda: _listed(swarm, "ps", "-a", service=service), f"a {service} container")[-1]
        _wait(lambda: _state(swarm, first, "Status") == "exited", f"the {service} to exit")
        code = int(_state(swarm, first, "ExitCode"))
        assert_one_line_error(subprocess.CompletedProcess(service, code, "", container_log(swarm, first)), 2, error)


def _settings() -> dict:
    """The coordinator's environment in the stack file."""
    import yaml  # a test extra

    return yaml.safe_load(STACK_FILE.read_text())["services"]["coordinator"]["environment"]


def _listed(environment: dict, *command, service: str | None = None) -> list:
    """The ids `docker COMMAND` lists of the stack's objects, or of the containers of this deployment of a service
    (by its id: those of a stack deployed before may not all be gone)."""
    if service is None:
        label = f"com.docker.stack.namespace={STACK}"
    else:
        label = "com.docker.swarm.service.id=" + checked(
            environment, "docker", "service", "inspect", "--format", "{{.ID}}", f"{STACK}_{service}").strip()
    return checked(environment, "docker", *command, "--quiet", "--filter", f"label={label}").split()


def _coordinator(environment: dict, other_than: str | None = None) -> str:
    """The coordinator's running container (a new one, if another is named)."""
    def running():
        return [container for container in _listed(environment, "ps", service="coordinator") if container != other_than]

    return _wait(running, "the coordinator's container")[0]


def _status(environment: dict, container: str) -> dict | None:
    """`coordinator status` asked inside the container, as JSON; None until the status socket answers."""
    done = subprocess.run(["docker", "exec", container, "coordinator", "status", "--connect", "tcp://127.0.0.1:5556",
                           "--log-format", "json"], env=environment, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT)
    if done.returncode != 0:
        running = _state(environment, container, "Running")
        assert running == "true", f"the coordinator stopped: {container_log(environment, container)[-3000:]}"
        return None
    return json.loads(done.stdout)


def _slots(status: dict) -> list:
    """The slots of the workers that hold columns."""
    return [worker["slot"] for worker in status["workers"] if worker["slot"] is not None and not worker["left"]]


def _wait_for_status(environment: dict, container: str, condition, what: str) -> dict:
    return _wait(lambda: (status := _status(environment, container)) and condition(status) and status, what)


def _wait(find, what: str):
    """What `find` returns once it is something, within the step timeout."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not (found := find()):
        assert time.monotonic() < deadline, f"waited {STEP_TIMEOUT} s for {what}"
        time.sleep(0.5)
    return found


def _state(environment: dict, container: str, field: str) -> str:
    return checked(environment, "docker", "inspect", "--format", f"{{{{.State.{field}}}}}", container).strip()
