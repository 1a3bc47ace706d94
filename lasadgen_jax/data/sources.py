"""Random-access image sources for token extraction: an ImageFolder tree, a TFDS dataset, Fashion-MNIST.

Every source answers `len(source)`, `source.num_classes` and `source.load(i) -> (image, label)`,
where image is uint8 [H, W, 3] RGB, or None when the file cannot be decoded (a corrupt or truncated
image is skipped and counted by the caller, never fatal). `open_source` parses the `--source`
argument: `imagefolder:DIR`, `tfds:NAME` (e.g. `tfds:imagenet2012`) or `fashion_mnist`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from lasadgen_jax.data import fashion_mnist

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are; uint16 reduced to their high byte (value >> 8: exact on 8-bit values
    stretched to 16 bits, v * 257, and what Pillow itself does with 16-bit RGB PNGs). Other dtypes: ValueError."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        return (pixels.astype(np.uint16) >> 8).astype(np.uint8)
    raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 or uint16 (see to_uint8) [H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4] to uint8 [H, W, 3]."""
    image = to_uint8(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 1|3|4], got shape {image.shape}")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def pil_to_rgb(pil: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a decoded PIL image. 16-bit greyscale (modes I;16*) is reduced by to_uint8:
    Pillow's convert("RGB") would clip it at 255, i.e. white. 32-bit integer or float images (modes I,
    F) have no known range to scale from: ValueError (the image counts as unreadable)."""
    if pil.mode.startswith("I;16"):
        return to_rgb(np.asarray(pil))
    if pil.mode in ("I", "F"):
        raise ValueError(f"a mode-{pil.mode} image (32-bit {'integers' if pil.mode == 'I' else 'floats'}) has no "
                         f"known range to scale to 8 bits")
    return np.asarray(pil.convert("RGB"))


class ImageFolderSource:
    """DIR/<class name>/<image files>: classes are the sorted subdirectory names, labels their index.

    A class directory without image files is refused (it would be a class no image teaches), or, with
    skip_empty_classes, left out of the classes (labels are then indices among the others) with a warning.
    """

    def __init__(self, root: str, skip_empty_classes: bool = False):
        if not os.path.isdir(root):
            raise ValueError(f"imagefolder: {root!r} is not a directory")
        self.root = root
        directories = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not directories:
            raise ValueError(f"imagefolder: {root!r} has no class subdirectories")
        files_of = {name: self.image_files(os.path.join(root, name)) for name in directories}
        empty = [os.path.join(root, name) for name in directories if not files_of[name]]
        if empty and not skip_empty_classes:
            raise ValueError(f"imagefolder: class directory {empty[0]!r} holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)}); {len(empty)} such class(es); remove them or pass "
                             f"--skip-empty-classes")
        if empty:
            logger.warning("imagefolder: left out %d class directories without image files: %s", len(empty),
                           ", ".join(empty))
        self.classes = [name for name in directories if files_of[name]]
        self.files: list[tuple[str, int]] = [(path, label) for label, name in enumerate(self.classes)
                                             for path in files_of[name]]
        if not self.files:
            raise ValueError(f"imagefolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.num_classes = len(self.classes)
        self.name = f"imagefolder:{os.path.abspath(root)}"

    @staticmethod
    def image_files(directory: str) -> list[str]:
        """The image files under a class directory (recursively), in sorted order."""
        files = []
        for parent, _, filenames in sorted(os.walk(directory)):
            files += [os.path.join(parent, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        return files

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return self.files[index][0]

    def load(self, index: int) -> tuple[np.ndarray | None, int]:
        path, label = self.files[index]
        try:
            with Image.open(path) as pil:
                pil.load()  # decode now: a truncated file fails here, not later
                return pil_to_rgb(pil), label
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None, label


class TfdsSource:
    """A TFDS dataset read through `tfds.data_source` (random access; needs array_record files).

    ImageNet: build it once with the manual download, e.g. `tfds build imagenet2012
    --manual_dir=DIR --file_format=array_record` (building needs TensorFlow; reading does not).
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as error:
            raise ImportError("tfds sources need tensorflow-datasets: pip install 'lasadgen_jax[tfds]'") from error
        builder = tfds.builder(name, data_dir=data_dir)
        if "image" not in builder.info.features or "label" not in builder.info.features:
            raise ValueError(f"tfds:{name} has no 'image' and 'label' features: {list(builder.info.features)}")
        self.data = tfds.data_source(name, split=split, data_dir=data_dir)
        self.num_classes = int(builder.info.features["label"].num_classes)
        self.name = f"tfds:{name}:{split}"

    def __len__(self) -> int:
        return len(self.data)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int) -> tuple[np.ndarray | None, int]:
        example = self.data[index]
        return to_rgb(np.asarray(example["image"])), int(example["label"])


class FashionMnistSource:
    """Fashion-MNIST, 32x32 RGB, from `root` or the default locations (see lasadgen_jax.data.fashion_mnist).
    count: the split's first `count` images (None: all the data found hold)."""

    def __init__(self, split: str, root: str | None = None, count: int | None = None):
        self.images, self.labels = fashion_mnist.load_fashion_mnist(split, root, count)
        self.num_classes = fashion_mnist.NUM_CLASSES
        self.name = f"fashion_mnist:{split}"

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int) -> tuple[np.ndarray | None, int]:
        return self.images[index], int(self.labels[index])


def open_source(spec: str, split: str = "train", tfds_data_dir: str | None = None, skip_empty_classes: bool = False,
                fashion_mnist_root: str | None = None, max_images: int | None = None):
    """The source named by a --source argument: imagefolder:DIR | tfds:NAME | fashion_mnist.
    skip_empty_classes: see ImageFolderSource. fashion_mnist_root, max_images: see FashionMnistSource
    (other sources are cut to max_images by the caller)."""
    kind, _, argument = spec.partition(":")
    if kind == "imagefolder" and argument:
        return ImageFolderSource(argument, skip_empty_classes)
    if kind == "tfds" and argument:
        return TfdsSource(argument, split, tfds_data_dir)
    if kind == "fashion_mnist" and not argument:
        return FashionMnistSource(split, fashion_mnist_root, max_images)
    raise ValueError(f"unknown --source {spec!r}; expected imagefolder:DIR, tfds:NAME or fashion_mnist")
