"""Tests for common.data: the embedded MNIST copy and small generated IDX sets."""

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from common.data import EMBEDDED_MNIST, DataError, Dataset, load_dataset

STANDARD_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    """The embedded MNIST copy, loaded once for the whole module."""
    return load_dataset()


def images_bytes(images: np.ndarray, magic: int = 0x803) -> bytes:
    """Encode (count, rows, cols) uint8 images as an IDX file."""
    count, rows, cols = images.shape
    return struct.pack(">IIII", magic, count, rows, cols) + images.tobytes()


def labels_bytes(labels: np.ndarray, magic: int = 0x801) -> bytes:
    """Encode (count,) uint8 labels as an IDX file."""
    return struct.pack(">II", magic, len(labels)) + labels.tobytes()


def small_set(shape: tuple[int, int] = (28, 28)) -> dict[str, bytes]:
    """A deterministic tiny data set: 6 training and 4 test images, by standard file name."""
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (6, *shape), dtype=np.uint8)
    test_images = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
    return {
        "train-images-idx3-ubyte": images_bytes(train_images),
        "train-labels-idx1-ubyte": labels_bytes(np.array([0, 1, 2, 3, 9, 5], dtype=np.uint8)),
        "t10k-images-idx3-ubyte": images_bytes(test_images),
        "t10k-labels-idx1-ubyte": labels_bytes(np.array([7, 8, 9, 0], dtype=np.uint8)),
    }


def write_set(directory: Path, contents: dict[str, bytes], gzipped: bool) -> Path:
    """Write `contents` under their standard names, gzipped or raw, and return `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        if gzipped:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (directory / name).write_bytes(data)
    return directory


def write_checksums(directory: Path, contents: dict[str, bytes]) -> None:
    """Write a SHA256SUMS file for the uncompressed `contents`."""
    lines = [f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in contents.items()]
    (directory / "SHA256SUMS").write_text("".join(lines))


def load_error(directory: Path, **kwargs) -> str:
    """Load `directory`, expecting a DataError, and return its message after checking it is one line."""
    with pytest.raises(DataError) as caught:
        load_dataset(directory, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data: ")
    return message


def test_embedded_mnist_shapes_and_dtypes(mnist):
    assert mnist.train_images.shape == (60000, 784)
    assert mnist.train_labels.shape == (60000,)
    assert mnist.test_images.shape == (10000, 784)
    assert mnist.test_labels.shape == (10000,)
    for array in (mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels):
        assert array.dtype == np.uint8
    assert mnist.train_images.flags.c_contiguous
    assert mnist.test_images.flags.c_contiguous


def test_embedded_mnist_labels_cover_all_digits(mnist):
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    assert set(np.unique(mnist.test_labels)) == set(range(10))


def test_embedded_mnist_content_looks_like_digits(mnist):
    # MNIST digits are centred: the border is nearly blank and the middle is inked.
    images = mnist.train_images.reshape(-1, 28, 28)
    assert images[:, 0, :].mean() < 1
    assert images[:, 12:16, 12:16].mean() > 50
    assert mnist.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.test_labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_embedded_folder_holds_gzipped_files_and_checksums():
    assert EMBEDDED_MNIST.is_dir()
    assert (EMBEDDED_MNIST / "SHA256SUMS").is_file()
    for name in STANDARD_NAMES:
        assert (EMBEDDED_MNIST / f"{name}.gz").is_file()


def test_embedded_checksums_are_verified(tmp_path):
    for path in EMBEDDED_MNIST.iterdir():
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(target.read_bytes()))
    data[100] = (data[100] + 1) % 10  # still a valid label, so only the checksum can catch it
    target.write_bytes(gzip.compress(bytes(data)))
    message = load_error(tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "checksum" in message


def test_raw_and_gzipped_sets_load_identically(tmp_path):
    contents = small_set()
    raw = load_dataset(write_set(tmp_path / "raw", contents, gzipped=False))
    packed = load_dataset(write_set(tmp_path / "gz", contents, gzipped=True))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(raw, field), getattr(packed, field))
    assert raw.train_images.shape == (6, 784)
    assert raw.test_images.shape == (4, 784)
    assert raw.train_labels.tolist() == [0, 1, 2, 3, 9, 5]
    expected_first = np.frombuffer(contents["train-images-idx3-ubyte"][16:16 + 784], np.uint8)
    np.testing.assert_array_equal(raw.train_images[0], expected_first)


def test_gzipped_file_is_preferred_over_raw(tmp_path):
    write_set(tmp_path, small_set(), gzipped=True)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage")
    assert load_dataset(tmp_path).train_images.shape == (6, 784)


def test_other_image_shapes_load_when_requested(tmp_path):
    write_set(tmp_path, small_set((32, 32)), gzipped=False)
    assert load_dataset(tmp_path, image_shape=(32, 32)).train_images.shape == (6, 1024)


def test_matching_checksums_pass(tmp_path):
    contents = small_set()
    write_set(tmp_path, contents, gzipped=True)
    write_checksums(tmp_path, contents)
    assert load_dataset(tmp_path).test_labels.tolist() == [7, 8, 9, 0]


def test_checksum_mismatch_on_raw_file_names_it(tmp_path):
    contents = small_set()
    write_set(tmp_path, contents, gzipped=False)
    write_checksums(tmp_path, {**contents, "t10k-images-idx3-ubyte": b"something else"})
    message = load_error(tmp_path)
    assert "t10k-images-idx3-ubyte" in message
    assert "checksum" in message


def test_malformed_checksum_file(tmp_path):
    write_set(tmp_path, small_set(), gzipped=False)
    (tmp_path / "SHA256SUMS").write_text("not a checksum line\n")
    assert "SHA256SUMS" in load_error(tmp_path)


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "nowhere")
    assert "nowhere" in message and "does not exist" in message


def test_missing_file(tmp_path):
    write_set(tmp_path, small_set(), gzipped=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    message = load_error(tmp_path)
    assert "t10k-labels-idx1-ubyte" in message and "found" in message


def test_truncated_file(tmp_path):
    contents = small_set()
    contents["train-images-idx3-ubyte"] = contents["train-images-idx3-ubyte"][:116]
    message = load_error(write_set(tmp_path, contents, gzipped=True))
    assert message == (
        f"data: train-images-idx3-ubyte.gz in {tmp_path} is truncated: "
        "expected 4704 image bytes, found 100"
    )


def test_truncated_header(tmp_path):
    contents = small_set()
    contents["t10k-labels-idx1-ubyte"] = b"\x00\x00\x08"
    message = load_error(write_set(tmp_path, contents, gzipped=False))
    assert "t10k-labels-idx1-ubyte" in message and "truncated" in message


def test_trailing_bytes(tmp_path):
    contents = small_set()
    contents["train-labels-idx1-ubyte"] += b"\x00\x00"
    message = load_error(write_set(tmp_path, contents, gzipped=False))
    assert "train-labels-idx1-ubyte" in message and "2 trailing bytes" in message


def test_bad_magic(tmp_path):
    contents = small_set()
    contents["train-images-idx3-ubyte"] = images_bytes(np.zeros((6, 28, 28), np.uint8), 0x0D03)
    message = load_error(write_set(tmp_path, contents, gzipped=True))
    assert "train-images-idx3-ubyte.gz" in message
    assert "magic number 0x00000d03" in message


def test_labels_file_given_for_images_has_bad_magic(tmp_path):
    contents = small_set()
    contents["t10k-images-idx3-ubyte"] = contents["t10k-labels-idx1-ubyte"]
    message = load_error(write_set(tmp_path, contents, gzipped=False))
    assert "t10k-images-idx3-ubyte" in message and "magic number" in message


def test_non_gzip_garbage_in_gz_file(tmp_path):
    write_set(tmp_path, small_set(), gzipped=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip at all")
    message = load_error(tmp_path)
    assert "train-labels-idx1-ubyte.gz" in message and "gzip" in message


def test_cut_off_gzip_stream(tmp_path):
    write_set(tmp_path, small_set(), gzipped=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    message = load_error(tmp_path)
    assert "train-images-idx3-ubyte.gz" in message and "gzip" in message


def test_wrong_image_size(tmp_path):
    write_set(tmp_path, small_set((32, 32)), gzipped=True)
    message = load_error(tmp_path)
    assert "train-images-idx3-ubyte.gz" in message
    assert "32x32" in message and "28x28" in message


def test_mismatched_label_count(tmp_path):
    contents = small_set()
    contents["t10k-labels-idx1-ubyte"] = labels_bytes(np.array([1, 2, 3], dtype=np.uint8))
    message = load_error(write_set(tmp_path, contents, gzipped=False))
    assert "t10k-labels-idx1-ubyte" in message
    assert "3 labels" in message and "4 images" in message


def test_label_out_of_range(tmp_path):
    contents = small_set()
    contents["train-labels-idx1-ubyte"] = labels_bytes(np.array([0, 1, 2, 10, 4, 5], np.uint8))
    message = load_error(write_set(tmp_path, contents, gzipped=False))
    assert "train-labels-idx1-ubyte" in message and "label 10 at index 3" in message


def test_directory_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    assert "not a directory" in load_error(path)
