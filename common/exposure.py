"""The exposure plan: which worker slot owns each input column and each hidden unit, and the permutations
that hide the order of the columns a worker is sent (see EXPOSURE in the README)."""

from dataclasses import dataclass
from functools import cached_property
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
        return self._items_by_slot[0][slot]

    def units(self, slot: int) -> np.ndarray:
        """The hidden units of a slot, ascending."""
        return self._items_by_slot[1][slot]

    @cached_property
    def _items_by_slot(self) -> tuple:
        """(columns, units) of every slot, found once: every request of every step asks for them."""
        return tuple(
            [_read_only(np.flatnonzero(owners == slot)) for slot in range(self.slots)]
            for owners in (self.column_owners, self.unit_owners)
        )

    def save(self, path: Path, permutation_seed: int) -> None:
        np.savez(
            path,
            column_owners=self.column_owners,
            unit_owners=self.unit_owners,
            permutation_seed=np.array(str(permutation_seed)),  # 128 bits: kept as text
        )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared by every caller
    return array


def permuted(matrix: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """The matrix with its columns shuffled: M[:, p]."""
    return matrix.take(permutation, axis=1)  # unlike M[:, p], C-contiguous: it is sent without another copy


def inverse(permutation: np.ndarray) -> np.ndarray:
    """q with q[p] = arange, so that (M[:, p])[:, q] == M."""
    undo = np.empty_like(permutation)
    undo[permutation] = np.arange(len(permutation))
    return undo


def unpermuted(permuted_part: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """A part whose columns were shuffled by p, back in natural column order: part[:, q]."""
    return permuted_part.take(inverse(permutation), axis=1)  # a gather: far cheaper than scattering into [:, p]


def place_unpermuted(target: np.ndarray, rows: np.ndarray, permuted_part: np.ndarray, permutation) -> None:
    """Write back rows whose columns were shuffled by p, in the target's column order."""
    target[rows] = unpermuted(permuted_part, permutation)


def add_unpermuted(total: np.ndarray, permuted_part: np.ndarray, permutation: np.ndarray) -> None:
    """Add a part whose columns were shuffled by p to the total, in the total's column order."""
    np.add(total, unpermuted(permuted_part, permutation), out=total)
