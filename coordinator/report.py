"""`coordinator report`: a run directory's records drawn as PNG files.

Plotting needs matplotlib, an optional extra (`pip install 'scatterprop[plot]'`): training does not.
"""

import json
import math
from pathlib import Path

import numpy as np

PLOT_EXTRA = "pip install 'scatterprop[plot]'"
DPI = 120


class ReportError(RuntimeError):
    """A report that cannot be drawn; the text is one line for the user."""


def write_report(run_dir: Path, out_dir: Path) -> list:
    """Draw what the run directory holds into out_dir; returns the PNG paths written."""
    history = _read_history(Path(run_dir))
    exposure = _read_exposure(Path(run_dir) / "exposure.npz")
    workers = _read_json(Path(run_dir) / "workers.json")
    pyplot = _pyplot()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"cannot write {out_dir}: {error.strerror}") from None
    names = {worker["slot"]: worker["name"] for worker in workers or []}
    figures = {"learning-curves.png": _learning_curves(pyplot, history)}
    if exposure is not None:
        figures["exposure-map.png"] = _exposure_map(pyplot, exposure, names)
    if workers:
        figures["workers.png"] = _worker_load(pyplot, workers)
    written = []
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=DPI)
        pyplot.close(figure)
        written.append(out_dir / name)
    return written


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(f"coordinator report draws with matplotlib, which is not installed: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    return pyplot


def _read_history(run_dir: Path) -> list:
    path = run_dir / "history.jsonl"
    try:
        lines = path.read_text().splitlines()
        history = [json.loads(line) for line in lines if line.strip()]
    except OSError as error:
        raise ReportError(f"cannot read run directory {run_dir}: {error.strerror} ({path.name})") from None
    except ValueError:
        raise ReportError(f"{path} is not one JSON object per line") from None
    if not history:
        raise ReportError(f"{path} holds no finished epoch yet")
    return history


def _read_exposure(path: Path) -> np.ndarray | None:
    """The owner slot of each input column, or None when the run had no workers."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return saved["column_owners"]
    except (OSError, ValueError, KeyError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None


def _learning_curves(pyplot, history: list):
    epochs = [entry["epoch"] for entry in history]
    figure, (cost, accuracy) = pyplot.subplots(1, 2, figsize=(10, 4), layout="constrained")
    cost.plot(epochs, [entry["cost"] for entry in history], marker="o")
    cost.set(title="cost", xlabel="epoch")
    accuracy.plot(epochs, [100 * entry["train_accuracy"] for entry in history], marker="o", label="train")
    if all(entry["test_accuracy"] is not None for entry in history):
        accuracy.plot(epochs, [100 * entry["test_accuracy"] for entry in history], marker="s", label="test")
    accuracy.set(title="accuracy", xlabel="epoch", ylabel="%")
    accuracy.legend()
    for axes in (cost, accuracy):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    return figure


def _exposure_map(pyplot, column_owners: np.ndarray, names: dict):
    """The image grid (28 x 28 for MNIST) coloured by the slot that holds each pixel."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    slots = int(column_owners.max()) + 1
    side = math.isqrt(len(column_owners))
    grid = column_owners.reshape(side, side) if side * side == len(column_owners) else column_owners[None, :]
    colours = pyplot.get_cmap("tab10" if slots <= 10 else "tab20", slots)
    cmap = ListedColormap([colours(slot) for slot in range(slots)])
    figure, axes = pyplot.subplots(figsize=(6.4, 5), layout="constrained")
    axes.imshow(grid, cmap=cmap, vmin=-0.5, vmax=slots - 0.5)
    axes.set(title="which worker holds each pixel", xticks=[], yticks=[])
    legend = [Patch(color=cmap(slot), label=names.get(slot, f"slot {slot}")) for slot in range(slots)]
    axes.legend(handles=legend, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, title="worker")
    return figure


def _worker_load(pyplot, workers: list):
    workers = sorted(workers, key=lambda worker: worker["slot"])
    names = [worker["name"] for worker in workers]
    positions = np.arange(len(workers))
    figure, (busy, traffic) = pyplot.subplots(1, 2, figsize=(10, 4), layout="constrained")
    busy.bar(positions, [worker["busy_seconds"] for worker in workers])
    busy.set(title="time waited on each worker", ylabel="seconds (summed round trips)")
    width = 0.4
    traffic.bar(positions - width / 2, [worker["sent_bytes"] / 1e6 for worker in workers], width, label="to worker")
    traffic.bar(positions + width / 2, [worker["received_bytes"] / 1e6 for worker in workers], width,
                label="from worker")
    largest = max(max(worker["sent_bytes"], worker["received_bytes"]) for worker in workers) / 1e6
    traffic.set(title="bytes on the wire", ylabel="MB", ylim=(0, 1.25 * largest or 1))  # room for the legend
    traffic.legend(loc="upper center", ncols=2)
    for axes in (busy, traffic):
        axes.set_xticks(positions, names)
        axes.set_xlabel("worker")
        axes.grid(axis="y", alpha=0.3)
    return figure
