"""A coordinator and workers started as separate real processes on loopback, which tests can then disturb."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Harness:
    """Owns every process it starts and kills what is left when closed."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.run_dir = directory / "run"
        self.processes = []
        self.coordinator = None

    def start_coordinator(self, *args) -> subprocess.Popen:
        self.coordinator = self._start("coordinator", "train", "--bind", self.address, "--run-dir", self.run_dir, *args)
        return self.coordinator

    def resume_coordinator(self, *args) -> subprocess.Popen:
        """A new coordinator continuing the run from its last checkpoint, on the same address."""
        self.coordinator = self._start("coordinator", "train", "--resume", self.run_dir, "--bind", self.address, *args)
        return self.coordinator

    def start_worker(self, name: str, *args) -> subprocess.Popen:
        return self._start("worker", "--connect", self.address, "--name", name, *args)

    def epochs_done(self) -> int:
        history = self.run_dir / "history.jsonl"
        return len(history.read_text().splitlines()) if history.exists() else 0

    def wait_for_epoch(self, epoch: int, timeout: float = 120) -> None:
        wait_for(lambda: self.epochs_done() >= epoch, timeout, f"epoch {epoch}")

    def finish(self, timeout: float = 300) -> int:
        return self.coordinator.wait(timeout)

    def log(self, process: subprocess.Popen) -> str:
        return Path(process.args_log).read_text()

    def exposure_records(self) -> list:
        lines = (self.run_dir / "exposure.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait()

    def _start(self, program: str, *args) -> subprocess.Popen:
        log_path = self.directory / f"{program}-{len(self.processes)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", program, *map(str, args)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        process.args_log = log_path
        self.processes.append(process)
        return process
