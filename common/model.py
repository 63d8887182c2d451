"""The network's math as pure numpy functions: no I/O, shared by the local and the distributed trainer.

Notation: B rows in a batch, I inputs (784), H hidden units (128), O outputs (10). A worker holds k of
the I input columns and j of the H hidden units; the same functions serve it and the one-process run.
"""

from dataclasses import dataclass, fields

import numpy as np

LOSSES = ("mse", "bce")
INITIALISATIONS = ("scaled", "legacy")


@dataclass
class Params:
    """The weights and biases of the I-H-O sigmoid network."""

    w1: np.ndarray  # (I, H)
    b1: np.ndarray  # (H,)
    w2: np.ndarray  # (H, O)
    b2: np.ndarray  # (O,)

    def arrays(self) -> dict:
        return {name: getattr(self, name) for name in PARAM_NAMES}

    @classmethod
    def from_arrays(cls, arrays) -> "Params":
        """From a mapping that holds every name of PARAM_NAMES, such as a loaded model.npz or checkpoint."""
        return cls(*(arrays[name] for name in PARAM_NAMES))


PARAM_NAMES = tuple(field.name for field in fields(Params))  # also the array names in model.npz and checkpoints


def initial_params(sizes: tuple, init: str, seed: int, dtype: str) -> Params:
    """Fresh parameters: "legacy" is the seed notebook's randn * 0.01, "scaled" divides by sqrt(fan-in)."""
    inputs, hidden, outputs = sizes
    if init == "legacy":
        np.random.seed(seed)  # the seed notebook drew from numpy's global generator, in this order
        w1 = np.random.randn(inputs, hidden) * 0.01
        w2 = np.random.randn(hidden, outputs) * 0.01
    else:
        rng = np.random.default_rng(seed)
        w1 = rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)
        w2 = rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)
    return Params(w1.astype(dtype), np.zeros(hidden, dtype), w2.astype(dtype), np.zeros(outputs, dtype))


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


def activate(partial_sum: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A layer's output from its summed matrix product: (B, n) + (n,) -> (B, n)."""
    return sigmoid(partial_sum + bias)


def output_error(outputs: np.ndarray, target: np.ndarray, loss: str, batch_size: int) -> tuple:
    """The chunk's summed cost and dLoss/dz2 of a batch of `batch_size` rows: (B, O) -> (float, (B, O))."""
    if loss == "mse":  # cost = sum((a2 - y)^2) / (2m)
        difference = outputs - target
        cost = float(np.sum(difference * difference)) / 2
        return cost, difference * outputs * (1 - outputs) / batch_size
    # cost = -sum(y log a2 + (1 - y) log(1 - a2)) / m, with a2 kept off 0 and 1 by the dtype's own epsilon so that
    # log() stays finite when a sigmoid output rounds to 0 or 1 (1 - 1e-12 is 1 in float32)
    epsilon = np.finfo(outputs.dtype).eps
    clipped = np.clip(outputs, epsilon, 1 - epsilon)
    cost = -float(np.sum(target * np.log(clipped) + (1 - target) * np.log(1 - clipped)))
    return cost, (outputs - target) / batch_size


def hidden_error(backpropagated: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """dLoss/dz1 from the error carried back through the second layer: (B, H) * (B, H) -> (B, H)."""
    return backpropagated * activations * (1 - activations)


def weight_gradient(layer_inputs: np.ndarray, error: np.ndarray) -> np.ndarray:
    """dLoss/dW for the rows of W that multiply these inputs."""
    return layer_inputs.T @ error  # (B, k)^T @ (B, H) -> (k, H)


def descend(weights: np.ndarray, gradient: np.ndarray, learning_rate: float) -> np.ndarray:
    """One step of plain gradient descent."""
    return weights - np.asarray(learning_rate, weights.dtype) * gradient


def first_layer(weights, forward_inputs, gradient_inputs, error, learning_rate) -> tuple:
    """A weight gradient (if error is given), then a forward product with the descended weights (if inputs are).

    Returns (gradient (k, H) or None, partial (B, k) @ (k, H) -> (B, H) or None).
    """
    gradient = None if error is None else weight_gradient(gradient_inputs, error)
    if forward_inputs is None:
        return gradient, None
    if gradient is not None:
        weights = descend(weights, gradient, learning_rate)
    return gradient, forward_product(forward_inputs, weights)


def forward_product(layer_inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A layer's (partial) matrix product: (B, k) @ (k, H) -> (B, H)."""
    return layer_inputs @ weights


def second_forward(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The second layer's product: (B, j) @ (j, O) -> (B, O)."""
    return activations @ weights


def second_backward(activations: np.ndarray, weights: np.ndarray, error: np.ndarray) -> tuple:
    """The second layer's weight gradient (j, O) and the error carried back to its inputs (B, j)."""
    return weight_gradient(activations, error), error @ weights.T  # (B, O) @ (O, j) -> (B, j)


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
