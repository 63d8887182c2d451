"""The exposure plan: which worker slot owns each input column and each unit of every hidden layer, how
ownership moves when a worker is lost or joins, and the permutations that hide the order of the columns a
worker is sent (see "How the work is split" in the README).

Layer 1's products are split by input column; each later layer's (2, 3, ...) by the units of its input, the
hidden layer before it, each hidden layer with owners of its own."""

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

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
    unit_owners: tuple  # ((H1,), ..., (Hn,)) slot of each unit of each hidden layer

    @classmethod
    def random(cls, inputs: int, hidden: tuple, slots: int, seed: int) -> "ExposurePlan":
        """Balanced owners drawn from the seed: the input columns', then each hidden layer's, first layer first."""
        rng = np.random.default_rng(seed)
        return cls(balanced_owners(inputs, slots, rng), tuple(balanced_owners(units, slots, rng) for units in hidden))

    @classmethod
    def from_arrays(cls, arrays) -> "ExposurePlan":
        """From the arrays of `arrays()`, as exposure.npz and checkpoints hold them; a file from before deeper
        networks holds its one hidden layer's owners as `unit_owners`."""
        if "unit_owners" in arrays:
            return cls(arrays["column_owners"], (arrays["unit_owners"],))
        layers = 0
        while f"unit_owners{layers + 1}" in arrays:
            layers += 1
        return cls(arrays["column_owners"], tuple(arrays[f"unit_owners{layer}"] for layer in range(1, layers + 1)))

    def arrays(self) -> dict:
        """column_owners, and unit_owners1, unit_owners2, ... of the hidden layers."""
        units = {f"unit_owners{layer}": owners for layer, owners in enumerate(self.unit_owners, start=1)}
        return {"column_owners": self.column_owners, **units}

    @cached_property
    def slots(self) -> list:
        """The slots that own input columns, ascending: the order partial products are summed in."""
        return np.unique(self.column_owners).tolist()

    @property
    def later_layers(self) -> range:
        """The layers whose products are split by the units of their input: 2 .. n + 1 for n hidden layers."""
        return range(2, len(self.unit_owners) + 2)

    def columns(self, slot: int) -> np.ndarray:
        """The input columns of a slot, ascending."""
        return self._columns_by_slot[slot]

    def units(self, slot: int, layer: int) -> np.ndarray:
        """A slot's units of later layer `layer`'s input (hidden layer layer - 1), ascending (none when that
        layer has fewer units than there are workers)."""
        return self._units_by_slot[layer - 2][slot]

    def units_held(self, slot: int) -> int:
        """A slot's units of all hidden layers together."""
        return sum(len(self.units(slot, layer)) for layer in self.later_layers)

    def units_of_layer(self, layer: int) -> int:
        """The units of later layer `layer`'s input."""
        return len(self.unit_owners[layer - 2])

    def without(self, lost_slot: int, rng: np.random.Generator) -> "ExposurePlan":
        """The plan after a lost slot's columns and units are spread over the other slots."""
        receivers = [slot for slot in self.slots if slot != lost_slot]
        if not receivers:
            raise ValueError("no worker is left to take over")
        return self._remade(lambda owners: handed_out(owners, lost_slot, receivers, rng))

    def with_slot(self, new_slot: int, rng: np.random.Generator) -> "ExposurePlan":
        """The plan after a new slot takes a fair share from the slots that hold most."""
        return self._remade(lambda owners: with_share_for(owners, new_slot, self.slots, rng))

    def given_back(self, slot: int, former: "ExposurePlan") -> "ExposurePlan":
        """The plan after a slot takes back, from whoever holds them now, the columns and units it owned in `former`."""
        return ExposurePlan(
            np.where(former.column_owners == slot, slot, self.column_owners),
            tuple(np.where(before == slot, slot, now) for before, now in zip(former.unit_owners, self.unit_owners)),
        )

    def changed_slots(self, other: "ExposurePlan") -> list:
        """Slots of `other` whose columns or units of any layer differ from this plan's."""
        return [
            slot for slot in other.slots
            if not np.array_equal(self.columns(slot), other.columns(slot))
            or any(not np.array_equal(self.units(slot, layer), other.units(slot, layer)) for layer in self.later_layers)
        ]

    def renumbered(self) -> "ExposurePlan":
        """The same split with its slots numbered 0, 1, ... in their order (which keeps the summing order)."""
        return self._remade(lambda owners: np.searchsorted(self.slots, owners))

    def save(self, file, permutation_seed: int, label_privacy: float | None = None, stages: int = 1) -> None:
        """Write the plan, the permutations' seed and the labels' privacy (eps, NaN for none, and its stages) as
        exposure.npz, into a path or a binary file."""
        np.savez(file, **self.arrays(), permutation_seed=np.array(str(permutation_seed)),  # 128 bits: kept as text
                 label_privacy=np.array(np.nan if label_privacy is None else label_privacy), label_privacy_stages=stages)  # 128 bits: kept as text

    def _remade(self, change) -> "ExposurePlan":
        """A plan with `change` applied to every owner array: the columns', then each hidden layer's in order."""
        return ExposurePlan(change(self.column_owners), tuple(change(owners) for owners in self.unit_owners))

    @cached_property
    def _columns_by_slot(self) -> dict:
        return _members(self.column_owners)

    @cached_property
    def _units_by_slot(self) -> list:
        return [_members(owners) for owners in self.unit_owners]


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
