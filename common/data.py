"""Load MNIST-format data sets (IDX files, raw or gzipped) into numpy arrays."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from common.errors import InputError

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGE_HEADER = struct.Struct(">IIII")  # magic, count, rows, cols
LABEL_HEADER = struct.Struct(">II")  # magic, count
NUM_CLASSES = 10
CHECKSUM_FILE = "SHA256SUMS"

# The data ships as plain files inside the package, so the resource is a real directory.
EMBEDDED_MNIST = Path(str(files("common") / "mnist"))


class DataError(InputError):
    """A data set that cannot be used; the message is one line for the user."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Dataset:
    """Images as flat uint8 rows and their integer labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def images(self, split: str) -> np.ndarray:
        return self.train_images if split == "train" else self.test_images

    def labels(self) -> dict:
        """split -> its labels."""
        return {"train": self.train_labels, "test": self.test_labels}

    def cut(self, train_limit: int | None, test_limit: int | None) -> Dataset:
        """The first images of each split (None: all of them)."""
        train, test = slice(train_limit), slice(test_limit)
        return Dataset(self.train_images[train], self.train_labels[train], self.test_images[test], self.test_labels[test])


SPLITS = ("train", "test")
XOR_ROWS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.uint8)
XOR = Dataset(XOR_ROWS, np.array([0, 1, 1, 0], np.uint8), XOR_ROWS, np.array([0, 1, 1, 0], np.uint8))
"""The seed's XOR network's four rows, used for training and testing alike."""


def load_dataset(directory: Path | None = None, image_shape: tuple[int, int] = (28, 28)) -> Dataset:
    """Load the four standard IDX files from `directory` (default: the embedded MNIST copy)."""
    directory = EMBEDDED_MNIST if directory is None else Path(directory)
    _require_directory(directory)
    checksums = _read_checksums(directory)
    train_images, train_labels = _load_split(directory, "train", image_shape, checksums)
    test_images, test_labels = _load_split(directory, "t10k", image_shape, checksums)
    return Dataset(train_images, train_labels, test_images, test_labels)


def _load_split(
    directory: Path, prefix: str, image_shape: tuple[int, int], checksums: dict[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split's images and labels and check that they pair up."""
    images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = _parse_images(images_path, _read_verified(images_path, checksums), image_shape)
    labels = _parse_labels(labels_path, _read_verified(labels_path, checksums))
    if len(labels) != len(images):
        raise DataError(
            f"{_describe(labels_path)} has {len(labels)} labels but "
            f"{images_path.name} has {len(images)} images"
        )
    return images, labels


def _describe(path: Path) -> str:
    """Name a file the way every error message starts."""
    return f"data: {path.name} in {path.parent}"


def _require_directory(directory: Path) -> None:
    """Fail unless `directory` is an existing directory."""
    if not directory.exists():
        raise DataError(f"data: directory {directory} does not exist")
    if not directory.is_dir():
        raise DataError(f"data: {directory} is not a directory")


def _find_file(directory: Path, name: str) -> Path:
    """Return the gzipped or raw file with the standard `name`, preferring gzip."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"data: neither {name}.gz nor {name} found in {directory}")


def _read_checksums(directory: Path) -> dict[str, str]:
    """Map uncompressed file names to expected SHA-256 hex digests from SHA256SUMS, if present."""
    path = directory / CHECKSUM_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{_describe(path)} cannot be read: {_reason(exc)}") from exc
    checksums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not _is_sha256(fields[0]):
            raise DataError(f"{_describe(path)} line {number} is not '<sha256>  <filename>'")
        # sha256sum marks binary-mode entries with a leading '*'.
        checksums[fields[1].strip().removeprefix("*")] = fields[0].lower()
    return checksums


def _is_sha256(text: str) -> bool:
    """Tell whether `text` is a 64-digit hexadecimal digest."""
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def _read_verified(path: Path, checksums: dict[str, str]) -> bytes:
    """Read the uncompressed bytes of `path` and check them against SHA256SUMS if listed."""
    data = _read_uncompressed(path)
    expected = checksums.get(path.name.removesuffix(".gz"))
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DataError(
                f"{_describe(path)} does not match its {CHECKSUM_FILE} checksum: "
                f"expected {expected}, found {actual}"
            )
    return data


def _read_uncompressed(path: Path) -> bytes:
    """Read `path`, decompressing it if it ends in .gz."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{_describe(path)} cannot be read: {_reason(exc)}") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{_describe(path)} is not a valid gzip file: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """Reduce an exception to a one-line explanation."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(text.split())


def _parse_images(path: Path, data: bytes, image_shape: tuple[int, int]) -> np.ndarray:
    """Turn IDX image bytes into a read-only (count, rows*cols) uint8 array."""
    _, count, rows, cols = _unpack_header(path, data, IMAGE_HEADER, IMAGE_MAGIC)
    if (rows, cols) != tuple(image_shape):
        raise DataError(
            f"{_describe(path)} has {rows}x{cols} images, "
            f"expected {image_shape[0]}x{image_shape[1]}"
        )
    _check_payload_length(path, data, IMAGE_HEADER.size, count * rows * cols, "image")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=IMAGE_HEADER.size)
    return pixels.reshape(count, rows * cols)


def _parse_labels(path: Path, data: bytes) -> np.ndarray:
    """Turn IDX label bytes into a read-only (count,) uint8 array of values below NUM_CLASSES."""
    _, count = _unpack_header(path, data, LABEL_HEADER, LABEL_MAGIC)
    _check_payload_length(path, data, LABEL_HEADER.size, count, "label")
    labels = np.frombuffer(data, dtype=np.uint8, offset=LABEL_HEADER.size)
    invalid = np.flatnonzero(labels >= NUM_CLASSES)
    if invalid.size:
        raise DataError(
            f"{_describe(path)} has label {labels[invalid[0]]} at index {invalid[0]}, "
            f"expected 0..{NUM_CLASSES - 1}"
        )
    return labels


def _unpack_header(path: Path, data: bytes, header: struct.Struct, magic: int) -> tuple[int, ...]:
    """Read the big-endian IDX header at the start of `data`, checking its magic number."""
    # Check the magic first so that a wrong kind of file is reported as such, not as truncated.
    found_magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found_magic != magic:
        raise DataError(
            f"{_describe(path)} has magic number 0x{found_magic:08x}, expected 0x{magic:08x}"
        )
    if len(data) < header.size:
        raise DataError(
            f"{_describe(path)} is truncated: expected a {header.size}-byte header, "
            f"found {len(data)} bytes"
        )
    return header.unpack_from(data)


def _check_payload_length(path: Path, data: bytes, offset: int, expected: int, kind: str) -> None:
    """Fail unless exactly `expected` payload bytes follow the header."""
    found = len(data) - offset
    if found < expected:
        raise DataError(
            f"{_describe(path)} is truncated: expected {expected} {kind} bytes, found {found}"
        )
    if found > expected:
        raise DataError(
            f"{_describe(path)} has {found - expected} trailing bytes after "
            f"{expected} {kind} bytes"
        )
