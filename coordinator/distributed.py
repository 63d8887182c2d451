"""The products of a training step split by the exposure plan: each worker gets its rows of the weights with
the columns shuffled by a fresh secret permutation, and the partial products come back, un-shuffled here."""

import numpy as np

from common.exposure import ExposurePlan, add_unpermuted, permuted, place_unpermuted
from common.protocol import FirstLayer, SecondBackward, SecondForward
from common.settings import REPLY_TIMEOUT
from coordinator.scheduler import Expected
from coordinator.training import LocalProducts


class ClusterProducts:
    """The same three product groups as LocalProducts, computed by the workers of a Cluster."""

    def __init__(self, cluster, plan: ExposurePlan, permutation_seed: int):
        self.cluster = cluster
        self.plan = plan
        self.permutations = np.random.default_rng(permutation_seed)
        self.second_permutations = {}  # slot -> the output permutation of its last SecondForward

    def first_layer(self, weights, split, rows, error_rows, error, learning_rate) -> tuple:
        hidden = weights.shape[1]
        requests, shuffles = {}, {}
        for slot in range(self.plan.slots):
            columns, shuffle = self.plan.columns(slot), self.permutations.permutation(hidden)
            expected = {}
            if rows is not None:
                expected["partial"] = (len(rows), hidden)
            if error is not None:
                expected["gradient"] = (len(columns), hidden)
            request = FirstLayer(
                request=0,
                weights=None if rows is None else permuted(weights[columns], shuffle),
                split=split,
                rows=rows,
                error_rows=error_rows,
                error=None if error is None else permuted(error, shuffle),
                learning_rate=float(learning_rate),
            )
            requests[slot], shuffles[slot] = (request, Expected(expected)), shuffle
        results = self.cluster.run_round(requests, REPLY_TIMEOUT)
        gradient = None if error is None else np.empty_like(weights)
        product = None if rows is None else np.zeros((len(rows), hidden), weights.dtype)
        for slot in range(self.plan.slots):  # a fixed order keeps the sum reproducible
            if gradient is not None:
                place_unpermuted(gradient, self.plan.columns(slot), results[slot]["gradient"], shuffles[slot])
            if product is not None:
                add_unpermuted(product, results[slot]["partial"], shuffles[slot])
        return gradient, product

    def second_forward(self, activations, weights) -> np.ndarray:
        outputs = weights.shape[1]
        requests = {}
        for slot in range(self.plan.slots):
            units, shuffle = self.plan.units(slot), self.permutations.permutation(outputs)
            request = SecondForward(request=0, activations=activations[:, units], weights=permuted(weights[units], shuffle))
            requests[slot] = (request, Expected({"partial": (len(activations), outputs)}))
            self.second_permutations[slot] = shuffle
        results = self.cluster.run_round(requests, REPLY_TIMEOUT)
        product = np.zeros((len(activations), outputs), weights.dtype)
        for slot in range(self.plan.slots):
            add_unpermuted(product, results[slot]["partial"], self.second_permutations[slot])
        return product

    def second_backward(self, error) -> tuple:
        batch, outputs = error.shape
        hidden = len(self.plan.unit_owners)
        requests = {}
        for slot, shuffle in self.second_permutations.items():
            expected = Expected({"gradient": (len(self.plan.units(slot)), outputs), "error": (batch, len(self.plan.units(slot)))})
            requests[slot] = (SecondBackward(request=0, error=permuted(error, shuffle)), expected)
        results = self.cluster.run_round(requests, REPLY_TIMEOUT)
        gradient = np.empty((hidden, outputs), error.dtype)
        backpropagated = np.empty((batch, hidden), error.dtype)
        for slot, shuffle in self.second_permutations.items():
            units = self.plan.units(slot)
            place_unpermuted(gradient, units, results[slot]["gradient"], shuffle)
            backpropagated[:, units] = results[slot]["error"]
        return gradient, backpropagated


class ClusterFirstLayer(ClusterProducts):
    """The first layer on the workers, the second layer's small products (B x H x O) here: one round per step.

    Workers then see only their pixels, W1 rows and d1, never a1, W2 or d2; the price is that the
    coordinator does some matrix products itself (see "Speed" in the README).
    """

    second_forward = LocalProducts.second_forward
    second_backward = LocalProducts.second_backward
