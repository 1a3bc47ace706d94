"""Cut the Fashion-MNIST subset embedded in the package from the four IDX files of the full dataset.

    python -m lasadgen_jax.data.fashion_mnist_cut --source=/usr/share/datasets/fashion-mnist \\
        --out=lasadgen_jax/data/fashion_mnist_subset

Writes the first `--train` images and labels of the train split and the first `--test` of the test
split as gzipped IDX files of the original format and names (the header's count changed, the
records unchanged), so the subset is read by the same code as the full dataset. The gzip stream
carries no file name or time: the same inputs give the same files.
"""

from __future__ import annotations

import argparse
import gzip
import os

import numpy as np

from lasadgen_jax.data.fashion_mnist import IDX_UINT8_MAGIC, SPLIT_FILES, read_idx_uint8

EMBEDDED_COUNTS = {"train": 12000, "test": 2000}   # the demo's 12000 (configs/demo.py), test: see the README there


def write_idx_uint8(path: str, array: np.ndarray) -> None:
    """`array` (uint8) as a gzipped IDX file: magic, big-endian dimensions, then the bytes in C order."""
    if array.dtype != np.uint8 or array.ndim not in IDX_UINT8_MAGIC:
        raise ValueError(f"{path}: IDX writes uint8 arrays of {sorted(IDX_UINT8_MAGIC)} dimensions, "
                         f"got {array.dtype} {array.shape}")
    header = np.array([IDX_UINT8_MAGIC[array.ndim], *array.shape], ">u4").tobytes()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(header + np.ascontiguousarray(array).tobytes())


def cut_subset(source: str, out: str, counts: dict[str, int]) -> None:
    """The first counts[split] images and labels of each split in `source`, written into `out`."""
    os.makedirs(out, exist_ok=True)
    for split, (images_name, labels_name) in SPLIT_FILES.items():
        images = read_idx_uint8(os.path.join(source, images_name), ndim=3)
        labels = read_idx_uint8(os.path.join(source, labels_name), ndim=1)
        if not 1 <= counts[split] <= min(len(images), len(labels)):
            raise ValueError(f"--{split} {counts[split]}: the {split} split in {source} holds {len(images)} images")
        write_idx_uint8(os.path.join(out, images_name), images[: counts[split]])
        write_idx_uint8(os.path.join(out, labels_name), labels[: counts[split]])
        print(f"{split}: the first {counts[split]} of {len(images)} images and labels -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="directory of the full dataset's four IDX .gz files")
    parser.add_argument("--out", required=True, help="directory to write the subset's four IDX .gz files into")
    parser.add_argument("--train", type=int, default=EMBEDDED_COUNTS["train"], help="first train images kept")
    parser.add_argument("--test", type=int, default=EMBEDDED_COUNTS["test"], help="first test images kept")
    args = parser.parse_args(argv)
    cut_subset(args.source, args.out, {"train": args.train, "test": args.test})


if __name__ == "__main__":
    main()
