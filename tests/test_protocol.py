"""Message round trips, and the gate refusing every frame that is not exactly a valid message."""

import os
import pickle

import msgpack
import numpy as np
import pytest

from common import protocol
from common.protocol import (
    Failure, FirstLayer, ProtocolError, Register, Reject, Result, SecondBackward, SecondForward, Shard, Stop,
    Welcome,
)

ARRAY = np.arange(12, dtype=np.float32).reshape(3, 4)
EVERY_KIND = [
    Register("A", 1),
    Welcome(3, "float32", 255.0),
    Reject("no"),
    Shard("train", np.zeros((5, 2), np.uint8)),
    FirstLayer(1, ARRAY, "test", np.arange(3, dtype=np.int32), None, None, 0.5),
    FirstLayer(2, None, "train", None, np.arange(3, dtype=np.int32), ARRAY, 1.0),
    SecondForward(4, ARRAY, ARRAY.T.copy()),
    SecondBackward(5, ARRAY),
    Result(6, {"partial": ARRAY, "gradient": ARRAY.astype(np.float64)}),
    Failure(7, "bad rows"),
    Stop("done"),
]


def _same(first, second) -> bool:
    if isinstance(first, np.ndarray):
        return first.dtype == second.dtype and np.array_equal(first, second)
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)
    return first == second


@pytest.mark.parametrize("message", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_every_kind_round_trips(message):
    decoded = protocol.decode(protocol.encode(message))
    assert type(decoded) is type(message)
    for name in message.__dataclass_fields__:
        assert _same(getattr(message, name), getattr(decoded, name))


def test_every_kind_is_covered():
    assert {type(m) for m in EVERY_KIND} == set(protocol.MESSAGE_KINDS.values())


def _frame(*arrays: bytes, **fields) -> bytes:
    """A frame built by hand: header length, msgpack header, then raw array bytes."""
    header = msgpack.packb(fields)
    return protocol.HEADER_LENGTH.pack(len(header)) + header + b"".join(arrays)


def _array(dtype, shape, code: int = protocol.ARRAY_EXTENSION) -> msgpack.ExtType:
    """How the header names an array."""
    return msgpack.ExtType(code, msgpack.packb([dtype, shape]))


class Exploit:
    """Unpickling this would create a file: the proof that nothing from a socket is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_object_array_is_refused_without_unpickling(tmp_path):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(Exploit(marker))
    for dtype in ("|O", "O"):
        with pytest.raises(ProtocolError, match="dtype"):
            protocol.decode(_frame(payload, kind="shard", split="train", images=_array(dtype, [1])))
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "array, data, reason",
    [
        (_array([["a", "<f4"], ["b", "<f4"]], [1]), b"\0" * 8, "dtype"),  # structured
        (_array("<c16", [1]), b"\0" * 16, "dtype"),  # complex is not on the list
        (_array("|u1", [2, 4]), b"\0" * 7, "too short"),  # too few bytes for the shape
        (_array("|u1", [2, 4]), b"\0" * 9, "after the arrays"),  # too many
        (_array("|u1", [2, 2, 2]), b"\0" * 8, "shape"),  # too many dims
        (_array("|u1", [-8]), b"\0" * 8, "shape"),
        (_array("|u1", "8"), b"\0" * 8, "shape"),
        (_array("|u1", [8], code=2), b"\0" * 8, "extension type"),
        (msgpack.ExtType(protocol.ARRAY_EXTENSION, msgpack.packb("|u1")), b"\0" * 8, "not \\[dtype, shape\\]"),
        ({b"nd": True, b"type": "|u1", b"shape": [8], b"data": b"\0" * 8}, b"", "not text"),  # msgpack-numpy's map
    ],
)
def test_bad_arrays_are_refused(array, data, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode(_frame(data, kind="shard", split="train", images=array))


def _header_only(header: bytes) -> bytes:
    return protocol.HEADER_LENGTH.pack(len(header)) + header


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"", "too short"),
        (protocol.HEADER_LENGTH.pack(100) + b"\x80", "does not fit"),
        (_header_only(b"\xc1garbage"), "not a msgpack header"),
        (_header_only(msgpack.packb({"kind": "stop", "reason": "x"})[:-1]), "not a msgpack header"),  # truncated
        (_header_only(msgpack.packb([1, 2, 3])), "not a message map"),
        (_frame(kind="execute", code="rm -rf /"), "unknown message kind"),
        (_frame(reason="no kind"), "unknown message kind"),
        (_frame(kind="stop"), "fields wrong"),
        (_frame(kind="stop", reason="x", extra=1), "fields wrong"),
        (_frame(kind="register", name="A", version="1"), "register.version"),
        (_frame(kind="register", name="A" * 1000, version=1), "register.name"),
        (_frame(kind="first_layer", request=1, weights=None, split="train", rows=None, error_rows=None,
                error=None, learning_rate=float("nan")), "learning_rate"),
        (_frame(kind="result", request=1, products={"partial": 3}), "result.products"),
        (_frame(kind="shard", split="train", images=b"raw bytes"), "shard.images"),
        (_frame(b"\x00", kind="stop", reason="x"), "after the arrays"),  # trailing data
        (_header_only(b"\x91" * 5000), "not a msgpack header"),  # nesting deeper than the decoder's stack
    ],
)
def test_bad_frames_are_refused(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode(frame)


def test_a_refusal_is_one_line():
    with pytest.raises(ProtocolError) as refused:
        protocol.decode(_frame(kind="x" * 500))
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 120
