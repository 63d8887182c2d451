"""deploy/swarm/stack.yml against the CLIs it runs and the keys `coordinator keygen` makes, without an engine
(tests/test_swarm_engine.py runs it)."""

from pathlib import PurePosixPath

import pytest

from common import keys
from coordinator.cli import OPEN_BIND
from coordinator.spawn import worker_names
from tests.conftest import parsed_service
from tests.test_swarm_engine import KEYS, STACK_FILE

SECRETS = PurePosixPath("/run/secrets")  # where swarm mounts a secret whose target is a relative path


@pytest.fixture(scope="module")
def stack() -> dict:
    import yaml  # a test extra

    return yaml.safe_load(STACK_FILE.read_text())


def _mounted(service: dict, stack: dict) -> dict:
    """Path in the container -> the file (in the stack file's folder) it holds, for each of a service's secrets."""
    return {SECRETS / secret["target"]: stack["secrets"][secret["source"]]["file"] for secret in service["secrets"]}


def _for_slot(service: dict, slot: int) -> dict:
    """The service with swarm's template filled in for one task slot."""
    environment = {name: value.replace("{{.Task.Slot}}", str(slot)) for name, value in service["environment"].items()}
    return {**service, "environment": environment}


def test_one_coordinator_resumes_the_run_in_its_volume(stack, monkeypatch):
    coordinator = stack["services"]["coordinator"]
    program, subcommand, options = parsed_service(coordinator, monkeypatch)
    assert (program, subcommand, options["workers"], options["spawn"]) == ("coordinator", "train", 7, None)
    assert options["bind"] == OPEN_BIND and options["resume_if_exists"]
    assert coordinator["deploy"]["replicas"] == 1
    volume, mount = coordinator["volumes"][0].split(":")
    assert volume in stack["volumes"] and PurePosixPath(mount) in options["run_dir"].parents
    # restarted after a kill or a crash, to resume; a finished run (exit 0) stays finished
    assert coordinator["deploy"]["restart_policy"]["condition"] == "on-failure"


def test_the_coordinator_reads_a_keygen_folder_from_its_secrets(stack, monkeypatch):
    coordinator = stack["services"]["coordinator"]
    folder = parsed_service(coordinator, monkeypatch)[2]["curve_keys"]
    expected = {folder / f"{keys.COORDINATOR}.key_secret": f"keys/{keys.COORDINATOR}.key_secret"}
    # slot N's public key under the name N, the name the worker of slot N registers as (a key is bound to its name)
    expected |= {folder / keys.ALLOWED / f"{slot}.key": f"keys/{keys.ALLOWED}/{name}.key"
                 for slot, name in enumerate(worker_names(KEYS), 1)}
    assert _mounted(coordinator, stack) == expected


@pytest.mark.parametrize("slot", range(1, KEYS + 1))
def test_the_worker_in_slot_n_uses_the_nth_key_pair(stack, slot, monkeypatch):
    worker = stack["services"]["worker"]
    program, _, options = parsed_service(_for_slot(worker, slot), monkeypatch)
    assert (program, options["connect"]) == ("worker", OPEN_BIND.replace("*", "coordinator"))
    assert options["name"] == str(slot) and options["give_up_after"] is not None
    name = worker_names(KEYS)[slot - 1]
    mounted = _mounted(worker, stack)
    assert mounted[options["curve_secret_key"]] == str(PurePosixPath("keys") / keys.worker_secret_file(".", name))
    assert mounted[options["curve_server_key"]] == str(PurePosixPath("keys") / keys.server_public_file("."))


def test_workers_scale_as_one_service_that_is_restarted_only_on_failure(stack):
    worker = stack["services"]["worker"]
    assert worker["deploy"]["replicas"] == 7
    assert worker["deploy"]["restart_policy"]["condition"] == "on-failure", "a worker told to stop would come back"
    assert all(service["networks"] == list(stack["networks"]) for service in stack["services"].values())
