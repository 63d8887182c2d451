"""The distributed run gives the one-process run's numbers: same seed, float64, weights to 1e-9."""

import json

import pytest

from tests.conftest import LOOPBACK_ANY_PORT, load_model, max_difference

pytestmark = pytest.mark.slow  # every test here starts real processes

TOLERANCE = 1e-9
# 2,000 images in batches of 20 for 2 epochs: 200 gradient steps.
SMALL_RUN = ("--dtype", "float64", "--train-limit", "2000", "--test-limit", "500", "--batch-size", "20",
             "--epochs", "2", "--seed", "7")
# One batch of 5,000 rows is sent in two chunks whose gradients are summed (with the rows, which kept ones cannot).
CHUNKED_RUN = ("--dtype", "float64", "--train-limit", "5000", "--test-limit", "100", "--batch-size", "5000",
               "--epochs", "3", "--lr", "2", "--rekey", "every-step")
# The other hidden activations and output functions, dropout, and two hidden layers, on 300 images in batches of 20:
# 30 steps each.
TINY_RUN = ("--dtype", "float64", "--train-limit", "300", "--test-limit", "100", "--batch-size", "20", "--epochs", "2",
            "--seed", "5")
NETWORKS = {
    "relu-softmax-ce-dropout": ("--activation", "relu", "--output", "softmax", "--loss", "ce", "--dropout", "0.3"),
    "tanh-linear-mse": ("--activation", "tanh", "--output", "linear", "--loss", "mse", "--lr", "0.01"),
    "784-64-32-10-relu-softmax-ce-dropout": ("--hidden", "64,32", "--activation", "relu", "--output", "softmax",
                                             "--loss", "ce", "--dropout", "0.3"),
}


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    return {}


def _local(train_run, cache: dict, settings: tuple) -> dict:
    if settings not in cache:
        _, run_dir = train_run("--local", *settings)
        cache[settings] = (load_model(run_dir), (run_dir / "history.jsonl").read_text())
    return cache[settings]


@pytest.mark.parametrize("workers", [1, 2, 7])
def test_distributed_matches_local(train_run, local_models, workers):
    local_model, local_history = _local(train_run, local_models, SMALL_RUN)
    done, run_dir = train_run("--spawn", workers, "--bind", LOOPBACK_ANY_PORT, *SMALL_RUN)
    _assert_same_run(run_dir, local_model, local_history)
    assert done.stdout.count("epoch ") == 2


@pytest.mark.parametrize("workers", [1, 2, 7])
@pytest.mark.parametrize("network", NETWORKS)
def test_each_network_matches_local(train_run, local_models, network, workers):
    """The workers that compute the later layers get the activations already masked by the coordinator."""
    settings = (*TINY_RUN, *NETWORKS[network])
    local_model, local_history = _local(train_run, local_models, settings)
    _, run_dir = train_run("--spawn", workers, "--bind", LOOPBACK_ANY_PORT, "--later-layers", "workers", *settings)
    _assert_same_run(run_dir, local_model, local_history)


@pytest.mark.parametrize("network", ["relu-softmax-ce-dropout", "784-64-32-10-relu-softmax-ce-dropout"])
def test_dropout_with_the_later_layers_on_the_coordinator_matches_local(train_run, local_models, network):
    settings = (*TINY_RUN, *NETWORKS[network])
    local_model, _ = _local(train_run, local_models, settings)
    _, run_dir = train_run("--spawn", 2, "--bind", LOOPBACK_ANY_PORT, "--later-layers", "coordinator", *settings)
    assert max_difference(load_model(run_dir), local_model) < TOLERANCE


def _assert_same_run(run_dir, local_model: dict, local_history: str) -> None:
    assert max_difference(load_model(run_dir), local_model) < TOLERANCE
    our_lines, their_lines = (run_dir / "history.jsonl").read_text().splitlines(), local_history.splitlines()
    for ours, theirs in zip(our_lines, their_lines, strict=True):
        ours, theirs = json.loads(ours), json.loads(theirs)
        assert ours["test_accuracy"] == theirs["test_accuracy"]
        assert ours["cost"] == pytest.approx(theirs["cost"], rel=1e-9)


def test_later_layers_on_the_workers_matches_local(train_run, local_models):
    """The seed's design, every product on the workers (the default is the later layers on the coordinator)."""
    local_model, _ = _local(train_run, local_models, SMALL_RUN)
    _, run_dir = train_run("--spawn", 2, "--bind", LOOPBACK_ANY_PORT, "--later-layers", "workers", *SMALL_RUN)
    assert max_difference(load_model(run_dir), local_model) < TOLERANCE


@pytest.mark.parametrize("workers, rekey", [(7, "every-epoch"), (2, "13")])
def test_kept_rows_match_local(train_run, local_models, workers, rekey):
    local_model, _ = _local(train_run, local_models, SMALL_RUN)
    _, run_dir = train_run("--spawn", workers, "--bind", LOOPBACK_ANY_PORT, "--rekey", rekey, *SMALL_RUN)
    assert max_difference(load_model(run_dir), local_model) < TOLERANCE


def test_chunked_full_batch_matches_local(train_run, local_models):
    local_model, _ = _local(train_run, local_models, CHUNKED_RUN)
    _, run_dir = train_run("--spawn", 2, "--bind", LOOPBACK_ANY_PORT, *CHUNKED_RUN)
    assert max_difference(load_model(run_dir), local_model) < TOLERANCE


@pytest.mark.parametrize(
    "settings, seed", [(SMALL_RUN, 7), *((TINY_RUN + network, 5) for network in NETWORKS.values())],
    ids=["small", *NETWORKS],
)
def test_training_actually_moves_the_weights(train_run, local_models, settings, seed):
    """Guards the comparisons above against two runs that agree because nothing happened."""
    from common.model import initial_params

    local_model, _ = _local(train_run, local_models, settings)
    hidden = settings[settings.index("--hidden") + 1].split(",") if "--hidden" in settings else ["128"]
    initial = initial_params((784, *map(int, hidden), 10), "scaled", seed, "float64").arrays()
    assert max_difference(local_model, initial) > 1e-2


@pytest.mark.parametrize("stages", ["1", "2"])
def test_label_privacy_matches_local(train_run, local_models, stages):
    """The labels are drawn, and in two stages drawn again from the model's outputs, on the coordinator alone."""
    settings = (*SMALL_RUN, "--label-privacy", "2", "--label-privacy-stages", stages)
    local_model, local_history = _local(train_run, local_models, settings)
    _, run_dir = train_run("--spawn", 2, "--bind", LOOPBACK_ANY_PORT, *settings)
    _assert_same_run(run_dir, local_model, local_history)
    assert max_difference(local_model, _local(train_run, local_models, SMALL_RUN)[0]) > 1e-2  # the labels differ
