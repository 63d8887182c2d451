"""Helpers for tests that start real coordinator and worker processes on loopback."""

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

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
