"""Fashion-MNIST, the offline dataset of the CPU demo: where it is read from, and reading it.

The data are the four gzipped IDX files of the original release (60k train and 10k test images,
28x28 grey, 10 classes), read from the first of:
1. an explicit root: the `root` argument, which configs pass as their `fashion_mnist_root` field
   (the tokenizer's config.data.fashion_mnist_root, extraction's --fashion-mnist-root, a `fashion_mnist:`
   FID reference's config.eval.fashion_mnist_root; in configs/demo.py config.prepare.fashion_mnist_root
   sets all three);
2. the environment variable LASADGEN_FASHION_MNIST, a directory holding the four files;
3. Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) where installed;
4. the subset embedded in this package (fashion_mnist_subset/: the first 12000 train and the first
   2000 test images of the same files, byte for byte; its README says how it was cut).
A root named by 1 or 2 that lacks a file is an error, not a step down the list. Asking for more
images than the data found hold is an error; with the embedded subset it says how to get the full
dataset. Every load prints one line saying what was read from where. Images are padded with black
to 32x32 (a size the tokenizer's downsampling divides) and repeated to three channels, since the
tokenizer takes RGB.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
EMBEDDED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_subset")
ROOT_ENV_VAR = "LASADGEN_FASHION_MNIST"
INSTALL_COMMAND = "apt-get install -y dataset-fashion-mnist"
IMAGE_SIZE = 32
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FULL_SPLIT_SIZES = {"train": 60000, "test": 10000}
# IDX magic numbers: two zero bytes, a type byte (0x08 = uint8) and the number of dimensions.
IDX_UINT8_MAGIC = {1: 0x00000801, 3: 0x00000803}
EMBEDDED = "the embedded subset"


# ---------------------------------------------------------------- where the data are


@dataclasses.dataclass(frozen=True)
class DataLocation:
    """A directory holding the four IDX files, and how it was chosen (for messages and cache keys)."""

    root: str
    origin: str   # "fashion_mnist_root", "$LASADGEN_FASHION_MNIST", "Debian's dataset-fashion-mnist" or EMBEDDED

    @property
    def embedded(self) -> bool:
        return self.origin == EMBEDDED


def all_file_names() -> list[str]:
    return [name for names in SPLIT_FILES.values() for name in names]


def missing_files(root: str) -> list[str]:
    return [name for name in all_file_names() if not os.path.isfile(os.path.join(root, name))]


def checked_location(root: str, origin: str) -> DataLocation:
    """A root the user named: it must hold all four files (a typo must not fall back to other data). The
    embedded subset's own directory is the embedded subset (its errors say how to get the full dataset)."""
    if os.path.realpath(root) == os.path.realpath(EMBEDDED_ROOT):
        return DataLocation(EMBEDDED_ROOT, EMBEDDED)
    missing = missing_files(root)
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST: {origin} is {root!r}, which lacks {missing[0]}; it must be a "
                                f"directory holding the four IDX .gz files {all_file_names()}")
    return DataLocation(root, origin)


def resolve_location(root: str | None = None) -> DataLocation:
    """Where Fashion-MNIST is read from: `root` if given, else $LASADGEN_FASHION_MNIST (if set and not
    empty), else Debian's package if its four files are installed, else the embedded subset."""
    if root is not None:
        return checked_location(os.path.expanduser(root), "fashion_mnist_root")
    from_env = os.environ.get(ROOT_ENV_VAR)
    if from_env:
        return checked_location(os.path.expanduser(from_env), f"${ROOT_ENV_VAR}")
    if not missing_files(DEBIAN_ROOT):
        return DataLocation(DEBIAN_ROOT, "Debian's dataset-fashion-mnist")
    return DataLocation(EMBEDDED_ROOT, EMBEDDED)


def location_identity(split: str, root: str | None = None) -> dict:
    """What a cache of values computed from a split must match: the directory and its images file's size."""
    location = resolve_location(root)
    images_path = split_paths(split, location.root)[0]
    return {"root": os.path.abspath(location.root), "images_bytes": os.path.getsize(images_path)}


def describe(location: DataLocation, split: str, held: int) -> str:
    """What a split holds and where, e.g. 'embedded subset of 12000 images (DIR)' or 'full dataset at DIR (...)'."""
    if location.embedded:
        return f"embedded subset of {held} images ({location.root})"
    if held == FULL_SPLIT_SIZES[split]:
        return f"full dataset at {location.root} (from {location.origin})"
    return f"{held} images at {location.root} (from {location.origin})"


def too_many_message(location: DataLocation, split: str, count: int, held: int) -> str:
    asked = f"Fashion-MNIST {split}: {count} images asked for"
    if not location.embedded:
        return f"{asked}, but {location.root} (from {location.origin}) holds only {held}"
    return (f"{asked}, but only the {describe(location, split, held)} is available; for the full dataset run "
            f"`{INSTALL_COMMAND}` (as root), or point ${ROOT_ENV_VAR} (or a "
            f"config's fashion_mnist_root, in the demo --config.prepare.fashion_mnist_root) at a directory holding "
            f"its four IDX .gz files")


# ---------------------------------------------------------------- reading


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
    return tuple(os.path.join(root, name) for name in SPLIT_FILES[split])


def load_fashion_mnist(split: str = "train", root: str | None = None,
                       count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) of one split, read from resolve_location(root).

    count: the split's first `count` images (more than the data hold is a ValueError); None: all it
    holds (60000 / 10000 in the full dataset, fewer in the embedded subset: the printed line says which).
    """
    location = resolve_location(root)
    images_path, labels_path = split_paths(split, location.root)
    images = read_idx_uint8(images_path, ndim=3)
    labels = read_idx_uint8(labels_path, ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    held = len(images)
    if count is not None:
        if count < 1:
            raise ValueError(f"Fashion-MNIST {split}: the image count must be positive, got {count}")
        if count > held:
            raise ValueError(too_many_message(location, split, count, held))
        images, labels = images[:count], labels[:count]
    print(f"Fashion-MNIST {split}: the first {len(images)} images of the {describe(location, split, held)}", flush=True)
    pad = (IMAGE_SIZE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=-1), labels.astype(np.int32)
