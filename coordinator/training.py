"""Mini-batch gradient descent over a products backend: the same loop drives the local and the distributed run.

A backend computes the groups of matrix products of a step (the first layer's, then each later layer's
forward and, in reverse order, backward); `LocalProducts` does it in this process, `ClusterProducts` on
the workers. Layers are numbered from 1, as w1, w2, ... in model.npz: layer 1 multiplies the inputs.
The first layer's gradient step of a batch is taken together with the next forward product
(`step_then_forward`), so one round of messages both ends a step and starts the next (see FirstLayer in
the protocol); `settle` applies the last one on its own.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common import model, settings
from common.exposure import ExposurePlan
from common.model import Params
from coordinator.config import TrainingConfig


@dataclass
class Progress:
    """How far a run has got: the epoch under way, its steps done, and their summed cost and correct count."""

    epoch: int = 1  # 1-based
    step: int = 0  # batches of `epoch` already trained
    cost: float = 0.0
    correct: int = 0


def batches(samples: int, batch_size: int) -> int:
    """Batches that hold `samples` images, the last one possibly short."""
    return -(-samples // batch_size)


def batch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The epoch's shuffled row order: recomputed from the seed, so a resumed run draws the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(size).astype(np.int32)


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # 1-based
    cost: float  # mean cost over the epoch's forward passes, before each batch's update
    train_accuracy: float
    test_accuracy: float | None  # after the epoch's last update; None with no test images
    seconds: float
    label_privacy: float | None = None  # eps of a label-private run, whose train accuracy is of the labels trained on


@dataclass(frozen=True)
class BackendState:
    """What a checkpoint keeps of a products backend: its secret permutations' generator state and its exposure
    plan; neither exists in one process."""

    permutations: dict | None = None
    plan: ExposurePlan | None = None


class Products(Protocol):
    """A products backend: the matrix products of a step, computed in this process or by workers."""

    def forward(self, weights, split, rows) -> np.ndarray: ...
    def gradient(self, weights, error_rows, error) -> np.ndarray: ...
    def step_then_forward(self, weights, error_rows, error, learning_rate, split, rows) -> tuple: ...
    def settle(self, weights, pending, learning_rate) -> np.ndarray: ...
    def later_forward(self, layer, activations, weights) -> np.ndarray: ...
    def later_backward(self, layer, error) -> tuple: ...
    def epoch_ended(self) -> None: ...
    def state(self) -> BackendState: ...

    def restore(self, state: BackendState) -> None:
        """Continue a checkpoint's secret permutations (the plan a backend is built with: see ClusterOptions)."""


class LocalLaterLayers:
    """The later layers' products computed here, each layer's forward operands kept for its backward."""

    def __init__(self):
        self.operands = {}  # layer -> (activations, weights) of its last forward

    def forward(self, layer, activations, weights) -> np.ndarray:
        """(B, H) @ (H, n) -> (B, n)."""
        self.operands[layer] = (activations, weights)
        return model.later_forward(activations, weights)

    def backward(self, layer, error) -> tuple:
        """The layer's weight gradient (H, n) and the error carried back to its inputs (B, H)."""
        return model.later_backward(*self.operands[layer], error)


class LocalProducts:
    """The products computed here in full: the one-process run that the distributed run must match."""

    def __init__(self, inputs: dict):
        self.inputs = inputs  # split -> (n, I) floats
        self.later = LocalLaterLayers()

    def forward(self, weights, split, rows) -> np.ndarray:
        """The first layer's product for some rows of a split: (B, I) @ (I, H) -> (B, H)."""
        return model.forward_product(self.inputs[split][rows], weights)

    def gradient(self, weights, error_rows, error) -> np.ndarray:
        """The first layer's weight gradient of a chunk of training rows: (I, H)."""
        return model.weight_gradient(self.inputs["train"][error_rows], error)

    def step_then_forward(self, weights, error_rows, error, learning_rate, split, rows) -> tuple:
        """(the weights after a gradient step, the forward product of some rows with them)."""
        weights = stepped(self, weights, (error_rows, error), learning_rate)
        return weights, self.forward(weights, split, rows)

    def settle(self, weights, pending, learning_rate) -> np.ndarray:
        """The weights with a pending step applied, if there is one."""
        return stepped(self, weights, pending, learning_rate)

    def later_forward(self, layer, activations, weights) -> np.ndarray:
        return self.later.forward(layer, activations, weights)

    def later_backward(self, layer, error) -> tuple:
        return self.later.backward(layer, error)

    def epoch_ended(self) -> None:
        """Nothing changes between epochs in one process."""

    def state(self) -> BackendState:
        return BackendState()

    def restore(self, state: BackendState) -> None:
        """Nothing is shuffled in one process."""


def stepped(products, weights, pending, learning_rate) -> np.ndarray:
    """The first layer's weights after the gradient step of `pending` (error rows, error), from `products`."""
    if pending is None:
        return weights
    return model.descend(weights, products.gradient(weights, *pending), learning_rate)


class Trainer:
    """Trains `params` in place; labels are per split, the inputs live with the products backend. With `private`
    labels (coordinator.labels) it trains on those, and only on the images each epoch's stage allows."""

    def __init__(self, config: TrainingConfig, params: Params, products: Products, labels: dict, progress: Progress = None,
                 private=None):
        self.config = config
        self.params = params
        self.products = products
        self.true_labels = labels  # split -> (n,) ints
        self.private = private
        self.labels = labels if private is None else {**labels, "train": private.labels}  # what is trained on
        self.outputs = params.weights[-1].shape[1]
        self.pending = None  # (rows, hidden error) whose first-layer gradient is not yet applied
        self.progress = progress or Progress()
        self.masks = model.dropout_masks(config.seed)  # drawn here only: no mask leaves the coordinator

    @property
    def evaluation_rows(self) -> int:
        """Rows per round of a test pass: as many as keep each worker's reply small (see settings)."""
        row_bytes = max(w.shape[1] for w in self.params.weights) * self.params.weights[0].dtype.itemsize
        return max(1, min(self.config.chunk_rows, settings.EVALUATION_REPLY_BYTES // row_bytes))

    def training_rows(self, epoch: int) -> np.ndarray:
        """The training images of an epoch: all of them, unless a label-private run's first stage is under way."""
        if self.private is None:
            return np.arange(len(self.labels["train"]), dtype=np.int32)
        return self.private.rows_of_epoch(epoch, self.config.epochs)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the epoch under way."""
        return batches(len(self.training_rows(self.progress.epoch)), self.config.batch_size)

    @property
    def steps_done(self) -> int:
        """Gradient steps of the whole run so far."""
        size = self.config.batch_size
        done = sum(batches(len(self.training_rows(epoch)), size) for epoch in range(1, self.progress.epoch))
        return done + self.progress.step

    def train(
        self,
        on_epoch: Callable[[EpochReport], None],
        on_batch: Callable[[int], None] = None,
        after_step: Callable[[], None] = None,
    ) -> None:
        """Train from `progress` to the last epoch; `after_step` runs between steps, when the state is whole."""
        while self.progress.epoch <= self.config.epochs:
            on_epoch(self.run_epoch(on_batch, after_step))
            self.products.epoch_ended()
        self.settle()

    def run_epoch(self, on_batch: Callable[[int], None] = None, after_step: Callable[[], None] = None) -> EpochReport:
        """Train the rest of the epoch under way, then move `progress` to the next one."""
        started = time.perf_counter()
        batch, progress = self.config.batch_size, self.progress
        if self.private is not None and self.private.second_stage_due(progress.epoch, self.config.epochs):
            self._draw_second_stage()  # once: its labels are in every checkpoint from here on
        rows = self.training_rows(progress.epoch)
        size = len(rows)
        order = rows[batch_order(self.config.seed, progress.epoch, size)]
        for start in range(progress.step * batch, size, batch):
            batch_cost, batch_correct = self.train_batch(order[start : start + batch])
            progress.step, progress.cost, progress.correct = (
                progress.step + 1, progress.cost + batch_cost, progress.correct + batch_correct
            )
            if on_batch:
                on_batch(min(start + batch, size))
            if after_step:
                after_step()
        test_accuracy = self.accuracy("test") if len(self.labels["test"]) else None
        self.progress = Progress(progress.epoch + 1)
        seconds = time.perf_counter() - started
        return EpochReport(progress.epoch, progress.cost / size, progress.correct / size, test_accuracy, seconds,
                           self.config.label_privacy)

    def _draw_second_stage(self) -> None:
        """RR with a prior for the images still undrawn: the prior is the model's outputs, trained on the others."""
        rows, step = self.private.undrawn, self.evaluation_rows
        outputs = np.vstack([self._forward_pass("train", rows[start : start + step], dropout=False)[2]
                             for start in range(0, len(rows), step)])
        self.private.draw_second_stage(self.true_labels["train"], outputs, self.config.seed)

    def train_batch(self, rows: np.ndarray) -> tuple:
        """One step of gradient descent on a batch, in chunks; returns its summed cost and correct count."""
        chunks = [rows[i : i + self.config.chunk_rows] for i in range(0, len(rows), self.config.chunk_rows)]
        p, lr = self.params, self.config.learning_rate
        weight_gradients = [np.zeros_like(w) for w in p.weights]
        bias_gradients = [np.zeros_like(b) for b in p.biases]
        cost = correct = 0
        for chunk in chunks:
            hidden, masks, outputs = self._forward_pass("train", chunk, dropout=True)
            target = model.targets(self.labels["train"][chunk], self.outputs, outputs.dtype)
            chunk_cost, error = model.output_error(outputs, target, self.config.loss, self.config.output, len(rows))
            for layer in range(p.layers, 1, -1):  # the last layer first; layer 1's gradient is the first layer's
                bias_gradients[layer - 1] += error.sum(axis=0)
                gradient, backpropagated = self.products.later_backward(layer, error)
                weight_gradients[layer - 1] += gradient
                error = model.hidden_error(backpropagated, hidden[layer - 2], masks[layer - 2], self.config.activation)
            bias_gradients[0] += error.sum(axis=0)
            cost += chunk_cost
            correct += model.correct(outputs, self.labels["train"][chunk])
            if len(chunks) == 1:
                self.pending = (chunk, error)  # applied with the next forward product
            else:
                weight_gradients[0] += self.products.gradient(p.weights[0], chunk, error)
        first = 1 if len(chunks) == 1 else 0  # a single chunk's first-layer step is pending
        p.weights[first:] = [model.descend(w, g, lr) for w, g in zip(p.weights[first:], weight_gradients[first:])]
        p.biases = [model.descend(b, g, lr) for b, g in zip(p.biases, bias_gradients)]
        return cost, correct

    def accuracy(self, split: str) -> float:
        """The fraction of a split the current parameters classify correctly."""
        labels, correct = self.labels[split], 0
        for start in range(0, len(labels), self.evaluation_rows):
            rows = np.arange(start, min(start + self.evaluation_rows, len(labels)), dtype=np.int32)
            outputs = self._forward_pass(split, rows, dropout=False)[2]  # no dropout when evaluating
            correct += model.correct(outputs, labels[rows])
        return correct / len(labels)

    def _forward_pass(self, split: str, rows, dropout: bool) -> tuple:
        """(each hidden layer's activations, each one's dropout mask, the outputs) of some rows: layer by layer,
        each mask drawn here as its layer's activations come, the next layer's products taking them masked."""
        p, config = self.params, self.config
        hidden, masks = [model.activate(self._forward(split, rows), p.biases[0], config.activation)], []
        for layer in range(2, p.layers + 1):
            rate = config.dropout if dropout else 0.0
            masks.append(model.dropout_mask(self.masks, hidden[-1].shape, rate, hidden[-1].dtype))  # (B, H)
            # the workers that compute the later layers get the activations already masked
            product = self.products.later_forward(layer, hidden[-1] * masks[-1], p.weights[layer - 1])
            function = config.output if layer == p.layers else config.activation
            hidden.append(model.activate(product, p.biases[layer - 1], function))
        return hidden[:-1], masks, hidden[-1]

    def settle(self) -> None:
        """Apply a pending first-layer step on its own, so the parameters are final (this ends a kept period)."""
        self.params.weights[0] = self.products.settle(self.params.weights[0], self.pending, self.config.learning_rate)
        self.pending = None

    def _forward(self, split: str, rows) -> np.ndarray:
        """The first layer's product for some rows, taking the pending step first in the same round."""
        if self.pending is None:
            return self.products.forward(self.params.weights[0], split, rows)
        (error_rows, error), lr = self.pending, self.config.learning_rate
        self.pending = None
        self.params.weights[0], product = self.products.step_then_forward(
            self.params.weights[0], error_rows, error, lr, split, rows
        )
        return product
