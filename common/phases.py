"""Where a process's wall time goes: the phases of its hot path, timed with perf_counter_ns and summed.

The clock works in laps: `lap(PHASE)` charges the time since the previous lap to PHASE, so the code marks
only the end of each phase and every nanosecond is charged somewhere. What is timed is handed a clock: a
PhaseClock when something will read it (`coordinator bench --profile`), NO_CLOCK, whose laps do nothing, otherwise.
A worker whose environment names a folder in PHASES_DIR_VARIABLE keeps its totals in a small shared file there,
so the bench can read them live.
"""

import os
import time
from pathlib import Path

import numpy as np

COORDINATOR_PHASES = ("math", "build", "encode", "send", "wait", "decode", "check", "unshuffle")
"""The coordinator's: its own math (the step's element-wise work, and with `--later-layers coordinator` the
later layers' products), building requests (shuffles and slicing), encoding and sending them, waiting for
frames, decoding, checking answers (the scheduler's and the Freivalds checks), un-shuffling and summing the
partial products."""

WORKER_PHASES = ("wait", "decode", "compute", "encode", "send")
"""A worker's: waiting for a request, decoding it, computing, encoding and sending the answer."""

PHASES = tuple(dict.fromkeys(COORDINATOR_PHASES + WORKER_PHASES))
PHASES_DIR_VARIABLE = "SCATTERPROP_PHASES_DIR"


class PhaseClock:
    """Nanoseconds per phase, in `totals` (an array that may live in a shared file)."""

    def __init__(self, totals: np.ndarray | None = None):
        self.totals = np.zeros(len(PHASES), np.int64) if totals is None else totals
        self.index = {phase: number for number, phase in enumerate(PHASES)}
        self.last = time.perf_counter_ns()

    def lap(self, phase: str) -> None:
        now = time.perf_counter_ns()
        self.totals[self.index[phase]] += now - self.last
        self.last = now

    def seconds(self) -> dict:
        """phase -> seconds so far."""
        return {phase: float(total) / 1e9 for phase, total in zip(PHASES, self.totals)}

    def share(self, folder: Path, name: str) -> None:
        """Keep the totals in folder/name.phases from now on, readable by another process while this one runs."""
        shared = np.lib.format.open_memmap(Path(folder) / f"{name}.phases", "w+", np.int64, (len(PHASES),))
        shared[:] = self.totals
        self.totals = shared


def read_shared(folder: Path) -> dict:
    """phase -> seconds, summed over every shared clock in the folder."""
    totals = np.zeros(len(PHASES), np.int64)
    for path in Path(folder).glob("*.phases"):
        totals += np.load(path, mmap_mode="r")
    return dict(zip(PHASES, totals / 1e9))


class NoClock:
    """The clock of what nobody profiles."""

    def lap(self, phase: str) -> None:
        pass


NO_CLOCK = NoClock()


def worker_clock(name: str):
    """A worker's clock: shared in the folder its environment names (the bench's spawned workers), else NO_CLOCK."""
    folder = os.environ.get(PHASES_DIR_VARIABLE)
    if not folder:
        return NO_CLOCK
    clock = PhaseClock()
    clock.share(Path(folder), name)
    return clock
