"""Helpers for tests that start real coordinator and worker processes on loopback."""

import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
PROCESS_TIMEOUT = 300  # seconds; a run that takes longer is a hang, not a slow machine


def run_cli(program: str, *args, timeout: float = PROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `coordinator ...` or `worker ...` as a real process and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", program, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )


def load_model(run_dir) -> dict:
    with np.load(run_dir / "model.npz") as saved:
        return {name: saved[name] for name in ("w1", "b1", "w2", "b2")}


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


COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def compose_services() -> dict:
    """The services of docker-compose.yml, anchors merged: name -> its settings."""
    import yaml  # a test extra

    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]
