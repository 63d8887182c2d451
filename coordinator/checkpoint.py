"""Checkpoints: everything that continues a run bit-for-bit, kept in the run directory as a hash chain.

Checkpoint n is two files in RUN_DIR/checkpoints: 000007.npz, the parameters and the exposure plan in
force as plain arrays (never a pickle), and 000007.json, the rest: the progress within the epoch, the
history so far, the config, the secret permutations' generator state, `arrays_sha256` (the .npz file's
SHA-256), `prev` (the previous checkpoint's `sha256`, null for the first) and `sha256`, the hash of this
metadata without that field. The .json must be exactly the text `metadata_text` writes: JSON parses some
changed bytes to the same values (the 17th digit of 0.12500277279543626 changed by one reads as the same
float; 1e-05 and 1E-05), and a checkpoint with any byte changed is broken.
Each file is written under a temporary name and renamed, the .json last, so a checkpoint exists once
its .json does and a crash mid-write leaves only a stray .npz behind.

The chain shows that no checkpoint was changed, removed or reordered after the next one was written;
it is not a signature: whoever can write the folder can write a whole new chain.
"""

import dataclasses
import hashlib
import json
import logging
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import model
from common.errors import UserError
from common.exposure import ExposurePlan
from common.model import Params
from coordinator.config import OUTPUT_UNITS, TrainingConfig
from coordinator.files import write_atomically
from coordinator.labels import PrivateLabels
from coordinator.training import Progress, Trainer

log = logging.getLogger("coordinator")
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}  # what the log says for each

FOLDER = "checkpoints"
FIELDS = ("checkpoint", "steps", "epoch", "epoch_step", "cost", "correct", "history", "config", "permutations",
          "masks", "arrays_sha256", "prev", "sha256")
ADDED_FIELDS = {"masks"}  # absent from the checkpoints of earlier versions, which still continue


class CheckpointError(UserError):
    """A checkpoint folder that cannot be used."""


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint."""

    signal = signal.SIGINT  # the request: a Ctrl-C unless said otherwise


@dataclass
class Checkpoint:
    params: Params
    progress: Progress
    history: list  # the finished epochs' reports, as dicts
    config: dict
    permutations: dict | None = None  # the state of the secret permutations' generator; None for a local run
    plan: ExposurePlan | None = None  # who owns which columns and units at this point; None for a local run
    steps: int = 0  # gradient steps of the whole run
    number: int = 0  # position in the chain, from 1
    sha256: str | None = None
    masks: dict | None = None  # the state of the dropout masks' generator; None in a checkpoint from before dropout
    labels: PrivateLabels | None = None  # the labels a label-private run trains on; None otherwise


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metadata_sha256(metadata: dict) -> str:
    """The hash of a checkpoint's metadata without its own `sha256` field."""
    content = {name: value for name, value in metadata.items() if name != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def metadata_text(metadata: dict) -> str:
    """A checkpoint's .json, the one way it is written."""
    return json.dumps(metadata, indent=1) + "\n"


def save(folder: Path, checkpoint: Checkpoint, prev: str | None) -> str:
    """Write a checkpoint as link `checkpoint.number` after the one whose hash is `prev`; returns its hash."""
    folder.mkdir(exist_ok=True)
    arrays_path = folder / f"{checkpoint.number:06d}.npz"
    plan = {} if checkpoint.plan is None else checkpoint.plan.arrays()
    labels = {} if checkpoint.labels is None else checkpoint.labels.arrays()
    write_atomically(arrays_path, lambda file: np.savez(file, **checkpoint.params.arrays(), **plan, **labels))
    progress = checkpoint.progress
    metadata = {
        "checkpoint": checkpoint.number, "steps": checkpoint.steps, "epoch": progress.epoch,
        "epoch_step": progress.step, "cost": progress.cost, "correct": progress.correct,
        "history": checkpoint.history, "config": checkpoint.config, "permutations": checkpoint.permutations,
        "masks": checkpoint.masks, "arrays_sha256": file_sha256(arrays_path), "prev": prev,
    }
    metadata["sha256"] = metadata_sha256(metadata)
    text = metadata_text(metadata)
    write_atomically(arrays_path.with_suffix(".json"), lambda file: file.write(text.encode()))
    return metadata["sha256"]


def read_chain(folder: Path) -> tuple:
    """(metadata of the intact links in order, a one-line reason naming the first broken link or None)."""
    paths = sorted(folder.glob("[0-9]*.json"), key=lambda path: int(path.stem) if path.stem.isdigit() else -1)
    links, prev = [], None
    for expected_number, path in enumerate(paths, start=1):
        metadata, problem = _read_link(path, expected_number, prev)
        if problem:
            return links, f"checkpoint {path.stem} is broken: {problem}"
        links.append(metadata)
        prev = metadata["sha256"]
    return links, None


def _read_link(path: Path, number: int, prev: str | None) -> tuple:
    """(a link's metadata, why it does not belong at this place in the chain or '')."""
    if path.stem != f"{number:06d}":
        return None, f"expected checkpoint {number:06d} here (one is missing)"
    try:
        text = path.read_bytes()
        metadata = json.loads(text)
    except (OSError, ValueError) as error:
        return None, f"cannot read its metadata ({error})"
    if not isinstance(metadata, dict) or not set(FIELDS) - ADDED_FIELDS <= set(metadata) <= set(FIELDS):
        return None, "its metadata does not have the checkpoint fields"
    if metadata["sha256"] != metadata_sha256(metadata) or text != metadata_text(metadata).encode():
        return None, "its metadata was changed"
    if metadata["checkpoint"] != number:
        return None, f"it says it is checkpoint {metadata['checkpoint']}"
    if metadata["prev"] != prev:
        return None, "it does not follow the checkpoint before it"
    arrays_path = path.with_suffix(".npz")
    if not arrays_path.exists() or file_sha256(arrays_path) != metadata["arrays_sha256"]:
        return None, f"{arrays_path.name} is missing or was changed"
    return metadata, ""


def latest(folder: Path) -> Checkpoint:
    """The last checkpoint of an intact chain, or CheckpointError."""
    links, broken = read_chain(folder)
    if broken:
        raise CheckpointError(f"{broken}; see `coordinator verify-chain`")
    if not links:
        raise CheckpointError(f"no checkpoints in {folder}")
    metadata = links[-1]
    arrays_path = folder / f"{metadata['checkpoint']:06d}.npz"
    try:
        with np.load(arrays_path, allow_pickle=False) as saved:
            params = Params.from_arrays(saved)
            plan = ExposurePlan.from_arrays(saved) if "column_owners" in saved else None
            labels = _private_labels(saved, metadata["config"]) if "trained_labels" in saved else None
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot read {arrays_path}: {error}") from None
    progress = Progress(metadata["epoch"], metadata["epoch_step"], metadata["cost"], metadata["correct"])
    return Checkpoint(
        params, progress, metadata["history"], metadata["config"], metadata["permutations"], plan,
        metadata["steps"], metadata["checkpoint"], metadata["sha256"], metadata.get("masks"), labels,
    )


def _private_labels(saved, config: dict) -> PrivateLabels:
    classes = OUTPUT_UNITS[config.get("dataset", "mnist")]
    return PrivateLabels.from_arrays(saved, config["label_privacy"], config.get("label_privacy_stages", 1), classes)


class Checkpointer:
    """Saves a trainer's state as its config says (every so many epochs and steps), and on a stop request."""

    def __init__(self, folder: Path, trainer: Trainer, start: Checkpoint):
        self.folder = folder
        self.trainer = trainer
        self.last = start  # the checkpoint the chain ends with (a blank one before the first)
        self.history = list(start.history)
        self.stop_requested = False

    def after_step(self) -> None:
        """Checkpoint if one is due mid-epoch or a stop was requested; then stop if asked to."""
        every, step = self.trainer.config.checkpoint_every, self.trainer.progress.step
        due = every and step % every == 0 and step < self.trainer.steps_per_epoch  # the epoch's end has its own
        if self.stop_requested or due:
            self.save()
        self._stop_if_requested()

    def after_epoch(self, report) -> None:
        self.history.append(dataclasses.asdict(report))
        config = self.trainer.config
        if report.epoch % config.checkpoint_epochs == 0 or report.epoch == config.epochs or self.stop_requested:
            self.save()
        self._stop_if_requested()

    def save(self) -> None:
        """Add the trainer's current state to the chain, unless the chain already ends with it."""
        trainer = self.trainer
        if trainer.progress == self.last.progress:
            return
        trainer.settle()  # the pending first-layer gradient is applied now instead of with the next product
        backend = trainer.products.state()
        checkpoint = Checkpoint(
            trainer.params.copy(), dataclasses.replace(trainer.progress), list(self.history), self.last.config,
            backend.permutations, backend.plan, trainer.steps_done, self.last.number + 1,
            masks=trainer.masks.bit_generator.state, labels=trainer.private,
        )
        checkpoint.sha256 = save(self.folder, checkpoint, self.last.sha256)
        self.last = checkpoint

    def _stop_if_requested(self) -> None:
        if self.stop_requested:
            raise Interrupted(f"stopped at checkpoint {self.last.number:06d} (step {self.last.steps})")


def has_checkpoints(run_dir: Path) -> bool:
    return any((Path(run_dir) / FOLDER).glob("*.json"))


def resume_point(run_dir: Path) -> tuple:
    """(config, last checkpoint) of a run to continue, or CheckpointError."""
    start = latest(Path(run_dir) / FOLDER)
    try:
        config = TrainingConfig(**start.config)
    except TypeError as error:
        raise CheckpointError(f"the last checkpoint's config does not fit this version: {error}") from None
    if config.label_privacy is not None and start.labels is None:  # a second draw would spend the budget twice
        raise CheckpointError(f"checkpoint {start.number:06d} of a label-private run holds no trained labels; "
                              "they are never drawn again, so this run cannot continue")
    if start.masks is None:  # a run from before dropout existed drew no masks: its generator is as new
        start.masks = model.dropout_masks(config.seed).bit_generator.state
    return config, start


@contextmanager
def stop_between_steps(checkpoints: Checkpointer):
    """Make the first Ctrl-C or SIGTERM a checkpoint and a stop after the current step; a second one stops at once.

    SIGTERM is how `docker stop`, `docker-compose stop` and `kill` ask; the Interrupted that ends the run
    carries the signal, so the exit code can say which (128 + its number, as a shell reports).
    """
    requests = []

    def request_stop(signal_number, frame):
        if checkpoints.stop_requested:
            raise KeyboardInterrupt
        checkpoints.stop_requested = True
        requests.append(signal_number)
        log.warning("%s: checkpointing after this step (again to stop at once)", STOP_SIGNALS[signal_number])

    previous = {number: signal.signal(number, request_stop) for number in STOP_SIGNALS}
    try:
        yield
    except Interrupted as stop:
        stop.signal = requests[0]
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
