"""Local worker processes for `coordinator train --spawn N`: started here, never outliving the coordinator."""

import ctypes
import logging
import signal
import string
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from common import keys

log = logging.getLogger("coordinator")

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"  # loopback only, on a port ZeroMQ finds free
IPC_PATH_LIMIT = 100  # bytes of a Unix socket's path: the kernel takes at most 107 (sun_path)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies
STOP_GRACE = 5.0  # seconds a stopped worker gets to exit before SIGKILL
FAILURE_LINES = 10  # lines of a failed worker's log shown to the user: its error and what led to it


def worker_names(count: int) -> list:
    """A, B, C, ... (the nodes of the default cluster), then W27, W28, ..."""
    letters = string.ascii_uppercase
    return [letters[i] if i < len(letters) else f"W{i + 1}" for i in range(count)]


def spawn_endpoint(run_dir: Path) -> str:
    """Where to bind for workers spawned here: a Unix socket in the run directory (cheaper than TCP loopback,
    and out of other machines' reach), or loopback TCP where that socket's path would be too long."""
    path = Path(run_dir).resolve() / "workers.sock"
    return f"ipc://{path}" if len(str(path)) <= IPC_PATH_LIMIT else LOOPBACK_ANY_PORT


def local_address(endpoint: str) -> str:
    """The address a local worker connects to for a bound endpoint such as tcp://0.0.0.0:5555."""
    return endpoint.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")


def child_of_coordinator() -> None:
    """Die with the coordinator, and leave a terminal's Ctrl-C to it: it finishes the step and checkpoints first."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept across exec; Python then leaves SIGINT ignored


@dataclass
class LocalWorkers:
    """Spawned worker processes; one that fails before it is stopped has the end of its log shown."""

    processes: list = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def watch(self, process: subprocess.Popen, name: str, log_file: Path) -> None:
        """Wait (on a thread of its own) for the process to end; if it failed on its own, log its last lines."""
        code = process.wait()
        if code != 0 and not self.stopping.is_set():
            last_lines = log_file.read_text(errors="replace").splitlines()[-FAILURE_LINES:]
            log.warning("spawned worker %s exited with code %d; the end of %s:\n%s", name, code, log_file,
                        "\n".join(last_lines))

    def stop(self) -> None:
        self.stopping.set()
        stop_workers(self.processes)


def spawn_workers(count: int, address: str, log_folder: Path, curve_keys: Path | None = None) -> LocalWorkers:
    """Start `count` workers, each writing its output to log_folder/NAME.log, not into the coordinator's
    display; with a key folder, each uses the key pair made for its name."""
    names = worker_names(count)
    commands = [[sys.executable, "-m", "worker", "--connect", address, "--name", name] for name in names]
    if curve_keys is not None:
        for command, name in zip(commands, names):
            secret_file = keys.worker_secret_file(curve_keys, name)
            if not secret_file.exists():
                raise keys.KeyFileError(f"no key for worker {name} in {curve_keys}; make keys for {count} workers")
            server_file = keys.server_public_file(curve_keys)
            command += ["--curve-secret-key", str(secret_file), "--curve-server-key", str(server_file)]
    log_folder.mkdir(parents=True, exist_ok=True)
    workers = LocalWorkers()
    for command, name in zip(commands, names):
        log_file = log_folder / f"{name}.log"
        with open(log_file, "wb") as output:  # the child keeps its own copy of the file
            process = subprocess.Popen(command, preexec_fn=child_of_coordinator, stdin=subprocess.DEVNULL,
                                       stdout=output, stderr=subprocess.STDOUT)
        workers.processes.append(process)
        threading.Thread(target=workers.watch, args=(process, name, log_file), daemon=True).start()
    return workers


def stop_workers(processes: list) -> None:
    for process in processes:
        process.terminate()
    wait_or_kill(processes)


def wait_or_kill(processes: list) -> None:
    """Give processes told to stop STOP_GRACE seconds each, then kill the late ones."""
    for process in processes:
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
