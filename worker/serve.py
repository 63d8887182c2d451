"""The worker's loop: take the welcome and the shards, then answer each compute request until told to stop."""

import logging

from common import phases
from common.protocol import Failure, Stop, Welcome
from worker.compute import RequestError, WorkerState
from worker.connection import CoordinatorLink

log = logging.getLogger("worker")


def serve(link: CoordinatorLink, make_state=WorkerState, clock=phases.NO_CLOCK) -> str:
    """Work for the coordinator until it says stop; returns its reason. `clock` times the computing."""
    state = None
    while True:
        message = link.receive()
        if isinstance(message, Stop):
            return message.reason
        if isinstance(message, Welcome):  # a new session: nothing held before is valid now
            log.info("%s registered as %s", link.name, "a standby" if message.slot < 0 else f"slot {message.slot}")
            state = make_state(message.dtype, message.input_divisor, message.wire)
        elif state is None:
            log.warning("ignored a %s that came before the welcome", type(message).__name__)
        else:
            answer = _answer(state, message)
            clock.lap("compute")
            link.send(answer)


def _answer(state: WorkerState, request):
    if type(request) not in state.handlers:
        return Failure(getattr(request, "request", -1), f"a worker does not take {type(request).__name__}")
    try:
        return state.compute(request)
    except RequestError as error:
        log.warning("refused request %d: %s", request.request, error)
        return Failure(request.request, str(error))
