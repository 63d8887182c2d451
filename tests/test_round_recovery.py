"""A worker lost at every moment of a run, in every design: the weights are those of one process.

The real cluster, scheduler, products backend and worker state, over an in-memory transport (tests/memory_cluster.py):
the loss is tried at each frame a worker is sent, before it computes and after it has answered, so it falls before
a round, within it, after an answer, and in the middle of a shard transfer, a re-key and a later layer's forward.
"""

import itertools

import numpy as np
import pytest

from common import model, settings
from common.data import Dataset
from common.exposure import ExposurePlan
from coordinator.config import TrainingConfig
from coordinator.training import LocalProducts, Trainer
from tests.memory_cluster import Death, MemoryTransport, cluster_products

WORKERS = ["A", "B", "C"]
CONFIG = TrainingConfig(epochs=2, batch_size=8, hidden=(6, 4), dtype="float64", test_limit=8, seed=3)
DESIGNS = {  # name -> (config, later layers on the coordinator)
    "rows every step, later layers on workers": (CONFIG.with_overrides(rekey="every-step"), False),
    "rows kept 2 steps, later layers on workers": (CONFIG.with_overrides(rekey="2"), False),
    "rows kept 2 steps, later layers here": (CONFIG.with_overrides(rekey="2"), True),
}


@pytest.fixture(autouse=True)
def losses_seen_at_once(monkeypatch):
    """A loss here is a deregistration already queued, not a silence that others may share: nothing to settle."""
    monkeypatch.setattr(settings, "LOSS_SETTLE", 0.0)


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 28 * 28), dtype=np.uint8)
    return Dataset(images[:24], rng.integers(0, 10, 24), images[24:], rng.integers(0, 10, 8))


def _trained(config, data, products) -> model.Params:
    params = model.initial_params(config.layer_sizes(data), config.init, config.seed, config.dtype)
    trainer = Trainer(config, params, products, data.labels())
    trainer.train(on_epoch=lambda report: None)
    return params


def _distributed(config, data, later_layers_here, names, deaths=()) -> tuple:
    """(the trained params, the transport) of a run over the in-memory cluster."""
    transport = MemoryTransport(names, deaths)
    plan = ExposurePlan.random(28 * 28, config.hidden, len(WORKERS), config.seed)
    products = cluster_products(transport, config, data, plan, len(WORKERS), later_layers_here)
    return _trained(config, data, products), transport


def _difference(first: model.Params, second: model.Params) -> float:
    arrays = zip(first.weights + first.biases, second.weights + second.biases)
    return max(float(np.max(np.abs(a - b))) for a, b in arrays)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("standby", [False, True], ids=["survivors take over", "a standby takes over"])
def test_one_loss_at_any_frame_leaves_the_one_process_weights(data, design, standby):
    config, later_layers_here = DESIGNS[design]
    local = _trained(config, data, LocalProducts({"train": data.train_images / 255.0, "test": data.test_images / 255.0}))
    names = WORKERS + ["spare"] * standby
    undisturbed, transport = _distributed(config, data, later_layers_here, names)
    assert _difference(undisturbed, local) < 1e-12
    frames = transport.frames[b"B"]
    assert frames > 10  # shards, the rounds of both passes, re-keys: the script below tries each of them
    for frame, answered in itertools.product(range(1, frames + 1), [False, True]):
        params, lossy = _distributed(config, data, later_layers_here, names, [Death("B", frame, answered)])
        assert b"B" in lossy.dead
        assert _difference(params, local) < 1e-12, f"B lost at frame {frame} ({'after' if answered else 'before'})"
        if standby:
            assert lossy.frames[b"spare"] > 0


@pytest.mark.parametrize("design", DESIGNS)
def test_a_second_loss_during_the_recovery_from_the_first(data, design):
    """B lost, then C lost at each of the frames that follow (its part of the recovery: new columns, re-sent
    forwards, the round again); A alone finishes the run."""
    config, later_layers_here = DESIGNS[design]
    local = _trained(config, data, LocalProducts({"train": data.train_images / 255.0, "test": data.test_images / 255.0}))
    first = Death("B", 12, answered=False)
    _, after_first = _distributed(config, data, later_layers_here, WORKERS, [first])
    reached = after_first.frames[b"C"]
    for frame in range(1, reached + 1, max(1, reached // 40)):
        params, lossy = _distributed(config, data, later_layers_here, WORKERS, [first, Death("C", frame, False)])
        assert lossy.dead == {b"B", b"C"}
        assert _difference(params, local) < 1e-12, f"C lost at frame {frame}"
