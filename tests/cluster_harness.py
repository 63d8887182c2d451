"""A coordinator and workers started as separate real processes on loopback, which tests can then disturb."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

from coordinator.status import request_status
from tests.conftest import LOOPBACK_ANY_PORT, load_model, start

BOUND = re.compile(r"waiting for \d+ workers on (\S+)")  # what the coordinator logs once it has bound
STATUS = re.compile(r"status served on (\S+)")  # logged with --status-bind
STARTUP_TIMEOUT = 120  # seconds for a coordinator to load its data and bind, on a machine busy with other tests


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Harness:
    """Owns every process it starts and kills what is left when closed."""

    def __init__(self, directory: Path, bind: str = LOOPBACK_ANY_PORT):
        """`bind`: the coordinator's address; with a port of * it is read from its log once it has bound one."""
        self.directory = directory
        self.run_dir = directory / "run"
        self.processes = []
        self.coordinator = None
        self.bind = bind
        self.bound = None if bind.endswith(":*") else bind

    def start_coordinator(self, *args) -> subprocess.Popen:
        self.coordinator = self._start("coordinator", "train", "--bind", self.bind, "--run-dir", self.run_dir, *args)
        return self.coordinator

    def resume_coordinator(self, *args) -> subprocess.Popen:
        """A new coordinator continuing the run from its last checkpoint on the first one's address, where the
        workers it left behind keep registering again (the port was free a moment ago, so it almost surely still is)."""
        self.coordinator = self._start("coordinator", "train", "--resume", self.run_dir, "--bind", self.address, *args)
        return self.coordinator

    @property
    def address(self) -> str:
        """Where the coordinator listens: waits for the line it logs once it has bound."""
        if self.bound is None:
            self.bound = self._logged(self.coordinator, BOUND)
        return self.bound

    def wait_for_step(self, epoch: int, step: int, timeout: float = 120) -> None:
        """Until the coordinator, started with `--status-bind tcp://127.0.0.1:*`, says it has done this step."""
        address = self._logged(self.coordinator, STATUS)

        def done() -> bool:
            status = request_status(address, timeout)
            return (status.epoch, status.step) >= (epoch, step) or status.state == "finished"

        wait_for(done, timeout, f"step {step} of epoch {epoch}")

    def start_worker(self, name: str | None, *args, fault: str | None = None) -> subprocess.Popen:
        """A worker process (named as the worker names itself when `name` is None); with `fault`, one of
        tests.faulty_worker's, which answers wrongly or dies on purpose."""
        program = "worker" if fault is None else "tests.faulty_worker"
        named = () if name is None else ("--name", name)
        return self._start(program, *(() if fault is None else (fault,)), "--connect", self.address, *named, *args)

    def epochs_done(self) -> int:
        history = self.run_dir / "history.jsonl"
        return len(history.read_text().splitlines()) if history.exists() else 0

    def wait_for_epoch(self, epoch: int, timeout: float = 120) -> None:
        wait_for(lambda: self.epochs_done() >= epoch, timeout, f"epoch {epoch}")

    def wait_for_log(self, process: subprocess.Popen, text: str, count: int = 1, timeout: float = 120) -> None:
        """Until the process has logged `text` `count` times."""
        wait_for(lambda: self.log(process).count(text) >= count, timeout, f"{count} x {text!r} in {process.log_path}")

    def finish(self, timeout: float = 300) -> int:
        return self.coordinator.wait(timeout)

    def log(self, process: subprocess.Popen) -> str:
        return process.log_path.read_text()

    def exposure_records(self) -> list:
        lines = (self.run_dir / "exposure.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait()

    def _logged(self, process: subprocess.Popen, pattern: re.Pattern) -> str:
        """The first match of `pattern`'s group in the process's log, once it is there."""

        def logged() -> bool:
            assert process.poll() is None, f"it exited: {self.log(process)[-3000:]}"
            return pattern.search(self.log(process)) is not None

        wait_for(logged, STARTUP_TIMEOUT, f"{pattern.pattern!r} in {process.log_path}")
        return pattern.search(self.log(process))[1]

    def _start(self, program: str, *args) -> subprocess.Popen:
        log_path = self.directory / f"{program}-{len(self.processes)}.log"
        with open(log_path, "w") as log_file:
            process = start(program, *args, stdout=log_file, stderr=subprocess.STDOUT)
        process.log_path = log_path
        self.processes.append(process)
        return process


def one_process_model(directory: Path, *args) -> dict:
    """The model.npz arrays of `coordinator train --local` with these arguments: what a distributed run must match."""
    harness = Harness(directory)
    try:
        harness.start_coordinator("--local", *args)
        assert harness.finish() == 0, harness.log(harness.coordinator)
        return load_model(harness.run_dir)
    finally:
        harness.close()
