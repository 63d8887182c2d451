"""A complete scatterprop worker, written from docs/PROTOCOL.md alone: ZeroMQ, msgpack and NumPy, nothing else.

    python docs/examples/minimal_worker.py tcp://HOST:PORT [NAME]
"""

import os
import platform
import sys
import time

import msgpack
import numpy as np
import zmq

VERSION = 4
HEARTBEAT_INTERVAL = 0.5  # seconds without sending anything before we send a heartbeat
HEARTBEAT_TIMEOUT = 3.0  # seconds without a word from the coordinator before we take it as gone
RECONNECT_WAIT = 1.0  # seconds between giving up on a connection and registering on a new one
MAX_LAYER = 17  # the last layer a network of the coordinator's most hidden layers (16) has: bounds what we keep
DTYPES = {"|u1", "<u2", "<i4", "<i8", "<f2", "<f4", "<f8"}  # what an array may be, as the coordinator's decoder allows


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=array_map)


def array_map(array: np.ndarray) -> dict:
    """An array as the protocol's map: its keys are msgpack bin (bytes), its data row-major."""
    array = np.ascontiguousarray(array)
    return {b"nd": True, b"type": array.dtype.str, b"kind": b"", b"shape": list(array.shape), b"data": array.tobytes()}


def unpack(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False, object_hook=lambda m: array_of(m) if b"nd" in m else m)


def array_of(m: dict) -> np.ndarray:
    if m[b"type"] not in DTYPES:
        raise ValueError(f"array dtype {m[b'type']!r} is not allowed")
    return np.frombuffer(m[b"data"], dtype=m[b"type"]).reshape(m[b"shape"])


def to_wire(array: np.ndarray, wire: str) -> np.ndarray:
    """An error or partial product as it travels: as computed, float16, or bfloat16 (float32's upper 16 bits)."""
    if wire == "exact":
        return array
    if wire == "float16":
        return array.astype(np.float16)
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)  # round to nearest, ties to even


def from_wire(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if array.dtype == np.uint16:  # bfloat16's bits
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(dtype, copy=False)


class Session:
    """What a worker holds between one welcome and the next: its inputs, its kept first-layer rows and each later
    layer's operands."""

    def __init__(self, welcome: dict):
        self.dtype = np.dtype(welcome["dtype"])
        self.divisor = self.dtype.type(welcome["input_divisor"])
        self.wire = welcome["wire"]  # how errors come and partial products go; we compute in self.dtype
        self.inputs = {}  # split -> (n, k) inputs
        self.kept = None  # (k, H) first-layer rows kept between re-keys
        self.later = {}  # layer -> (activations (B, j), weights (j, n)) of its last later_forward
        self.handlers = {"shard": self.shard, "first_layer": self.first_layer,
                         "kept_first_layer": self.kept_first_layer, "return_rows": self.return_rows,
                         "later_forward": self.later_forward, "later_backward": self.later_backward}

    def answer(self, request: dict) -> dict:
        """The result of a numbered request, or a failure saying why it cannot be carried out."""
        try:
            products = self.handlers[request["kind"]](request)
        except (KeyError, IndexError, ValueError, TypeError) as error:
            return {"kind": "failure", "request": request["request"], "reason": repr(error)[:256]}
        products = {name: to_wire(array, self.wire) if name in ("partial", "error") else array
                    for name, array in products.items()}
        return {"kind": "result", "request": request["request"], "products": products}

    def shard(self, chunk: dict) -> dict:
        images, start = chunk["images"], chunk["offset"]
        if start == 0:  # a split starts afresh
            self.inputs[chunk["split"]] = np.empty((chunk["total"], images.shape[1]), self.dtype)
        self.inputs[chunk["split"]][start : start + len(images)] = images.astype(self.dtype) / self.divisor
        return {}

    def first_layer(self, request: dict) -> dict:
        products, weights = {}, request["weights"]
        if request["error"] is not None:
            # (B', k)^T @ (B', H) -> (k, H); this step's gradient, applied before the forward product
            error = from_wire(request["error"], self.dtype)
            products["gradient"] = self.inputs["train"][request["error_rows"]].T @ error
            if weights is not None:
                weights = weights - self.dtype.type(request["learning_rate"]) * products["gradient"]
        if request["rows"] is not None:
            products["partial"] = self.inputs[request["split"]][request["rows"]] @ weights  # (B, k) @ (k, H)
        return products

    def kept_first_layer(self, request: dict) -> dict:
        weights = self.kept if request["weights"] is None else request["weights"]  # new weights: a re-key
        if weights is None:
            raise ValueError("kept_first_layer without weights before any re-key")
        products = self.first_layer({**request, "weights": weights})
        if "gradient" in products:  # stepped here, and kept; the gradient is not sent back
            weights = weights - self.dtype.type(request["learning_rate"]) * products.pop("gradient")
        self.kept = weights
        return products

    def return_rows(self, request: dict) -> dict:
        if self.kept is None:
            raise ValueError("return_rows before any kept rows")
        return {"weights": self.kept}

    def later_forward(self, request: dict) -> dict:
        if not 2 <= request["layer"] <= MAX_LAYER:
            raise ValueError(f"layer {request['layer']} is not 2..{MAX_LAYER}")
        self.later[request["layer"]] = (request["activations"], request["weights"])  # kept for its later_backward
        return {"partial": request["activations"] @ request["weights"]}  # (B, j) @ (j, n) -> (B, n)

    def later_backward(self, request: dict) -> dict:
        activations, weights = self.later[request["layer"]]  # a KeyError before its later_forward: a failure
        error = from_wire(request["error"], self.dtype)
        return {"gradient": activations.T @ error, "error": error @ weights.T}  # (j, n) and (B, j)


def connect(context: zmq.Context, address: str, name: str) -> zmq.Socket:
    """A new connection (a new identity to the coordinator) with our registration on its way."""
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(address)
    socket.send(pack({"kind": "register", "name": name, "version": VERSION}))
    return socket


def serve(socket: zmq.Socket, name: str) -> str | None:
    """Work on one connection: the stop reason, or None after a silent coordinator (register again)."""
    session, heard, sent = None, time.monotonic(), time.monotonic()
    while True:
        due = heard + HEARTBEAT_TIMEOUT  # heartbeats only once welcomed
        if session is not None:
            due = min(due, sent + HEARTBEAT_INTERVAL)
        if socket.poll(max(0.0, due - time.monotonic()) * 1000):
            heard, reply = time.monotonic(), None
            try:
                message = unpack(socket.recv())
            except Exception as error:  # msgpack raises many kinds; any of them means a bad frame
                print(f"ignored a bad frame: {error}", file=sys.stderr)
                continue
            kind = message.get("kind")
            if kind == "stop":
                return message["reason"]
            if kind == "reject":
                raise SystemExit(f"error: the coordinator refused this worker: {message['reason']}")
            if kind == "welcome":
                session = Session(message)  # a new session: nothing held before is valid now
                print(f"{name} registered in slot {message['slot']}", file=sys.stderr)
            elif kind == "register_again":
                session, reply = None, {"kind": "register", "name": name, "version": VERSION}
            elif session is not None and kind in session.handlers:
                reply = session.answer(message)
            if reply is not None:
                socket.send(pack(reply))
                sent = time.monotonic()
        now = time.monotonic()
        if now - heard > HEARTBEAT_TIMEOUT:
            return None
        if session is not None and now - sent >= HEARTBEAT_INTERVAL:
            socket.send(pack({"kind": "heartbeat"}))
            sent = now


def main(address: str, name: str) -> None:
    context = zmq.Context()
    while True:
        socket = connect(context, address, name)
        try:
            reason = serve(socket, name)
        except KeyboardInterrupt:
            socket.send(pack({"kind": "deregister", "reason": "interrupted"}))  # our columns go to others at once
            socket.close(linger=500)
            raise SystemExit(130)
        socket.close()
        if reason is not None:
            print(f"stopped: {reason}", file=sys.stderr)
            return
        print(f"no word from {address} for {HEARTBEAT_TIMEOUT:g} s; registering again", file=sys.stderr)
        time.sleep(RECONNECT_WAIT)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python minimal_worker.py tcp://HOST:PORT [NAME]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else f"{platform.node()}-{os.getpid()}")
