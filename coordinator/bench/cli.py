"""`coordinator bench`: epoch time, traffic and memory of the cluster against the one-process floor."""

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from common.data import DataError
from coordinator.config import TrainingConfig, hidden_layers
from common.phases import COORDINATOR_PHASES, WORKER_PHASES
from coordinator.verify import VERIFY_MODES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

ACCURACY_TARGETS = (0.97, 0.975, 0.98)
MIB = 1024 * 1024


def _option(envvar: str, help: str, **kwargs):
    return typer.Option(envvar=f"SCATTERPROP_BENCH_{envvar}", help=help, **kwargs)


def _numbers(text: str) -> list:
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of whole numbers") from None
    if min(numbers) < 1:
        raise typer.BadParameter("every number must be at least 1")
    return numbers


@app.command()
def main(
    workers: Annotated[str, _option("WORKERS", "Worker counts to run, comma-separated.")] = "1,2,4,7",
    batch_sizes: Annotated[str, _option("BATCH_SIZES", "Batch sizes to run, comma-separated.")] = "32,128,1024",
    epochs: Annotated[int, _option("EPOCHS", "Timed epochs per repeat.", min=1)] = 1,
    repeats: Annotated[int, _option("REPEATS", "Repeats per configuration; the median counts.", min=1)] = 3,
    hidden: Annotated[
        str, _option("HIDDEN", "Units of each hidden layer, comma-separated (as `coordinator train`).")
    ] = "128",
    dtype: Annotated[str, _option("DTYPE", "float32 or float64.")] = "float32",
    train_limit: Annotated[int | None, _option("TRAIN_LIMIT", "Use only the first N training images.", min=1)] = None,
    later_layers: Annotated[
        str, _option("LATER_LAYERS", "Who computes the cluster's layers after the first, comma-separated: coordinator "
                     "(the product's default), workers.")
    ] = "coordinator",
    verify: Annotated[
        str, _option("VERIFY", "The cluster's Freivalds checks, comma-separated: off, sample, all.")
    ] = "sample",
    spawn_transport: Annotated[
        str, _option("SPAWN_TRANSPORT", "How the cluster reaches its spawned workers, comma-separated: ipc (a Unix "
                     "socket, as `coordinator train --spawn` does), tcp (loopback).")
    ] = "ipc",
    rekey: Annotated[
        str, _option("REKEY", "How long the cluster's workers keep their first-layer rows, comma-separated: "
                     "every-step, every-epoch, or a number of steps (see `coordinator train --rekey`).")
    ] = TrainingConfig.rekey,
    floor_threads: Annotated[
        int | None, _option("FLOOR_THREADS", "BLAS threads of the floor (default: the library's own choice).", min=1)
    ] = None,
    transport: Annotated[
        bool, _option("TRANSPORT", "Also time each cluster configuration's messages alone, through echo workers "
                      "that do nothing else: what ZeroMQ by itself costs.")
    ] = True,
    out: Annotated[Path, _option("OUT", "Where to write the JSON results.")] = Path("results.json"),
    profile: Annotated[
        bool, _option("PROFILE", "Also print where a step's time goes, phase by phase, on the coordinator and (summed) "
                      "on its workers; the JSON always has it.")
    ] = False,
    time_to_accuracy: Annotated[
        bool, _option("TIME_TO_ACCURACY", "Also train with the default settings on all the training images (whatever "
                      "--train-limit says), locally and on the largest worker count, until 97%, 97.5% and 98% test "
                      "accuracy (minutes).")
    ] = False,
):
    """Run the floor (one process, plain numpy), the cluster and its bare transport side by side; write JSON, print
    Markdown."""
    worker_counts, sizes_of_batches = _numbers(workers), _numbers(batch_sizes)
    placements = later_layers.split(",")
    if not set(placements) <= {"workers", "coordinator"}:
        raise typer.BadParameter(f"later layers {later_layers!r}: choose workers, coordinator or both")
    modes = verify.split(",")
    if not set(modes) <= set(VERIFY_MODES):
        raise typer.BadParameter(f"verify {verify!r}: choose from {', '.join(VERIFY_MODES)}")
    links = spawn_transport.split(",")
    if not set(links) <= {"ipc", "tcp"}:
        raise typer.BadParameter(f"spawn transport {spawn_transport!r}: choose ipc, tcp or both")
    rekeys = rekey.split(",")
    unknown = [interval for interval in rekeys if TrainingConfig(rekey=interval).rekey_steps == 0]
    if unknown:
        raise typer.BadParameter(f"rekey {unknown[0]!r}: choose every-step, every-epoch or a number of steps")
    clusters = [
        (count, placement == "coordinator", mode, link, interval)
        for placement in placements for mode in modes for link in links for interval in rekeys for count in worker_counts
    ]
    base = TrainingConfig(hidden=hidden_layers(hidden), dtype=dtype, train_limit=train_limit, test_limit=0)
    problems = base.problems()
    if problems:
        raise typer.BadParameter("; ".join(problems))
    from coordinator.bench.compare import accuracy_rows, speed_rows  # here: `coordinator --help` need not load it

    try:
        data = base.load_data()
        rows, sizes = len(data.train_labels), base.layer_sizes(data)
        results = []
        for batch_size in sizes_of_batches:
            config = base.with_overrides(batch_size=batch_size)
            results += speed_rows(config, clusters, repeats, epochs, rows, sizes, floor_threads, transport)
        if time_to_accuracy:
            accuracy_config = TrainingConfig(dtype=dtype)  # a limited set would not reach the targets
            results += accuracy_rows(accuracy_config, max(worker_counts), ACCURACY_TARGETS)
    except (DataError, RuntimeError) as error:  # a session's failure arrives as a RuntimeError with its text
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    typer.echo(markdown(results))
    if profile:
        typer.echo("\n" + profile_markdown(results))
        fits = coordinator_fits(results)
        for (batch_size, later_layers, interval), (fixed, per_worker) in fits.items():
            typer.echo(f"coordinator busy ms/step, batch {batch_size}, later layers on {later_layers}, rekey {interval}: "
                       f"{fixed:.2f} + {per_worker:.3f} * workers")


def markdown(results: list) -> str:
    """The results as Markdown tables: speed, then time to accuracy if measured."""
    lines = [
        "| mode | later layers | verify | link | rekey | workers | batch | s/epoch | x floor | CPU ms/step | CPU x floor "
        "| rounds/step | MB/epoch | min MB/epoch | x min | coordinator MB | worker MB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (r for r in results if r["measure"] == "epoch"):
        over_minimum = row["bytes_per_epoch"] / row["min_bytes_per_epoch"] if row["min_bytes_per_epoch"] else None
        lines.append("| " + " | ".join([
            row["mode"], row["later_layers"], row["verify"], row["spawn_transport"], row["rekey"], str(row["workers"]),
            str(row["batch_size"]), f"{row['epoch_seconds']:.2f}",
            f"{row['ratio_to_floor']:.2f}", _shown(row["cpu_ms_per_step"], ".2f"), _shown(row["cpu_ratio_to_floor"], ".2f"),
            f"{row['rounds_per_step']:g}", f"{row['bytes_per_epoch'] / MIB:.1f}",
            f"{row['min_bytes_per_epoch'] / MIB:.1f}", _shown(over_minimum, ".3f"),
            f"{row['coordinator_peak_rss_mb']:.0f}", _shown(row["worker_peak_rss_mb"], ".0f"),
        ]) + " |")
    accuracy = [r for r in results if r["measure"] == "accuracy"]
    if accuracy:
        targets = [f"{reached['target']:.1%}" for reached in accuracy[0]["reached"]]
        lines += ["", "| mode | workers | " + " | ".join(f"s to {t} | epochs to {t}" for t in targets) + " |",
                  "|---|---:|" + "---:|---:|" * len(targets)]
        for row in accuracy:
            cells = [f"{_shown(reached['seconds'], '.1f')} | {_shown(reached['epochs'], 'd')}" for reached in row["reached"]]
            lines.append(f"| {row['mode']} | {row['workers']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_markdown(results: list) -> str:
    """Milliseconds per step for every cluster row: the CPU time of the coordinator and of its workers (summed), then
    the wall time of each phase, the coordinator's, then its workers' summed."""
    rows = [r for r in results if r["measure"] == "epoch" and r.get("coordinator_ms_per_step")]
    header = ["workers", "batch", "later layers", "link", "rekey", "ms/step", "coordinator CPU", "workers CPU"]
    header += [f"coordinator {phase}" for phase in COORDINATOR_PHASES] + [f"workers {phase}" for phase in WORKER_PHASES]
    lines = ["| " + " | ".join(header) + " |", "|---:|---:|---|---|---|" + "---:|" * (len(header) - 5)]
    for row in rows:
        steps_ms = row["epoch_seconds"] * 1000 / row["steps"]
        cells = [str(row["workers"]), str(row["batch_size"]), row["later_layers"], row["spawn_transport"], row["rekey"],
                 f"{steps_ms:.2f}", f"{row['coordinator_cpu_ms_per_step']:.2f}", f"{row['worker_cpu_ms_per_step']:.2f}"]
        cells += [f"{row['coordinator_ms_per_step'][phase]:.2f}" for phase in COORDINATOR_PHASES]
        cells += [f"{row['worker_ms_per_step'][phase]:.2f}" for phase in WORKER_PHASES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coordinator_busy_ms(row: dict) -> float:
    """The coordinator's milliseconds a step in every phase but waiting for answers: what its own CPU does."""
    return sum(ms for phase, ms in row["coordinator_ms_per_step"].items() if phase != "wait")


def coordinator_fits(results: list) -> dict:
    """(batch, later layers, rekey) -> (a, b) of the least-squares line a + b N through the coordinator's busy ms per step
    against N workers, where at least two worker counts were measured."""
    groups = {}
    for row in results:
        if row["measure"] == "epoch" and row.get("coordinator_ms_per_step"):
            groups.setdefault((row["batch_size"], row["later_layers"], row["rekey"]), []).append(row)
    fits = {}
    for key, rows in groups.items():
        if len({row["workers"] for row in rows}) >= 2:
            per_worker, fixed = np.polyfit([row["workers"] for row in rows], [coordinator_busy_ms(r) for r in rows], 1)
            fits[key] = (float(fixed), float(per_worker))
    return fits


def _shown(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
