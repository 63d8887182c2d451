"""The network's math as pure numpy functions: no I/O, shared by the local and the distributed trainer.

Notation: B rows in a batch, I inputs (784), H hidden units (128) of a hidden layer, O outputs (10). Layer 1
multiplies the inputs, each later layer (2, 3, ...) the units of the hidden layer before it. A worker holds
k of the I input columns and j of each hidden layer's units; the same functions serve it and the one-process run.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

INITIALISATIONS = ("scaled", "uniform", "normal", "legacy")
UNIFORM_LIMIT = 0.1  # the notebooks' uniform weights lie in [-0.1, 0.1)
NORMAL_STD = 0.01  # and their normal ones have this standard deviation (the seed notebook's randn * 0.01)


@dataclass
class Params:
    """The weights and biases of the I-H1-...-Hn-O network, layer 1 first."""

    weights: list  # [(I, H1), (H1, H2), ..., (Hn, O)]
    biases: list  # [(H1,), (H2,), ..., (O,)]

    @property
    def layers(self) -> int:
        return len(self.weights)

    def arrays(self) -> dict:
        """The arrays by their names in model.npz and checkpoints: w1, b1, w2, b2, ..."""
        return {f"{kind}{layer}": arrays[layer - 1] for layer in range(1, self.layers + 1)
                for kind, arrays in (("w", self.weights), ("b", self.biases))}

    @classmethod
    def from_arrays(cls, arrays) -> "Params":
        """From a mapping that holds w1, b1, w2, b2 and any further layers in order, such as a loaded model.npz."""
        layers = 2
        while f"w{layers + 1}" in arrays:
            layers += 1
        return cls([arrays[f"w{layer}"] for layer in range(1, layers + 1)],
                   [arrays[f"b{layer}"] for layer in range(1, layers + 1)])

    def copy(self) -> "Params":
        return Params(list(self.weights), list(self.biases))


def initial_params(
    sizes: tuple, init: str, seed: int, dtype: str, uniform_limit: float = UNIFORM_LIMIT, normal_std: float = NORMAL_STD
) -> Params:
    """Fresh weights, drawn layer by layer from the first, and zero biases: "scaled" is randn / sqrt(fan-in),
    "uniform" lies in [-limit, limit), "normal" is randn * std, "legacy" the seed notebook's randn * 0.01 from
    numpy's global generator; `sizes` is (I, H1, ..., Hn, O)."""
    shapes = list(zip(sizes[:-1], sizes[1:]))
    if init == "legacy":
        np.random.seed(seed)  # the seed notebook drew from numpy's global generator, in this order
        weights = [np.random.randn(*shape) * 0.01 for shape in shapes]
    else:
        rng = np.random.default_rng(seed)
        draw = {
            "scaled": lambda shape: rng.standard_normal(shape) / np.sqrt(shape[0]),
            "uniform": lambda shape: rng.uniform(-uniform_limit, uniform_limit, shape),
            "normal": lambda shape: rng.standard_normal(shape) * normal_std,
        }[init]
        weights = [draw(shape) for shape in shapes]
    return Params([w.astype(dtype) for w in weights], [np.zeros(size, dtype) for size in sizes[1:]])


def inputs(images: np.ndarray, dtype: str, divisor: float) -> np.ndarray:
    """Network inputs from uint8 pixels: (n, k) uint8 -> (n, k) floats."""
    return images.astype(dtype) / np.asarray(divisor, dtype)


def targets(labels: np.ndarray, outputs: int, dtype: str) -> np.ndarray:
    """One-hot rows for several outputs, the label itself for a single output: (B,) -> (B, O)."""
    if outputs == 1:
        return labels.astype(dtype)[:, None]
    return np.eye(outputs, dtype=dtype)[labels]


def correct(outputs: np.ndarray, labels: np.ndarray) -> int:
    """How many rows the network gets right: the largest output, or one output's side of 0.5."""
    if outputs.shape[1] == 1:
        return int(np.count_nonzero((outputs[:, 0] > 0.5) == labels))
    return int(np.count_nonzero(outputs.argmax(axis=1) == labels))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def softmax(z: np.ndarray) -> np.ndarray:
    """Each row's exponentials over their sum, the row's largest taken off first so none overflows: (B, O)."""
    exponentials = np.exp(z - z.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def softmax_backward(error: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """dLoss/dz from dLoss/da through softmax's Jacobian: a * (g - sum(g * a)) per row, (B, O) -> (B, O)."""
    return outputs * (error - np.sum(error * outputs, axis=1, keepdims=True))


class Function(NamedTuple):
    """A layer's element-wise function and its chain rule: dLoss/da -> dLoss/dz, written with the output a."""

    forward: Callable  # z -> a
    backward: Callable  # (dLoss/da, a) -> dLoss/dz


FUNCTIONS = {
    "sigmoid": Function(sigmoid, lambda error, a: error * a * (1 - a)),
    "relu": Function(lambda z: np.maximum(z, 0), lambda error, a: error * (a > 0)),
    "tanh": Function(np.tanh, lambda error, a: error * (1 - a * a)),
    "softmax": Function(softmax, softmax_backward),
    "linear": Function(lambda z: z, lambda error, a: error),
}
ACTIVATIONS = ("sigmoid", "relu", "tanh")  # of the hidden layer
OUTPUTS = ("sigmoid", "softmax", "linear")  # of the output layer


def squared_error(outputs: np.ndarray, target: np.ndarray) -> float:
    """sum((a2 - y)^2) / 2 over the chunk."""
    difference = outputs - target
    return float(np.sum(difference * difference)) / 2


def binary_cross_entropy(outputs: np.ndarray, target: np.ndarray) -> float:
    """-sum(y log a2 + (1 - y) log(1 - a2)) over the chunk, with a2 kept off 0 and 1 by the dtype's own epsilon so
    that log() stays finite when a sigmoid output rounds to 0 or 1 (1 - 1e-12 is 1 in float32)."""
    epsilon = np.finfo(outputs.dtype).eps
    clipped = np.clip(outputs, epsilon, 1 - epsilon)
    return -float(np.sum(target * np.log(clipped) + (1 - target) * np.log(1 - clipped)))


def cross_entropy(outputs: np.ndarray, target: np.ndarray) -> float:
    """-sum(y log a2) over the chunk, a2 kept off 0 as above."""
    return -float(np.sum(target * np.log(np.maximum(outputs, np.finfo(outputs.dtype).eps))))


class Loss(NamedTuple):
    """A cost function, and the output function it belongs with."""

    cost: Callable  # (outputs, target) -> the chunk's summed cost
    output: str | None  # the output function whose slope the loss's own cancels, so dLoss/dz2 = a2 - y; None: any


LOSSES = {
    "mse": Loss(squared_error, None),
    "bce": Loss(binary_cross_entropy, "sigmoid"),
    "ce": Loss(cross_entropy, "softmax"),
}


def activate(partial_sum: np.ndarray, bias: np.ndarray, function: str) -> np.ndarray:
    """A layer's output from its summed matrix product: (B, n) + (n,) -> (B, n)."""
    return FUNCTIONS[function].forward(partial_sum + bias)


def output_error(outputs: np.ndarray, target: np.ndarray, loss: str, output: str, batch_size: int) -> tuple:
    """The chunk's summed cost and dLoss/dz2 of a batch of `batch_size` rows: (B, O) -> (float, (B, O)).

    The batch's cost is the mean over its rows, so each error is divided by `batch_size`. bce after sigmoid
    and ce after softmax give a2 - y; mse goes through the output function's chain rule.
    """
    cost = LOSSES[loss].cost(outputs, target)
    if LOSSES[loss].output == output:
        return cost, (outputs - target) / batch_size
    return cost, FUNCTIONS[output].backward(outputs - target, outputs) / batch_size


def dropout_masks(seed: int) -> np.random.Generator:
    """The run's generator of dropout masks: a stream of the seed apart from the weights' and the batch orders'."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))


def dropout_mask(masks: np.random.Generator, shape: tuple, rate: float, dtype) -> np.ndarray:
    """Inverted dropout: each unit dropped with probability `rate`, the kept ones scaled by 1 / (1 - rate): (B, H).

    At rate 0 every unit is kept as it is, and no number is drawn.
    """
    if rate == 0:
        return np.ones(shape, dtype)
    kept = masks.random(shape) >= rate
    return kept.astype(dtype) / np.asarray(1 - rate, dtype)


def hidden_error(backpropagated: np.ndarray, activations: np.ndarray, mask: np.ndarray, function: str) -> np.ndarray:
    """dLoss/dz of a hidden layer from the error carried back through the next layer to its masked activations
    a * mask: (B, H) * (B, H) -> (B, H); `activations` are a before the mask."""
    return FUNCTIONS[function].backward(backpropagated * mask, activations)


def weight_gradient(layer_inputs: np.ndarray, error: np.ndarray) -> np.ndarray:
    """dLoss/dW for the rows of W that multiply these inputs."""
    return layer_inputs.T @ error  # (B, k)^T @ (B, H) -> (k, H)


def descend(weights: np.ndarray, gradient: np.ndarray, learning_rate: float) -> np.ndarray:
    """One step of plain gradient descent."""
    return weights - np.asarray(learning_rate, weights.dtype) * gradient


def first_layer(weights, forward_inputs, gradient_inputs, error, learning_rate) -> tuple:
    """A weight gradient and the weights descended by it (if error is given), then a forward product with them (if
    inputs are). With no weights (a chunk's gradient alone) there is nothing to descend.

    Returns (gradient (k, H) or None, weights (k, H) or None, partial (B, k) @ (k, H) -> (B, H) or None).
    """
    gradient = None if error is None else weight_gradient(gradient_inputs, error)
    if gradient is not None and weights is not None:
        weights = descend(weights, gradient, learning_rate)
    partial = None if forward_inputs is None else forward_product(forward_inputs, weights)
    return gradient, weights, partial


def forward_product(layer_inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A layer's (partial) matrix product: (B, k) @ (k, H) -> (B, H)."""
    return layer_inputs @ weights


def later_forward(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A later layer's (partial) product from some of its input units: (B, j) @ (j, n) -> (B, n)."""
    return activations @ weights


def later_backward(activations: np.ndarray, weights: np.ndarray, error: np.ndarray) -> tuple:
    """A later layer's weight gradient (j, n) and the error carried back to its input units (B, j)."""
    return weight_gradient(activations, error), error @ weights.T  # (B, n) @ (n, j) -> (B, j)


# Errors and partial products may cross the network narrower than the run computes (`--wire`); weights and
# gradients never do. bfloat16 is float32's upper half: numpy has no such type, so its bits travel as uint16.
WIRE_FORMATS = ("exact", "float16", "bfloat16")
WIRE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def wire_dtype(wire: str, dtype) -> np.dtype:
    """The dtype an error or partial product travels in: the run's own ("exact"), float16, or bfloat16's bits."""
    return WIRE_DTYPES.get(wire, np.dtype(dtype))


def wire_roundoff(wire: str) -> tuple:
    """(unit roundoff, absolute floor) of putting a value on the wire: (0, 0) when exact."""
    if wire == "exact":
        return 0.0, 0.0
    if wire == "float16":
        return float(np.finfo(np.float16).eps) / 2, float(np.finfo(np.float16).smallest_subnormal) / 2
    return 2.0**-8, float(np.finfo(np.float32).smallest_subnormal) / 2  # bfloat16 keeps 8 bits of mantissa


def to_wire(array: np.ndarray, wire: str) -> np.ndarray:
    """An array as it travels: unchanged, cast to float16, or rounded to the nearest (even) bfloat16's bits."""
    if wire == "exact":
        return array
    if wire == "float16":
        return array.astype(np.float16)
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)  # drop 16 bits, ties to even


def from_wire(array: np.ndarray, dtype) -> np.ndarray:
    """An array off the wire in the run's dtype (itself when it came exact); uint16 is bfloat16's bits."""
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(dtype, copy=False)
