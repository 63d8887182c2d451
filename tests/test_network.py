"""The network as a setting: which combinations are refused, what dropout changes, and what a model file keeps."""

import json
from dataclasses import replace

import numpy as np
import pytest

from coordinator import run
from common.errors import InputError
from coordinator.config import PRESETS, TrainingConfig, hidden_layers
from coordinator.rundir import ModelError, evaluate_model

TINY = TrainingConfig(train_limit=300, test_limit=100, batch_size=20, epochs=2, dtype="float64")


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(loss="ce"), "loss ce needs output softmax, not sigmoid"),
        (dict(output="softmax"), "loss bce needs output sigmoid, not softmax"),
        (dict(output="linear", loss="ce"), "loss ce needs output softmax, not linear"),
        (dict(dataset="xor", output="softmax", loss="ce"), "softmax needs several outputs; xor has one"),
        (dict(activation="softmax"), "activation must be one of sigmoid, relu, tanh"),
        (dict(output="relu", loss="mse"), "output must be one of sigmoid, softmax, linear"),
        (dict(dropout=1.0), "dropout must be at least 0 and less than 1"),
        (dict(dropout=-0.1), "dropout must be at least 0 and less than 1"),
        (dict(init="he"), "init must be one of scaled, uniform, normal, legacy"),
        (dict(init="uniform", uniform_limit=0.0), "uniform limit must be positive"),
        (dict(init="normal", normal_std=-1.0), "normal std must be positive"),
        (dict(hidden=()), "hidden must list 1..16 layers"),
        (dict(hidden=(8,) * 17), "hidden must list 1..16 layers"),
        (dict(hidden=(64, 0)), "hidden layers must have 1..4096 units each"),
        (dict(hidden=(5000,)), "hidden layers must have 1..4096 units each"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(settings, words):
    assert TrainingConfig(**settings).problems() == [words]


def test_hidden_is_a_tuple_however_it_comes():
    """From the command line as text, from config.json as a list, from the config of a run before deeper networks
    as one int: all the same settings."""
    assert hidden_layers("256,128") == (256, 128) and hidden_layers("128") == (128,)
    assert TrainingConfig(hidden=128) == TrainingConfig(hidden=[128]) == TrainingConfig()
    assert TrainingConfig(hidden=[256, 128]).hidden == (256, 128)
    for text in ("256,x", "", "256,", "-5", "1.5"):
        with pytest.raises(InputError, match="is not a comma list of unit counts"):
            hidden_layers(text)


@pytest.mark.parametrize("output", ["sigmoid", "softmax", "linear"])
def test_squared_error_goes_with_any_output(output):
    assert TrainingConfig(output=output, loss="mse").problems() == []


def test_every_preset_is_a_valid_setting():
    for name, preset in PRESETS.items():
        assert preset.config.problems() == [], name


def _trained(tmp_path, name: str, config: TrainingConfig) -> tuple:
    """(final parameters as arrays, the run's history) of a local run."""
    params = run.train(config, tmp_path / name, None, on_epoch=lambda report: None)
    history = [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
    return params.arrays(), history


def test_dropout_changes_the_training_and_the_seed_changes_the_masks(tmp_path):
    network = replace(TINY, activation="relu", output="softmax", loss="ce", learning_rate=0.1)
    plain, _ = _trained(tmp_path, "plain", network)
    dropped, _ = _trained(tmp_path, "dropped", replace(network, dropout=0.5))
    other_seed, _ = _trained(tmp_path, "other", replace(network, dropout=0.5, seed=1))
    assert max(np.max(np.abs(plain[name] - dropped[name])) for name in plain) > 1e-3
    assert not np.array_equal(dropped["w2"], other_seed["w2"])


def test_evaluation_uses_the_runs_functions_and_no_dropout(tmp_path):
    config = replace(TINY, activation="tanh", output="softmax", loss="ce", learning_rate=0.1, dropout=0.5,
                     test_limit=None)
    _, history = _trained(tmp_path, "run", config)
    model_path = tmp_path / "run" / "model.npz"
    assert evaluate_model(model_path, None) == history[-1]["test_accuracy"]  # the test pass is without dropout
    with np.load(model_path) as saved:
        arrays = dict(saved)
    assert (str(arrays["activation"]), str(arrays["output"]), str(arrays["loss"])) == ("tanh", "softmax", "ce")
    np.savez(tmp_path / "as-relu.npz", **{**arrays, "activation": np.array("relu")})
    assert evaluate_model(tmp_path / "as-relu.npz", None) != history[-1]["test_accuracy"]
    np.savez(tmp_path / "unknown.npz", **{**arrays, "activation": np.array("swish")})
    with pytest.raises(ModelError, match="unusable settings: activation must be one of"):
        evaluate_model(tmp_path / "unknown.npz", None)


def test_a_model_file_from_before_the_network_was_a_setting_evaluates_as_sigmoid(tmp_path):
    _, history = _trained(tmp_path, "run", replace(TINY, test_limit=None))
    with np.load(tmp_path / "run" / "model.npz") as saved:
        old = {name: saved[name] for name in ("w1", "b1", "w2", "b2", "input_divisor")}
    np.savez(tmp_path / "old.npz", **old)
    assert evaluate_model(tmp_path / "old.npz", None) == history[-1]["test_accuracy"]


def test_a_deep_model_file_evaluates_and_inconsistent_layers_are_refused(tmp_path):
    _, history = _trained(tmp_path, "run", replace(TINY, hidden=(32, 16), test_limit=None))
    model_path = tmp_path / "run" / "model.npz"
    assert evaluate_model(model_path, None) == history[-1]["test_accuracy"]
    with np.load(model_path) as saved:
        arrays = dict(saved)
    assert [arrays[f"w{layer}"].shape for layer in (1, 2, 3)] == [(784, 32), (32, 16), (16, 10)]
    np.savez(tmp_path / "bad.npz", **{**arrays, "w3": arrays["w3"][:-1]})
    with pytest.raises(ModelError, match="inconsistent array shapes"):
        evaluate_model(tmp_path / "bad.npz", None)
