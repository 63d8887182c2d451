"""The math against trusted references: finite differences, and the one-matrix products it splits up."""

import numpy as np
import pytest

from common import model
from common.exposure import ExposurePlan, permuted, unpermuted

RNG = np.random.default_rng(0)


def _cost_and_gradients(params: model.Params, x, labels, network: tuple, masks: list):
    """The full-matrix forward and backward pass, written out with the shared functions; `masks` are fixed
    dropout masks, one per hidden layer, so that the cost is a function of the parameters alone."""
    activation, output, loss = network
    y = model.targets(labels, params.weights[-1].shape[1], "float64")
    hidden = [model.activate(model.first_layer(params.weights[0], x, None, None, 0)[2], params.biases[0], activation)]
    for layer in range(2, params.layers + 1):
        function = output if layer == params.layers else activation
        product = model.later_forward(hidden[-1] * masks[layer - 2], params.weights[layer - 1])
        hidden.append(model.activate(product, params.biases[layer - 1], function))
    cost, error = model.output_error(hidden.pop(), y, loss, output, len(x))
    grads = {}
    for layer in range(params.layers, 1, -1):
        grads[f"w{layer}"], back = model.later_backward(hidden[layer - 2] * masks[layer - 2], params.weights[layer - 1],
                                                        error)
        grads[f"b{layer}"] = error.sum(0)
        error = model.hidden_error(back, hidden[layer - 2], masks[layer - 2], activation)
    grads["w1"], grads["b1"] = model.weight_gradient(x, error), error.sum(0)
    return cost / len(x), grads


# Every hidden activation, every output with mse, and each loss with the output it needs.
NETWORKS = [(activation, "sigmoid", "mse") for activation in model.ACTIVATIONS] + [
    ("sigmoid", output, "mse") for output in ("softmax", "linear")
] + [("relu", "sigmoid", "bce"), ("tanh", "softmax", "ce")]


@pytest.mark.parametrize("network", NETWORKS, ids="-".join)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("sizes", [(6, 5, 3), (6, 5, 4, 3)], ids=["one-hidden", "two-hidden"])
def test_backward_pass_matches_finite_differences(network, dropout, sizes):
    params = model.initial_params(sizes, "scaled", 1, "float64")
    for bias in params.biases[:-1]:
        bias += RNG.normal(size=len(bias))  # ReLU units on both sides of 0, and none exactly at its kink
    x, labels = RNG.random((8, 6)), RNG.integers(0, 3, 8)
    masks = [model.dropout_mask(np.random.default_rng(2), (8, units), dropout, "float64") for units in sizes[1:-1]]
    _, grads = _cost_and_gradients(params, x, labels, network, masks)
    step = 1e-6
    for name, array in params.arrays().items():
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + step
            above = _cost_and_gradients(params, x, labels, network, masks)[0]
            array[index] = saved - step
            below = _cost_and_gradients(params, x, labels, network, masks)[0]
            array[index] = saved
            assert grads[name][index] == pytest.approx((above - below) / (2 * step), abs=1e-8), (name, index)


def test_dropout_mask_is_inverted_and_drops_at_the_rate():
    mask = model.dropout_mask(np.random.default_rng(0), (200, 100), 0.2, "float32")
    assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, np.float32(1 / 0.8)}
    assert np.mean(mask == 0) == pytest.approx(0.2, abs=0.01)
    assert np.mean(mask) == pytest.approx(1.0, abs=0.02)  # inverted: the expected activation is unchanged
    unused = np.random.default_rng(0)
    assert (model.dropout_mask(unused, (3, 4), 0.0, "float64") == 1).all()
    assert unused.bit_generator.state == np.random.default_rng(0).bit_generator.state  # rate 0 draws nothing


def test_dropout_masks_are_a_stream_apart_from_the_weights_and_batch_orders():
    from coordinator.training import batch_order

    masks = model.dropout_masks(5).random(4)
    assert not np.array_equal(masks, np.random.default_rng(5).random(4))
    assert not np.array_equal(masks, np.random.default_rng([5, 0]).random(4))
    assert np.array_equal(masks, model.dropout_masks(5).random(4))
    assert batch_order(5, 1, 10).tolist() != model.dropout_masks(5).permutation(10).tolist()


@pytest.mark.parametrize("init, limit, spread", [("uniform", 0.1, 0.1 / np.sqrt(3)), ("normal", 0.01, 0.01)])
def test_uniform_and_normal_initialisations_use_their_scale(init, limit, spread):
    params = model.initial_params((784, 100, 10), init, 3, "float64")
    assert params.weights[0].std() == pytest.approx(spread, rel=0.02)
    if init == "uniform":
        assert -limit <= params.weights[0].min() and params.weights[0].max() < limit
    scaled = model.initial_params((784, 100, 10), init, 3, "float64", uniform_limit=0.5, normal_std=0.5)
    assert scaled.weights[0].std() == pytest.approx(spread / limit * 0.5, rel=0.02)


def test_fused_first_layer_is_gradient_then_step_then_product():
    weights, x_old, x_new, error = RNG.random((6, 4)), RNG.random((3, 6)), RNG.random((2, 6)), RNG.random((3, 4))
    gradient, _, product = model.first_layer(weights, x_new, x_old, error, 0.5)
    assert np.allclose(gradient, x_old.T @ error)
    assert np.allclose(product, x_new @ (weights - 0.5 * x_old.T @ error))
    assert model.first_layer(weights, None, x_old, error, 0.5)[2] is None


def test_partial_products_under_one_shuffle_add_up_to_the_whole():
    """sum_w X[:, K_w] @ W1[K_w][:, p] = (X @ W1)[:, p]: one un-shuffle after the sum (EXPOSURE.md)."""
    x, w1 = RNG.random((5, 20)), RNG.random((20, 8))
    plan, shuffle = ExposurePlan.random(20, (8,), 3, seed=4), RNG.permutation(8)
    total, gradient, error = np.zeros((5, 8)), np.empty_like(w1), RNG.random((5, 8))
    for slot in plan.slots:
        columns = plan.columns(slot)
        total += x[:, columns] @ permuted(w1, shuffle)[columns]
        gradient[columns] = x[:, columns].T @ permuted(error, shuffle)
    assert np.allclose(unpermuted(total, shuffle), x @ w1)
    assert np.allclose(unpermuted(gradient, shuffle), x.T @ error)


def test_plan_is_balanced_and_covers_every_column():
    plan = ExposurePlan.random(784, (128,), 7, seed=0)
    sizes = [len(plan.columns(slot)) for slot in range(7)]
    assert sizes == [112] * 7
    assert sorted(np.concatenate([plan.columns(s) for s in range(7)])) == list(range(784))
    assert {len(plan.units(s, 2)) for s in range(7)} == {18, 19}
    assert not np.array_equal(plan.columns(0), np.arange(112))  # random, not blocks


def test_plan_gives_each_hidden_layer_its_own_balanced_owners():
    plan = ExposurePlan.random(784, (64, 32), 7, seed=0)
    assert list(plan.later_layers) == [2, 3]
    for layer, units in ((2, 64), (3, 32)):
        held = [plan.units(s, layer) for s in range(7)]
        assert sorted(np.concatenate(held)) == list(range(units))
        assert {len(part) for part in held} == {units // 7, units // 7 + 1}
    assert not np.array_equal(plan.unit_owners[0][:32], plan.unit_owners[1])  # drawn apart, not one split reused
    assert np.array_equal(plan.column_owners, ExposurePlan.random(784, (128,), 7, seed=0).column_owners)


def test_plan_arrays_round_trip_and_an_old_plan_still_loads():
    plan = ExposurePlan.random(20, (6, 4), 3, seed=1)
    again = ExposurePlan.from_arrays(plan.arrays())
    assert sorted(plan.arrays()) == ["column_owners", "unit_owners1", "unit_owners2"]
    assert all(np.array_equal(a, b) for a, b in zip(again.unit_owners, plan.unit_owners))
    old = ExposurePlan.from_arrays({"column_owners": plan.column_owners, "unit_owners": plan.unit_owners[0]})
    assert list(old.later_layers) == [2] and np.array_equal(old.units(1, 2), plan.units(1, 2))


def test_legacy_initialisation_is_the_seed_notebooks():
    params = model.initial_params((784, 128, 10), "legacy", 402, "float64")
    np.random.seed(402)
    assert np.array_equal(params.weights[0], np.random.randn(784, 128) * 0.01)
    assert np.array_equal(params.weights[1], np.random.randn(128, 10) * 0.01)
    assert not any(bias.any() for bias in params.biases)


def test_params_name_their_arrays_by_layer_and_load_back():
    params = model.initial_params((6, 5, 4, 3), "scaled", 1, "float32")
    assert list(params.arrays()) == ["w1", "b1", "w2", "b2", "w3", "b3"]
    again = model.Params.from_arrays(params.arrays())
    assert again.layers == 3 and all(np.array_equal(a, b) for a, b in zip(again.weights, params.weights))
    two = model.initial_params((6, 5, 3), "scaled", 1, "float32")
    assert list(two.arrays()) == ["w1", "b1", "w2", "b2"]  # a one-hidden-layer model file as it always was
    assert np.array_equal(two.weights[0], params.weights[0])  # layers are drawn first to last


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_cost_stays_finite_when_outputs_round_to_0_or_1(dtype):
    outputs, target = np.array([[1.0, 0.0], [0.0, 1.0]], dtype), np.array([[1.0, 0.0], [1.0, 0.0]], dtype)
    cost, error = model.output_error(outputs, target, "bce", "sigmoid", 2)
    assert np.isfinite(cost) and cost > 0 and np.isfinite(error).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_and_its_cross_entropy_stay_finite_for_large_sums(dtype):
    outputs = model.activate(np.array([[1000.0, 0.0, -1000.0]], dtype), np.zeros(3, dtype), "softmax")
    assert np.isfinite(outputs).all() and outputs.sum() == pytest.approx(1)
    cost, error = model.output_error(outputs, np.array([[0.0, 0.0, 1.0]], dtype), "ce", "softmax", 1)
    assert np.isfinite(cost) and cost > 10 and np.isfinite(error).all()
