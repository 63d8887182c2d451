"""The exposure plan: which worker slot owns each input column and each hidden unit, and the permutations
that hide the order of the columns a worker is sent (see EXPOSURE in the README)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def balanced_owners(items: int, slots: int, rng: np.random.Generator) -> np.ndarray:
    """A random owner slot for each item, every slot getting items // slots or one more: (items,)."""
    if slots > items:
        raise ValueError(f"cannot split {items} columns among {slots} workers")
    owners = np.arange(items) % slots
    rng.shuffle(owners)
    return owners


@dataclass(frozen=True)
class ExposurePlan:
    """Owner slots of the input columns and hidden units; a worker is sent only what its slot owns."""

    column_owners: np.ndarray  # (I,) slot of each input column
    unit_owners: np.ndarray  # (H,) slot of each hidden unit

    @classmethod
    def random(cls, inputs: int, hidden: int, slots: int, seed: int) -> "ExposurePlan":
        rng = np.random.default_rng(seed)
        return cls(balanced_owners(inputs, slots, rng), balanced_owners(hidden, slots, rng))

    @property
    def slots(self) -> int:
        return int(self.column_owners.max()) + 1

    def columns(self, slot: int) -> np.ndarray:
        """The input columns of a slot, ascending."""
        return np.flatnonzero(self.column_owners == slot)

    def units(self, slot: int) -> np.ndarray:
        """The hidden units of a slot, ascending."""
        return np.flatnonzero(self.unit_owners == slot)

    @classmethod
    def load(cls, path: Path) -> "ExposurePlan":
        with np.load(path, allow_pickle=False) as saved:
            return cls(saved["column_owners"], saved["unit_owners"])

    def save(self, path: Path, permutation_seed: int) -> None:
        np.savez(
            path,
            column_owners=self.column_owners,
            unit_owners=self.unit_owners,
            permutation_seed=np.array(str(permutation_seed)),  # 128 bits: kept as text
        )


def permuted(matrix: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """The matrix with its columns shuffled: M[:, p]."""
    return matrix[:, permutation]


def place_unpermuted(target: np.ndarray, rows: np.ndarray, permuted_part: np.ndarray, permutation) -> None:
    """Write back rows whose columns were shuffled by p: target[rows][:, p] = part restores their order."""
    target[np.ix_(rows, permutation)] = permuted_part


def add_unpermuted(total: np.ndarray, permuted_part: np.ndarray, permutation: np.ndarray) -> None:
    """Add a part whose columns were shuffled by p to the total, in the total's column order."""
    total[:, permutation] += permuted_part
