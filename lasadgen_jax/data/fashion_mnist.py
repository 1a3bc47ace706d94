"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: the offline dataset of the CPU demo.

The package installs the four gzipped IDX files of the original release under
/usr/share/datasets/fashion-mnist (60k train and 10k test images, 28x28 grey, 10 classes). They are
read here, padded with black to 32x32 (a size the tokenizer's downsampling divides) and repeated to
three channels, since the tokenizer takes RGB.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_COMMAND = "apt-get install -y dataset-fashion-mnist"
IMAGE_SIZE = 32
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: two zero bytes, a type byte (0x08 = uint8) and the number of dimensions.
IDX_UINT8_MAGIC = {1: 0x00000801, 3: 0x00000803}


def read_idx_uint8(path: str, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes with `ndim` dimensions, as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic, *dims = np.frombuffer(data, ">u4", count=1 + ndim)
    if magic != IDX_UINT8_MAGIC[ndim]:
        raise ValueError(f"{path}: IDX magic {magic:#010x}, expected {IDX_UINT8_MAGIC[ndim]:#010x} (uint8, {ndim}-d)")
    count = int(np.prod(dims))
    if len(data) != header_size + count:
        raise ValueError(f"{path}: {len(data) - header_size} payload bytes, the header says {count}")
    return np.frombuffer(data, np.uint8, offset=header_size).reshape([int(d) for d in dims])


def split_paths(split: str, root: str) -> tuple[str, str]:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; known: {sorted(SPLIT_FILES)}")
    paths = tuple(os.path.join(root, name) for name in SPLIT_FILES[split])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST is not installed: {missing[0]} does not exist. Install it with "
                                f"`{INSTALL_COMMAND}` (Debian/Ubuntu, as root), or pass the directory holding "
                                f"the IDX files as root")
    return paths


def load_fashion_mnist(split: str = "train", root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) of one split."""
    images_path, labels_path = split_paths(split, root)
    images = read_idx_uint8(images_path, ndim=3)
    labels = read_idx_uint8(labels_path, ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    pad = (IMAGE_SIZE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=-1), labels.astype(np.int32)
