"""Kept first-layer rows (`--rekey`): the worker steps them as `first_layer` would, the coordinator's tracked checks
pass honest answers and catch wrong ones, and a run that loses or catches a worker between re-keys still ends
with the one-process run's weights."""

import json

import numpy as np
import pytest

from common import model
from common.protocol import KeptFirstLayer, ReturnRows, Shard
from coordinator.kept import KeptPeriod, LoggedStep
from coordinator.verify import Verifier
from tests.cluster_harness import Harness, one_process_model
from tests.conftest import load_model, max_difference
from worker.compute import RequestError, WorkerState
from tests.faults import EXIT_CODE

RNG = np.random.default_rng(8)
IMAGES = RNG.integers(0, 256, (60, 30), dtype=np.uint8)
COLUMNS = np.arange(30)


def _inputs(dtype: str):
    return lambda split, rows, columns: model.inputs(IMAGES[rows][:, columns], dtype, 255.0)


def _state(dtype: str) -> WorkerState:
    state = WorkerState(dtype, 255.0)
    state.load_shard(Shard(0, "train", 0, len(IMAGES), IMAGES))
    state.load_shard(Shard(0, "test", 0, len(IMAGES), IMAGES))
    return state


def _batch(dtype: str, size: int = 12) -> tuple:
    """(rows, hidden error) of a batch, with the magnitudes of a real one."""
    return RNG.integers(0, len(IMAGES), size).astype(np.int32), (RNG.standard_normal((size, 20)) / 100).astype(dtype)


def test_kept_rows_are_stepped_as_first_layer_steps_sent_rows():
    state, weights = _state("float64"), RNG.standard_normal((30, 20))
    (error_rows, error), rows = _batch("float64"), np.arange(5, dtype=np.int32)
    answer = state.compute(KeptFirstLayer(1, weights, "test", rows, error_rows, error, 0.3)).products
    gradient, _, partial = model.first_layer(weights, IMAGES[rows] / 255.0, IMAGES[error_rows] / 255.0, error, 0.3)
    assert answer.keys() == {"partial"} and np.array_equal(answer["partial"], partial)
    returned = state.compute(ReturnRows(2)).products["weights"]
    assert np.array_equal(returned, model.descend(weights, gradient, 0.3))


def test_a_refused_kept_request_changes_nothing():
    state, weights = _state("float64"), RNG.standard_normal((30, 20))
    with pytest.raises(RequestError, match="before any re-key"):
        state.compute(KeptFirstLayer(1, None, "train", np.arange(3, dtype=np.int32), None, None, 0.0))
    with pytest.raises(RequestError, match="before any kept rows"):
        state.compute(ReturnRows(2))
    state.compute(KeptFirstLayer(3, weights, "train", None, None, None, 0.0))
    error_rows, error = _batch("float64")
    with pytest.raises(RequestError, match="out of range"):
        state.compute(KeptFirstLayer(4, None, "train", np.array([99], np.int32), error_rows, error, 0.3))
    assert np.array_equal(state.compute(ReturnRows(5)).products["weights"], weights)


def _period(dtype: str, steps: int) -> tuple:
    """A worker and the coordinator's KeptPeriod after `steps` honest steps, with the answers along the way."""
    verifier = Verifier("all", 1.0, np.random.default_rng(0), _inputs(dtype), dtype)
    weights = (RNG.standard_normal((30, 20)) / 5).astype(dtype)
    period = KeptPeriod(weights, RNG.permutation(20), _plan(), RNG.standard_normal(20), _inputs(dtype))
    state, answers = _state(dtype), []
    for _ in range(steps):
        error_rows, error = _batch(dtype)
        rows = RNG.integers(0, len(IMAGES), 8).astype(np.int32)
        request = KeptFirstLayer(0, period.rows_for(0), "train", rows, error_rows, error, 0.5)
        step = LoggedStep(error_rows, error, 0.5)
        tracking = period.tracking_after(step)
        answers.append((request, state.compute(request).products, tracking))
        period.advance(step, tracking)
    return verifier, period, state, answers


def _plan():
    from common.exposure import ExposurePlan

    return ExposurePlan(np.zeros(30, np.int64), (np.zeros(20, np.int64),))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_honest_kept_answers_pass_and_the_log_rebuilds_the_rows_exactly(dtype):
    verifier, period, state, answers = _period(dtype, 300)
    for request, products, tracking in answers:
        assert verifier.check(request, products, COLUMNS, kept=tracking) is None
    returned = state.compute(ReturnRows(0)).products
    assert verifier.check(ReturnRows(0), returned, COLUMNS, kept=period.tracking) is None
    assert np.array_equal(period.replayed(), model.from_wire(returned["weights"], dtype)[:, np.argsort(period.permutation)])


# How wrong an answer at the end of a 300-step period must be to be caught for sure: the allowance is the worst
# case of every step's rounding, which in float32 adds up to percents (see "Kept rows" in the README).
CAUGHT_SKEW = {"float32": 1.1, "float64": 1.0001}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kept_rows_or_products_wrong_by_more_than_the_rounding_fail(dtype):
    verifier, period, state, answers = _period(dtype, 300)
    request, products, tracking = answers[-1]
    skew = np.dtype(dtype).type(CAUGHT_SKEW[dtype])
    assert verifier.check(request, {"partial": products["partial"] * skew}, COLUMNS, kept=tracking).product == "partial"
    rows = state.compute(ReturnRows(0)).products["weights"]
    evidence = verifier.check(ReturnRows(0), {"weights": rows * skew}, COLUMNS, kept=period.tracking)
    assert evidence.product == "weights" and evidence.discrepancy > evidence.allowance


# --- real processes ----------------------------------------------------------------------------------

pytest_slow = pytest.mark.slow
# float64, 2 epochs of 100 steps, re-keyed every epoch: the loss and the lie below fall inside a period.
RUN = ("--dtype", "float64", "--train-limit", "1000", "--test-limit", "200", "--batch-size", "10", "--epochs", "2",
       "--seed", "13", "--rekey", "every-epoch")
TOLERANCE = 1e-9  # the issue asks for 1e-6 after a loss; the log replays the workers' arithmetic, so it is far closer


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict:
    return one_process_model(tmp_path_factory.mktemp("local"), *RUN)


def _cluster(tmp_path, faults: dict, *args) -> Harness:
    harness = Harness(tmp_path)
    harness.start_coordinator("--workers", 3, *RUN, *args)
    for name in "ABC":
        harness.start_worker(name, fault=faults.get(name))
    return harness


@pytest_slow
@pytest.mark.parametrize("later_layers", ["workers", "coordinator"])
def test_a_worker_lost_between_re_keys_leaves_the_undisturbed_weights(tmp_path, undisturbed, later_layers):
    harness = _cluster(tmp_path, {"B": "exit-at-request:150"}, "--later-layers", later_layers)  # mid-epoch 1 or 2
    try:
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        assert harness.processes[2].wait(10) == EXIT_CODE, "the fault never fired"
        assert "reassigning slot" in harness.log(harness.coordinator)
        difference = max_difference(load_model(harness.run_dir), undisturbed)
        print(f"max weight difference from the undisturbed run: {difference:.2e}")
        assert difference < TOLERANCE
    finally:
        harness.close()


@pytest_slow
def test_a_worker_lying_about_its_kept_rows_is_caught_at_the_re_key(tmp_path, undisturbed):
    harness = _cluster(tmp_path, {"C": "rows"})  # the default --verify sample checks every re-key
    try:
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        caught = [json.loads(line) for line in (harness.run_dir / "quarantine.jsonl").read_text().splitlines()]
        assert [(record["worker"], record["request"], record["product"]) for record in caught] == [
            ("C", "ReturnRows", "weights")
        ]
        difference = max_difference(load_model(harness.run_dir), undisturbed)
        print(f"max weight difference from the undisturbed run: {difference:.2e}")
        assert difference < TOLERANCE
    finally:
        harness.close()
