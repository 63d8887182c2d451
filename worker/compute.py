"""What a worker holds and computes; no sockets, so it can be tested and reused directly."""

import numpy as np

from common import model, settings
from common.protocol import (
    WIRE_PRODUCTS, FirstLayer, KeptFirstLayer, LaterBackward, LaterForward, Result, ReturnRows, Shard,
)


class RequestError(ValueError):
    """A request this worker cannot carry out; the text says why in one line."""


class WorkerState:
    """A worker's input columns of each split, its kept first-layer rows, and the operands of each later layer's last
    forward."""

    def __init__(self, dtype: str, input_divisor: float, wire: str = "exact"):
        self.dtype = np.dtype(dtype)
        self.wire = wire  # errors come and partial products go in this format; the math is in `dtype`
        self.input_divisor = input_divisor
        self.inputs: dict[str, np.ndarray] = {}  # split -> (n, k) floats
        self.rows_loaded: dict[str, int] = {}  # split -> rows of `inputs` filled so far by shard chunks
        self.kept_rows: np.ndarray | None = None  # (k, H) first-layer rows stepped here between re-keys
        self.later_operands: dict[int, tuple] = {}  # layer -> (activations (B, j), weights (j, n))
        self.handlers = {
            Shard: self.load_shard,
            FirstLayer: self.first_layer,
            KeptFirstLayer: self.kept_first_layer,
            ReturnRows: self.return_rows,
            LaterForward: self.later_forward,
            LaterBackward: self.later_backward,
        }

    def load_shard(self, shard: Shard) -> dict:
        """Take one chunk of a split's columns; a chunk at offset 0 starts the split afresh."""
        images = shard.images
        if images.dtype != np.uint8 or images.ndim != 2:
            raise RequestError("a shard must be a 2-d uint8 array")
        if shard.offset == 0:
            if not 0 < shard.total <= settings.MAX_SHARD_ROWS:
                raise RequestError(f"a split of {shard.total} rows is not 1..{settings.MAX_SHARD_ROWS}")
            self.inputs[shard.split] = np.empty((shard.total, images.shape[1]), self.dtype)
            self.rows_loaded[shard.split] = 0
        held = self.inputs.get(shard.split)
        if held is None or shard.total != len(held) or images.shape[1] != held.shape[1]:
            raise RequestError(f"shard chunk does not continue split {shard.split!r}")
        if not 0 < shard.offset + len(images) <= shard.total or shard.offset > self.rows_loaded[shard.split]:
            raise RequestError(f"shard chunk at row {shard.offset} is out of order")
        held[shard.offset : shard.offset + len(images)] = model.inputs(images, self.dtype, self.input_divisor)
        self.rows_loaded[shard.split] = max(self.rows_loaded[shard.split], shard.offset + len(images))
        return {}

    def compute(self, request) -> Result:
        """The result of one compute request, or RequestError."""
        products = self.handlers[type(request)](request)
        return Result(request.request, {
            name: model.to_wire(array, self.wire) if name in WIRE_PRODUCTS else array for name, array in products.items()
        })

    def first_layer(self, request: FirstLayer) -> dict:
        if request.rows is not None or request.weights is not None:
            self._check(request.weights, (self._columns(), None), "weights", self.dtype)
        gradient, _, partial = self._first_layer_of(request.weights, request)
        products = {"gradient": gradient, "partial": partial}
        return {name: array for name, array in products.items() if array is not None}

    def kept_first_layer(self, request: KeptFirstLayer) -> dict:
        """Re-key if rows come, step the kept rows by the error's gradient, then the forward product with them."""
        weights = self.kept_rows if request.weights is None else request.weights
        if weights is None:
            raise RequestError("kept_first_layer without weights before any re-key")
        self._check(weights, (self._columns(), None), "kept rows", self.dtype)
        _, self.kept_rows, partial = self._first_layer_of(weights, request)  # refused before the kept rows change
        return {} if partial is None else {"partial": partial}

    def _first_layer_of(self, weights, request) -> tuple:
        """model.first_layer on a (kept) first-layer request's operands, each checked first: (gradient, the weights
        after it, partial)."""
        forward_inputs = None if request.rows is None else self._rows_of(request.split, request.rows)
        gradient_inputs = error = None
        if request.error is not None:
            gradient_inputs = self._rows_of("train", request.error_rows)
            width = None if weights is None else weights.shape[1]
            self._check(request.error, (len(request.error_rows), width), "error", self._wire_dtype())
            error = self._off_wire(request.error)
        return model.first_layer(weights, forward_inputs, gradient_inputs, error, request.learning_rate)

    def return_rows(self, request: ReturnRows) -> dict:
        if self.kept_rows is None:
            raise RequestError("return_rows before any kept rows")
        return {"weights": self.kept_rows}

    def later_forward(self, request: LaterForward) -> dict:
        if not 2 <= request.layer <= settings.MAX_HIDDEN_LAYERS + 1:
            raise RequestError(f"layer {request.layer} is not a later layer 2..{settings.MAX_HIDDEN_LAYERS + 1}")
        self._check(request.activations, (None, None), "activations", self.dtype)
        self._check(request.weights, (request.activations.shape[1], None), "weights", self.dtype)
        self.later_operands[request.layer] = (request.activations, request.weights)
        return {"partial": model.later_forward(request.activations, request.weights)}

    def later_backward(self, request: LaterBackward) -> dict:
        if request.layer not in self.later_operands:
            raise RequestError(f"later_backward of layer {request.layer} before its later_forward")
        activations, weights = self.later_operands[request.layer]
        self._check(request.error, (activations.shape[0], weights.shape[1]), "error", self._wire_dtype())
        gradient, error = model.later_backward(activations, weights, self._off_wire(request.error))
        return {"gradient": gradient, "error": error}

    def _columns(self) -> int:
        return self._loaded("train").shape[1]

    def _loaded(self, split: str) -> np.ndarray:
        """A split's inputs, once every chunk of its shard has come."""
        if split not in self.inputs or self.rows_loaded[split] < len(self.inputs[split]):
            raise RequestError(f"compute request before the whole {split!r} shard")
        return self.inputs[split]

    def _rows_of(self, split: str, rows) -> np.ndarray:
        """The inputs of some rows of a split: (B,) -> (B, k)."""
        inputs = self._loaded(split)
        if rows is None or rows.ndim != 1 or rows.dtype.kind != "i":
            raise RequestError("rows must be a 1-d integer array")
        if rows.size and (rows.min() < 0 or rows.max() >= len(inputs)):
            raise RequestError(f"rows out of range for split {split!r}")
        return inputs[rows]

    def _wire_dtype(self) -> np.dtype:
        return model.wire_dtype(self.wire, self.dtype)

    def _off_wire(self, error):
        return None if error is None else model.from_wire(error, self.dtype)

    def _check(self, array, shape: tuple, name: str, dtype: np.dtype) -> None:
        """Refuse an operand of the wrong dtype or shape (None in `shape` accepts any size)."""
        if array is None or array.dtype != dtype or array.ndim != len(shape):
            raise RequestError(f"{name} must be a {len(shape)}-d {dtype} array")
        if any(want is not None and have != want for have, want in zip(array.shape, shape)):
            raise RequestError(f"{name} has shape {array.shape}, expected {shape}")
