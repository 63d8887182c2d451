"""The run directory: config.json, history.jsonl, exposure.npz, workers.json, permutations.jsonl, model.npz and
coordinator.log."""

import dataclasses
import json
import logging
import shutil
import sys
import zipfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np

from common import model
from common.data import load_dataset
from common.errors import InputError, UserError
from common.exposure import ExposurePlan
from common.model import Params
from coordinator.config import TrainingConfig
from coordinator.files import append_line, whole_lines, write_atomically, write_text_atomically
from coordinator.training import LocalProducts, Trainer

LOG_FILE = "coordinator.log"
LABELS_FILE = "labels.npz"  # a label-private run's trained labels (RunDirectory.save_labels)
KEYS_FILE = "permutations.jsonl"  # the secret permutation of each layer, round by round: the truth of an audit
# The settings model.npz keeps beside the parameters: what an evaluation needs, and the loss it was trained for.
# A file from before the network was a setting holds only input_divisor; its sigmoid layers are the defaults.
MODEL_SETTINGS = ("input_divisor", "activation", "output", "loss")

log = logging.getLogger("coordinator")


class ModelError(InputError):
    """A model file that cannot be used."""


class RunDirectoryError(UserError):
    """A run directory that cannot be written."""


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class RunLogHandler(logging.FileHandler):
    """coordinator.log; on a full disk its lines are lost quietly: the error that ends the run says what happened,
    where logging's default would print a traceback for every line."""

    def handleError(self, record) -> None:
        pass


@contextmanager
def logging_into(path: Path):
    """Copy every log line into RUN_DIR/coordinator.log while the run lasts, and the error that ends it with
    its traceback: there only, as the terminal gets one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        handler = RunLogHandler(path / LOG_FILE)
    except OSError as error:
        raise RunDirectoryError(f"cannot write run directory {path}: {error.strerror}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    except BaseException:
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "the run stopped", (), sys.exc_info()))
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def discard_if_unstarted(path: Path) -> None:
    """Remove a failed run's directory if nothing happened in it: no worker was sent data, no step was saved."""
    history = path / "history.jsonl"
    started = (path / "exposure.jsonl").exists() or (path / "checkpoints").exists() or (
        history.exists() and history.stat().st_size > 0
    )
    if not started:
        shutil.rmtree(path, ignore_errors=True)


class RunDirectory:
    """Writes one run's records as the run goes."""

    def __init__(self, path: Path, history: list = ()):
        """Open the run directory, its history starting with `history` (a resumed run's finished epochs)."""
        self.path = Path(path)
        self.last_keys = {}  # layer -> the permutation last written to the keys log
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path / "history.jsonl", "".join(json.dumps(entry) + "\n" for entry in history))
        except OSError as error:
            raise RunDirectoryError(f"cannot write run directory {self.path}: {error.strerror}") from None

    def save_config(self, config, **extra) -> None:
        text = json.dumps({**dataclasses.asdict(config), **extra}, indent=2)
        write_text_atomically(self.path / "config.json", text + "\n")

    def save_labels(self, labels) -> None:
        """labels.npz: what a label-private run trains on (coordinator.labels), with eps and its stages."""
        arrays = {**labels.arrays(), "eps": np.array(labels.eps), "stages": np.array(labels.stages)}
        write_atomically(self.path / LABELS_FILE, lambda file: np.savez(file, **arrays))

    def append_history(self, report) -> None:
        append_line(self.path / "history.jsonl", json.dumps(dataclasses.asdict(report)) + "\n")

    def save_exposure(self, plan: ExposurePlan, permutation_seed: int, config: TrainingConfig) -> None:
        write_atomically(self.path / "exposure.npz", lambda file: plan.save(
            file, permutation_seed, config.label_privacy, config.label_privacy_stages))

    def append_exposure(self, epoch: int, step: int, slot: int, worker: str, plan: ExposurePlan, reason: str) -> None:
        """Record that a worker holds a slot's columns and units (a list per hidden layer) from this point of the run
        on."""
        record = {
            "epoch": epoch, "step": step, "slot": slot, "worker": worker, "reason": reason,
            "columns": plan.columns(slot).tolist(),
            "units": [plan.units(slot, layer).tolist() for layer in plan.later_layers],
        }
        append_line(self.path / "exposure.jsonl", json.dumps(record) + "\n")
        log.info("worker %s sees %d input columns and %d hidden units (%s)", worker, len(record["columns"]),
                 plan.units_held(slot), reason)

    def append_keys(self, round_number: int, keys: dict) -> None:
        """Record the permutation each layer's columns travel under from this round on, where it changed: what
        `coordinator audit` scores a worker's tracking of hidden units against. Round numbers start again with each
        coordinator process, so its first line names a new session."""
        changed = {layer: p for layer, p in keys.items() if self.last_keys.get(layer) is not p}
        if not changed:
            return
        lines = []
        if not self.last_keys:
            lines.append({"session": self._sessions() + 1})
        self.last_keys.update(changed)
        lines += [{"round": round_number, "layer": layer, "permutation": p.tolist()} for layer, p in changed.items()]
        append_line(self.path / KEYS_FILE, "".join(json.dumps(line) + "\n" for line in lines))

    def _sessions(self) -> int:
        return sum('"session"' in line for line in whole_lines(self.path / KEYS_FILE))

    def last_holders(self) -> dict:
        """slot -> the name of the worker that last took it over, from exposure.jsonl ({} without one)."""
        return {record["slot"]: record["worker"] for record in map(json.loads, whole_lines(self.path / "exposure.jsonl"))}

    def append_quarantine(self, epoch: int, step: int, worker, slot: int, request_kind: str, evidence) -> None:
        """Record a worker caught returning a wrong product, with the evidence."""
        record = {"epoch": epoch, "step": step, "worker": worker.name, "answers": worker.answered, "slot": slot,
                  "request": request_kind, **dataclasses.asdict(evidence)}
        append_line(self.path / "quarantine.jsonl", json.dumps(record) + "\n")

    def save_workers(self, statuses) -> None:
        """Each worker's final numbers (WorkerStatus), for `coordinator report`."""
        text = json.dumps([dataclasses.asdict(status) for status in statuses], indent=2)
        write_text_atomically(self.path / "workers.json", text + "\n")

    def save_model(self, params: Params, config: TrainingConfig) -> None:
        write_model(self.path, params, config)


def write_model(run_dir: Path, params: Params, config: TrainingConfig) -> None:
    """RUN_DIR/model.npz: the parameters, and the settings an evaluation needs."""
    settings = {name: np.array(getattr(config, name)) for name in MODEL_SETTINGS}
    write_atomically(Path(run_dir) / "model.npz", lambda file: np.savez(file, **params.arrays(), **settings))


def restore_model(run_dir: Path, params: Params, config: TrainingConfig) -> bool:
    """Write a finished run's model.npz from its final checkpoint's parameters unless it already holds exactly them
    (a kill or a full disk at the end of a run leaves it missing, or empty); True if it was written."""
    path = Path(run_dir) / "model.npz"
    try:
        saved, _ = load_model(path)
        if all(np.array_equal(a, b) for a, b in zip(saved.arrays().values(), params.arrays().values(), strict=True)):
            return False
    except (ModelError, ValueError):
        pass
    write_model(run_dir, params, config)
    return True


def load_model(path: Path) -> tuple:
    """(Params, the TrainingConfig that evaluates them) from a model.npz, refusing anything that is not plain
    arrays of the right shapes and known settings."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # numpy would try to unpickle it, and advise allow_pickle
        raise ModelError(f"{path} is not a model file (a model.npz written by `coordinator train`)")
    try:
        with np.load(path, allow_pickle=False) as saved:
            params = Params.from_arrays(saved)
            settings = {name: saved[name].item() for name in MODEL_SETTINGS if name in saved}
            settings["input_divisor"] = float(saved["input_divisor"])  # in every model file, old ones too
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"cannot read model {path}: {error}") from None
    if not shapes_fit(params):
        raise ModelError(f"model {path} has inconsistent array shapes")
    hidden = tuple(w.shape[1] for w in params.weights[:-1])
    config = TrainingConfig(dtype=params.weights[0].dtype.name, hidden=hidden, **settings)
    if config.problems():
        raise ModelError(f"model {path} has unusable settings: {'; '.join(config.problems())}")
    return params, config


def shapes_fit(params: Params) -> bool:
    """Whether each layer's weights are a matrix that takes the previous layer's outputs, with a bias per output."""
    weights, biases = params.weights, params.biases
    if not all(w.ndim == 2 and w.size and b.shape == (w.shape[1],) for w, b in zip(weights, biases)):
        return False
    return all(before.shape[1] == after.shape[0] for before, after in zip(weights, weights[1:]))


def evaluate_model(model_path: Path, data_dir: Path | None) -> float:
    """The test accuracy of a saved model on an MNIST-format folder."""
    params, config = load_model(model_path)
    data = load_dataset(data_dir)
    inputs = params.weights[0].shape[0]
    if inputs != data.test_images.shape[1]:
        raise ModelError(f"model {model_path} takes {inputs} inputs, the images have {data.test_images.shape[1]}")
    products = LocalProducts({"test": model.inputs(data.test_images, config.dtype, config.input_divisor)})
    return Trainer(config, params, products, {"test": data.test_labels}).accuracy("test")
