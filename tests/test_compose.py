"""docker-compose.yml against the CLIs it runs: valid for docker-compose, and every option it uses exists."""

import shutil
import subprocess

import pytest

from tests.conftest import COMPOSE_FILE, compose_services, parsed_service

WORKER_SERVICES = [f"worker-{letter}" for letter in "abcdefg"]


def test_docker_compose_accepts_the_file():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    done = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_one_coordinator_for_seven_workers(monkeypatch):
    services = compose_services()
    assert sorted(services) == ["coordinator", *WORKER_SERVICES]
    program, subcommand, options = parsed_service(services["coordinator"], monkeypatch)
    assert (program, subcommand, options["workers"], options["spawn"]) == ("coordinator", "train", 7, None)
    assert options["bind"].endswith(":5555") and options["run_dir"] is not None
    assert options["resume_if_exists"], "a second `up` would refuse the run in the volume"
    # Compose stops the coordinator before what it depends on: it checkpoints and stops the workers itself.
    assert sorted(services["coordinator"]["depends_on"]) == WORKER_SERVICES
    names = set()
    for name in WORKER_SERVICES:
        program, _, options = parsed_service(services[name], monkeypatch)
        assert (program, options["connect"]) == ("worker", "tcp://coordinator:5555")
        assert options["give_up_after"] is not None, "an `up` whose coordinator is gone would never return"
        assert services[name]["restart"] == "no", "a worker that gave up would be started again and again"
        names.add(options["name"])
    assert len(names) == 7


@pytest.mark.parametrize("name", sorted(compose_services()))
def test_service_uses_only_options_its_cli_accepts(name, monkeypatch):
    parsed_service(compose_services()[name], monkeypatch)


def test_image_holds_every_package():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    packages = tomllib.loads((COMPOSE_FILE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {line.split()[1] for line in (COMPOSE_FILE.parent / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}
    top_level = {package.split(".")[0] for package in packages}  # a subpackage comes with its parent's folder
    assert top_level <= copied, f"the Dockerfile does not COPY {top_level - copied}"


def test_image_can_draw_the_report():
    """`coordinator report` inside the container needs matplotlib: the plot extra."""
    installs = [line for line in (COMPOSE_FILE.parent / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert len(installs) == 1 and '".[plot]"' in installs[0], installs
