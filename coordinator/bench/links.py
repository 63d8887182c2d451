"""`python -m coordinator.bench.links`: the cluster behind a real, bandwidth-limited link.

Each run builds a coordinator host and N worker hosts out of network namespaces on one bridge (addresses only
inside them, 10.78.0.0/24), limits the coordinator's link with a token bucket filter both ways (netem, and so
delay, is not available here), trains with `coordinator train`, and tears everything down, also on failure or
Ctrl-C. What it reports, for each rate, batch size and setting:
- epoch seconds: the median over the epochs after the first (the first also carries the image shards) of the
  time from one epoch's line to the next, scaled to 60,000 training images from `--train-limit`; the test pass
  at each epoch's end uses the same fraction of the 10,000 test images, so the scaled figure holds a whole test
  pass too, and the checkpoint after it (which ends a period of kept rows, so collects them);
- bytes per epoch: what the coordinator's interface sent plus received over those same spans, TCP/IP headers
  included, read when each epoch's line arrives, scaled alike;
- time to 97.5%: the epochs, and the seconds of training (not scaled), until the test accuracy first reaches it.
Needs root and iproute2.
"""

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from coordinator.bench.cli import _numbers
from coordinator.bench.hosts import Hosts
from common.cli import run
from common.errors import EXIT_INTERRUPTED, InputError, UserError
from coordinator.spawn import worker_names

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

SUBNET = "10.78.0"  # a private /24 assigned only inside the namespaces made here (the tests use 10.77.0)
COORDINATOR_PORT = 5555
FULL_TRAINING_SET = 60_000  # MNIST's training images: what every figure is scaled to
FULL_TEST_SET = 10_000  # MNIST's test images: a run tests on the same fraction as it trains on
TARGET_ACCURACY = 0.975
RATE_PATTERN = re.compile(r"^\d+(\.\d+)?(kbit|mbit|gbit)$")  # the tc units this tool accepts
WORKER_GIVE_UP = 30  # seconds a worker waits for a coordinator, as docker-compose.yml sets it
FAILURE_LINES = 10  # lines of the coordinator's log shown when a run fails


class LinkBenchError(UserError):
    """A run that could not be made or did not finish."""


@dataclass(frozen=True)
class EpochSample:
    seconds: float  # the epoch's training and test pass, as the coordinator reports it
    link_bytes: int  # sent plus received on the coordinator's interface since the last epoch's line
    test_accuracy: float | None
    span: float  # seconds since the last epoch's line: what the bytes were counted over


@dataclass(frozen=True)
class LinkRow:
    rate: str
    batch_size: int
    setting: str  # the extra `coordinator train` options, "" for the defaults
    workers: int
    epoch_seconds: float  # scaled to FULL_TRAINING_SET
    bytes_per_epoch: float  # scaled to FULL_TRAINING_SET
    epochs_to_target: int | None
    seconds_to_target: float | None  # of training, not scaled
    final_test_accuracy: float | None


def rates_of(text: str) -> list:
    """`100mbit,1gbit` -> ["100mbit", "1gbit"], each a rate tc understands."""
    rates = [part.strip().lower() for part in text.split(",")]
    bad = [rate for rate in rates if not RATE_PATTERN.match(rate)]
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)}: write a rate as a number and kbit, mbit or gbit, e.g. 100mbit")
    return rates


def epoch_sample(line: str, link_bytes: int, span: float) -> EpochSample | None:
    """The epoch a line of `--log-format json` reports, with the link's bytes and the seconds since the last one;
    None if no epoch."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("event") != "epoch":
        return None
    return EpochSample(event["seconds"], link_bytes, event.get("test_accuracy"), span)


def summary(samples: list, train_images: int) -> dict:
    """The figures of one run's epochs (at least two): the steady epochs scaled to FULL_TRAINING_SET, and time to
    TARGET_ACCURACY."""
    scale = FULL_TRAINING_SET / train_images
    steady = samples[1:]  # the first epoch also sends the shards
    reached = next((number for number, sample in enumerate(samples, 1)
                    if (sample.test_accuracy or 0) >= TARGET_ACCURACY), None)
    return {
        "epoch_seconds": statistics.median(sample.span for sample in steady) * scale,
        "bytes_per_epoch": statistics.median(sample.link_bytes for sample in steady) * scale,
        "epochs_to_target": reached,
        "seconds_to_target": None if reached is None else sum(sample.seconds for sample in samples[:reached]),
        "final_test_accuracy": samples[-1].test_accuracy,
    }


def median_row(rate: str, batch_size: int, setting: str, workers: int, summaries: list) -> LinkRow:
    """One row from the summaries of repeated runs: the median of each figure; time to target from the first run."""
    return LinkRow(
        rate, batch_size, setting, workers,
        statistics.median(s["epoch_seconds"] for s in summaries),
        statistics.median(s["bytes_per_epoch"] for s in summaries),
        summaries[0]["epochs_to_target"], summaries[0]["seconds_to_target"],
        statistics.median(s["final_test_accuracy"] or 0 for s in summaries),
    )


def markdown(rows: list) -> str:
    lines = [
        "| coordinator link | batch | setting | workers | s/epoch (60k) | MB/epoch (60k) | epochs to 97.5% "
        "| s to 97.5% | last test accuracy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.rate} | {row.batch_size} | {row.setting or 'default'} | {row.workers} | {row.epoch_seconds:.1f} "
            f"| {row.bytes_per_epoch / 1e6:.0f} | {_shown(row.epochs_to_target, 'd')} "
            f"| {_shown(row.seconds_to_target, '.0f')} | {_shown(row.final_test_accuracy, '.2%')} |"
        )
    return "\n".join(lines)


def _shown(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def measure(rate: str, workers: int, train_options: list, timeout: float, scratch: Path) -> list:
    """Train once behind a link of `rate`: the EpochSample of every epoch. Everything made is torn down after."""
    hosts = Hosts(f"sl{os.getpid() % 100000}", SUBNET)
    address = f"tcp://{hosts.address(0)}:{COORDINATOR_PORT}"
    try:
        hosts.add_switch()
        coordinator_namespace, _ = hosts.add_host(0)
        for index, name in enumerate(worker_names(workers), start=1):
            namespace, _ = hosts.add_host(index)
            with open(scratch / f"worker-{name}.log", "w") as log:
                hosts.start(namespace, ["worker", "--connect", address, "--name", name, "--give-up-after",
                                        WORKER_GIVE_UP], {"SCATTERPROP_THREADS": "1"}, stdout=log,
                            stderr=subprocess.STDOUT)
        hosts.shape(0, rate)
        log_path = scratch / "coordinator.log"
        with open(log_path, "w") as log:
            coordinator = hosts.start(
                coordinator_namespace,
                ["coordinator", "train", "--workers", workers, "--bind", address, "--log-format", "json",
                 "--run-dir", scratch / "run", *train_options],
                {}, stdout=subprocess.PIPE, stderr=log,
            )
        return _samples(coordinator, hosts, timeout, log_path)
    finally:
        hosts.tear_down()


def _samples(coordinator: subprocess.Popen, hosts: Hosts, timeout: float, log_path: Path) -> list:
    """Read the coordinator's epoch lines until it ends, counting the link's bytes at each; kill it at `timeout`."""
    timer = threading.Timer(timeout, coordinator.kill)
    timer.start()
    try:
        samples, counted, since = [], hosts.link_bytes(0), time.monotonic()
        for line in coordinator.stdout:
            now_bytes, now = hosts.link_bytes(0), time.monotonic()
            sample = epoch_sample(line, now_bytes - counted, now - since)
            if sample is not None:
                samples.append(sample)
                counted, since = now_bytes, now
    finally:
        timer.cancel()
    if coordinator.wait() != 0:
        last_lines = log_path.read_text(errors="replace").splitlines()[-FAILURE_LINES:]
        raise LinkBenchError(f"the coordinator failed (exit {coordinator.returncode}, killed after {timeout:g} s if "
                             f"negative); its log ends: " + " | ".join(last_lines))
    return samples


def _interrupt_on_sigterm() -> None:
    """A SIGTERM ends a run as Ctrl-C does, through the `finally` that deletes its namespaces."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_BENCH_{envvar}", help=help, **kwargs)


@app.command()
def main(
    rates: Annotated[str, _option("RATES", "The coordinator's link rates, comma-separated (tc units).")] = "100mbit,1gbit",
    workers: Annotated[int, _option("WORKERS", "Worker hosts.", min=1, max=200)] = 7,
    batch_sizes: Annotated[str, _option("BATCH_SIZES", "Batch sizes, comma-separated.")] = "128,1024",
    setting: Annotated[
        list[str] | None, _option("SETTING", "More `coordinator train` options for one configuration, as one "
                                  "string (repeat for several; default: none, the defaults).")
    ] = None,
    epochs: Annotated[int, _option("EPOCHS", "Epochs per run; the first, which sends the shards, is not timed.",
                                   min=2)] = 3,
    repeats: Annotated[int, _option("REPEATS", "Runs per configuration; the median counts.", min=1)] = 1,
    train_limit: Annotated[int, _option("TRAIN_LIMIT", "Training images per epoch (scaled to 60,000).",
                                        min=1, max=FULL_TRAINING_SET)] = 10_000,
    timeout: Annotated[float, _option("TIMEOUT", "Seconds one run may take before it counts as failed.", min=1)] = 1800,
    out: Annotated[Path, _option("OUT", "Where to write the JSON results.")] = Path("links.json"),
):
    """Train behind a shaped coordinator link at each rate; write JSON, print Markdown."""
    if os.geteuid() != 0:
        raise InputError("coordinator.bench.links builds network namespaces and shapes links: run it as root")
    chosen_rates = rates_of(rates)
    sizes = _numbers(batch_sizes)
    _interrupt_on_sigterm()
    try:
        rows = _measured_rows(chosen_rates, sizes, setting or [""], workers, epochs, repeats, train_limit, timeout)
    except KeyboardInterrupt:
        typer.echo("interrupted; the namespaces are deleted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    typer.echo(markdown(rows))


def _measured_rows(rates, sizes, settings, workers, epochs, repeats, train_limit, timeout) -> list:
    """One LinkRow per rate, batch size and setting, each the median of `repeats` runs."""
    test_limit = max(1, train_limit * FULL_TEST_SET // FULL_TRAINING_SET)
    rows = []
    for rate in rates:
        for batch_size in sizes:
            for options in settings:
                summaries = []
                for _ in range(repeats):
                    train_options = ["--dtype", "float32", "--epochs", epochs, "--batch-size", batch_size,
                                     "--train-limit", train_limit, "--test-limit", test_limit, *shlex.split(options)]
                    with tempfile.TemporaryDirectory(prefix="links-") as scratch:
                        samples = measure(rate, workers, train_options, timeout, Path(scratch))
                    summaries.append(summary(samples, train_limit))
                rows.append(median_row(rate, batch_size, options, workers, summaries))
                typer.echo(markdown(rows[-1:]).splitlines()[-1], err=True)  # progress, one row at a time
    return rows


if __name__ == "__main__":
    run(app, "coordinator.bench.links")
