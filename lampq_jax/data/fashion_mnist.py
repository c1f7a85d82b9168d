"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, read offline.

The files are IDX (optionally gzipped): 2 zero bytes, a type byte (0x08 = uint8), a byte
with the number of dimensions, one big-endian uint32 per dimension, then the data.

Example:
    >>> images, labels = load_fashion_mnist("test")   # [10000, 28, 28, 1] uint8, [10000] int32
    >>> x = normalize(images)                          # [10000, 28, 28, 1] float32
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Union

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
APT_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"

# Pixel statistics of the training set after dividing by 255.
MEAN = 0.2860
STD = 0.3530

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Reads an IDX file (gzipped when its name ends in `.gz`) into an array of its shape.

    Args:
      path: the file.

    Returns:
      The array, shape `[d0, d1, ...]` from the header, in native byte order.

    Raises:
      FileNotFoundError: the file does not exist (the message names it and the apt command).
      ValueError: the header is malformed or the data size disagrees with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}. Fashion-MNIST comes from: {APT_COMMAND}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: header bytes {list(raw[:4])}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header for {ndim} dimensions ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header shape {shape} of {dtype} needs {expected} data bytes, file has {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def load_fashion_mnist(split: str, root: Union[str, Path] = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Loads a Fashion-MNIST split.

    Args:
      split: "train" (60,000 images) or "test" (10,000 images).
      root: folder holding the four `*-ubyte.gz` files.

    Returns:
      `(images, labels)`: images `[N, 28, 28, 1]` uint8, labels `[N]` int32 in 0..9.

    Raises:
      ValueError: unknown split.
      FileNotFoundError: a file is missing; the message names it and the apt command.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root)
    image_file, label_file = (root / name for name in _FILES[split])
    for p in (image_file, label_file):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file not found: {p}. Install it with: {APT_COMMAND} "
                f"(or pass root= the folder that holds {_FILES[split]})"
            )
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"unexpected Fashion-MNIST shapes: images {images.shape}, labels {labels.shape}")
    return images[..., None].astype(np.uint8), labels.astype(np.int32)


def normalize(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32: `(x / 255 - MEAN) / STD`, MEAN = 0.2860, STD = 0.3530.

    Args:
      images: `[..., 28, 28, 1]` uint8 (any shape works).

    Returns:
      float32 array of the same shape.
    """
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    return (x - np.float32(MEAN)) / np.float32(STD)
