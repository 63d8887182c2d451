"""docs/PROTOCOL.md agrees with the code: its tables of kinds, fields, dtypes, products and limits are derived
here from common/protocol.py, common/settings.py, the scheduler and the worker, and compared."""

import ast
import dataclasses
import re
import types
from pathlib import Path

import numpy as np

from common import protocol, settings
from common.protocol import FirstLayer, KeptFirstLayer, Register, ReturnRows, LaterBackward, LaterForward, Shard
from coordinator.config import TrainingConfig
from coordinator.cluster_options import _largest_reply_bytes
from coordinator.scheduler import Arrived, Disconnect, Scheduler
from coordinator.status import RunStatus, WorkerStatus
from worker.compute import WorkerState

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
TYPE_NAMES = {  # how the document names the type of each field the decoder checks
    int: "int",
    float: "float",
    str: "str",
    np.ndarray: "array",
    np.ndarray | None: "array or nil",
    dict: "map of str to array",
}
SAMPLE_VALUES = {int: 1, float: 1.0, str: "x", np.ndarray: np.zeros((1, 1)), dict: {}}


def table(first_column: str) -> list:
    """The rows (lists of cell texts, backticks and escapes removed) of the table whose header starts so."""
    lines = DOC.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        rows.append([cell.strip().replace("`", "").replace("\\|", "|") for cell in cells])
    return rows


def sender(kind: str) -> str:
    """Who sends a kind, from the code: the coordinator if its package builds one, a worker if the scheduler
    takes one from an admitted worker without dropping it for a kind workers do not send."""
    cls = protocol.MESSAGE_KINDS[kind]
    senders = []
    if cls.__name__ in _classes_built_by_coordinator():
        senders.append("coordinator")
    if _scheduler_takes_from_worker(cls):
        senders.append("worker")
    return "both" if len(senders) == 2 else senders[0]


def _classes_built_by_coordinator() -> set:
    built = set()
    for path in (ROOT / "coordinator").glob("*.py"):
        if path.name == "conformance.py":  # plays the coordinator to test workers, and so builds every kind
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                built.add(node.func.id)
    return built


def _scheduler_takes_from_worker(cls) -> bool:
    scheduler = Scheduler(1, settings.PROTOCOL_VERSION, np.dtype("float64"))
    scheduler.handle(Arrived(b"peer", Register("A", settings.PROTOCOL_VERSION)))
    actions = scheduler.handle(Arrived(b"peer", _sample(cls)))
    return not any(isinstance(a, Disconnect) and "workers do not send" in a.reason for a in actions)


def _sample(cls):
    """A message of any kind with made-up field values of the right types."""
    def value(kind):
        return None if isinstance(kind, types.UnionType) else SAMPLE_VALUES[kind]

    return cls(**{name: value(kind) for name, kind in protocol.FIELD_TYPES[cls].items()})


def test_version():
    assert f"protocol version **{settings.PROTOCOL_VERSION}**" in DOC


def test_every_kind_its_sender_and_its_fields():
    documented = {kind: (sent_by, fields) for kind, sent_by, fields in table("kind | sent by")}
    assert set(documented) == set(protocol.MESSAGE_KINDS)
    for kind, cls in protocol.MESSAGE_KINDS.items():
        sent_by, fields = documented[kind]
        assert sent_by == sender(kind), kind
        assert fields == (", ".join(field.name for field in dataclasses.fields(cls)) or "(none)"), kind


def test_every_field_and_its_type():
    documented = {(kind, field): kind_of_value for kind, field, kind_of_value, _ in table("kind | field")}
    expected = {
        (protocol.KIND_OF[cls], name): TYPE_NAMES[kind]
        for cls, fields in protocol.FIELD_TYPES.items()
        for name, kind in fields.items()
    }
    assert documented == expected


def test_field_type_names_are_explained():
    assert {row[0] for row in table("msgpack type")} == set(TYPE_NAMES.values())
    assert f"at most {protocol.MAX_TEXT_LENGTH} characters" in DOC


def test_array_map_and_dtypes():
    assert {row[0].encode() for row in table("key (bin)")} == protocol.ARRAY_MAP_KEYS
    dtypes = {code: (name, int(size)) for code, name, size, _ in table("dtype string")}
    assert set(dtypes) == protocol.ALLOWED_DTYPES
    for code, (name, size) in dtypes.items():
        assert (np.dtype(code).name, np.dtype(code).itemsize) == (name, size)
    assert f"at most {protocol.MAX_ARRAY_DIMS} non-negative integers" in DOC


def test_limits_and_timeouts():
    rows = table("name | value")
    for name, value, _, _ in rows:
        module = settings if hasattr(settings, name) else protocol
        assert getattr(module, name) == ast.literal_eval(value), name
    limits = {"MAX_TEXT_LENGTH", "MAX_SHARD_ROWS", "MAX_CHUNK_ROWS", "HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT",
              "REQUEST_DEADLINE", "SHARD_CHUNK_BYTES", "PROTOCOL_VERSION"}
    assert limits <= {row[0] for row in rows}


def test_largest_frame_the_coordinator_takes():
    assert f"({_largest_reply_bytes(TrainingConfig(), 784):,} bytes for the default float32 network)" in DOC


def test_products_of_each_request():
    documented = {}
    for request, product, *_ in table("request | product"):
        documented.setdefault(request, set()).update({product} - {"(none)"})
    assert documented == _products_our_worker_returns()


def _products_our_worker_returns() -> dict:
    """request kind -> the names of the products our worker returns for it, in every variant of the request."""
    state = WorkerState("float64", 255.0)
    state.compute(Shard(1, "train", 0, 3, np.zeros((3, 2), np.uint8)))
    weights, rows, error = np.ones((2, 4)), np.arange(3, dtype=np.int32), np.ones((3, 4))
    variants = {
        "shard": [Shard(2, "train", 0, 3, np.zeros((3, 2), np.uint8))],
        "first_layer": [
            FirstLayer(3, weights, "train", rows, None, None, 1.0),
            FirstLayer(4, None, "train", None, rows, error, 1.0),
            FirstLayer(5, weights, "train", rows, rows, error, 1.0),
        ],
        "kept_first_layer": [
            KeptFirstLayer(8, weights, "train", None, None, None, 1.0),
            KeptFirstLayer(9, None, "train", rows, rows, error, 1.0),
        ],
        "return_rows": [ReturnRows(10)],
        "later_forward": [LaterForward(6, 2, np.ones((3, 4)), np.ones((4, 2)))],
        "later_backward": [LaterBackward(7, 2, np.ones((3, 2)))],
    }
    return {kind: set().union(*(state.compute(r).products for r in requests)) for kind, requests in variants.items()}


def test_status_keys():
    paragraph = next(part for part in DOC.split("\n- ") if part.startswith("The status socket")).split("\n\n")[0]
    bullet = " ".join(paragraph.split())
    run_part, worker_part = bullet.split("each entry of `workers` has")
    assert re.findall(r"`(\w+)`", run_part.split("keys:")[1]) == [f.name for f in dataclasses.fields(RunStatus)]
    assert re.findall(r"`(\w+)`", worker_part) == [f.name for f in dataclasses.fields(WorkerStatus)]


def test_version_mismatch_reason():
    scheduler = Scheduler(1, settings.PROTOCOL_VERSION, np.dtype("float64"))
    reject = scheduler.handle(Arrived(b"peer", Register("A", settings.PROTOCOL_VERSION - 1)))[0].message
    assert f"`{reject.reason}`" in DOC


def test_conformance_checks_are_listed():
    from coordinator import conformance

    listed = re.findall(r"^\d\. (.*?): ", DOC.split("## Checking a worker")[1], re.MULTILINE | re.DOTALL)
    names = [name for item in listed for name in re.findall(r"`([\w ]+)`", item)]
    assert names == ["register"] + [name for name, _ in conformance.Session(None, "").steps()]
    assert f"idle for {conformance.IDLE_SECONDS:g} s, the worker is never silent for more than " \
           f"{conformance.LONGEST_SILENCE:g} s" in DOC
    assert f"sends nothing for {conformance.STOP_SILENCE:g} s (a message within {conformance.CROSSING_TIME:g} s" in DOC
