"""What a worker is sent: only its own columns and units, never a label, weights only ever in shuffled column order.

A real coordinator and two real workers talk over loopback TCP in this process (in threads), so both
what the coordinator meant to send and what each worker received can be recorded and compared.
"""

import dataclasses
import logging
import threading
from concurrent.futures import Future
from contextlib import contextmanager

import numpy as np
import pytest

from common.exposure import ExposurePlan
from common.protocol import (
    FirstLayer, KeptFirstLayer, LaterBackward, LaterForward, ReturnRows, Shard, Stop, Welcome,
)
from coordinator import run
from coordinator.cluster_options import ClusterOptions
from coordinator.config import TrainingConfig
from coordinator.distributed import ClusterProducts
from worker.connection import CoordinatorLink
from tests.conftest import LOOPBACK_ANY_PORT
from worker.serve import serve

# Two hidden layers, so that every later layer's split is seen: layers 2 and 3 each have owners of their own.
# The first layer's rows travel every step here; the kept rows of --rekey have their own test below.
CONFIG = TrainingConfig(epochs=2, batch_size=50, train_limit=300, test_limit=100, seed=3, hidden=(64, 32),
                        rekey="every-step")
WORKERS = 2


class RecordingLink(CoordinatorLink):
    def __init__(self, *args):
        super().__init__(*args)
        self.received = []

    def receive(self):
        message = super().receive()
        self.received.append(message)
        return message


class BoundAddress(logging.Handler):
    """The address the coordinator bound, caught from the line it logs before it waits for its workers."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.address = Future()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting for "):  # "waiting for N workers on ADDRESS"
            self.address.set_result(record.args[-1])


@contextmanager
def _bound_address():
    """A BoundAddress listening to the coordinator's log (at INFO, which pytest's root logger would drop)."""
    coordinator_log, bound = logging.getLogger("coordinator"), BoundAddress()
    level = coordinator_log.level
    coordinator_log.setLevel(logging.INFO)
    coordinator_log.addHandler(bound)
    try:
        yield bound
    finally:
        coordinator_log.removeHandler(bound)
        coordinator_log.setLevel(level)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(what each worker received by slot, the natural-order operands the coordinator split up, run dir)."""
    return _recorded_run(tmp_path_factory.mktemp("exposure"), later_layers_here=False)


# ClusterProducts' methods
RECORDED = ("_first_layer_round", "_kept_round", "_new_period", "later_forward", "later_backward")


def _recorded_run(run_dir, later_layers_here: bool, config: TrainingConfig = CONFIG) -> tuple:
    sent = {"first_layer": [], "kept_first_layer": [], "kept_weights": [], "later_forward": [], "later_backward": []}
    originals = {name: getattr(ClusterProducts, name) for name in RECORDED}

    def first_layer_round(self, weights, split, rows, step):
        sent["first_layer"].append((None if rows is None else weights.copy(), None if step is None else step[1]))
        return originals["_first_layer_round"](self, weights, split, rows, step)

    def kept_round(self, split, rows, step):
        sent["kept_first_layer"].append(None if step is None else step[1])
        return originals["_kept_round"](self, split, rows, step)

    def new_period(self, weights):
        sent["kept_weights"].append(weights.copy())
        return originals["_new_period"](self, weights)

    def later_forward(self, layer, activations, weights):
        sent["later_forward"].append((layer, activations, weights.copy()))
        return originals["later_forward"](self, layer, activations, weights)

    def later_backward(self, layer, error):
        sent["later_backward"].append((layer, error))
        return originals["later_backward"](self, layer, error)

    for name, recording in zip(RECORDED, (first_layer_round, kept_round, new_period, later_forward, later_backward)):
        setattr(ClusterProducts, name, recording)
    links = []

    def work(bound: BoundAddress, name: str) -> None:
        links.append(RecordingLink(bound.address.result(timeout=60), name))
        serve(links[-1])

    try:
        with _bound_address() as bound:
            threads = [threading.Thread(target=work, args=(bound, name), daemon=True) for name in "AB"]
            for thread in threads:
                thread.start()
            options = ClusterOptions(LOOPBACK_ANY_PORT, WORKERS, False, 30, later_layers_here=later_layers_here)
            run.train(config, run_dir, options, on_epoch=lambda report: None)
        for thread in threads:
            thread.join(30)
    finally:
        for name, original in originals.items():
            setattr(ClusterProducts, name, original)
        for link in links:
            link.close()
    by_slot = {link.received[0].slot: link.received for link in links}
    return by_slot, sent, run_dir


def _shuffle_of(shuffled: np.ndarray, natural: np.ndarray) -> np.ndarray:
    """p such that shuffled == natural[:, p], found by matching whole columns; it must not be the identity."""
    shuffle = np.array([np.flatnonzero((natural == column[:, None]).all(axis=0))[0] for column in shuffled.T])
    assert sorted(shuffle) == list(range(natural.shape[1])) and not np.array_equal(shuffle, np.arange(len(shuffle)))
    return shuffle


def test_workers_receive_only_their_own_columns(recorded):
    by_slot, _, run_dir = recorded
    data = CONFIG.load_data()
    owners = np.load(run_dir / "exposure.npz")["column_owners"]
    for slot, messages in by_slot.items():
        chunks = [m for m in messages if isinstance(m, Shard)]
        shards = {split: np.concatenate([m.images for m in chunks if m.split == split]) for split in ("train", "test")}
        columns = np.flatnonzero(owners == slot)
        assert len(columns) == 392
        assert np.array_equal(shards["train"], data.train_images[:, columns])
        assert np.array_equal(shards["test"], data.test_images[:, columns])


def test_workers_never_receive_labels_or_anything_else(recorded):
    by_slot, _, _ = recorded
    allowed = (Welcome, Shard, FirstLayer, LaterForward, LaterBackward, Stop)
    for messages in by_slot.values():
        assert all(isinstance(m, allowed) for m in messages)
        assert isinstance(messages[-1], Stop)
        for message in messages:
            arrays = [v for v in vars(message).values() if isinstance(v, np.ndarray)]
            uint8 = [a for a in arrays if a.dtype == np.uint8]
            assert not uint8 or isinstance(message, Shard)  # labels are uint8: only pixels ever are


def test_weight_rows_always_arrive_freshly_shuffled(recorded):
    by_slot, sent, run_dir = recorded
    owners = np.load(run_dir / "exposure.npz")["column_owners"]
    for slot, messages in by_slot.items():
        columns = np.flatnonzero(owners == slot)
        received = [m for m in messages if isinstance(m, FirstLayer)]
        assert len(received) == len(sent["first_layer"]) > 10
        seen = set()
        for message, (weights, error) in zip(received, sent["first_layer"]):
            if message.weights is None:
                continue
            shuffle = _shuffle_of(message.weights, weights[columns])
            if error is not None:  # the hidden error travels in the same shuffled order
                assert np.array_equal(message.error, error[:, shuffle])
            seen.add(shuffle.tobytes())
        assert len(seen) == sum(m.weights is not None for m in received)  # a fresh shuffle every time


def test_each_later_layer_sends_only_its_own_units_rows_freshly_shuffled(recorded):
    """Layers 2 and 3: a worker gets the activations and weight rows of its own units of the layer's input (each
    hidden layer split apart), the rows under a fresh shuffle each time, and the layer's error in that same order."""
    by_slot, sent, run_dir = recorded
    with np.load(run_dir / "exposure.npz") as saved:
        owners = {2: saved["unit_owners1"], 3: saved["unit_owners2"]}
    assert [len(owners[layer]) for layer in (2, 3)] == [64, 32]
    for slot, messages in by_slot.items():
        units = {layer: np.flatnonzero(layer_owners == slot) for layer, layer_owners in owners.items()}
        later = [m for m in messages if isinstance(m, (LaterForward, LaterBackward))]
        forwards = [m for m in later if isinstance(m, LaterForward)]
        assert [m.layer for m in forwards] == [layer for layer, _, _ in sent["later_forward"]]
        assert {m.layer for m in forwards} == {2, 3}
        shuffles, seen = {}, {2: set(), 3: set()}
        forwards_sent, backwards = iter(sent["later_forward"]), iter(sent["later_backward"])
        for message in later:
            if isinstance(message, LaterForward):
                layer, activations, weights = next(forwards_sent)
                assert message.layer == layer
                assert np.array_equal(message.activations, activations[:, units[layer]])  # only its own units
                shuffles[layer] = _shuffle_of(message.weights, weights[units[layer]])
                seen[layer].add(shuffles[layer].tobytes())
            else:
                layer, error = next(backwards)
                assert message.layer == layer
                assert np.array_equal(message.error, error[:, shuffles[layer]])  # the layer's own last shuffle
        assert next(backwards, None) is None
        for layer in (2, 3):
            received = sum(m.layer == layer for m in forwards)
            assert received > 10 and len(seen[layer]) > received // 2  # fresh each time (10! or 32! orders)


def test_with_the_later_layers_on_the_coordinator_workers_get_only_first_layer_requests(tmp_path):
    by_slot, sent, _ = _recorded_run(tmp_path, later_layers_here=True)
    for messages in by_slot.values():
        assert {type(m) for m in messages} == {Welcome, Shard, FirstLayer, Stop}
        assert len([m for m in messages if isinstance(m, FirstLayer)]) == len(sent["first_layer"]) > 10
    assert sent["later_forward"] == sent["later_backward"] == []


def test_the_workers_of_a_round_share_its_fresh_shuffle(recorded):
    """One secret order per round hides as much as one per worker (the error is the same for all of them),
    and lets the coordinator shuffle and un-shuffle once per round."""
    by_slot, sent, run_dir = recorded
    owners = np.load(run_dir / "exposure.npz")["column_owners"]
    shuffles = {
        slot: [_shuffle_of(m.weights, weights[np.flatnonzero(owners == slot)])
               for m, (weights, _) in zip([m for m in messages if isinstance(m, FirstLayer)], sent["first_layer"])
               if m.weights is not None]
        for slot, messages in by_slot.items()
    }
    first, second = shuffles.values()
    assert len(first) > 10 and all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_kept_rows_arrive_freshly_shuffled_once_a_re_key_and_the_errors_follow_their_order(tmp_path):
    """With --rekey every-epoch, a worker gets its W1 rows once a period, under a fresh shuffle shared by the
    round's workers; every error of the period comes in that same order, and no gradient ever goes back."""
    config = dataclasses.replace(CONFIG, rekey="every-epoch")
    by_slot, sent, run_dir = _recorded_run(tmp_path, later_layers_here=True, config=config)
    owners = np.load(run_dir / "exposure.npz")["column_owners"]
    shuffles = {}
    for slot, messages in by_slot.items():
        assert {type(m) for m in messages} == {Welcome, Shard, KeptFirstLayer, ReturnRows, Stop}
        columns = np.flatnonzero(owners == slot)
        kept = [m for m in messages if isinstance(m, KeptFirstLayer)]
        assert len(kept) == len(sent["kept_first_layer"]) > 10
        periods, shuffle = iter(sent["kept_weights"]), None
        for message, error in zip(kept, sent["kept_first_layer"]):
            if message.weights is not None:  # a re-key
                shuffle = _shuffle_of(message.weights, next(periods)[columns])
                shuffles.setdefault(slot, []).append(shuffle.tobytes())
            if error is not None:
                assert np.array_equal(message.error, error[:, shuffle])
        assert next(periods, None) is None  # every period's rows were sent
    first, second = shuffles.values()
    assert first == second and len(set(first)) == len(first) >= 2  # shared by the round, fresh each period


def test_a_slot_given_back_owns_again_exactly_what_it_owned():
    """A worker lost and back: its columns and units come back to it from whoever took them, nothing else moves."""
    rng = np.random.default_rng(0)
    before = ExposurePlan.random(20, (9, 6), 3, seed=1)
    spread = before.without(1, rng).with_slot(3, rng)  # lost, then a late worker took a share
    back = spread.given_back(1, before)
    for owners_before, owners_spread, owners_back in zip(
        (before.column_owners, *before.unit_owners), (spread.column_owners, *spread.unit_owners),
        (back.column_owners, *back.unit_owners),
    ):
        assert np.array_equal(owners_back == 1, owners_before == 1)
        assert np.array_equal(owners_back[owners_before != 1], owners_spread[owners_before != 1])
