"""A worker's recording: every message it received and sent, as the wire carried them (see docs/RECORDING.md).

The file is a stream of msgpack maps: a header, then one record per message, then (unless the worker was
killed) an end record. Each record holds the message's frame exactly as it crossed the socket, so reading
a recording goes through the protocol's one decode gate like any frame from a socket: nothing in a
recording is unpickled, and a damaged frame is refused with the protocol's own reason.

    {"format": "scatterprop-recording", "version": 1, "protocol": 4, "worker": name, "coordinator": address,
     "started": unix seconds}
    {"direction": "received" | "sent", "seconds": since started, "frame": bin}   one per message, heartbeats left out
    {"end": "closed" | "limit", "records": n, "bytes": n}
"""

import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from common import protocol, settings
from common.errors import InputError

FORMAT = "scatterprop-recording"
VERSION = 1
FILE = "recording.msgpack"
DIRECTIONS = ("received", "sent")
WRITE_BUFFER_BYTES = 1 << 20  # frames are written as they come; one system call per megabyte, not per frame
# A record's map up to its frame: its three keys, the direction and time, then "frame" and a bin 32 header,
# so that the frame itself is written straight from the socket's buffer, never copied into a packed record.
RECORD_HEAD = {direction: b"\x83" + msgpack.packb("direction") + msgpack.packb(direction) + msgpack.packb("seconds")
               for direction in DIRECTIONS}
FRAME_HEAD = msgpack.packb("frame") + b"\xc6"


class RecordingError(InputError):
    """A recording that cannot be read; the text says which and why in one line."""


class Recorder:
    """Appends each frame a worker receives or sends to FOLDER/recording.msgpack, until `limit_bytes` are written."""

    def __init__(self, folder: Path, limit_bytes: int, worker: str, coordinator: str, on_limit=None):
        """`on_limit(text)` is told once, when the limit (or a disk that is full) stops the recording; the worker
        goes on working."""
        path = Path(folder) / FILE
        if path.exists():
            raise InputError(f"{path} already holds a recording; give another --record folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "xb", buffering=WRITE_BUFFER_BYTES)
        except OSError as error:
            raise InputError(f"cannot record into {folder}: {error.strerror}") from None
        self.path, self.limit_bytes, self.on_limit = path, limit_bytes, on_limit
        self.started = time.time()
        self.records = self.written = 0
        self.recording = True
        self._write({"format": FORMAT, "version": VERSION, "protocol": settings.PROTOCOL_VERSION, "worker": worker,
                     "coordinator": coordinator, "started": self.started})

    def record(self, direction: str, frame: bytes) -> None:
        if not self.recording:
            return
        frame = memoryview(frame)
        head = (RECORD_HEAD[direction] + msgpack.packb(time.time() - self.started) + FRAME_HEAD
                + len(frame).to_bytes(4, "big"))
        if self.written + len(head) + len(frame) > self.limit_bytes:
            self._end("limit")
            if self.on_limit:
                self.on_limit(f"recording stopped at --record-limit ({self.limit_bytes / 1e6:g} MB) after "
                              f"{self.records} messages: {self.path}")
            return
        try:
            self.file.write(head)
            self.file.write(frame)
        except OSError as error:  # a full disk ends the recording, not the work
            self.recording = False
            if self.on_limit:
                self.on_limit(f"recording stopped after {self.records} messages: {self.path}: {error.strerror}")
            return
        self.written += len(head) + len(frame)
        self.records += 1

    def close(self) -> None:
        if self.recording:
            self._end("closed")
        try:
            self.file.close()
        except OSError:  # what could not be written reads back as a truncated recording
            pass

    def _end(self, why: str) -> None:
        self.recording = False
        try:
            self._write({"end": why, "records": self.records, "bytes": self.written})
            self.file.flush()
        except OSError:  # a full disk: the recording reads back as truncated
            pass

    def _write(self, record: dict) -> None:
        packed = msgpack.packb(record)
        self.file.write(packed)
        self.written += len(packed)


@dataclass(frozen=True)
class Recorded:
    direction: str  # "received" or "sent"
    seconds: float  # since the recording started
    message: object  # a protocol message, through the decode gate


@dataclass(frozen=True)
class Recording:
    worker: str
    coordinator: str
    messages: list  # [Recorded] in the order they crossed the socket
    ended: str  # "closed", "limit" (the worker stopped recording, and went on), or "truncated" (it was killed)

    @property
    def complete(self) -> bool:
        return self.ended == "closed"


def read_recording(folder: Path) -> Recording:
    """The recording in FOLDER, every frame through the protocol's decode gate, or RecordingError."""
    path = Path(folder) / FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RecordingError(f"cannot read recording {path}: {error.strerror}") from None
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    records = iter(unpacker)
    try:
        header = next(records, None)
        if not _is_header(header):
            raise RecordingError(f"{path} is not a scatterprop recording")
        if header["version"] != VERSION or header["protocol"] != settings.PROTOCOL_VERSION:
            raise RecordingError(f"{path} is recording version {header['version']} of protocol {header['protocol']}; "
                                 f"this version reads {VERSION} of protocol {settings.PROTOCOL_VERSION}")
        messages, ended = [], "truncated"
        for number, record in enumerate(records, start=1):
            if isinstance(record, dict) and record.keys() == {"end", "records", "bytes"}:
                ended = record["end"]
                break
            messages.append(_recorded(record, path, number))
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as error:
        if isinstance(error, RecordingError):
            raise
        raise RecordingError(f"{path} is corrupt after {len(messages)} records ({type(error).__name__})") from None
    return Recording(header["worker"], header["coordinator"], messages, ended)


def _is_header(header) -> bool:
    return (isinstance(header, dict) and header.get("format") == FORMAT
            and all(type(header.get(key)) is int for key in ("version", "protocol")))


def _recorded(record, path: Path, number: int) -> Recorded:
    if not (isinstance(record, dict) and record.keys() == {"direction", "seconds", "frame"}
            and record["direction"] in DIRECTIONS and type(record["frame"]) is bytes):
        raise RecordingError(f"{path}: record {number} is not a recorded message")
    try:
        message = protocol.decode(record["frame"])
    except protocol.ProtocolError as error:
        raise RecordingError(f"{path}: record {number} holds a bad frame: {error}") from None
    return Recorded(record["direction"], float(record["seconds"]), message)
