"""The exposure plan: which worker slot owns each input column and each hidden unit, how ownership moves
when a worker is lost or joins, and the permutations that hide the order of the columns a worker is
sent (see "How the work is split" in the README)."""

from collections import defaultdict
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


def handed_out(owners: np.ndarray, lost_slot: int, receivers: list, rng: np.random.Generator) -> np.ndarray:
    """The owners after a lost slot's items go, one by one in random order, to whichever receiver holds fewest."""
    owners = owners.copy()
    counts = {slot: int(np.count_nonzero(owners == slot)) for slot in receivers}
    for item in rng.permutation(np.flatnonzero(owners == lost_slot)):
        receiver = min(receivers, key=lambda slot: (counts[slot], slot))
        owners[item], counts[receiver] = receiver, counts[receiver] + 1
    return owners


def with_share_for(owners: np.ndarray, new_slot: int, slots: list, rng: np.random.Generator) -> np.ndarray:
    """The owners after a new slot takes its fair share, each item taken from whoever holds most."""
    owners = owners.copy()
    counts = {slot: int(np.count_nonzero(owners == slot)) for slot in slots}
    for _ in range(len(owners) // (len(slots) + 1)):
        donor = max(slots, key=lambda slot: (counts[slot], -slot))
        owners[rng.choice(np.flatnonzero(owners == donor))], counts[donor] = new_slot, counts[donor] - 1
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

    @cached_property
    def slots(self) -> list:
        """The slots that own input columns, ascending: the order partial products are summed in."""
        return np.unique(self.column_owners).tolist()

    def columns(self, slot: int) -> np.ndarray:
        """The input columns of a slot, ascending."""
        return self._columns_by_slot[slot]

    def units(self, slot: int) -> np.ndarray:
        """The hidden units of a slot, ascending (none when there are fewer units than workers)."""
        return self._units_by_slot[slot]

    def without(self, lost_slot: int, rng: np.random.Generator) -> "ExposurePlan":
        """The plan after a lost slot's columns and units are spread over the other slots."""
        receivers = [slot for slot in self.slots if slot != lost_slot]
        if not receivers:
            raise ValueError("no worker is left to take over")
        return ExposurePlan(*(handed_out(owners, lost_slot, receivers, rng) for owners in self._owners))

    def with_slot(self, new_slot: int, rng: np.random.Generator) -> "ExposurePlan":
        """The plan after a new slot takes a fair share from the slots that hold most."""
        return ExposurePlan(*(with_share_for(owners, new_slot, self.slots, rng) for owners in self._owners))

    def changed_slots(self, other: "ExposurePlan") -> list:
        """Slots of `other` whose columns or units differ from this plan's."""
        return [
            slot for slot in other.slots
            if not (np.array_equal(self.columns(slot), other.columns(slot)) and np.array_equal(self.units(slot), other.units(slot)))
        ]

    def renumbered(self) -> "ExposurePlan":
        """The same split with its slots numbered 0, 1, ... in their order (which keeps the summing order)."""
        return ExposurePlan(*(np.searchsorted(self.slots, owners) for owners in self._owners))

    def save(self, path: Path, permutation_seed: int) -> None:
        np.savez(
            path,
            column_owners=self.column_owners,
            unit_owners=self.unit_owners,
            permutation_seed=np.array(str(permutation_seed)),  # 128 bits: kept as text
        )

    @property
    def _owners(self) -> tuple:
        return self.column_owners, self.unit_owners

    @cached_property
    def _columns_by_slot(self) -> dict:
        return _members(self.column_owners)

    @cached_property
    def _units_by_slot(self) -> dict:
        return _members(self.unit_owners)


def _members(owners: np.ndarray) -> defaultdict:
    """slot -> its items ascending; a slot that owns nothing gets an empty array."""
    members = defaultdict(lambda: np.empty(0, np.int64))
    members.update({int(slot): np.flatnonzero(owners == slot) for slot in np.unique(owners)})
    return members


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
