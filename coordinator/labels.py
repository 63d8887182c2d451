"""The labels a label-private run trains on (`--label-privacy EPS`): drawn once, kept in the run directory and in
every checkpoint, never drawn again.

With one stage every training label is replaced by randomized response at the start. With two (LP-2ST of
Ghazi et al.), a seeded half of the images gets plain randomized response and is trained on alone for the
first half of the epochs; then the model's predictions for the other half are the prior of their draw
(RR with a prior), and the rest of the run trains on all of them. Each label is used by one mechanism
only, and the prior comes from the other half's replaced labels, so each stays eps-label-DP.
"""

from dataclasses import dataclass

import numpy as np

from common import label_privacy

# Streams of the run's seed, apart from the weights', the batch orders' and the dropout masks' (spawn key 1)
RESPONSE_STREAM = 2  # the first draw
HALVES_STREAM = 3  # which images are in the first stage
PRIOR_STREAM = 4  # the second stage's draw
UNDRAWN, FIRST, SECOND = -1, 1, 2  # an image's stage: which draw its label came from


def _stream(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


@dataclass
class PrivateLabels:
    """Each training image's label as trained on, and the stage it was drawn in (UNDRAWN until then)."""

    labels: np.ndarray  # (n,) int64; meaningless where the stage is UNDRAWN
    stage: np.ndarray  # (n,) int8
    eps: float
    stages: int
    classes: int

    @classmethod
    def drawn(cls, true_labels: np.ndarray, eps: float, stages: int, classes: int, seed: int) -> "PrivateLabels":
        """The first draw: every label, or with two stages a seeded half of them."""
        count = len(true_labels)
        first = np.ones(count, bool)
        if stages == 2:
            first[:] = False
            first[_stream(seed, HALVES_STREAM).permutation(count)[: count // 2]] = True
        replaced = label_privacy.randomized_response(true_labels.astype(np.int64), eps, classes,
                                                     _stream(seed, RESPONSE_STREAM))
        return cls(np.where(first, replaced, 0), np.where(first, FIRST, UNDRAWN).astype(np.int8), eps, stages, classes)

    def rows_of_epoch(self, epoch: int, epochs: int) -> np.ndarray:
        """The training images an epoch trains on: those whose label is drawn, or all in the second stage."""
        if self.stages == 2 and epoch <= first_stage_epochs(epochs):
            return np.flatnonzero(self.stage == FIRST).astype(np.int32)
        return np.arange(len(self.labels), dtype=np.int32)

    def second_stage_due(self, epoch: int, epochs: int) -> bool:
        """Whether an epoch begins the second stage of a two-stage run whose second draw is still to come."""
        return self.stages == 2 and epoch > first_stage_epochs(epochs) and bool(np.any(self.stage == UNDRAWN))

    @property
    def undrawn(self) -> np.ndarray:
        return np.flatnonzero(self.stage == UNDRAWN).astype(np.int32)

    def draw_second_stage(self, true_labels: np.ndarray, outputs: np.ndarray, seed: int) -> None:
        """RR with a prior for the images still undrawn, the prior from the model's outputs for them (n, classes)."""
        rows = self.undrawn
        prior = label_privacy.prior_from_outputs(outputs, self.eps)
        self.labels[rows] = label_privacy.rr_with_prior(true_labels[rows].astype(np.int64), prior, self.eps,
                                                        _stream(seed, PRIOR_STREAM))
        self.stage[rows] = SECOND

    def arrays(self) -> dict:
        """As run directories and checkpoints hold them: trained_labels, label_stage."""
        return {"trained_labels": self.labels, "label_stage": self.stage}

    @classmethod
    def from_arrays(cls, arrays, eps: float, stages: int, classes: int) -> "PrivateLabels":
        return cls(np.array(arrays["trained_labels"]), np.array(arrays["label_stage"]), eps, stages, classes)


def first_stage_epochs(epochs: int) -> int:
    """Epochs of the first stage of a two-stage run: the first half."""
    return max(1, epochs // 2)
