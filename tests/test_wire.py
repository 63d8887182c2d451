"""`--wire`: errors and partial products cross the network narrower than the run computes, and nothing else does."""

import dataclasses
import json

import numpy as np
import pytest

from coordinator.bench.traffic import minimum_step_bytes
from common import model
from common.protocol import LaterForward, Result, Shard, decode, encode
from coordinator.config import TrainingConfig
from coordinator.scheduler import Expected, Scheduler
from coordinator.verify import Verifier
from tests.conftest import LOOPBACK_ANY_PORT, load_model, max_difference
from tests.test_verify import IMAGES, _requests
from worker.compute import WorkerState

NARROW = ("float16", "bfloat16")


def test_exact_is_the_array_itself():
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert model.to_wire(array, "exact") is array and model.from_wire(array, np.float64) is array


def test_bfloat16_keeps_the_upper_half_rounded_to_nearest_even():
    values = np.array([1.0, 1 + 2**-8, 1 + 2**-7 + 2**-8, -3.5e-20, 1 + 2**-9], np.float32)
    back = model.from_wire(model.to_wire(values, "bfloat16"), np.float32)
    # a tie goes to the even neighbour: 1 + 2^-8 to 1, 1 + 3 * 2^-8 to 1 + 2^-6; 1 + 2^-9 is below the tie
    assert back.tolist()[:3] == [1.0, 1.0, 1 + 2**-6] and back[4] == 1.0
    assert back[3] == pytest.approx(-3.5e-20, rel=2**-8)  # float32's exponent range, unlike float16


@pytest.mark.parametrize("wire", NARROW)
def test_round_trip_error_is_within_the_stated_roundoff(wire):
    values = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    unit, floor = model.wire_roundoff(wire)
    back = model.from_wire(model.to_wire(values, wire), np.float32)
    assert np.all(np.abs(back - values) <= unit * np.abs(values) + floor)
    assert model.to_wire(values, wire).dtype == model.wire_dtype(wire, "float32") and back.dtype == np.float32


def test_narrow_wires_need_a_float32_run():
    assert TrainingConfig(dtype="float32", wire="bfloat16").problems() == []
    assert "float32" in " ".join(TrainingConfig(dtype="float64", wire="float16").problems())
    assert TrainingConfig(wire="int4").problems()


def _on_wire(requests: list, wire: str) -> list:
    return [request if getattr(request, "error", None) is None
            else dataclasses.replace(request, error=model.to_wire(request.error, wire)) for request in requests]


@pytest.mark.parametrize("wire", NARROW)
def test_the_worker_computes_in_the_run_dtype_and_narrows_only_errors_and_partials(wire):
    state, requests = WorkerState("float32", 255.0, wire), _on_wire(_requests("float32"), wire)
    exact = WorkerState("float32", 255.0)
    state.load_shard(_shard()), exact.load_shard(_shard())
    for request in requests:
        narrow = state.compute(request).products
        widened = dataclasses.replace(request, error=model.from_wire(request.error, np.float32)) \
            if getattr(request, "error", None) is not None else request
        reference = exact.compute(widened).products
        for name, array in narrow.items():
            if name in ("partial", "error"):
                assert array.dtype == model.wire_dtype(wire, "float32")
                assert np.array_equal(array, model.to_wire(reference[name], wire))
            else:
                assert array.dtype == np.float32 and np.array_equal(array, reference[name])
        assert decode(encode(Result(1, narrow))).products.keys() == narrow.keys()  # the gate lets them through


def _shard() -> Shard:
    return Shard(0, "train", 0, len(IMAGES), IMAGES)


@pytest.mark.parametrize("wire", NARROW)
def test_honest_narrow_answers_pass_freivalds_and_wrong_ones_fail(wire):
    inputs = lambda split, rows, columns: model.inputs(IMAGES[np.ix_(rows, columns)], "float32", 255.0)
    verifier = Verifier("all", 1.0, np.random.default_rng(0), inputs, "float32", model.wire_roundoff(wire))
    for _ in range(100):
        forward = None
        for request, products in zip(*_narrow_answers(wire)):
            forward = request if isinstance(request, LaterForward) else forward
            assert verifier.check(request, products, np.arange(30), forward) is None
    request, products = next(zip(*_narrow_answers(wire)))
    partial = model.from_wire(products["partial"], np.float32)
    partial[5, 7] += 2 * np.abs(partial).mean()
    products["partial"] = model.to_wire(partial, wire)
    assert verifier.check(request, products, np.arange(30), None).product == "partial"


def _narrow_answers(wire: str) -> tuple:
    state, requests = WorkerState("float32", 255.0, wire), _on_wire(_requests("float32"), wire)
    state.load_shard(_shard())
    return requests, [state.compute(request).products for request in requests]


def test_the_scheduler_wants_the_wire_dtype_for_partials_and_the_run_dtype_for_gradients():
    bits = model.wire_dtype("bfloat16", "float32")
    assert _invalid({"partial": np.zeros((2, 3), bits), "gradient": np.zeros((4, 3), np.float32)}) == ""
    assert "partial" in _invalid({"partial": np.zeros((2, 3), np.float32), "gradient": np.zeros((4, 3), np.float32)})
    assert "gradient" in _invalid({"partial": np.zeros((2, 3), bits), "gradient": np.zeros((4, 3), bits)})
    not_a_number = model.to_wire(np.full((2, 3), np.nan, np.float32), "bfloat16")
    assert "NaN" in _invalid({"partial": not_a_number, "gradient": np.zeros((4, 3), np.float32)})


def _invalid(products: dict) -> str:
    scheduler = Scheduler(1, 1, np.dtype(np.float32), wire_dtype=model.wire_dtype("bfloat16", "float32"))
    return scheduler._invalid(products, Expected({"partial": (2, 3), "gradient": (4, 3)}))


@pytest.mark.slow
@pytest.mark.parametrize("wire", NARROW)
def test_a_narrow_wire_trains_like_the_exact_one_and_no_honest_worker_is_caught(train_run, wire):
    settings = ("--dtype", "float32", "--train-limit", "2000", "--test-limit", "500", "--batch-size", "20",
                "--epochs", "2", "--seed", "7", "--spawn", "2", "--bind", LOOPBACK_ANY_PORT, "--verify", "all")
    _, exact_dir = train_run(*settings)
    done, narrow_dir = train_run(*settings, "--wire", wire)
    assert "quarantine" not in done.stderr, done.stderr[-2000:]
    exact, narrow = (json.loads(path.joinpath("history.jsonl").read_text().splitlines()[-1])
                     for path in (exact_dir, narrow_dir))
    assert abs(exact["test_accuracy"] - narrow["test_accuracy"]) <= 0.02
    assert 0 < max_difference(load_model(narrow_dir), load_model(exact_dir)) < 0.05


@pytest.mark.parametrize("later_layers_here", [False, True])
def test_the_least_traffic_counts_errors_and_partials_at_the_wire_width(later_layers_here):
    batch, (inputs, hidden, outputs), workers, s, w = 64, (784, 128, 10), 7, 4, 2
    formula = 2 * inputs * hidden * s + 2 * workers * batch * hidden * w + 4 * workers * batch
    if not later_layers_here:
        formula += batch * hidden * (s + w) + 2 * hidden * outputs * s + 2 * workers * batch * outputs * w
    assert minimum_step_bytes(batch, (inputs, hidden, outputs), workers, s, later_layers_here, w) == formula
