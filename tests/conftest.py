"""Helpers for tests that start real coordinator and worker processes on loopback."""

import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import typer

from common.model import Params
from coordinator.cli import app as coordinator_app
from tests import engine
from worker.cli import app as worker_app

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
PROCESS_TIMEOUT = 300  # seconds; a run that takes longer is a hang, not a slow machine


def start(program: str, *args, env: dict | None = None, **popen) -> subprocess.Popen:
    """`python -m program args` as a real process: unbuffered, so its lines arrive as it writes them, and reading
    no stdin; `popen` says where its output goes."""
    return subprocess.Popen(
        [sys.executable, "-m", program, *map(str, args)], stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **popen,
    )


def run_cli(program: str, *args, timeout: float = PROCESS_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `coordinator ...`, `worker ...` or `bench ...` to its end and capture its output."""
    with start(program, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """The process failed with `code` and said why in one `error:` line, its last, holding every word: no
    traceback, no usage box (what it logged before, such as the address it bound, may stand above)."""
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "Usage:" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), done.stderr[-2000:]
    for word in words:
        assert word in lines[-1], lines[-1]


def load_model(run_dir) -> dict:
    """The parameters of a run's model.npz by name: w1, b1, w2, b2, ..."""
    with np.load(run_dir / "model.npz") as saved:
        return Params.from_arrays(saved).arrays()


def max_difference(first: dict, second: dict) -> float:
    return max(float(np.max(np.abs(first[name] - second[name]))) for name in first)


@pytest.fixture
def train_run(tmp_path):
    """Run `coordinator train` into a fresh run directory; returns (completed process, run dir)."""
    counter = iter(range(1000))

    def run(*args, expect_ok: bool = True):
        run_dir = tmp_path / f"run{next(counter)}"
        done = run_cli("coordinator", "train", "--run-dir", run_dir, *args)
        if expect_ok:
            assert done.returncode == 0, done.stderr[-3000:]
        return done, run_dir

    return run


APPS = {"coordinator": coordinator_app, "worker": worker_app}
COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def compose_services() -> dict:
    """The services of docker-compose.yml, anchors merged: name -> its settings."""
    import yaml  # a test extra

    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def parsed_service(service: dict, monkeypatch) -> tuple:
    """(program, subcommand, option values) as the CLI parses a service's command and environment (a compose or
    stack file's service, or a Kubernetes container put in that shape)."""
    program, *args = shlex.split(service["command"])
    command = typer.main.get_command(APPS[program])
    subcommand = None
    if hasattr(command, "commands"):
        subcommand, *args = args
        command = command.commands[subcommand]
    environment = {name: str(value) for name, value in service.get("environment", {}).items()}
    envvars = {param.envvar for param in command.params if param.envvar}
    assert set(environment) <= envvars, f"not read by {program} {subcommand or ''}: {set(environment) - envvars}"
    for name in envvars:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    context = command.make_context(program, list(args))  # refuses an unknown option or a bad value
    return program, subcommand, context.params


def lines_of(stream) -> queue.Queue:
    """The lines of a stream as they come, read by a thread so the test can wait with a deadline."""
    lines = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, text: str, deadline: float) -> list:
    """Lines read until one holds `text` (or the stream ended, or the deadline passed)."""
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if text in line:
            break
    return seen


@pytest.fixture(scope="session")
def docker_environment():
    """A private engine (tests/engine.py) with python:3.11-slim stood in for and the project's image built, once for
    every test that runs containers; skipped where none can start, except with CI=true, where that fails."""
    reason = engine.why_no_engine()
    if reason:
        print(f"no Docker engine: {reason}")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the engine tests, but {reason}")
        pytest.skip(reason)
    with engine.private_engine() as environment:
        started = time.monotonic()
        engine.import_standin_python(environment)
        engine.checked(environment, "docker", "build", "--network", "host", "-t", "scatterprop",
                       str(COMPOSE_FILE.parent))
        print(f"stand-in and image ready in {time.monotonic() - started:.0f} s")
        yield environment


def pytest_collection_modifyitems(items):
    """The tests on the private engine run last and one after another: it starts once for them all, and what it
    sets on the machine (forwarding through the firewall dropped, bridged packets filtered) holds for no other test."""
    items.sort(key=lambda item: "docker_environment" in item.fixturenames)
