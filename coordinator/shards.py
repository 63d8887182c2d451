"""Getting each worker the columns of the images its slot holds, in chunks, before it is sent a round.

What a worker holds is tracked per connection: a worker that registers again, takes over a slot, or whose slot's
columns change is sent them afresh. One chunk goes to each worker that lacks its columns per exchange, so every
worker hears from the coordinator often however slow its link, and a loss at any chunk leaves a state the next
attempt simply continues from.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common import settings
from common.protocol import Shard
from coordinator.scheduler import Expected

log = logging.getLogger("coordinator")


@dataclass
class ShardTransfer:
    """One worker's columns of every split, as Shard chunks of about SHARD_CHUNK_BYTES sent one at a time."""

    slot: int
    images: dict  # split -> (n, I) uint8
    columns: np.ndarray  # the slot's input columns
    sent: int = 0  # chunks answered so far

    def __post_init__(self):
        self.chunks = chunk_rows(self.images, max(1, settings.SHARD_CHUNK_BYTES // max(1, len(self.columns))))

    @property
    def done(self) -> bool:
        return self.sent == len(self.chunks)

    def next_chunk(self) -> Shard:
        split, start, stop = self.chunks[self.sent]
        images = self.images[split]
        return Shard(0, split, start, len(images), np.ascontiguousarray(images[start:stop][:, self.columns]))


def chunk_rows(images: dict, rows_per_chunk: int) -> list:
    """(split, first row, row after the last) of every shard chunk of every split, in the order they are sent."""
    return [
        (split, offset, min(offset + rows_per_chunk, len(pixels)))
        for split, pixels in images.items()
        for offset in range(0, len(pixels), rows_per_chunk)
    ]


class ShardDelivery:
    """Which connection holds which slot's columns, and the transfers under way."""

    def __init__(self, images: dict, on_transfer: Callable):
        self.images = images  # split -> (n, I) uint8: the source of every shard
        self.on_transfer = on_transfer  # (peer, slot): a transfer of the slot's columns to the peer begins
        self.holding = {}  # peer -> the slot whose current columns it holds in full
        self.transfers = {}  # peer -> its ShardTransfer under way

    def forget(self, peer: bytes) -> None:
        """The peer's columns are stale (its slot's columns changed): it is sent them again."""
        self.holding.pop(peer, None)
        self.transfers.pop(peer, None)

    def deliver(self, cluster, plan) -> None:
        """Send each worker of the plan that lacks its slot's current columns its shards (raises WorkerLost)."""
        started, chunks = time.monotonic(), 0
        while True:
            sends = {}
            for slot in plan.slots:
                for peer in cluster.peers_of(slot):
                    if self.holding.get(peer) != slot:
                        sends[peer] = (slot, self._transfer_to(peer, slot, plan).next_chunk(), Expected({}))
            if not sends:
                if chunks:
                    log.info("shards sent: %d chunks in %.1f s", chunks, time.monotonic() - started)
                return
            chunks += len(sends)
            cluster.run_sends(sends)
            for peer in sends:
                transfer = self.transfers[peer]
                transfer.sent += 1
                if transfer.done:
                    self.holding[peer] = self.transfers.pop(peer).slot

    def _transfer_to(self, peer: bytes, slot: int, plan) -> ShardTransfer:
        """The peer's transfer under way, or a new one of its slot's columns, recorded as exposed from now on."""
        transfer = self.transfers.get(peer)
        if transfer is None or transfer.slot != slot:
            transfer = self.transfers[peer] = ShardTransfer(slot, self.images, plan.columns(slot))
            self.on_transfer(peer, slot)
        return transfer
