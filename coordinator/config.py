"""Training settings: defaults in one place, the presets, and their checks."""

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import model, settings
from common.errors import InputError
from common.data import XOR, Dataset, load_dataset

INPUT_COLUMNS = {"mnist": 28 * 28, "xor": 2}  # an MNIST image's pixels; the XOR rows' two bits
OUTPUT_UNITS = {"mnist": 10, "xor": 1}  # one per digit; one for the two-class XOR rows
REKEY_NAMES = {"every-step": 1, "every-epoch": None}  # --rekey by name: the steps between re-keys


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides a run's numbers; saved as config.json in the run directory."""

    dataset: str = "mnist"  # "mnist" (an MNIST-format folder) or "xor" (the seed's four rows)
    data: str | None = None  # folder of IDX files; None is the embedded MNIST
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 0.5  # with bce: 94% after the first epoch, 98% after 20 (MSE at lr 3 gave 74% and 97.9%)
    seed: int = 0
    hidden: tuple = (128,)  # units of each hidden layer, the first layer's outputs first; an int is one layer
    activation: str = "sigmoid"  # of the hidden units (model.ACTIVATIONS)
    output: str = "sigmoid"  # of the output layer (model.OUTPUTS)
    loss: str = "bce"  # model.LOSSES; bce needs sigmoid outputs, ce (softmax cross-entropy) softmax ones
    dropout: float = 0.0  # the probability that a hidden unit is dropped in a training step
    dtype: str = "float32"
    wire: str = "exact"  # how errors and partial products cross the network (model.WIRE_FORMATS)
    rekey: str = "50"  # how long workers keep their first-layer rows: every-step, every-epoch or N steps (see README)
    init: str = "scaled"
    uniform_limit: float = model.UNIFORM_LIMIT  # init "uniform" draws weights in [-limit, limit)
    normal_std: float = model.NORMAL_STD  # init "normal" draws them with this standard deviation
    input_divisor: float = 255.0  # 255 scales pixels to [0, 1]; 1 keeps them raw
    train_limit: int | None = None
    test_limit: int | None = None
    chunk_rows: int = settings.MAX_CHUNK_ROWS
    report_every: int = 1  # print every this many epochs
    checkpoint_epochs: int = 1  # checkpoint after every this many epochs (and after the last)
    checkpoint_every: int = 0  # also checkpoint every this many steps within an epoch; 0: never mid-epoch
    label_privacy: float | None = None  # eps: train on labels drawn once by randomized response (coordinator.labels)
    label_privacy_stages: int = 1  # 1: plain randomized response; 2: RR with a prior, in two stages (LP-2ST)

    def __post_init__(self):
        # config.json holds a list, and runs from before deeper networks one int: both become the tuple
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        object.__setattr__(self, "hidden", hidden)

    def load_data(self) -> Dataset:
        """The run's images and labels, cut to the configured limits."""
        if self.dataset == "xor":
            return XOR
        return load_dataset(Path(self.data) if self.data else None).cut(self.train_limit, self.test_limit)

    def layer_sizes(self, data: Dataset) -> tuple:
        """(inputs, hidden 1, ..., hidden n, outputs) of the network for this data set."""
        return data.train_images.shape[1], *self.hidden, OUTPUT_UNITS[self.dataset]

    def with_overrides(self, **overrides) -> "TrainingConfig":
        """This config with the given fields replaced; None means "keep"."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def problems(self) -> list:
        """What is wrong with these settings, as one-line texts."""
        # bce and ce hold only after the output function whose slope they cancel; mse after any
        loss_output = model.LOSSES[self.loss].output if self.loss in model.LOSSES else None
        checks = [
            (self.dataset in ("mnist", "xor"), f"unknown dataset {self.dataset!r}"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.learning_rate > 0, "learning rate must be positive"),
            (1 <= len(self.hidden) <= settings.MAX_HIDDEN_LAYERS,
             f"hidden must list 1..{settings.MAX_HIDDEN_LAYERS} layers"),
            (all(type(units) is int and 1 <= units <= settings.MAX_HIDDEN_UNITS for units in self.hidden),
             f"hidden layers must have 1..{settings.MAX_HIDDEN_UNITS} units each"),
            (self.activation in model.ACTIVATIONS, f"activation must be one of {', '.join(model.ACTIVATIONS)}"),
            (self.output in model.OUTPUTS, f"output must be one of {', '.join(model.OUTPUTS)}"),
            (self.loss in model.LOSSES, f"loss must be one of {', '.join(model.LOSSES)}"),
            (loss_output in (None, self.output), f"loss {self.loss} needs output {loss_output}, not {self.output}"),
            (self.output != "softmax" or OUTPUT_UNITS.get(self.dataset) != 1,
             f"softmax needs several outputs; {self.dataset} has one"),
            (0 <= self.dropout < 1, "dropout must be at least 0 and less than 1"),
            (self.dtype in ("float32", "float64"), "dtype must be float32 or float64"),
            (self.wire in model.WIRE_FORMATS, f"wire must be one of {', '.join(model.WIRE_FORMATS)}"),
            (self.wire == "exact" or self.dtype == "float32", "a narrower --wire needs a float32 run"),
            (self.rekey_steps != 0, "rekey must be every-step, every-epoch or a number of steps of at least 1"),
            # a batch of several chunks sums their gradients before the step; kept rows step with each error they get
            (self.rekey_steps in (0, 1) or self.batch_size <= self.chunk_rows,
             f"kept rows (rekey {self.rekey}) step once a chunk, so a batch must be at most {self.chunk_rows} images "
             "(chunk rows); use rekey every-step, or a smaller batch"),
            (self.init in model.INITIALISATIONS, f"init must be one of {', '.join(model.INITIALISATIONS)}"),
            (self.uniform_limit > 0, "uniform limit must be positive"),
            (self.normal_std > 0, "normal std must be positive"),
            (self.input_divisor > 0, "input divisor must be positive"),
            (self.train_limit is None or self.train_limit >= 1, "train limit must be at least 1"),
            (self.test_limit is None or self.test_limit >= 0, "test limit must be at least 0"),
            (1 <= self.chunk_rows <= settings.MAX_CHUNK_ROWS, f"chunk rows must be 1..{settings.MAX_CHUNK_ROWS}"),
            (self.report_every >= 1, "report every must be at least 1"),
            (self.checkpoint_epochs >= 1, "checkpoint epochs must be at least 1"),
            (self.checkpoint_every >= 0, "checkpoint every must be at least 0"),
            (self.label_privacy is None or (math.isfinite(self.label_privacy) and self.label_privacy > 0),
             "label privacy (eps) must be a positive number"),
            (self.label_privacy_stages in (1, 2), "label privacy stages must be 1 or 2"),
            (self.label_privacy is not None or self.label_privacy_stages == 1,
             "label privacy stages need --label-privacy EPS"),
            (self.label_privacy is None or OUTPUT_UNITS.get(self.dataset, 0) > 1,
             f"label privacy needs several classes; {self.dataset} has one output"),
            (self.label_privacy is None or self.label_privacy_stages == 1 or self.epochs >= 2,
             "two label privacy stages need at least 2 epochs"),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def rekey_steps(self) -> int | None:
        """Steps between re-keys of the workers' kept rows: 1 sends the rows every step, None every epoch; 0 if
        `rekey` is not valid."""
        if self.rekey in REKEY_NAMES:
            return REKEY_NAMES[self.rekey]
        return int(self.rekey) if self.rekey.isdigit() and int(self.rekey) >= 1 else 0

    def most_slots(self) -> int:
        """The most worker slots the network splits into: each slot needs an input column and a unit of every
        hidden layer."""
        return min(INPUT_COLUMNS[self.dataset], *self.hidden)


def hidden_layers(text: str) -> tuple:
    """`--hidden` as the units of each hidden layer: "256,128" -> (256, 128), or InputError."""
    parts = text.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise InputError(f"--hidden {text!r} is not a comma list of unit counts, such as 128 or 256,128")
    return tuple(int(part) for part in parts)


@dataclass(frozen=True)
class SettingOption:
    """A training setting as `coordinator train` takes it: the TrainingConfig field it sets, the option's help, and
    the longer account docs/TRAINING.md gives. Typer's option, its SCATTERPROP_ variable, the CLI reference and
    that table all come from here (coordinator.cli, tests/cli_reference.py)."""

    field: str
    help: str
    detail: str = ""  # docs/TRAINING.md's words, where there is more to say than the help
    name: str | None = None  # the option's name, where it is not the field's (--lr)
    takes: type | None = None  # what the option takes, where it is not the field's type
    to_field: Callable | None = None  # the option's value -> the field's, where they differ
    default_text: str | None = None  # how the default reads, where the field's value would not say it

    @property
    def option(self) -> str:
        return self.name or self.field

    def shown_default(self) -> str:
        """The default preset's value, as a user would write it ("" where there is none)."""
        if self.default_text is not None:
            return self.default_text
        value = getattr(TrainingConfig(), self.field)
        if value is None:
            return ""
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    def field_value(self, value):
        return value if self.to_field is None else self.to_field(value)

    @property
    def option_type(self) -> type:
        """What the option takes: its own type, else the field's without None."""
        if self.takes is not None:
            return self.takes
        field_type = {field.name: field.type for field in dataclasses.fields(TrainingConfig)}[self.field]
        return next((member for member in typing.get_args(field_type) if member is not type(None)), field_type)


SETTING_OPTIONS = (
    SettingOption("epochs", "Passes over the training images."),
    SettingOption("batch_size", "Images per gradient step.", "Batches over 4096 rows are sent in chunks whose "
                  "gradients are summed (with kept rows they are refused: see `--rekey`)."),
    SettingOption("learning_rate", "Learning rate.", "Of plain gradient descent, without momentum.", name="lr"),
    SettingOption("seed", "Seed of the initial weights, dropout masks, batch order and exposure plan."),
    SettingOption("hidden", "Units of each hidden layer, first layer first: 128 (784-128-10), or a comma list such "
                  "as 256,128.", "Up to 16 hidden layers of up to 4096 units; see \"Networks\" below.", takes=str,
                  to_field=hidden_layers),
    SettingOption("activation", "Hidden units' function: sigmoid, relu or tanh."),
    SettingOption("output", "Output layer's function: sigmoid, softmax or linear."),
    SettingOption("loss", "mse (any output), bce (binary cross-entropy, sigmoid output) or ce (cross-entropy, "
                  "softmax output).", "The mse cost is sum((a2 - y)^2) / 2m. Softmax needs several outputs, so "
                  "not `--preset xor`. At lr 3, MSE (the earlier default) reached 74% after the first epoch and "
                  "97.9% after 20; BCE at lr 0.5 reaches 94% and 98.1%, at lr 1 95% and 97.7%."),
    SettingOption("dropout", "Probability that a hidden unit is dropped in a training step (inverted: kept ones "
                  "scaled up).", "Kept units are multiplied by 1/(1-P), so nothing changes at evaluation, which "
                  "drops nothing."),
    SettingOption("init", "Initial weights: scaled (randn / sqrt(fan-in)), uniform, normal, or legacy (the seed "
                  "notebook's).", "Legacy is randn * 0.01 from numpy's global generator, for `--preset seed` and "
                  "`xor`; biases start at 0."),
    SettingOption("uniform_limit", "--init uniform draws in [-limit, limit)."),
    SettingOption("normal_std", "--init normal draws with this standard deviation."),
    SettingOption("dtype", "float32 or float64."),
    SettingOption("wire", "How errors and partial products cross the network: exact (the run's dtype), or for a "
                  "float32 run float16 or bfloat16 (half the bytes).", "Workers still compute in float32, and the "
                  "weights and gradients stay float32; see \"Narrower numbers on the wire\" below."),
    SettingOption("rekey", "How long workers keep their first-layer rows and step them themselves: every-step (the "
                  "rows travel every step), every-epoch, or N steps (see Kept rows in docs/TRAINING.md).",
                  "Between re-keys a step sends only d1 and the row numbers and gets back only the z1 partial; see "
                  "\"Kept rows\" below."),
    SettingOption("label_privacy", "eps: train on labels replaced once by randomized response, so that each is "
                  "eps-label-DP (see What each worker sees in the README).", default_text="off"),
    SettingOption("label_privacy_stages", "1: randomized response; 2: a half first, then the rest by RR with the "
                  "model as prior (LP-2ST)."),
    SettingOption("input_divisor", "Scale pixels to [0, 1] (--no-scale keeps 0-255).", name="scale", takes=bool,
                  to_field=lambda scale: 255.0 if scale else 1.0, default_text="scale"),
    SettingOption("data", "Folder of MNIST-format IDX files (default: embedded MNIST).", "Raw or gzipped "
                  "(Fashion-MNIST works too).", takes=Path, to_field=str,
                  default_text="embedded MNIST"),
    SettingOption("train_limit", "Use only the first N training images.", default_text="all"),
    SettingOption("test_limit", "Use only the first N test images.", default_text="all"),
    SettingOption("report_every", "Print every N epochs."),
    SettingOption("checkpoint_epochs", "Checkpoint after every N epochs."),
    SettingOption("checkpoint_every", "Checkpoint every N steps within an epoch too (0: never)."),
)


@dataclass(frozen=True)
class Preset:
    config: TrainingConfig
    workers: int = 7  # the default cluster's nodes A to G; used when the command line gives no count
    later_layers: str = "coordinator"  # who computes the layers after the first, unless --later-layers says


PRESETS = {
    "default": Preset(TrainingConfig()),
    # The seed notebook: raw pixels, full batch, float64, and its initialisation.
    "seed": Preset(TrainingConfig(
        input_divisor=1.0, batch_size=60_000, learning_rate=0.05, loss="mse", dtype="float64", init="legacy", seed=402,
        rekey="every-step",  # a full batch is many chunks, whose gradients are summed before the step
    ), later_layers="workers"),  # the seed's design: every product on the workers
    # The seed's 2-3-1 XOR network; its lr 10 went with a cost divided by 2, ours divides by the 4 rows.
    # Its two input columns go to two workers, as in the seed.
    "xor": Preset(TrainingConfig(
        dataset="xor", hidden=(3,), epochs=5000, batch_size=4, learning_rate=20.0, loss="mse", dtype="float64",
        init="legacy", seed=42, input_divisor=1.0, report_every=500, checkpoint_epochs=500,
    ), workers=2),
    # The dropout notebook: 784-100-10 ReLU, linear outputs and squared error, learning from 1,000 images.
    "relu-dropout": Preset(TrainingConfig(
        hidden=(100,), activation="relu", output="linear", loss="mse", dropout=0.5, init="uniform", batch_size=100,
        learning_rate=0.1, train_limit=1000, test_limit=1000, epochs=300, report_every=10, checkpoint_epochs=50,
    )),
    # The tanh-and-softmax notebook's network in the same setting: 784-100-10 tanh, softmax outputs, cross-entropy.
    "tanh-softmax": Preset(TrainingConfig(
        hidden=(100,), activation="tanh", output="softmax", loss="ce", dropout=0.5, init="uniform", batch_size=100,
        learning_rate=0.02, train_limit=1000, test_limit=1000, epochs=300, report_every=10, checkpoint_epochs=50,
    )),
}
