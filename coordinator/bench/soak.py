"""`python -m coordinator.bench.soak`: the resident memory of a long run, coordinator and workers, over time.

It starts `coordinator train --spawn N` with more epochs than it can finish, reads every process's resident memory
(VmRSS) at intervals, stops the run after SECONDS, and prints one line per reading and a summary: how much each
process grew after the first minute, when its memory has settled (the shards, the data set and numpy's pools).
"""

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run
from coordinator.bench.session import children, memory_mb

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

SETTLED_AFTER = 60.0  # seconds: what a process holds by then is its working set; growth is counted from there


def rss_mb(pid: int) -> float | None:
    """A process's resident memory now, in MiB, or None once it is gone."""
    try:
        return memory_mb(pid, "VmRSS")
    except (OSError, RuntimeError):  # gone, or a zombie that holds no memory any more
        return None


def workers_of(pid: int) -> list:
    """The coordinator's children (the spawned workers); none once it is gone."""
    try:
        return sorted(children(pid))
    except OSError:
        return []


def growth(readings: list) -> tuple:
    """(seconds, coordinator MiB, largest worker MiB): from the first reading at SETTLED_AFTER seconds or later (the
    last one, in a shorter run) to the last, what each grew."""
    settled = next((reading for reading in readings if reading[0] >= SETTLED_AFTER), readings[-1])
    last = readings[-1]
    workers = [last[2][index] - settled[2][index] for index in range(min(len(settled[2]), len(last[2])))]
    return settled[0], last[1] - settled[1], max(workers, default=0.0)


@app.command()
def main(
    seconds: Annotated[float, typer.Option(min=1, help="How long the run goes on before it is stopped.")] = 600.0,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between readings.")] = 15.0,
    workers: Annotated[int, typer.Option(min=1, help="Workers to spawn.")] = 7,
    options: Annotated[str, typer.Option(help="More `coordinator train` options, space-separated.")] = "",
):
    """Run training for SECONDS and print the resident memory of the coordinator and of each worker as it goes."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "coordinator", "train", "--spawn", str(workers), "--epochs", "100000",
                   "--quiet", "--run-dir", str(Path(scratch) / "run"), *options.split()]
        coordinator = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        started, readings = time.monotonic(), []
        try:
            while time.monotonic() - started < seconds and coordinator.poll() is None:
                time.sleep(interval)
                pids = workers_of(coordinator.pid)
                reading = (time.monotonic() - started, rss_mb(coordinator.pid), [rss_mb(pid) or 0.0 for pid in pids])
                if reading[1] is None:
                    break
                readings.append(reading)
                typer.echo(f"{reading[0]:7.1f} s  coordinator {reading[1]:6.1f} MiB  workers "
                           + " ".join(f"{mb:.1f}" for mb in reading[2]))
        finally:
            coordinator.send_signal(signal.SIGINT)  # it checkpoints and stops its workers
            coordinator.wait(60)
    if coordinator.returncode not in (0, 130) or not readings:
        typer.echo(f"error: the run stopped early (exit {coordinator.returncode})", err=True)
        raise typer.Exit(1)
    since, coordinator_growth, worker_growth = growth(readings)
    typer.echo(f"from {since:.0f} s to {readings[-1][0]:.0f} s the coordinator grew {coordinator_growth:+.1f} MiB, "
               f"the worker that grew most {worker_growth:+.1f} MiB")


if __name__ == "__main__":
    run(app, "coordinator.bench.soak")
