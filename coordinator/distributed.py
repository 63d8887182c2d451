"""The products of a training step split by the exposure plan: each worker gets its rows of the weights with
the columns shuffled by a fresh secret permutation, and the partial products come back, un-shuffled here.

One permutation serves all the workers of a round: the error they get is the same matrix for all, so
per-worker permutations would hide nothing from colluders that a shared one does not, and to a single
worker the two look the same (see "What each worker sees" in the README). The coordinator then shuffles
each operand once, sends the workers one message where their requests are the same, checks and gathers
each slot's answer as soon as it is in (coordinator.gathering), and un-shuffles each product once.

When a worker is lost mid-round, its slot goes to a standby if one waits (which widens nobody's view),
or else its columns and units are spread over the survivors, who get the extra columns of the images;
if the lost worker registers again (after a partition heals, say), it gets back at the next epoch's start
exactly the columns and units it had, so that its view does not widen either. When every worker is lost at
once (a stall of ours, a cut of the coordinator's link) there is nobody to spread over: the coordinator
waits for them to register again, each into its own slot. Then every later layer whose backward round is
still to come is sent its forward operands again (the workers' kept ones follow the old plan), and the
round is sent again. The math does not depend on who computed what.

Recovery only changes the plan and who holds which slot; before every round, each worker that lacks its
slot's current columns is sent them, in chunks (see coordinator.shards). So a peer may vanish at any moment,
in the middle of a transfer included, and the next attempt simply starts from what is true then.

With `--rekey`, workers keep their first-layer rows between re-keys (see coordinator.kept): a round then
carries only the error, and any recovery rebuilds every row from the log and starts a new period, since
kept rows are state that a lost worker takes with it.
"""

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common import model, phases, settings
from common.exposure import ExposurePlan, permuted, unpermuted
from common.model import from_wire, to_wire
from common.protocol import FirstLayer, KeptFirstLayer, LaterBackward, LaterForward, ReturnRows
from coordinator.cluster import ClusterError, WorkerLost
from coordinator.gathering import Placed, Summed
from coordinator.kept import KeptPeriod, LoggedStep
from coordinator.scheduler import Expected
from coordinator.shards import ShardDelivery
from coordinator.training import BackendState, LocalLaterLayers, stepped
from coordinator.verify import Verifier

log = logging.getLogger("coordinator")


@dataclass
class Built:
    """One attempt at a round: slot -> (request, Expected), the permutation of each layer whose columns the requests
    carry (for the audit's record), and what the caller needs of the attempt that was answered (`made`: its shuffle,
    or the step it logged)."""

    requests: dict
    keys: dict
    made: object = None


@dataclass
class Round:
    """A round as data: `build` makes its requests afresh for each attempt (a recovery changes the plan and draws new
    permutations), the answers are gathered into `products` (gathering.Summed or Placed), and `tracking`, given the
    attempt, says what the kept rows' answers are checked against (kept.Tracking), worked out while workers compute."""

    build: Callable[[], Built]
    products: list = field(default_factory=list)
    tracking: Callable[[Built], object] | None = None


@dataclass
class Answered:
    """A round's trusted products (name -> array), and the attempt they answer."""

    results: dict
    built: Built
    tracking: object = None


class ClusterProducts:
    """The same product groups as LocalProducts, computed by the workers of a Cluster."""

    def __init__(
        self, cluster, plan: ExposurePlan, images: dict, permutation_seed: int, rebalance: bool, verifier: Verifier,
        wire: str, on_exposure: Callable, on_quarantine: Callable, on_keys: Callable, rekey_steps: int | None,
        clock=phases.NO_CLOCK,
    ):
        self.cluster = cluster
        self.plan = plan
        self.permutations = np.random.default_rng(permutation_seed)
        self.rebalance = rebalance  # admit standbys at epoch boundaries, or keep them for losses only
        self.verifier = verifier
        self.wire = wire  # how errors go out and partial products come back (model.WIRE_FORMATS)
        self.on_exposure = on_exposure  # (slot, worker name, plan, reason): a slot's columns changed hands
        self.on_quarantine = on_quarantine  # (Worker, slot, request kind, Evidence)
        self.on_keys = on_keys  # (round number, {layer: the permutation its columns travel under}): the audit's truth
        self.rekey_steps = rekey_steps  # steps between re-keys of kept rows: 1 sends the rows every step; None: epochs
        self.clock = clock  # times the rounds' phases here: math, building, checking, un-shuffling (common.phases)
        self.kept = None  # the KeptPeriod under way, if any
        self.later_operands = {}  # layer -> (activations, weights) of its last forward
        self.later_permutations = {}  # layer -> the output permutation of its last LaterForward round
        self.last_later_forward = {}  # (slot, layer) -> its last LaterForward request, the operands it keeps
        self.awaiting_backward = set()  # later layers past their forward, not yet their backward: workers keep theirs
        self.next_slot = max(plan.slots) + 1
        self.shards = ShardDelivery(images, self._exposed)
        self.reasons = {slot: "initial plan" for slot in plan.slots}  # why a slot's columns last moved
        self.spread = {}  # slot -> the plan before its columns and units were spread over the others: to give back

    def forward(self, weights, split, rows) -> np.ndarray:
        """The first layer's product for some rows of a split; with `--rekey`, with the kept rows."""
        if not self.keeps_rows:
            return self._first_layer_round(weights, split, rows, None)[1]
        if self.kept is None:
            self.kept = self._new_period(weights)
        return self._kept_round(split, rows, None)

    @property
    def keeps_rows(self) -> bool:
        """Whether workers keep their first-layer rows between re-keys (`--rekey`) rather than get them every step."""
        return self.rekey_steps != 1

    def gradient(self, weights, error_rows, error) -> np.ndarray:
        """The first layer's weight gradient of a chunk (a batch of several chunks adds theirs up)."""
        return self._first_layer_round(weights, "train", None, (error_rows, error, 0.0))[0]

    def step_then_forward(self, weights, error_rows, error, learning_rate, split, rows) -> tuple:
        """(the weights after the step as far as the coordinator knows them, the forward product with them).

        With kept rows, the workers hold the current weights; the coordinator learns them at each re-key.
        """
        step = (error_rows, error, learning_rate)
        if not self.keeps_rows:
            gradient, product = self._first_layer_round(weights, split, rows, step)
            return model.descend(weights, gradient, learning_rate), product
        if self.kept is None:
            self.kept = self._new_period(weights)
        elif self.rekey_steps and self.kept.steps >= self.rekey_steps:
            weights = self._collected()
            self.kept = self._new_period(weights)
        return weights, self._kept_round(split, rows, step)

    def settle(self, weights, pending, learning_rate) -> np.ndarray:
        """The weights with a pending step applied; ends a kept period, so these are the current weights."""
        if self.kept is None:
            return stepped(self, weights, pending, learning_rate)
        if pending is not None:
            self._kept_round("train", None, (*pending, learning_rate))
        return self._collected()

    def _first_layer_round(self, weights, split, rows, step) -> tuple:
        """(gradient, product) of a round that sends the weights: a step (error rows, error, learning rate), if
        given, is a gradient, applied before the forward product of `rows`, if given."""
        hidden = weights.shape[1]
        error_rows, error, learning_rate = step or (None, None, 0.0)

        def build() -> Built:
            shuffle = self.permutations.permutation(hidden)
            shuffled_weights = None if rows is None else permuted(weights, shuffle)
            shuffled_error = None if error is None else to_wire(permuted(error, shuffle), self.wire)
            shared = FirstLayer(0, None, split, rows, error_rows, shuffled_error, float(learning_rate))
            requests = {}
            for slot in self.plan.slots:
                columns, expected = self.plan.columns(slot), {}
                if rows is not None:
                    expected["partial"] = (len(rows), hidden)
                if error is not None:
                    expected["gradient"] = (len(columns), hidden)
                slot_weights = None if rows is None else shuffled_weights[columns]
                requests[slot] = (_for_slot(shared, slot_weights), Expected(expected))
            return Built(requests, {1: shuffle}, made=shuffle)

        products = []
        if error is not None:
            products.append(Placed("gradient", weights.dtype, lambda slot: self.plan.columns(slot)))
        if rows is not None:
            products.append(Summed("partial", weights.dtype))
        self.clock.lap("math")  # the trainer's own, since the last round
        answered = self._round(Round(build, products))
        shuffle = answered.built.made
        gradient = None if error is None else unpermuted(answered.results["gradient"], shuffle)
        product = None if rows is None else unpermuted(answered.results["partial"], shuffle)
        self.clock.lap("unshuffle")
        return gradient, product

    def _kept_round(self, split, rows, step) -> np.ndarray | None:
        """A round on the kept rows: the step's error goes out (one frame for all), only forward products come
        back; the workers apply the step to their rows, and the coordinator logs it."""
        error_rows, error, learning_rate = step or (None, None, 0.0)

        def build() -> Built:
            period = self.kept  # a recovery starts a new one, with rebuilt rows and a fresh permutation
            wire_error = None if error is None else to_wire(permuted(error, period.permutation), self.wire)
            logged = None if step is None else LoggedStep(error_rows, from_wire(wire_error, error.dtype), learning_rate)
            shared = KeptFirstLayer(0, None, split, rows, error_rows, wire_error, float(learning_rate))
            expected = Expected({} if rows is None else {"partial": (len(rows), period.start.shape[1])})
            requests = {slot: (_for_slot(shared, period.rows_for(slot)), expected) for slot in self.plan.slots}
            return Built(requests, {1: period.permutation}, made=logged)

        self.clock.lap("math")
        dtype = self.kept.start.dtype
        answered = self._round(Round(build, [] if rows is None else [Summed("partial", dtype)],
                                     tracking=lambda built: self.kept.tracking_after(built.made)))
        period = self.kept
        period.advance(answered.built.made, answered.tracking)
        product = None if rows is None else unpermuted(answered.results["partial"], period.permutation)
        self.clock.lap("unshuffle")
        return product

    def _new_period(self, weights: np.ndarray) -> KeptPeriod:
        """A kept period from these weights (natural order) under the current plan, with a fresh permutation and a
        fresh secret check vector; the rows go out with its first round."""
        hidden = weights.shape[1]
        return KeptPeriod(weights, self.permutations.permutation(hidden), self.plan,
                          self.verifier.rng.standard_normal(hidden), self.verifier.inputs)

    def _collected(self) -> np.ndarray:
        """End the kept period: W1 in natural order, from the workers' rows checked against the log, or rebuilt
        from the log when a worker is lost or caught."""
        period = self.kept
        if period.sent:  # else no worker holds its rows yet, so nothing has stepped them
            hidden, shared = period.start.shape[1], ReturnRows(0)
            requests = {slot: (shared, Expected({"weights": (len(period.plan.columns(slot)), hidden)}))
                        for slot in period.plan.slots}
            returned = Round(lambda: Built(requests, {1: period.permutation}),
                             [Placed("weights", period.start.dtype, period.plan.columns)], lambda built: period.tracking)
            try:
                answered = self._attempt(returned)
            except WorkerLost as lost:
                self._recover(lost.lost)  # rebuilds the rows from the log, in a new period that no worker holds yet
            else:
                self.kept = None
                return unpermuted(answered.results["weights"], period.permutation)
        period, self.kept = self.kept, None
        return unpermuted(period.start, period.permutation)

    def later_forward(self, layer, activations, weights) -> np.ndarray:
        """A later layer's product, from each slot's units of the layer's input; the first later layer's starts a
        new forward pass, after which no earlier pass's kept operands are needed again."""
        self.clock.lap("math")
        if layer == self.plan.later_layers[0]:
            self.awaiting_backward.clear()
        self.later_operands[layer] = (activations, weights)
        answered = self._round(self._later_forward_round(layer, [Summed("partial", weights.dtype)]))
        self.awaiting_backward.add(layer)
        product = unpermuted(answered.results["partial"], self.later_permutations[layer])
        self.clock.lap("unshuffle")
        return product

    def later_backward(self, layer, error) -> tuple:
        """A later layer's weight gradient and the error carried back to its inputs, from the operands the workers
        kept at its forward."""
        self.clock.lap("math")
        batch, outputs = error.shape

        def build() -> Built:
            permutation = self.later_permutations[layer]  # a recovery re-sends the forward under a fresh one
            shared = LaterBackward(0, layer, to_wire(permuted(error, permutation), self.wire))  # one for every worker
            requests = {}
            for slot in self.plan.slots:
                units = len(self.plan.units(slot, layer))
                requests[slot] = (shared, Expected({"gradient": (units, outputs), "error": (batch, units)}))
            return Built(requests, {layer: permutation})

        def units(slot):
            return self.plan.units(slot, layer)

        answered = self._round(Round(build, [Placed("gradient", error.dtype, units),
                                             Placed("error", error.dtype, units, 1)]))
        self.awaiting_backward.discard(layer)
        gradient = unpermuted(answered.results["gradient"], self.later_permutations[layer])
        self.clock.lap("unshuffle")
        return gradient, answered.results["error"]

    def epoch_ended(self) -> None:
        """Between epochs, let standbys stand in for lost replicas, then give each one still waiting a fair
        share of the columns and units, taken from those holding most (unless standbys are kept for losses).
        Kept rows are collected first when that moves them, or when they are re-keyed every epoch."""
        rekey = self.kept is not None and (self.rekey_steps is None or self._standbys_join())
        weights = self._collected() if rekey else None
        self._restore_replicas()
        self._give_back()
        if self.rebalance:
            for peer in self.cluster.standbys:
                new_slot, self.next_slot = self.next_slot, self.next_slot + 1
                self.cluster.assign(peer, new_slot)
                self._change_plan(self.plan.with_slot(new_slot, self.permutations), "rebalanced for a new worker")
        if weights is not None:
            self.kept = self._new_period(weights)

    def state(self) -> BackendState:
        return BackendState(self.permutations.bit_generator.state, self.plan)

    def restore(self, state: BackendState) -> None:
        """Continue the checkpoint's secret permutations: the shuffles the interrupted run would have sent next."""
        if state.permutations is not None:
            self.permutations.bit_generator.state = state.permutations

    def _standbys_join(self) -> bool:
        """Whether epoch_ended will give a standby a slot."""
        missing_replica = any(len(self.cluster.peers_of(slot)) < self.cluster.replicas for slot in self.plan.slots)
        return bool(self.cluster.standbys) and (self.rebalance or missing_replica or bool(self._returning()))

    def _give_back(self) -> None:
        """Each standby whose slot was spread over the others when it was lost takes back exactly its columns."""
        for peer, slot in self._returning():
            self.cluster.assign(peer, slot)
            self._change_plan(self.plan.given_back(slot, self.spread.pop(slot)), "got its own columns back")

    def _returning(self) -> list:
        """(peer, slot) of each standby that held a slot whose columns were spread when it was lost."""
        return [(peer, self.cluster.former_slot(peer)) for peer in self.cluster.standbys
                if self.cluster.former_slot(peer) in self.spread]

    def _restore_replicas(self) -> None:
        for slot in self.plan.slots:
            for _ in range(self.cluster.replicas - len(self.cluster.peers_of(slot))):
                if not self.cluster.standbys:
                    return
                self.cluster.assign(self.cluster.standbys[0], slot)
                self.reasons[slot] = "replaces a lost replica"

    def _later_forward_round(self, layer: int, products: list) -> Round:
        """A later layer's forward, under a permutation drawn afresh for each attempt; the workers keep its operands
        for the layer's backward."""

        def build() -> Built:
            activations, weights = self.later_operands[layer]
            permutation = self.later_permutations[layer] = self.permutations.permutation(weights.shape[1])
            shuffled_weights = permuted(weights, permutation)
            requests = {}
            for slot in self.plan.slots:
                units = self.plan.units(slot, layer)
                request = LaterForward(request=0, layer=layer, activations=activations[:, units],
                                       weights=shuffled_weights[units])
                self.last_later_forward[slot, layer] = request
                requests[slot] = (request, Expected({"partial": (len(activations), weights.shape[1])}))
            return Built(requests, {layer: permutation})

        return Round(build, products)

    def _round(self, round_: Round) -> Answered:
        """Run a round until every slot has a trusted answer. A loss is a transition, not a retry from the top: the
        lost slots are reassigned, and what must then go out is queued, in order: the forward of every later layer
        still to go backward (the workers' kept operands followed the old plan), then the round itself."""
        queue = [round_]
        while True:
            try:
                answered = self._attempt(queue[0])
            except WorkerLost as lost:
                self._recover(lost.lost)
                queue = [self._later_forward_round(layer, []) for layer in sorted(self.awaiting_backward)] + [round_]
                continue
            queue.pop(0)
            if not queue:
                return answered

    def _attempt(self, round_: Round) -> Answered:
        """One try at a round: shards first where they are missing, then the requests. Each slot's answers are
        checked and gathered as soon as they are in. Raises WorkerLost when a worker is lost, or quarantines leave
        a slot with none."""
        self.shards.deliver(self.cluster, self.plan)
        built = round_.build()
        sampled = {slot: self.verifier.chosen(request) for slot, (request, _) in built.requests.items()}  # slot order
        self.clock.lap("build")
        self.cluster.send_round(built.requests)
        self.on_keys(self.cluster.round_number, built.keys)
        tracking = None if round_.tracking is None else round_.tracking(built)
        self.clock.lap("check")
        gatherers = [spec.gatherer(self.plan.slots) for spec in round_.products]

        def take(slot, answers):
            trusted = self._trusted_answer(slot, built.requests[slot][0], answers, sampled[slot], tracking)
            self.clock.lap("check")
            if trusted is not None:
                for gatherer in gatherers:
                    gatherer.add(slot, trusted)
                self.clock.lap("unshuffle")

        self.cluster.gather(take)
        return Answered({spec.name: gatherer.result() for spec, gatherer in zip(round_.products, gatherers)},
                        built, tracking)

    def _trusted_answer(self, slot: int, request, answers: list, sampled: bool, kept) -> dict | None:
        """The answer to keep from a slot's replicas, quarantining each one caught wrong (None if all were).

        Replicas that agree stand or fall together, checked when the secret sample picks them; replicas
        that disagree are each checked, whatever the sample says.
        """
        first = answers[0][1]
        if all(_identical(first, products) for _, products in answers[1:]):
            evidence = self._caught(slot, request, first, kept) if sampled else None
            verdicts = [(worker, products, evidence) for worker, products in answers]
        else:
            verdicts = [(worker, products, self._caught(slot, request, products, kept)) for worker, products in answers]
        for worker, _, evidence in verdicts:
            if evidence is not None:
                self._quarantine(worker, slot, request, evidence)
        return next((products for _, products, evidence in verdicts if evidence is None), None)

    def _caught(self, slot: int, request, products: dict, kept):
        """The Freivalds evidence against one answer, or None; `kept` is the kept rows' tracking, if any."""
        forward = self.last_later_forward.get((slot, request.layer)) if isinstance(request, LaterBackward) else None
        return self.verifier.check(request, products, self.plan.columns(slot), forward, kept)

    def _quarantine(self, worker, slot: int, request, evidence) -> None:
        self.cluster.quarantine(worker, str(evidence))
        self.on_quarantine(worker, slot, type(request).__name__, evidence)

    def _recover(self, lost: dict) -> None:
        """Reassign lost slots: to the worker that held one if it is back, else to a standby, else over the others
        (with nobody left, after waiting for the lost to register again); no messages here: the next attempt's shard
        transfers carry out the change."""
        self.cluster.idle(settings.LOSS_SETTLE)  # losses that come together (a stall of ours) are handled together
        lost = {**lost, **self.cluster.take_lost()}
        orphaned = {slot: reason for slot, reason in lost.items() if not self.cluster.peers_of(slot)}
        if orphaned and not any(self.cluster.peers_of(slot) for slot in self.plan.slots):
            log.warning("every worker is lost; waiting up to %g s for them to register again", settings.REJOIN_WAIT)
            self.cluster.wait_for_return([*orphaned, *self.spread], settings.REJOIN_WAIT)
            self._give_back()  # first, so that a slot that had taken over another's columns is its own again
        for slot, reason in list(orphaned.items()):
            returned = self.cluster.standby_for(slot)
            if returned is not None:
                self.cluster.assign(returned, slot)
                self.reasons[slot] = f"registered again into its own slot ({reason})"
                del orphaned[slot]
        for slot, reason in orphaned.items():
            log.warning("%s; reassigning slot %d", reason, slot)
            standbys = self.cluster.standbys
            if standbys:
                self.cluster.assign(standbys[0], slot)
                self.reasons[slot] = f"took over a lost worker's slot ({reason})"
                continue
            try:
                plan = self.plan.without(slot, self.permutations)
            except ValueError:
                raise ClusterError(f"every worker is lost ({reason}), and none registered again within "
                                   f"{settings.REJOIN_WAIT:g} s") from None
            self.spread[slot] = self._with_spread_given_back()
            self._change_plan(plan, f"took over columns of a lost worker ({reason})")
        if self.kept is not None:  # rows of a lost worker, or of moved columns, are gone: rebuild all, re-key all
            self.kept = self._new_period(self.kept.replayed())

    def _with_spread_given_back(self) -> ExposurePlan:
        """The plan with every spread slot's columns and units back with it: what each slot owns of its own (a slot
        lost after it took over another's columns gets back only its own)."""
        plan = self.plan
        for slot, former in self.spread.items():
            plan = plan.given_back(slot, former)
        return plan

    def _change_plan(self, plan: ExposurePlan, reason: str) -> None:
        """Adopt a new plan; the workers of every slot whose columns or units changed must be sent them again."""
        changed, self.plan = self.plan.changed_slots(plan), plan
        for slot in changed:
            self.reasons[slot] = reason
            for peer in self.cluster.peers_of(slot):
                self.shards.forget(peer)

    def _exposed(self, peer: bytes, slot: int) -> None:
        """A transfer of the slot's columns to the peer begins: from now on it has seen them."""
        self.on_exposure(slot, self.cluster.name_of(peer), self.plan, self.reasons[slot])


def _identical(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(np.array_equal(first[name], second[name]) for name in first)


class LocalLaterLayersProducts(ClusterProducts):
    """The first layer on the workers, the later layers' smaller products (B x H x n each) here: one round per step.

    Workers then see only their pixels, W1 rows and d1, never a hidden activation, a later layer's weights or
    its error; the price is that the coordinator does some matrix products itself (see "Speed" in the README).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.later = LocalLaterLayers()

    def later_forward(self, layer, activations, weights) -> np.ndarray:
        return self.later.forward(layer, activations, weights)

    def later_backward(self, layer, error) -> tuple:
        return self.later.backward(layer, error)


def _for_slot(shared, weights: np.ndarray | None):
    """A round's message as one slot gets it: the shared message itself, one frame for every worker, unless it
    carries the slot's own weights."""
    return shared if weights is None else dataclasses.replace(shared, weights=weights)
