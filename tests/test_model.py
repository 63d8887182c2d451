"""The math against trusted references: finite differences, and the one-matrix products it splits up."""

import numpy as np
import pytest

from common import model
from common.exposure import ExposurePlan, permuted, unpermuted

RNG = np.random.default_rng(0)


def _cost_and_gradients(params: model.Params, x, labels, loss):
    """The full-matrix forward and backward pass, written out with the shared functions."""
    y = model.targets(labels, params.w2.shape[1], "float64")
    hidden = model.activate(model.first_layer(params.w1, x, None, None, 0)[1], params.b1)
    outputs = model.activate(model.second_forward(hidden, params.w2), params.b2)
    cost, output_error = model.output_error(outputs, y, loss, len(x))
    w2_gradient, back = model.second_backward(hidden, params.w2, output_error)
    hidden_error = model.hidden_error(back, hidden)
    w1_gradient = model.weight_gradient(x, hidden_error)
    grads = {"w1": w1_gradient, "b1": hidden_error.sum(0), "w2": w2_gradient, "b2": output_error.sum(0)}
    return cost / len(x), grads


@pytest.mark.parametrize("loss", model.LOSSES)
def test_backward_pass_matches_finite_differences(loss):
    params = model.initial_params((6, 5, 3), "scaled", 1, "float64")
    params.b1 += RNG.normal(size=5)
    x, labels = RNG.random((8, 6)), RNG.integers(0, 3, 8)
    _, grads = _cost_and_gradients(params, x, labels, loss)
    step = 1e-6
    for name, array in params.arrays().items():
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + step
            above = _cost_and_gradients(params, x, labels, loss)[0]
            array[index] = saved - step
            below = _cost_and_gradients(params, x, labels, loss)[0]
            array[index] = saved
            assert grads[name][index] == pytest.approx((above - below) / (2 * step), abs=1e-8), (name, index)


def test_fused_first_layer_is_gradient_then_step_then_product():
    weights, x_old, x_new, error = RNG.random((6, 4)), RNG.random((3, 6)), RNG.random((2, 6)), RNG.random((3, 4))
    gradient, product = model.first_layer(weights, x_new, x_old, error, 0.5)
    assert np.allclose(gradient, x_old.T @ error)
    assert np.allclose(product, x_new @ (weights - 0.5 * x_old.T @ error))
    assert model.first_layer(weights, None, x_old, error, 0.5)[1] is None


def test_partial_products_under_one_shuffle_add_up_to_the_whole():
    """sum_w X[:, K_w] @ W1[K_w][:, p] = (X @ W1)[:, p]: one un-shuffle after the sum (EXPOSURE.md)."""
    x, w1 = RNG.random((5, 20)), RNG.random((20, 8))
    plan, shuffle = ExposurePlan.random(20, 8, 3, seed=4), RNG.permutation(8)
    total, gradient, error = np.zeros((5, 8)), np.empty_like(w1), RNG.random((5, 8))
    for slot in plan.slots:
        columns = plan.columns(slot)
        total += x[:, columns] @ permuted(w1, shuffle)[columns]
        gradient[columns] = x[:, columns].T @ permuted(error, shuffle)
    assert np.allclose(unpermuted(total, shuffle), x @ w1)
    assert np.allclose(unpermuted(gradient, shuffle), x.T @ error)


def test_plan_is_balanced_and_covers_every_column():
    plan = ExposurePlan.random(784, 128, 7, seed=0)
    sizes = [len(plan.columns(slot)) for slot in range(7)]
    assert sizes == [112] * 7
    assert sorted(np.concatenate([plan.columns(s) for s in range(7)])) == list(range(784))
    assert {len(plan.units(s)) for s in range(7)} == {18, 19}
    assert not np.array_equal(plan.columns(0), np.arange(112))  # random, not blocks


def test_legacy_initialisation_is_the_seed_notebooks():
    params = model.initial_params((784, 128, 10), "legacy", 402, "float64")
    np.random.seed(402)
    assert np.array_equal(params.w1, np.random.randn(784, 128) * 0.01)
    assert np.array_equal(params.w2, np.random.randn(128, 10) * 0.01)
    assert not params.b1.any() and not params.b2.any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_cost_stays_finite_when_outputs_round_to_0_or_1(dtype):
    outputs, target = np.array([[1.0, 0.0], [0.0, 1.0]], dtype), np.array([[1.0, 0.0], [1.0, 0.0]], dtype)
    cost, error = model.output_error(outputs, target, "bce", 2)
    assert np.isfinite(cost) and cost > 0 and np.isfinite(error).all()
