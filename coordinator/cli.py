"""`coordinator`: train the network on workers (or locally) and evaluate saved models."""

import logging
from pathlib import Path
from typing import Annotated

import typer

from common.data import DataError
from coordinator.cluster import ClusterError
from coordinator.config import PRESETS
from coordinator.rundir import ModelError, default_run_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

USER_ERRORS = (DataError, ModelError, ClusterError)
EXIT_USAGE = 2  # what typer itself returns for a bad option
EXIT_FAILED = 1
SECOND_LAYER_CHOICES = ("workers", "coordinator")


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_{envvar}", help=help, **kwargs)


def _fail(message: str, code: int = EXIT_USAGE):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _epoch_line(report, epochs: int) -> str:
    test = "-" if report.test_accuracy is None else f"{report.test_accuracy:.2%}"
    return (
        f"epoch {report.epoch}/{epochs}  cost {report.cost:.5f}  train {report.train_accuracy:.2%}"
        f"  test {test}  {report.seconds:.1f} s"
    )


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
    second_layer: Annotated[
        str, _option("SECOND_LAYER", "Who computes the second layer's products: workers, or the coordinator "
                     "(one round per step instead of three; see Speed in the README).")
    ] = "workers",
    report_every: Annotated[int | None, _option("REPORT_EVERY", "Print every N epochs.")] = None,
):
    """Train the 784-128-10 sigmoid network on MNIST, the matrix products done by workers."""
    from coordinator.run import ClusterOptions, train as run_training

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset].with_overrides(
        epochs=epochs, batch_size=batch_size, learning_rate=lr, seed=seed, hidden=hidden, loss=loss,
        dtype=dtype, data=None if data is None else str(data), train_limit=train_limit, test_limit=test_limit,
        input_divisor=None if scale is None else (255.0 if scale else 1.0), report_every=report_every,
    )
    problems = config.problems() + ([] if (spawn or workers) >= 1 else ["workers must be at least 1"])
    problems += [] if second_layer in SECOND_LAYER_CHOICES else ["second layer must be workers or coordinator"]
    if problems:
        _fail("; ".join(problems))
    second_layer_here = second_layer == "coordinator"
    cluster = None if local else ClusterOptions(bind, spawn or workers, spawn is not None, wait_timeout, second_layer_here)
    _configure_logging()

    def on_epoch(report):
        if report.epoch % config.report_every == 0 or report.epoch == config.epochs:
            typer.echo(_epoch_line(report, config.epochs))

    try:
        run_training(config, run_dir or default_run_dir(), cluster, on_epoch)
    except USER_ERRORS as error:
        _fail(str(error), EXIT_USAGE if isinstance(error, DataError) else EXIT_FAILED)


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
        _fail(str(error))
    typer.echo(f"test accuracy {accuracy:.2%}")


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
