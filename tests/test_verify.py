"""Freivalds checks: honest rounding never fails them, wrong answers do; lying workers are quarantined."""

import json

import numpy as np
import pytest

from common import model
from common.protocol import FirstLayer, LaterBackward, LaterForward, Shard
from coordinator.verify import Verifier
from tests.cluster_harness import Harness, one_process_model
from tests.conftest import load_model, max_difference
from worker.compute import WorkerState
from tests.faults import FAULTS, FaultyWorkerState

RNG = np.random.default_rng(3)
IMAGES = RNG.integers(0, 256, (50, 30), dtype=np.uint8)


def _verifier(dtype: str) -> Verifier:
    inputs = lambda split, rows, columns: model.inputs(IMAGES[np.ix_(rows, columns)], dtype, 255.0)
    return Verifier("all", 1.0, np.random.default_rng(0), inputs, dtype)


def _requests(dtype: str) -> list:
    """A fused first-layer request, a later layer's forward and its backward, with realistic magnitudes."""
    rows, error_rows = RNG.integers(0, 50, 16).astype(np.int32), RNG.integers(0, 50, 16).astype(np.int32)
    weights = (RNG.standard_normal((30, 20)) / 5).astype(dtype)
    error = (RNG.standard_normal((16, 20)) / 100).astype(dtype)
    forward = LaterForward(2, 2, RNG.random((16, 6)).astype(dtype), RNG.standard_normal((6, 10)).astype(dtype))
    backward = LaterBackward(3, 2, (RNG.standard_normal((16, 10)) / 50).astype(dtype))
    return [FirstLayer(1, weights, "train", rows, error_rows, error, 3.0), forward, backward]


def _answers(state: WorkerState, dtype: str):
    state.load_shard(Shard(0, "train", 0, len(IMAGES), IMAGES))
    for request in _requests(dtype):
        yield request, state.compute(request).products


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_honest_products_always_pass(dtype):
    verifier = _verifier(dtype)
    for _ in range(200):
        state = WorkerState(dtype, 255.0)
        forward = None
        for request, products in _answers(state, dtype):
            forward = request if isinstance(request, LaterForward) else forward
            assert verifier.check(request, products, np.arange(30), forward) is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", [m for m in FAULTS if m not in ("stale", "flip", "rows")])  # rows: test_rekey
def test_every_wrong_answer_fails(dtype, mode):
    verifier, forward = _verifier(dtype), None
    for request, products in _answers(FaultyWorkerState(dtype, 255.0, "exact", mode), dtype):
        forward = request if isinstance(request, LaterForward) else forward
        assert verifier.check(request, products, np.arange(30), forward) is not None, type(request).__name__


def test_one_wrong_element_fails():
    verifier, state = _verifier("float32"), WorkerState("float32", 255.0)
    request, products = next(_answers(state, "float32"))
    products["partial"][5, 7] += 2 * np.abs(products["partial"]).mean()  # as large as a typical element or two
    evidence = verifier.check(request, products, np.arange(30), None)
    assert evidence.product == "partial" and evidence.discrepancy > evidence.allowance


# --- real processes: a lying worker among honest ones ---------------------------------------------

# the later layers on the workers, so that liars lie about every kind of product
RUN = ("--later-layers", "workers", "--dtype", "float64", "--train-limit", "600", "--test-limit", "200", "--batch-size",
       "10", "--epochs", "2", "--seed", "11")
FIRST_BAD_ANSWER = {"skew": 1, "permute": 1, "zeros": 1, "flip": 7, "stale": 4}


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict:
    harness = Harness(tmp_path_factory.mktemp("honest"))
    try:
        harness.start_coordinator("--local", *RUN)
        assert harness.finish() == 0
        return {"model": load_model(harness.run_dir), "history": _history(harness)}
    finally:
        harness.close()


def _history(harness: Harness) -> list:
    return [json.loads(line) for line in (harness.run_dir / "history.jsonl").read_text().splitlines()]


def _run_with_liar(tmp_path, fault: str, *args) -> Harness:
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", 3, *RUN, *args)
        harness.start_worker("A")
        harness.start_worker("B")
        harness.start_worker("liar", fault=fault)
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
    except BaseException:  # the callers close it once it is returned; a run that failed would leave its workers
        harness.close()
        raise
    return harness


def _quarantined(harness: Harness) -> list:
    path = harness.run_dir / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("fault", [m for m in FAULTS if m != "rows"])  # rows lies only with --rekey: test_rekey
def test_verify_all_catches_each_fault_on_its_first_bad_answer(tmp_path, honest, fault):
    harness = _run_with_liar(tmp_path, fault, "--verify", "all")
    try:
        caught = _quarantined(harness)
        assert [(r["worker"], r["answers"]) for r in caught] == [("liar", FIRST_BAD_ANSWER[fault])]
        difference = max_difference(load_model(harness.run_dir), honest["model"])
        print(f"{fault}: caught at answer {caught[0]['answers']}, max weight difference {difference:.2e}")
        assert difference < 1e-6
    finally:
        harness.close()


@pytest.mark.slow
def test_verify_sample_catches_a_persistent_liar_soon_enough(tmp_path, honest):
    harness = _run_with_liar(tmp_path, "skew", "--verify", "sample", "--verify-rate", "0.05")
    try:
        caught = _quarantined(harness)
        # answers until caught are geometric with mean 20; 200 or more happens with odds 0.95^199 < 4e-5
        assert len(caught) == 1 and caught[0]["answers"] < 200
        print(f"sample: caught at answer {caught[0]['answers']}")
        assert _history(harness)[-1]["test_accuracy"] >= honest["history"][-1]["test_accuracy"] - 0.02
    finally:
        harness.close()


@pytest.mark.slow
def test_verify_off_lets_a_liar_silently_spoil_the_model(tmp_path, honest):
    harness = _run_with_liar(tmp_path, "skew", "--verify", "off")
    try:
        assert not _quarantined(harness)
        difference = max_difference(load_model(harness.run_dir), honest["model"])
        print(f"off: max weight difference {difference:.2e}")
        assert difference > 1e-5  # far beyond the 1e-6 within which every honest run stays
    finally:
        harness.close()


@pytest.mark.slow
def test_every_later_layer_is_checked_against_its_own_forward(tmp_path):
    """Two hidden layers, every answer checked: each backward of layer 3 and of layer 2 against the operands the
    worker kept from that layer's own forward (another layer's would not even fit), so honest workers stand."""
    deep = (*RUN, "--hidden", "24,16", "--activation", "relu", "--output", "softmax", "--loss", "ce")
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", 3, "--verify", "all", *deep)
        for name in "ABC":
            harness.start_worker(name)
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        assert not _quarantined(harness)
        distributed = load_model(harness.run_dir)
    finally:
        harness.close()
    (tmp_path / "local").mkdir()
    local = one_process_model(tmp_path / "local", *deep)
    assert list(local) == ["w1", "b1", "w2", "b2", "w3", "b3"] and max_difference(distributed, local) < 1e-9


@pytest.mark.slow
def test_honest_float32_run_raises_no_false_alarm(tmp_path):
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", 3, "--verify", "all", "--train-limit", "3000", "--test-limit", "1000",
                                  "--epochs", "3", "--batch-size", "32")
        for name in "ABC":
            harness.start_worker(name)
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        assert not _quarantined(harness)
        assert "Freivalds" not in harness.log(harness.coordinator)
    finally:
        harness.close()


@pytest.mark.slow
def test_replicas_unmask_a_liar_even_with_checks_off(tmp_path, honest):
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", 4, "--replicas", 2, "--verify", "off", *RUN)
        for name in "ABC":
            harness.start_worker(name)
        harness.start_worker("liar", fault="flip")
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        caught = _quarantined(harness)
        assert [(r["worker"], r["answers"]) for r in caught] == [("liar", FIRST_BAD_ANSWER["flip"])]
        assert max_difference(load_model(harness.run_dir), honest["model"]) < 1e-6
        initial = [r for r in harness.exposure_records() if r["reason"] == "initial plan"]
        assert sorted(len(r["columns"]) for r in initial) == [392] * 4  # two slots, each on two workers
    finally:
        harness.close()


@pytest.mark.slow
def test_a_slot_outlives_one_of_its_replicas(tmp_path, honest):
    harness = Harness(tmp_path)
    try:
        harness.start_coordinator("--workers", 4, "--replicas", 2, *RUN)
        workers = [harness.start_worker(name) for name in "ABCD"]
        harness.wait_for_epoch(1)
        workers[0].kill()
        assert harness.finish() == 0, harness.log(harness.coordinator)[-3000:]
        log = harness.log(harness.coordinator)
        assert "dropped worker A " in log, "the kill came after the run"
        assert "reassigning" not in log  # its replica carried the slot on
        assert max_difference(load_model(harness.run_dir), honest["model"]) < 1e-6
    finally:
        harness.close()
