"""The minimal worker (docs/examples/minimal_worker.py) with one thing wrong, for the conformance tests:

    python tests/bad_workers.py FAULT tcp://HOST:PORT NAME

FAULT is wrong-shape (every product one row short), no-heartbeat (never heartbeats) or ignore-stop (takes
`stop` for a heartbeat and carries on).
"""

import importlib.util
import sys
from pathlib import Path

MINIMAL_WORKER = Path(__file__).resolve().parent.parent / "docs" / "examples" / "minimal_worker.py"


def load_minimal_worker():
    spec = importlib.util.spec_from_file_location("minimal_worker", MINIMAL_WORKER)
    minimal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minimal)
    return minimal


def wrong_shape(minimal) -> None:
    answer = minimal.Session.answer

    def one_row_short(session, request):
        reply = answer(session, request)
        if reply["kind"] == "result":
            reply["products"] = {name: array[:-1] for name, array in reply["products"].items()}
        return reply

    minimal.Session.answer = one_row_short


def no_heartbeat(minimal) -> None:
    minimal.HEARTBEAT_INTERVAL = float("inf")


def ignore_stop(minimal) -> None:
    unpack = minimal.unpack

    def stop_unheard(frame):
        message = unpack(frame)
        return {"kind": "heartbeat"} if message.get("kind") == "stop" else message

    minimal.unpack = stop_unheard


FAULTS = {"wrong-shape": wrong_shape, "no-heartbeat": no_heartbeat, "ignore-stop": ignore_stop}

if __name__ == "__main__":
    fault, address, name = sys.argv[1:]
    minimal = load_minimal_worker()
    FAULTS[fault](minimal)
    minimal.main(address, name)
