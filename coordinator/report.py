"""`coordinator report`: a run directory's records drawn as PNG files.

Plotting needs matplotlib, an optional extra (`pip install 'scatterprop[plot]'`): training does not.
"""

import json
import math
from pathlib import Path

import numpy as np

from common.errors import UserError

PLOT_EXTRA = "pip install 'scatterprop[plot]'"
DPI = 120


class ReportError(UserError):
    """A report that cannot be drawn."""


def write_report(run_dir: Path, out_dir: Path) -> list:
    """Draw what the run directory holds into out_dir; returns the PNG paths written."""
    run_dir = Path(run_dir)
    history = _read_history(run_dir)
    exposure = _read_exposure(run_dir / "exposure.npz")
    handovers = _read_json_lines(run_dir / "exposure.jsonl") if (run_dir / "exposure.jsonl").exists() else []
    workers = _read_json(run_dir / "workers.json")
    audits = _read_json(run_dir / "audit.json")
    pyplot = _pyplot()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"cannot write {out_dir}: {error.strerror}") from None
    figures = {"learning-curves.png": _learning_curves(pyplot, history)}
    if exposure is not None:
        figures["exposure-map.png"] = _exposure_map(pyplot, exposure, handovers, _slot_names(workers, handovers),
                                                    history[-1].get("label_privacy"))
    if workers:
        figures["workers.png"] = _worker_load(pyplot, workers)
    if audits:
        figures["audit.png"] = _audit_panel(pyplot, audits)
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
    if not path.is_file():
        raise ReportError(f"cannot read run directory {run_dir}: it has no {path.name}")
    history = _read_json_lines(path)
    if not history:
        raise ReportError(f"{path} holds no finished epoch yet")
    return history


def _read_json_lines(path: Path) -> list:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ReportError(f"cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise ReportError(f"{path} is not one JSON object per line") from None


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
    eps = history[-1].get("label_privacy")
    train = "train" if eps is None else f"train (labels trained on: eps {eps:g} label privacy)"
    accuracy.plot(epochs, [100 * entry["train_accuracy"] for entry in history], marker="o", label=train)
    if all(entry["test_accuracy"] is not None for entry in history):
        accuracy.plot(epochs, [100 * entry["test_accuracy"] for entry in history], marker="s", label="test")
    accuracy.set(title="accuracy", xlabel="epoch", ylabel="%")
    accuracy.legend()
    for axes in (cost, accuracy):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    return figure


def _slot_names(workers: list | None, handovers: list) -> dict:
    """slot -> the names of the workers that held it, in order ("C then H" after a standby took over)."""
    held = {}
    for record in [*handovers, *(workers or [])]:
        names = held.setdefault(record["slot"], [])
        name = record.get("worker", record.get("name"))
        if name not in names:
            names.append(name)
    return {slot: " then ".join(names) for slot, names in held.items()}


def final_owners(column_owners: np.ndarray, handovers: list) -> np.ndarray:
    """The owner slot of each input column at the end: each record lists all the columns its slot holds."""
    owners = column_owners.copy()
    for record in handovers:
        owners[record["columns"]] = record["slot"]
    return owners


def _image_grid(owners: np.ndarray) -> np.ndarray:
    """Columns as the image they come from: 28 x 28 for MNIST, one row when not square."""
    side = math.isqrt(len(owners))
    return owners.reshape(side, side) if side * side == len(owners) else owners[None, :]


def _exposure_map(pyplot, column_owners: np.ndarray, handovers: list, names: dict, label_privacy: float | None):
    """The image grid coloured by the slot that holds each pixel; a second panel when pixels changed hands."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    owners_at_end = final_owners(column_owners, handovers)
    moved = _image_grid(owners_at_end != column_owners)
    slots = int(max(column_owners.max(), owners_at_end.max())) + 1
    colours = pyplot.get_cmap("tab10" if slots <= 10 else "tab20", slots)
    cmap = ListedColormap([colours(slot) for slot in range(slots)])
    panels = [("which worker holds each pixel", column_owners)]
    if moved.any():
        panels = [("at the start", column_owners), (f"at the end: {int(moved.sum())} pixels (dots) changed hands",
                                                     owners_at_end)]
    figure, axes = pyplot.subplots(1, len(panels), figsize=(1.6 + 4.8 * len(panels), 5), layout="constrained",
                                   squeeze=False)
    for panel, (title, owners) in zip(axes[0], panels):
        panel.imshow(_image_grid(owners), cmap=cmap, vmin=-0.5, vmax=slots - 0.5)
        panel.set(title=title, xticks=[], yticks=[])
    if label_privacy is not None:  # what the errors the workers were sent can tell them of the labels
        figure.suptitle(f"labels trained on: randomized response, each eps {label_privacy:g} label-private")
    if moved.any():
        rows, columns = np.nonzero(moved)
        axes[0][-1].scatter(columns, rows, s=6, c="black")
    gone = set(range(slots)) - set(owners_at_end.tolist())
    legend = [Patch(color=cmap(slot), label=names.get(slot, f"slot {slot}") + (" (left)" if slot in gone else ""))
              for slot in range(slots)]
    axes[0][-1].legend(handles=legend, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, title="worker")
    return figure


def _worker_load(pyplot, workers: list):
    """Bars per worker, in the order of workers.json: by slot, then standbys, then those that left."""
    names = [_bar_name(worker) for worker in workers]
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


def _bar_name(worker: dict) -> str:
    if worker.get("left"):
        return f"{worker['name']} (left)"
    return worker["name"] if worker["slot"] is not None else f"{worker['name']} (standby)"


def _audit_panel(pyplot, audits: list):
    """Each attack of `coordinator audit`: what it recovered against its control and chance, one panel per audit
    (the worker alone, then its colluders pooled)."""
    figure, panels = pyplot.subplots(1, len(audits), figsize=(7 * len(audits), 4.5), layout="constrained", squeeze=False)
    for axes, audit in zip(panels[0], audits):
        scores = audit["scores"][::-1]  # the first attack on top
        positions, height = np.arange(len(scores)), 0.38
        axes.barh(positions + height / 2, [100 * (s["recovered"] or 0) for s in scores], height, label="recovered")
        axes.barh(positions - height / 2, [100 * (s["control"] or 0) for s in scores], height, color="0.65",
                  label="control (labels shuffled)")
        axes.scatter([100 * s["chance"] for s in scores], positions, marker="|", s=300, color="black", zorder=3,
                     label="chance")
        axes.set_yticks(positions, [s["attack"] for s in scores], fontsize=8)
        axes.set(xlim=(0, 100), xlabel="% right", title=f"what worker {audit['worker']} learnt")
        axes.grid(axis="x", alpha=0.3)
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3, fontsize=8, frameon=False)
    return figure
