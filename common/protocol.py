"""The wire protocol: every message kind, its fields, one encoder and one decoder.

Frames. The coordinator binds a ROUTER, each worker connects a DEALER. Every message is one ZeroMQ
frame holding one msgpack map, {"kind": <kind>, <field>: <value>, ...}; on the coordinator's side the
ROUTER puts the worker's identity frame in front of it. NumPy arrays inside a message are
msgpack-numpy maps: {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [rows, cols], b"data": raw}.

    worker -> coordinator   register, result, failure, deregister, heartbeat
    coordinator -> worker   welcome, reject, register_again, shard, first_layer, kept_first_layer,
                            return_rows, later_forward, later_backward, stop, heartbeat

A session: the worker sends `register`; the coordinator answers `welcome` (or `reject`), sends the
worker's columns of each split as `shard` chunks (once, and again whenever its columns change), then
compute requests. Every numbered request, a shard chunk included, is answered by a `result` (an empty
one for a chunk) or a `failure` carrying the request's number, and finally `stop` ends the session.
Both sides send `heartbeat` while idle; any message counts as a sign of life (see settings). A peer
the coordinator does not know (it restarted, say) is told `register_again`.

`decode` is the gate: bytes from a socket become a message only through it. It refuses anything
that is not a map of a known kind with exactly that kind's fields of the right types, and any array
whose dtype is not on the numeric allow-list or whose byte length does not match its shape. Only
then does msgpack-numpy's decoder (which would unpickle an object array) see the array.
"""

import dataclasses
import math
import types
from dataclasses import dataclass

import msgpack
import msgpack_numpy
import numpy as np

ALLOWED_DTYPES = frozenset({"|u1", "<u2", "<i4", "<i8", "<f2", "<f4", "<f8"})  # <u2: bfloat16's bits
MAX_ARRAY_DIMS = 2
MAX_TEXT_LENGTH = 256  # characters of a name or a reason
ARRAY_MAP_KEYS = frozenset({b"nd", b"type", b"kind", b"shape", b"data"})


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text says why in one line."""


@dataclass(frozen=True)
class Register:
    """A worker introduces itself."""

    name: str
    version: int


@dataclass(frozen=True)
class Welcome:
    """The coordinator admits a worker and says how to turn its pixels into inputs."""

    slot: int
    dtype: str  # "float32" or "float64"
    input_divisor: float  # pixels are divided by this (255 scales them to [0, 1])
    wire: str  # "exact", "float16" or "bfloat16": how errors and partial products travel (WIRE_FIELDS)


@dataclass(frozen=True)
class Reject:
    """The coordinator refuses a worker."""

    reason: str


@dataclass(frozen=True)
class RegisterAgain:
    """The coordinator does not know this peer (it restarted, or dropped the worker): register afresh."""

    reason: str


@dataclass(frozen=True)
class Shard:
    """Rows `offset` onwards of the worker's own columns of one split's images.

    A chunk at offset 0 starts the split afresh (replacing what the worker held); the others follow in
    order, so a large split crosses a slow link as many small messages, each a sign of life.
    """

    request: int
    split: str  # "train" or "test"
    offset: int  # the first row of the chunk
    total: int  # rows of the whole split
    images: np.ndarray  # (n, k) uint8, rows offset .. offset + n - 1


@dataclass(frozen=True)
class FirstLayer:
    """Partial products of the first layer: a chunk's weight gradient, a forward product, or both.

    With both parts, the gradient is applied to `weights` (plain gradient descent with
    `learning_rate`) before the forward product, so one round ends a step and starts the next.
    """

    request: int
    weights: np.ndarray | None  # (k, H) first-layer rows of the worker's columns, columns permuted
    split: str  # the split `rows` index
    rows: np.ndarray | None  # (B,) int32 images to multiply by the weights
    error_rows: np.ndarray | None  # (B', ) int32 training images of the gradient
    error: np.ndarray | None  # (B', H) hidden error, columns permuted like `weights`; on the wire
    learning_rate: float


@dataclass(frozen=True)
class KeptFirstLayer:
    """FirstLayer on first-layer rows the worker keeps between re-keys (`--rekey`): the gradient is applied to
    the kept rows and not sent back, so only the error goes out and only the forward product comes back.

    `weights`, when given, is a re-key: the kept rows become these before anything else. With no
    weights, the worker uses the rows it kept, stepped by every error since they came.
    """

    request: int
    weights: np.ndarray | None  # (k, H) first-layer rows of the worker's columns, columns permuted; or None
    split: str  # the split `rows` index
    rows: np.ndarray | None  # (B,) int32 images to multiply by the kept rows
    error_rows: np.ndarray | None  # (B', ) int32 training images of the gradient
    error: np.ndarray | None  # (B', H) hidden error, columns permuted like the kept rows; on the wire
    learning_rate: float


@dataclass(frozen=True)
class ReturnRows:
    """Send back the kept first-layer rows, as the errors since the last re-key left them."""

    request: int


@dataclass(frozen=True)
class LaterForward:
    """The worker's partial product of a later layer (2, 3, ...: any after the first, which multiplies the inputs);
    it keeps both arrays, by layer, for that layer's backward pass."""

    request: int
    layer: int  # 2 .. 1 + the network's hidden layers, as w2, w3, ... in model.npz
    activations: np.ndarray  # (B, j) activations of the worker's units of the layer's input, masked by dropout
    weights: np.ndarray  # (j, n) the layer's rows of those units, columns permuted


@dataclass(frozen=True)
class LaterBackward:
    """The worker's share of a later layer's weight gradient and back-propagated error."""

    request: int
    layer: int  # a layer of an earlier LaterForward
    error: np.ndarray  # (B, n) the layer's error, columns permuted like its last LaterForward's weights; on the wire


@dataclass(frozen=True)
class Result:
    """A worker's answer to one compute request: named partial products."""

    request: int
    products: dict


@dataclass(frozen=True)
class Failure:
    """A worker could not carry out a request."""

    request: int
    reason: str


@dataclass(frozen=True)
class Stop:
    """The coordinator is done with the worker."""

    reason: str


@dataclass(frozen=True)
class Deregister:
    """A worker leaves on its own (Ctrl-C), so its work is reassigned at once."""

    reason: str


@dataclass(frozen=True)
class Heartbeat:
    """I am still here."""


WIRE_PRODUCTS = frozenset({"partial", "error"})  # products that travel in the welcome's wire format; the rest exact


MESSAGE_KINDS = {
    "register": Register,
    "welcome": Welcome,
    "reject": Reject,
    "register_again": RegisterAgain,
    "shard": Shard,
    "first_layer": FirstLayer,
    "kept_first_layer": KeptFirstLayer,
    "return_rows": ReturnRows,
    "later_forward": LaterForward,
    "later_backward": LaterBackward,
    "result": Result,
    "failure": Failure,
    "stop": Stop,
    "deregister": Deregister,
    "heartbeat": Heartbeat,
}
KIND_OF = {cls: kind for kind, cls in MESSAGE_KINDS.items()}
FIELD_TYPES = {cls: {field.name: field.type for field in dataclasses.fields(cls)} for cls in KIND_OF}


def encode(message) -> bytes:
    """One message as one frame."""
    return _packer.pack({"kind": KIND_OF[type(message)], **vars(message)})


def decode(frame) -> object:
    """The message in a frame, or ProtocolError: the only way bytes from a socket become a message."""
    try:  # plain msgpack builds only maps, lists, strings, bytes and numbers: nothing runs
        raw = msgpack.unpackb(frame, raw=False)
    except Exception as error:  # msgpack raises many kinds; any of them means garbage
        raise ProtocolError(f"not a msgpack frame ({type(error).__name__})") from None
    if not isinstance(raw, dict) or not _has_text_keys(raw):
        raise ProtocolError(f"frame holds a {type(raw).__name__}, not a message map")
    kind = raw.pop("kind", None)
    if kind not in MESSAGE_KINDS:
        raise ProtocolError(f"unknown message kind {_shown(kind)}")
    return _checked_message(MESSAGE_KINDS[kind], {name: _with_arrays(value) for name, value in raw.items()})


def _with_arrays(value, depth: int = 0):
    """A field's value with its array maps checked and built: a field may be an array, or (Result.products) a
    map of names to arrays; any other map is refused."""
    if type(value) is not dict:
        return value
    if _has_text_keys(value) and depth == 0:
        return {name: _with_arrays(item, depth + 1) for name, item in value.items()}
    return _checked_array(value)


def _has_text_keys(mapping: dict) -> bool:
    return all(type(key) is str for key in mapping)


def _checked_array(mapping: dict) -> np.ndarray:
    """A msgpack-numpy array map as an array, once its dtype, shape and length are known to be allowed."""
    if mapping.keys() != ARRAY_MAP_KEYS or mapping[b"nd"] is not True:
        raise ProtocolError("map is neither a message nor an array")
    dtype, shape, data = mapping[b"type"], mapping[b"shape"], mapping[b"data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES or mapping[b"kind"] != b"":
        raise ProtocolError(f"array dtype {_shown(dtype)} is not allowed")
    if not _is_shape(shape):
        raise ProtocolError(f"array shape {_shown(shape)} is not a shape of at most {MAX_ARRAY_DIMS} dims")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ProtocolError(f"array data does not match dtype {dtype} and shape {list(shape)}")
    return msgpack_numpy.decode(mapping)


def _is_shape(shape) -> bool:
    if type(shape) not in (list, tuple) or len(shape) > MAX_ARRAY_DIMS:
        return False
    return all(type(size) is int and size >= 0 for size in shape)


def _checked_message(cls, fields: dict):
    expected = FIELD_TYPES[cls]
    if fields.keys() != expected.keys():
        missing, extra = sorted(set(expected) - set(fields)), sorted(set(fields) - set(expected))
        raise ProtocolError(f"{KIND_OF[cls]} message fields wrong (missing {missing}, unexpected {extra})")
    for name, has_type in FIELD_CHECKS[cls].items():
        if not has_type(fields[name]):
            raise ProtocolError(f"{KIND_OF[cls]}.{name} is not a valid {_type_name(expected[name])}")
    return cls(**fields)


def _type_check(expected):
    """The test that a decoded value is of a field's type, made once per field rather than worked out per value."""
    if isinstance(expected, types.UnionType):  # `X | None`
        options = [_type_check(option) for option in expected.__args__]
        return lambda value: any(has_type(value) for has_type in options)
    if expected is type(None):
        return lambda value: value is None
    if expected is int:
        return lambda value: type(value) is int
    if expected is float:
        return lambda value: type(value) in (int, float) and math.isfinite(value)
    if expected is str:
        return lambda value: type(value) is str and len(value) <= MAX_TEXT_LENGTH
    if expected is dict:  # Result.products: names to arrays
        return lambda value: type(value) is dict and all(
            type(key) is str and type(array) is np.ndarray for key, array in value.items()
        )
    return lambda value: isinstance(value, expected)


def _type_name(expected) -> str:
    return " or ".join(t.__name__ for t in getattr(expected, "__args__", (expected,)))


def _shown(value) -> str:
    """A peer's value, cut short, for an error line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


FIELD_CHECKS = {cls: {name: _type_check(expected) for name, expected in fields.items()} for cls, fields in FIELD_TYPES.items()}
_packer = msgpack.Packer(default=msgpack_numpy.encode)  # one for the process: packb would build one per message
