"""Local worker processes for `coordinator train --spawn N`: started here, never outliving the coordinator."""

import ctypes
import signal
import string
import subprocess
import sys
from pathlib import Path

from common import keys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies
STOP_GRACE = 5.0  # seconds a stopped worker gets to exit before SIGKILL


def worker_names(count: int) -> list:
    """A, B, C, ... (the nodes of the default cluster), then W27, W28, ..."""
    letters = string.ascii_uppercase
    return [letters[i] if i < len(letters) else f"W{i + 1}" for i in range(count)]


def local_address(endpoint: str) -> str:
    """The address a local worker connects to for a bound endpoint such as tcp://0.0.0.0:5555."""
    return endpoint.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")


def child_of_coordinator() -> None:
    """Die with the coordinator, and leave a terminal's Ctrl-C to it: it finishes the step and checkpoints first."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept across exec; Python then leaves SIGINT ignored


def spawn_workers(count: int, address: str, curve_keys: Path | None = None) -> list:
    """Start `count` workers; with a key folder, each uses the key pair made for its name."""
    commands = [[sys.executable, "-m", "worker", "--connect", address, "--name", name] for name in worker_names(count)]
    if curve_keys is not None:
        for command, name in zip(commands, worker_names(count)):
            secret_file = keys.worker_secret_file(curve_keys, name)
            if not secret_file.exists():
                raise keys.KeyFileError(f"no key for worker {name} in {curve_keys}; make keys for {count} workers")
            server_file = keys.server_public_file(curve_keys)
            command += ["--curve-secret-key", str(secret_file), "--curve-server-key", str(server_file)]
    return [
        subprocess.Popen(command, preexec_fn=child_of_coordinator, stdin=subprocess.DEVNULL) for command in commands
    ]


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
