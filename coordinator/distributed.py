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
from coordinator.training import LocalProducts
from coordinator.verify import Verifier

log = logging.getLogger("coordinator")


class ClusterProducts:
    """The same three product groups as LocalProducts, computed by the workers of a Cluster."""

    def __init__(
        self, cluster, plan: ExposurePlan, images: dict, permutation_seed: int, rebalance: bool, verifier: Verifier,
        on_exposure: Callable, on_quarantine: Callable,
    ):
        self.cluster = cluster
        self.plan = plan
        self.images = images  # split -> (n, I) uint8: the source of every shard
        self.permutations = np.random.default_rng(permutation_seed)
        self.rebalance = rebalance  # admit standbys at epoch boundaries, or keep them for losses only
        self.verifier = verifier
        self.on_exposure = on_exposure  # (slot, worker name, plan, reason): a slot's columns changed hands
        self.on_quarantine = on_quarantine  # (Worker, slot, request kind, Evidence)
        self.second_permutations = {}  # slot -> the output permutation of its last SecondForward
        self.second_operands = None  # (activations, weights) of the last second-layer forward
        self.last_second_forward = {}  # slot -> its last SecondForward request, the operands it keeps
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
        """Between epochs, let standbys stand in for lost replicas, then give each one still waiting a fair
        share of the columns and units, taken from those holding most (unless standbys are kept for losses)."""
        self._restore_replicas()
        if not self.rebalance:
            return
        for peer in self.cluster.scheduler.standbys:
            new_slot, self.next_slot = self.next_slot, self.next_slot + 1
            self.cluster.assign(peer, new_slot)
            self._change_plan(self.plan.with_slot(new_slot, self.permutations), "rebalanced for a new worker")

    def _restore_replicas(self) -> None:
        scheduler = self.cluster.scheduler
        for slot in self.plan.slots:
            for _ in range(scheduler.replicas - len(scheduler.peers_of(slot))):
                if not scheduler.standbys:
                    return
                standby = scheduler.standbys[0]
                self.cluster.assign(standby, slot)
                self._provision(slot, "replaces a lost replica", [standby])

    def _second_forward_requests(self) -> dict:
        activations, weights = self.second_operands
        built = {}
        for slot in self.plan.slots:
            units, shuffle = self.plan.units(slot), self.permutations.permutation(weights.shape[1])
            request = SecondForward(request=0, activations=activations[:, units], weights=permuted(weights[units], shuffle))
            self.second_permutations[slot], self.last_second_forward[slot] = shuffle, request
            built[slot] = (request, Expected({"partial": (len(activations), weights.shape[1])}))
        return built

    def _second_forward_again(self) -> None:
        """After a recovery the workers' kept second-layer operands are stale: refresh them."""
        self._round(self._second_forward_requests)

    def _round(self, requests: Callable, after_recovery: Callable | None = None) -> dict:
        """Run a round until every slot has a trusted answer, recovering from lost or lying workers."""
        while True:
            built = requests()
            try:
                return self._settled(built, self.cluster.run_round(built))
            except WorkerLost as lost:
                self._recover(lost.lost)
                if after_recovery:
                    after_recovery()

    def _settled(self, built: dict, results: dict) -> dict:
        """slot -> one trusted answer; raises WorkerLost when quarantines leave a slot with no worker."""
        settled = {}
        for slot, (request, _) in built.items():
            trusted = self._trusted_answer(slot, request, results[slot])
            if trusted is not None:
                settled[slot] = trusted
        lost = self.cluster.scheduler.take_lost()
        if lost:
            raise WorkerLost(lost)
        return settled

    def _trusted_answer(self, slot: int, request, answers: list) -> dict | None:
        """The answer to keep from a slot's replicas, quarantining each one caught wrong (None if all were).

        Replicas that agree stand or fall together, checked when the secret sample picks them; replicas
        that disagree are each checked, whatever the sample says.
        """
        first = answers[0][1]
        if all(_identical(first, products) for _, products in answers[1:]):
            evidence = self._caught(slot, request, first) if self.verifier.chosen() else None
            verdicts = [(peer, products, evidence) for peer, products in answers]
        else:
            verdicts = [(peer, products, self._caught(slot, request, products)) for peer, products in answers]
        for peer, _, evidence in verdicts:
            if evidence is not None:
                self._quarantine(peer, slot, request, evidence)
        return next((products for _, products, evidence in verdicts if evidence is None), None)

    def _caught(self, slot: int, request, products: dict):
        """The Freivalds evidence against one answer, or None."""
        return self.verifier.check(request, products, self.plan.columns(slot), self.last_second_forward.get(slot))

    def _quarantine(self, peer: bytes, slot: int, request, evidence) -> None:
        worker = self.cluster.quarantine(peer, str(evidence))
        self.on_quarantine(worker, slot, type(request).__name__, evidence)

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

    def _provision(self, slot: int, reason: str, peers: list | None = None) -> None:
        """Send a slot's workers (or some of them) its columns of every split, replacing what they held,
        and record who now sees them."""
        columns = self.plan.columns(slot)
        peers = self.cluster.scheduler.peers_of(slot) if peers is None else peers
        for split, images in self.images.items():
            shard = Shard(split, np.ascontiguousarray(images[:, columns]))
            for peer in peers:
                self.cluster.send(peer, shard)
        for peer in peers:
            self.on_exposure(slot, self.cluster.scheduler.workers[peer].name, self.plan, reason)


def _identical(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(np.array_equal(first[name], second[name]) for name in first)


class ClusterFirstLayer(ClusterProducts):
    """The first layer on the workers, the second layer's small products (B x H x O) here: one round per step.

    Workers then see only their pixels, W1 rows and d1, never a1, W2 or d2; the price is that the
    coordinator does some matrix products itself (see "Speed" in the README).
    """

    second_forward = LocalProducts.second_forward
    second_backward = LocalProducts.second_backward
