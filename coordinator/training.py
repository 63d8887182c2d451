"""Mini-batch gradient descent over a products backend: the same loop drives the local and the distributed run.

A backend computes the three groups of matrix products of a step (first layer, second layer forward,
second layer backward); `LocalProducts` does it in this process, `ClusterProducts` on the workers.
The first layer's gradient step of a batch is taken together with the next forward product
(`step_then_forward`), so one round of messages both ends a step and starts the next (see FirstLayer in
the protocol); `settle` applies the last one on its own.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common import model, settings
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


class LocalProducts:
    """The products computed here in full: the one-process run that the distributed run must match."""

    def __init__(self, inputs: dict):
        self.inputs = inputs  # split -> (n, I) floats
        self.second_operands = None
        self.plan = self.permutations = None  # one process: nothing is split or shuffled

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

    def second_forward(self, activations, weights) -> np.ndarray:
        self.second_operands = (activations, weights)
        return model.second_forward(activations, weights)

    def second_backward(self, error) -> tuple:
        return model.second_backward(*self.second_operands, error)

    def epoch_ended(self) -> None:
        """Nothing changes between epochs in one process."""


def stepped(products, weights, pending, learning_rate) -> np.ndarray:
    """The first layer's weights after the gradient step of `pending` (error rows, error), from `products`."""
    if pending is None:
        return weights
    return model.descend(weights, products.gradient(weights, *pending), learning_rate)


class Trainer:
    """Trains `params` in place; labels are per split, the inputs live with the products backend."""

    def __init__(self, config: TrainingConfig, params: Params, products, labels: dict, progress: Progress = None):
        self.config = config
        self.params = params
        self.products = products
        self.labels = labels  # split -> (n,) ints
        self.outputs = params.w2.shape[1]
        self.pending = None  # (rows, hidden error) whose first-layer gradient is not yet applied
        self.progress = progress or Progress()
        self.masks = model.dropout_masks(config.seed)  # drawn here only: no mask leaves the coordinator

    @property
    def evaluation_rows(self) -> int:
        """Rows per round of a test pass: as many as keep each worker's reply small (see settings)."""
        row_bytes = self.params.w1.shape[1] * self.params.w1.dtype.itemsize
        return max(1, min(self.config.chunk_rows, settings.EVALUATION_REPLY_BYTES // row_bytes))

    @property
    def steps_per_epoch(self) -> int:
        return batches(len(self.labels["train"]), self.config.batch_size)

    @property
    def steps_done(self) -> int:
        """Gradient steps of the whole run so far."""
        return (self.progress.epoch - 1) * self.steps_per_epoch + self.progress.step

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
        size, batch, progress = len(self.labels["train"]), self.config.batch_size, self.progress
        order = batch_order(self.config.seed, progress.epoch, size)
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
        return EpochReport(progress.epoch, progress.cost / size, progress.correct / size, test_accuracy, seconds)

    def train_batch(self, rows: np.ndarray) -> tuple:
        """One step of gradient descent on a batch, in chunks; returns its summed cost and correct count."""
        chunks = [rows[i : i + self.config.chunk_rows] for i in range(0, len(rows), self.config.chunk_rows)]
        p, config, lr = self.params, self.config, self.config.learning_rate
        w1_gradient, w2_gradient = np.zeros_like(p.w1), np.zeros_like(p.w2)
        b1_gradient, b2_gradient = np.zeros_like(p.b1), np.zeros_like(p.b2)
        cost = correct = 0
        for chunk in chunks:
            hidden = model.activate(self._forward("train", chunk), p.b1, config.activation)
            mask = model.dropout_mask(self.masks, hidden.shape, config.dropout, hidden.dtype)  # (B, H)
            # the workers that compute the second layer get the activations already masked
            outputs = model.activate(self.products.second_forward(hidden * mask, p.w2), p.b2, config.output)
            target = model.targets(self.labels["train"][chunk], self.outputs, p.w2.dtype)
            chunk_cost, output_error = model.output_error(outputs, target, config.loss, config.output, len(rows))
            chunk_w2_gradient, backpropagated = self.products.second_backward(output_error)
            hidden_error = model.hidden_error(backpropagated, hidden, mask, config.activation)
            w2_gradient += chunk_w2_gradient
            b2_gradient += output_error.sum(axis=0)
            b1_gradient += hidden_error.sum(axis=0)
            cost += chunk_cost
            correct += model.correct(outputs, self.labels["train"][chunk])
            if len(chunks) == 1:
                self.pending = (chunk, hidden_error)  # applied with the next forward product
            else:
                w1_gradient += self.products.gradient(p.w1, chunk, hidden_error)
        if len(chunks) > 1:
            p.w1 = model.descend(p.w1, w1_gradient, lr)
        p.w2 = model.descend(p.w2, w2_gradient, lr)
        p.b1 = model.descend(p.b1, b1_gradient, lr)
        p.b2 = model.descend(p.b2, b2_gradient, lr)
        return cost, correct

    def accuracy(self, split: str) -> float:
        """The fraction of a split the current parameters classify correctly."""
        labels, correct = self.labels[split], 0
        for start in range(0, len(labels), self.evaluation_rows):
            rows = np.arange(start, min(start + self.evaluation_rows, len(labels)), dtype=np.int32)
            hidden = model.activate(self._forward(split, rows), self.params.b1, self.config.activation)
            outputs = model.activate(self.products.second_forward(hidden, self.params.w2), self.params.b2,
                                     self.config.output)  # no dropout when evaluating
            correct += model.correct(outputs, labels[rows])
        return correct / len(labels)

    def settle(self) -> None:
        """Apply a pending first-layer step on its own, so the parameters are final (this ends a kept period)."""
        self.params.w1 = self.products.settle(self.params.w1, self.pending, self.config.learning_rate)
        self.pending = None

    def _forward(self, split: str, rows) -> np.ndarray:
        """The first layer's product for some rows, taking the pending step first in the same round."""
        if self.pending is None:
            return self.products.forward(self.params.w1, split, rows)
        (error_rows, error), lr = self.pending, self.config.learning_rate
        self.pending = None
        self.params.w1, product = self.products.step_then_forward(self.params.w1, error_rows, error, lr, split, rows)
        return product
