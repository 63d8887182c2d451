"""`coordinator`: train the network on workers (or locally), watch a run, evaluate and report on it."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from common import cli
from common.cli import EXIT_FAILED, EXIT_USAGE, fail
from common.data import DataError
from coordinator.cluster import ClusterError
from coordinator.config import PRESETS
from coordinator.rundir import ModelError, default_run_dir
from coordinator.status import StatusError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

USER_ERRORS = (DataError, ModelError, ClusterError, StatusError)


class LogFormat(str, Enum):
    plain = "plain"
    json = "json"


def console_script() -> None:
    cli.run(app, "coordinator")


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_{envvar}", help=help, **kwargs)


@app.command()
def train(
    preset: Annotated[str, _option("PRESET", f"Starting settings: {', '.join(PRESETS)}.")] = "default",
    epochs: Annotated[int | None, _option("EPOCHS", "Passes over the training images.")] = None,
    batch_size: Annotated[int | None, _option("BATCH_SIZE", "Images per gradient step.")] = None,
    lr: Annotated[float | None, _option("LR", "Learning rate.")] = None,
    seed: Annotated[int | None, _option("SEED", "Seed of the initial weights, batch order and exposure plan.")] = None,
    hidden: Annotated[int | None, _option("HIDDEN", "Hidden units.")] = None,
    loss: Annotated[str | None, _option("LOSS", "mse or bce.")] = None,
    dtype: Annotated[str | None, _option("DTYPE", "float32 or float64.")] = None,
    scale: Annotated[bool | None, _option("SCALE", "Scale pixels to [0, 1] (--no-scale keeps 0-255).")] = None,
    data: Annotated[Path | None, _option("DATA", "Folder of MNIST-format IDX files (default: embedded MNIST).")] = None,
    train_limit: Annotated[int | None, _option("TRAIN_LIMIT", "Use only the first N training images.")] = None,
    test_limit: Annotated[int | None, _option("TEST_LIMIT", "Use only the first N test images.")] = None,
    run_dir: Annotated[Path | None, _option("RUN_DIR", "Where to write the run (default runs/<timestamp>).")] = None,
    local: Annotated[bool, _option("LOCAL", "Train in this process, without workers.")] = False,
    workers: Annotated[int, _option("WORKERS", "Workers to wait for.")] = 7,
    spawn: Annotated[int | None, _option("SPAWN", "Start N local worker processes (sets --workers N).")] = None,
    bind: Annotated[str, _option("BIND", "ZeroMQ address the coordinator binds.")] = "tcp://*:5555",
    wait_timeout: Annotated[float, _option("WAIT_TIMEOUT", "Seconds to wait for the workers.")] = 60.0,
    report_every: Annotated[int | None, _option("REPORT_EVERY", "Print every N epochs.")] = None,
    status_bind: Annotated[
        str | None, _option("STATUS_BIND", "ZeroMQ address of a read-only status socket for `coordinator status`.")
    ] = None,
    quiet: Annotated[bool, _option("QUIET", "Plain lines only, no live progress display.")] = False,
    log_format: Annotated[LogFormat, _option("LOG_FORMAT", "plain, or json: one JSON object per line.")] = LogFormat.plain,
):
    """Train the 784-128-10 sigmoid network on MNIST, the matrix products done by workers."""
    from coordinator.progress import output_for
    from coordinator.run import ClusterOptions, train as run_training

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset].with_overrides(
        epochs=epochs, batch_size=batch_size, learning_rate=lr, seed=seed, hidden=hidden, loss=loss,
        dtype=dtype, data=None if data is None else str(data), train_limit=train_limit, test_limit=test_limit,
        input_divisor=None if scale is None else (255.0 if scale else 1.0), report_every=report_every,
    )
    problems = config.problems() + ([] if (spawn or workers) >= 1 else ["workers must be at least 1"])
    if problems:
        fail("; ".join(problems))
    cluster = None if local else ClusterOptions(bind, spawn or workers, spawn is not None, wait_timeout, status_bind)
    try:
        with output_for(quiet, log_format.value, config.epochs, config.report_every) as output:
            run_training(config, run_dir or default_run_dir(), cluster, output.epoch, on_status=output.status)
    except USER_ERRORS as error:
        fail(str(error), EXIT_USAGE if isinstance(error, DataError) else EXIT_FAILED)


@app.command()
def evaluate(
    model: Annotated[Path, _option("MODEL", "A model.npz written by `coordinator train`.")],
    data: Annotated[Path | None, _option("DATA", "Folder of MNIST-format IDX files (default: embedded MNIST).")] = None,
):
    """Print the test accuracy of a saved model."""
    from coordinator.run import evaluate_model

    try:
        accuracy = evaluate_model(model, data)
    except USER_ERRORS as error:
        fail(str(error))
    typer.echo(f"test accuracy {accuracy:.2%}")


@app.command()
def status(
    connect: Annotated[str, _option("STATUS_CONNECT", "The status address of a coordinator started with --status-bind.")],
    timeout: Annotated[float, _option("STATUS_TIMEOUT", "Seconds to wait for the answer.", min=0)] = 5.0,
    log_format: Annotated[LogFormat, _option("LOG_FORMAT", "plain, or json: the status as one JSON object.")] = LogFormat.plain,
):
    """Show a running coordinator's workers, epoch and step (read-only)."""
    from coordinator.progress import print_workers
    from coordinator.status import request_status

    try:
        snapshot = request_status(connect, timeout)
    except StatusError as error:
        fail(str(error), EXIT_FAILED)
    if log_format == LogFormat.json:
        typer.echo(snapshot.to_json())
        return
    typer.echo(snapshot.summary())
    if snapshot.workers:
        print_workers(snapshot.workers)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(envvar="SCATTERPROP_RUN_DIR", help="A run directory written by `coordinator train`.")],
    out: Annotated[Path | None, _option("REPORT_OUT", "Where to write the PNGs (default: RUN_DIR/report).")] = None,
):
    """Draw a run's learning curves, exposure map and per-worker time and bytes as PNG files."""
    from coordinator.report import ReportError, write_report

    try:
        written = write_report(run_dir, out or run_dir / "report")
    except ReportError as error:
        fail(str(error), EXIT_FAILED)
    for path in written:
        typer.echo(str(path))
