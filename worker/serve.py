"""The worker's loop: register, load its shards, then answer each compute request until told to stop."""

import logging

from common.protocol import Failure, Shard, Stop
from worker.compute import RequestError, WorkerState
from worker.connection import CoordinatorLink

log = logging.getLogger("worker")


def serve(link: CoordinatorLink, max_requests: int | None = None) -> str:
    """Work for the coordinator until it says stop (or after `max_requests`); returns its reason."""
    welcome = link.register()
    log.info("%s registered as slot %d", link.name, welcome.slot)
    state = WorkerState(welcome.dtype, welcome.input_divisor)
    answered = 0
    while max_requests is None or answered < max_requests:
        message = link.receive()
        if isinstance(message, Stop):
            return message.reason
        if isinstance(message, Shard):
            _load(state, message)
            continue
        link.send(_answer(state, message))
        answered += 1
    return f"answered {answered} requests"


def _load(state: WorkerState, shard: Shard) -> None:
    try:
        state.load_shard(shard)
    except RequestError as error:
        log.warning("refused a shard: %s", error)


def _answer(state: WorkerState, request):
    if type(request) not in state.handlers:
        return Failure(getattr(request, "request", -1), f"a worker does not take {type(request).__name__}")
    try:
        return state.compute(request)
    except RequestError as error:
        log.warning("refused request %d: %s", request.request, error)
        return Failure(request.request, str(error))
