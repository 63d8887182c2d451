"""Kept first-layer rows (`--rekey`): between two re-keys every worker keeps its rows of W1, columns shuffled by
the period's secret permutation, and steps them itself with the errors it is sent.

The coordinator keeps those errors (the log), which is enough to
- check each forward product, and the rows that come back at the next re-key, by Freivalds tests against one
  secret vector r drawn for the period: W(t) r = W(t0) r - lr sum_s X_s^T (D_s r) costs matrix-vector
  products only, kept up to date step by step;
- rebuild every row when a worker is lost, by replaying the log exactly as the workers stepped.
"""

from dataclasses import dataclass

import numpy as np

from common import model
from common.exposure import ExposurePlan, permuted, unpermuted


@dataclass(frozen=True)
class LoggedStep:
    """One step the workers applied to their kept rows."""

    error_rows: np.ndarray  # (B,) training images
    error: np.ndarray  # (B, H) columns permuted, as the workers used it: off the wire, in the run's dtype
    learning_rate: float


@dataclass(frozen=True)
class Tracking:
    """What the coordinator knows of the kept rows W(t), as vectors over all input columns, in float64."""

    r: np.ndarray  # (H,) the period's secret vector
    w_r: np.ndarray  # (I,) W(t) r
    magnitude: np.ndarray  # (I,) bounds |W(s)| |r| for every step s of the period
    drift: np.ndarray  # (I,) bounds |W~(t) r - W(t) r|, where W~ is what the workers' rounding made of W


class KeptPeriod:
    """The rows the workers keep from one re-key to the next, the errors they were sent since, and what that says."""

    def __init__(self, weights: np.ndarray, permutation: np.ndarray, plan: ExposurePlan, r: np.ndarray, inputs):
        self.start = permuted(weights, permutation)  # (I, H) W(t0), shuffled as the workers hold it
        self.permutation = permutation
        self.plan = plan  # the slots' columns for the whole period: any change starts a new one
        self.r = r  # (H,) secret, float64
        self.inputs = inputs  # (split, rows, columns) -> (B, k) inputs, as the workers compute them
        self.log: list[LoggedStep] = []
        self.sent = False  # the workers hold `start` once a round that carried it is answered
        start = self.start.astype(np.float64)
        self.tracking = Tracking(r, start @ r, np.abs(start) @ np.abs(r), np.zeros(len(start)))

    @property
    def steps(self) -> int:
        return len(self.log)

    def rows_for(self, slot: int) -> np.ndarray | None:
        """What a slot's request carries: its rows at the re-key until they are known to be held, then nothing."""
        return None if self.sent else self.start[self.plan.columns(slot)]

    def tracking_after(self, step: LoggedStep | None) -> Tracking:
        """The tracking once the workers apply `step`: W r moves by -lr X^T (D r); the bounds grow by the
        workers' rounding of the gradient, of its scaling and of the subtraction, and by ours of X^T (D r)."""
        if step is None:
            return self.tracking
        known, lr = self.tracking, abs(step.learning_rate)
        inputs = self.inputs("train", step.error_rows, slice(None))  # (B, I), >= 0: pixels over a positive divisor
        error = step.error.astype(np.float64)
        along = np.stack([error @ self.r, np.abs(error) @ np.abs(self.r)], axis=1)  # (B, 2): D r and |D| |r|
        # one pass over X, in the run's dtype: (I, B) @ (B, 2) -> (I, 2)
        moved, size = (inputs.T @ along.astype(inputs.dtype)).astype(np.float64).T
        unit = _unit_roundoff(inputs.dtype)
        rounding = _gamma(len(inputs) + 2, unit)
        size *= 1 + rounding  # an upper bound still, after our own rounding
        magnitude = known.magnitude + lr * size
        drift = known.drift + 2 * rounding * lr * size + unit * magnitude  # the workers' rounding, and ours of `moved`
        return Tracking(self.r, known.w_r - step.learning_rate * moved, magnitude, drift)

    def advance(self, step: LoggedStep | None, tracking: Tracking) -> None:
        """Record a round the workers answered: they hold the rows now, stepped by `step` if there was one."""
        self.sent = True
        if step is not None:
            self.log.append(step)
            self.tracking = tracking

    def replayed(self) -> np.ndarray:
        """W(t) in natural column order, rebuilt from the start rows and the log as each slot's workers computed it."""
        rows = self.start.copy()
        for slot in self.plan.slots:
            columns = self.plan.columns(slot)
            weights = self.start[columns]
            for step in self.log:
                gradient = model.weight_gradient(self.inputs("train", step.error_rows, columns), step.error)
                weights = model.descend(weights, gradient, step.learning_rate)
            rows[columns] = weights
        return unpermuted(rows, self.permutation)


def _unit_roundoff(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def _gamma(depth: int, unit: float) -> float:
    """The worst-case relative rounding of a sum of `depth` products: k u / (1 - k u)."""
    return depth * unit / (1 - depth * unit)
