"""Freivalds checks of the workers' partial products.

For a product P = A B that a worker returns, draw a secret random vector r and compare P r with A (B r):
two matrix-vector products instead of a matrix product. The comparison allows the worst-case rounding
of computing P in the run's dtype, gamma_k |A| |B| |r| with gamma_k = k u / (1 - k u) for an inner
dimension k and unit roundoff u (plus the rounding of the check itself, done in the same dtype to avoid
copies), so honest arithmetic never fails it. A wrong element delta at (i, j)
escapes one check only if |delta r_j| falls under row i's allowance t_i; with r_j standard normal that
happens with probability about 0.8 t_i / |delta|, so an error well above the rounding level is caught
almost surely, and each further check multiplies the escape odds again.
"""

import dataclasses
import enum
from dataclasses import dataclass

import numpy as np

from common import model
from common.protocol import WIRE_PRODUCTS, FirstLayer, KeptFirstLayer, LaterBackward, LaterForward, ReturnRows
from coordinator.kept import Tracking

class Verify(str, enum.Enum):
    """Which results are Freivalds-checked: none, a secret random sample, or all."""

    off = "off"
    sample = "sample"
    all = "all"


VERIFY_MODES = tuple(mode.value for mode in Verify)  # as bench's comma-separated option names them
SAFETY = 2.0  # on top of the worst-case bounds, which already count the check's own rounding


@dataclass(frozen=True)
class Evidence:
    """Why a result was judged wrong: which product, and by how much beyond the rounding allowance."""

    product: str
    discrepancy: float  # the largest |P r - A (B r)| over the rows
    allowance: float  # the rounding allowance of that row

    def __str__(self) -> str:
        return f"{self.product} off by {self.discrepancy:.3g} where rounding allows {self.allowance:.3g}"


class Verifier:
    """Checks all, a secret random sample, or none of the results, against operands the coordinator holds."""

    def __init__(self, mode: str, rate: float, rng: np.random.Generator, inputs, dtype: str, wire_roundoff=(0.0, 0.0)):
        self.mode = mode
        self.dtype = np.dtype(dtype)  # the run's: what the workers compute in, and wire values are read back into
        self.wire_roundoff = wire_roundoff  # (unit, absolute floor) of the rounding onto the wire: model.wire_roundoff
        self.rate = rate
        self.rng = rng  # secret: the worker cannot tell which answers are checked
        self.inputs = inputs  # (split, rows, columns) -> (B, k) float inputs, as the workers compute them

    def chosen(self, request) -> bool:
        """Whether to check an answer to `request`: kept rows coming back are checked whenever anything is, since
        they are the weights themselves and come once a re-key."""
        if self.mode == "sample" and isinstance(request, ReturnRows):
            return True
        return self.mode == "all" or (self.mode == "sample" and self.rng.random() < self.rate)

    def check(self, request, products: dict, columns: np.ndarray, forward: LaterForward | None = None,
              kept: Tracking | None = None) -> Evidence | None:
        """Evidence against one result, or None; `forward` is the worker's last LaterForward of a LaterBackward's
        layer, `kept` what is known of its kept rows. Errors and products on the wire are taken as the worker took
        and gave them, off the wire in the run's dtype."""
        request, products = _off_wire(request, products, self.dtype)
        if isinstance(request, KeptFirstLayer):
            return self._kept_partial(request, products, columns, kept)
        if isinstance(request, ReturnRows):
            return self._returned_rows(products["weights"].astype(np.float64), columns, kept)
        if isinstance(request, FirstLayer):
            return self._first_layer(request, products, columns)
        if isinstance(request, LaterForward):
            return self._compare("partial", products["partial"], request.activations, request.weights)
        return self._later_backward(request, products, forward)

    def _first_layer(self, request: FirstLayer, products: dict, columns: np.ndarray) -> Evidence | None:
        evidence, weights = None, request.weights
        if request.error is not None:
            gradient_inputs = self.inputs("train", request.error_rows, columns)
            evidence = self._compare("gradient", products["gradient"], gradient_inputs.T, request.error)
            if weights is not None:  # the weights the worker stepped to, from the true gradient
                weights = _Operand(weights, gradient_inputs.T, request.error, request.learning_rate)
        if evidence is None and request.rows is not None:
            forward_inputs = self.inputs(request.split, request.rows, columns)
            evidence = self._compare("partial", products["partial"], forward_inputs, weights)
        return evidence

    def _kept_partial(self, request: KeptFirstLayer, products: dict, columns: np.ndarray, kept: Tracking):
        """Evidence that the forward product is not X W(t) for the kept rows W(t), or None."""
        if request.rows is None:
            return None
        inputs = self.inputs(request.split, request.rows, columns).astype(np.float64)
        partial = products["partial"].astype(np.float64)
        unit, floor = self.wire_roundoff
        rounding = (_gamma(inputs.shape[1], self.dtype) * (np.abs(inputs) @ kept.magnitude[columns])
                    + unit * (np.abs(partial) @ np.abs(kept.r)) + floor * float(np.abs(kept.r).sum()))
        return self._against_tracking("partial", partial, kept, columns, rounding, inputs)

    def _returned_rows(self, rows: np.ndarray, columns: np.ndarray, kept: Tracking) -> Evidence | None:
        """Evidence that the kept rows sent back at a re-key are not W(t), or None."""
        rounding = _gamma(rows.shape[1], np.float64) * (np.abs(rows) @ np.abs(kept.r))  # ours of rows @ r, in float64
        return self._against_tracking("weights", rows, kept, columns, rounding)

    def _against_tracking(self, name, product, kept: Tracking, columns, rounding, inputs=None) -> Evidence | None:
        """Evidence that product r != inputs (W(t) r) (or W(t) r itself, with no inputs), or None; everything
        in float64, so only the workers' rounding needs allowing for: `rounding` plus the kept rows' drift."""
        w_r, drift = kept.w_r[columns], kept.drift[columns]
        expected, drift = (w_r, drift) if inputs is None else (inputs @ w_r, np.abs(inputs) @ drift)
        allowance = SAFETY * (rounding + drift) + np.finfo(self.dtype).tiny
        return _evidence(name, product @ kept.r, expected, allowance)

    def _later_backward(self, request: LaterBackward, products: dict, forward: LaterForward) -> Evidence | None:
        return self._compare(
            "gradient", products["gradient"], forward.activations.T, request.error
        ) or self._compare("error", products["error"], request.error, forward.weights.T)

    def _compare(self, name: str, product: np.ndarray, left: np.ndarray, right) -> Evidence | None:
        """Evidence that product != left @ right, or None."""
        dtype = product.dtype  # checked in the run's own dtype: no copies to float64, its rounding allowed for
        r = self.rng.standard_normal(product.shape[1]).astype(dtype)
        right = right if isinstance(right, _Operand) else _Operand(right)
        depth, width = left.shape[1] + right.depth, product.shape[1]
        expected = left @ right.times(r)
        actual = product @ r
        scale = np.abs(left) @ right.magnitude_times(np.abs(r))  # |A| (|B| |r|)
        # the worker's rounding of P, then ours of both sides of the comparison
        allowance = (_gamma(depth, dtype) + _gamma(depth + width + 2, dtype)) * scale
        allowance += _gamma(width, dtype) * (np.abs(product) @ np.abs(r))
        if name in WIRE_PRODUCTS:  # the worker's rounding of P onto the wire
            unit, floor = self.wire_roundoff
            allowance += unit * (np.abs(product) @ np.abs(r)) + floor * float(np.abs(r).sum())
        allowance = SAFETY * allowance + np.finfo(dtype).tiny
        return _evidence(name, actual, expected, allowance)


def _evidence(name: str, actual: np.ndarray, expected: np.ndarray, allowance: np.ndarray) -> Evidence | None:
    """Evidence for the row whose |actual - expected| most exceeds its allowance, or None if none does."""
    excess = np.abs(actual - expected) - allowance
    worst = int(np.argmax(excess)) if excess.size else 0
    if excess.size and excess[worst] > 0:
        return Evidence(name, float(excess[worst] + allowance[worst]), float(allowance[worst]))
    return None


def _off_wire(request, products: dict, dtype: np.dtype) -> tuple:
    """The request's error and the products in WIRE_PRODUCTS in the run's dtype, as the worker used and made them."""
    products = {name: model.from_wire(array, dtype) if name in WIRE_PRODUCTS else array
                for name, array in products.items()}
    if getattr(request, "error", None) is not None:
        request = dataclasses.replace(request, error=model.from_wire(request.error, dtype))
    return request, products


class _Operand:
    """A right-hand operand W, or W - lr (X^T E) as the worker computes it, applied to vectors only."""

    def __init__(self, weights, inputs_t=None, error=None, learning_rate=0.0):
        self.weights, self.inputs_t, self.error, self.learning_rate = weights, inputs_t, error, learning_rate
        self.depth = 0 if inputs_t is None else inputs_t.shape[1] + 1  # the rounding the step adds

    def times(self, r: np.ndarray) -> np.ndarray:
        product = self.weights @ r  # (k, H) @ (H,) -> (k,)
        if self.inputs_t is not None:
            product = product - r.dtype.type(self.learning_rate) * (self.inputs_t @ (self.error @ r))
        return product

    def magnitude_times(self, r: np.ndarray) -> np.ndarray:
        magnitude = np.abs(self.weights) @ r
        if self.inputs_t is not None:
            magnitude = magnitude + r.dtype.type(abs(self.learning_rate)) * (np.abs(self.inputs_t) @ (np.abs(self.error) @ r))
        return magnitude


def _gamma(depth: int, dtype: np.dtype) -> float:
    """The worst-case relative rounding of a sum of `depth` products: k u / (1 - k u)."""
    unit = np.finfo(dtype).eps / 2
    return depth * unit / (1 - depth * unit)


def inputs_for(images: dict, dtype: str, divisor: float):
    """The (split, rows, columns) -> inputs function a Verifier needs, from the coordinator's own images."""

    def inputs(split, rows, columns):
        return model.inputs(images[split][rows][:, columns], dtype, divisor)  # rows first: a 4x faster gather

    return inputs
