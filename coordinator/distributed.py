"""The products of a training step split by the exposure plan: each worker gets its rows of the weights with
the columns shuffled by a fresh secret permutation, and the partial products come back, un-shuffled here.

When a worker is lost mid-round, its slot goes to a standby if one waits (which widens nobody's view),
or else its columns and units are spread over the survivors, who get the extra columns of the images;
then the round is sent again. The math does not depend on who computed what.
"""

import logging
from collections.abc import Callable

import numpy as np

from common.exposure import ExposurePlan, add_unpermuted, permuted, place_unpermuted
from common.protocol import FirstLayer, SecondBackward, SecondForward, Shard
from coordinator.cluster import ClusterError, WorkerLost
from coordinator.scheduler import Expected
from coordinator.verify import Verifier

log = logging.getLogger("coordinator")


class ClusterProducts:
    """The same three product groups as LocalProducts, computed by the workers of a Cluster."""

    def __init__(
        self, cluster, plan: ExposurePlan, images: dict, permutation_seed: int, on_exposure: Callable, rebalance: bool,
        verifier: Verifier, on_quarantine: Callable,
    ):
        self.cluster = cluster
        self.verifier = verifier
        self.on_quarantine = on_quarantine  # (Worker, slot, request kind, Evidence)
        self.last_second_forward = {}  # slot -> its last SecondForward request, the operands it keeps
        self.rebalance = rebalance  # admit standbys at epoch boundaries, or keep them for losses only
        self.plan = plan
        self.images = images  # split -> (n, I) uint8: the source of every shard
        self.permutations = np.random.default_rng(permutation_seed)
        self.on_exposure = on_exposure  # (slot, worker name, plan, reason): a slot's columns changed hands
        self.second_permutations = {}  # slot -> the output permutation of its last SecondForward
        self.second_operands = None  # (activations, weights) of the last second-layer forward
        self.next_slot = max(plan.slots) + 1
        for slot in plan.slots:
            self._provision(slot, "initial plan")

    def first_layer(self, weights, split, rows, error_rows, error, learning_rate) -> tuple:
        hidden = weights.shape[1]
        shuffles = {}

        def requests():
            built = {}
            for slot in self.plan.slots:
                columns, shuffles[slot] = self.plan.columns(slot), self.permutations.permutation(hidden)
                expected = {}
                if rows is not None:
                    expected["partial"] = (len(rows), hidden)
                if error is not None:
                    expected["gradient"] = (len(columns), hidden)
                request = FirstLayer(
                    request=0,
                    weights=None if rows is None else permuted(weights[columns], shuffles[slot]),
                    split=split,
                    rows=rows,
                    error_rows=error_rows,
                    error=None if error is None else permuted(error, shuffles[slot]),
                    learning_rate=float(learning_rate),
                )
                built[slot] = (request, Expected(expected))
            return built

        results = self._round(requests)
        gradient = None if error is None else np.empty_like(weights)
        product = None if rows is None else np.zeros((len(rows), hidden), weights.dtype)
        for slot in self.plan.slots:  # a fixed order keeps the sum reproducible
            if gradient is not None:
                place_unpermuted(gradient, self.plan.columns(slot), results[slot]["gradient"], shuffles[slot])
            if product is not None:
                add_unpermuted(product, results[slot]["partial"], shuffles[slot])
        return gradient, product

    def second_forward(self, activations, weights) -> np.ndarray:
        self.second_operands = (activations, weights)
        results = self._round(self._second_forward_requests)
        product = np.zeros((len(activations), weights.shape[1]), weights.dtype)
        for slot in self.plan.slots:
            add_unpermuted(product, results[slot]["partial"], self.second_permutations[slot])
        return product

    def second_backward(self, error) -> tuple:
        batch, outputs = error.shape
        hidden = len(self.plan.unit_owners)

        def requests():
            built = {}
            for slot in self.plan.slots:
                units = len(self.plan.units(slot))
                expected = Expected({"gradient": (units, outputs), "error": (batch, units)})
                built[slot] = (SecondBackward(request=0, error=permuted(error, self.second_permutations[slot])), expected)
            return built

        results = self._round(requests, after_recovery=self._second_forward_again)
        gradient = np.empty((hidden, outputs), error.dtype)
        backpropagated = np.empty((batch, hidden), error.dtype)
        for slot in self.plan.slots:
            units = self.plan.units(slot)
            place_unpermuted(gradient, units, results[slot]["gradient"], self.second_permutations[slot])
            backpropagated[:, units] = results[slot]["error"]
        return gradient, backpropagated

    def epoch_ended(self) -> None:
        """Between epochs, give each waiting worker a fair share of the columns and units, taken from
        those holding most (unless standbys are kept for losses only)."""
        if not self.rebalance:
            return
        for peer in self.cluster.scheduler.standbys:
            new_slot, self.next_slot = self.next_slot, self.next_slot + 1
            self.cluster.assign(peer, new_slot)
            self._change_plan(self.plan.with_slot(new_slot, self.permutations), "rebalanced for a new worker")

    def _second_forward_requests(self) -> dict:
        activations, weights = self.second_operands
        built = {}
        for slot in self.plan.slots:
            units, self.second_permutations[slot] = self.plan.units(slot), self.permutations.permutation(weights.shape[1])
            request = SecondForward(request=0, activations=activations[:, units], weights=permuted(weights[units], self.second_permutations[slot]))
            built[slot] = (request, Expected({"partial": (len(activations), weights.shape[1])}))
        return built

    def _second_forward_again(self) -> None:
        """After a recovery the workers' kept second-layer operands are stale: refresh them."""
        self._round(self._second_forward_requests)

    def _round(self, requests: Callable, after_recovery: Callable | None = None) -> dict:
        """Run a round, recovering from lost or lying workers and sending it again until every slot answers."""
        while True:
            built = requests()
            try:
                results = self.cluster.run_round(built)
                self._quarantine_liars(built, results)
                return results
            except WorkerLost as lost:
                self._recover(lost.lost)
                if after_recovery:
                    after_recovery()

    def _quarantine_liars(self, built: dict, results: dict) -> None:
        """Check the chosen results; a worker caught once is dropped for the run (raises WorkerLost)."""
        caught = {}
        for slot, (request, _) in built.items():
            if isinstance(request, SecondForward):
                self.last_second_forward[slot] = request
            if not self.verifier.chosen():
                continue
            evidence = self.verifier.check(request, results[slot], self.plan.columns(slot), self.last_second_forward.get(slot))
            if evidence is not None:
                worker = self.cluster.quarantine(slot, str(evidence))
                self.on_quarantine(worker, slot, type(request).__name__, evidence)
                caught[slot] = f"worker {worker.name} failed a Freivalds check: {evidence}"
        if caught:
            raise WorkerLost(caught)

    def _recover(self, lost: dict) -> None:
        for slot, reason in lost.items():
            log.warning("%s; reassigning slot %d", reason, slot)
            standbys = self.cluster.scheduler.standbys
            if standbys:
                self.cluster.assign(standbys[0], slot)
                self._provision(slot, f"took over a lost worker's slot ({reason})")
                continue
            try:
                plan = self.plan.without(slot, self.permutations)
            except ValueError:
                raise ClusterError(f"every worker is lost ({reason})") from None
            self._change_plan(plan, f"took over columns of a lost worker ({reason})")

    def _change_plan(self, plan: ExposurePlan, reason: str) -> None:
        changed, self.plan = self.plan.changed_slots(plan), plan
        for slot in changed:
            self._provision(slot, reason)

    def _provision(self, slot: int, reason: str) -> None:
        """Send a slot's worker its columns of every split (replacing what it held), and record it."""
        columns = self.plan.columns(slot)
        for split, images in self.images.items():
            self.cluster.send_to_slot(slot, Shard(split, np.ascontiguousarray(images[:, columns])))
        peer = self.cluster.scheduler.peer_of(slot)
        if peer is not None:
            self.on_exposure(slot, self.cluster.scheduler.workers[peer].name, self.plan, reason)
