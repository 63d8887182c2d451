"""The run directory: config.json, history.jsonl, exposure.npz, workers.json and model.npz."""

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from common.exposure import ExposurePlan
from common.model import Params

MODEL_ARRAYS = ("w1", "b1", "w2", "b2")


class ModelError(ValueError):
    """A model file that cannot be used; the text is one line for the user."""


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class RunDirectory:
    """Writes one run's records as the run goes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "history.jsonl").write_text("")
        except OSError as error:
            raise ModelError(f"cannot write run directory {self.path}: {error.strerror}") from None

    def save_config(self, config, **extra) -> None:
        text = json.dumps({**dataclasses.asdict(config), **extra}, indent=2)
        (self.path / "config.json").write_text(text + "\n")

    def append_history(self, report) -> None:
        with open(self.path / "history.jsonl", "a") as history:
            history.write(json.dumps(dataclasses.asdict(report)) + "\n")

    def save_exposure(self, plan: ExposurePlan, permutation_seed: int) -> None:
        plan.save(self.path / "exposure.npz", permutation_seed)

    def save_workers(self, statuses) -> None:
        """Each worker's final numbers (WorkerStatus), for `coordinator report`."""
        text = json.dumps([dataclasses.asdict(status) for status in statuses], indent=2)
        (self.path / "workers.json").write_text(text + "\n")

    def save_model(self, params: Params, input_divisor: float) -> None:
        np.savez(self.path / "model.npz", **params.arrays(), input_divisor=np.array(input_divisor))


def load_model(path: Path) -> tuple:
    """(Params, input divisor) from a model.npz, refusing anything that is not plain arrays of the right shapes."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in (*MODEL_ARRAYS, "input_divisor")}
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read model {path}: {error}") from None
    params = Params(*(arrays[name] for name in MODEL_ARRAYS))
    inputs, hidden = params.w1.shape if params.w1.ndim == 2 else (0, 0)
    shapes_fit = params.b1.shape == (hidden,) and params.w2.ndim == 2 and params.w2.shape[0] == hidden
    if not (hidden and shapes_fit and params.b2.shape == (params.w2.shape[1],)):
        raise ModelError(f"model {path} has inconsistent array shapes")
    return params, float(arrays["input_divisor"])
