"""Inception features of many images: fixed-size batches over all local devices, streamed from npz files.

`FeatureExtractor` runs the jitted network on batches of `batch_size` images (the last one
padded, so one compiled shape per image size), split over the local devices along the batch
(parameters replicated), and gathers pool3, spatial and, where the weights have them, logits on the
host. `stream_npz_images` reads an `arr_0` of tens of thousands of images a batch at a time, as
ADM's evaluator does, instead of holding all of them in memory.
"""

from __future__ import annotations

import dataclasses
import zipfile
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lasadgen_jax.eval.inception import check_images, jitted_forward, load_inception, weights_metadata


@dataclasses.dataclass
class Features:
    """Per-image features: pool3 [N, 2048], spatial [N, 2023], logits [N, 1008] or None, and the
    (height, width) of the images they come from (None where unknown)."""

    pool3: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None
    image_size: tuple[int, int] | None = None

    def __len__(self):
        return len(self.pool3)


class FeatureExtractor:
    """The TF-FID InceptionV3 of a converted weights file, batched and spread over the local devices."""

    def __init__(self, weights_path: str, batch_size: int = 200, precision: str = "highest", devices=None):
        devices = list(devices if devices is not None else jax.local_devices())
        if batch_size < 1 or batch_size % len(devices):
            raise ValueError(f"batch_size must be a positive multiple of the {len(devices)} devices, got {batch_size}")
        self.weights_path = weights_path
        self.batch_size = batch_size
        self.model = load_inception(weights_path, precision=precision)
        self.has_logits = self.model.logits is not None
        self.weights_id = weights_metadata(weights_path).get("source_sha256", "unknown")
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._graphdef, params = nnx.split(self.model)
        self._params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        images = jax.device_put(batch, self._batch_sharding)
        return jax.tree.map(np.asarray, jitted_forward(self._graphdef, self._params, images))

    def __call__(self, batches: Iterable[np.ndarray], total: int | None = None, desc: str = "inception features",
                 progress: bool = True) -> Features:
        """Features of every image in `batches` (uint8 [n, H, W, 3] arrays of any n, one H, W)."""
        from tqdm import tqdm

        outputs: dict[str, list] = {"pool3": [], "spatial": [], "logits": []}
        image_size = None
        with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
            for batch, valid in self._fixed_batches(batches):
                image_size = (int(batch.shape[1]), int(batch.shape[2]))
                result = self._run(batch)
                for name in outputs:
                    if name in result:
                        outputs[name].append(result[name][:valid])
                bar.update(valid)
        if not outputs["pool3"]:
            raise ValueError("no images to compute features of")
        join = lambda name: np.concatenate(outputs[name]) if outputs[name] else None
        return Features(pool3=join("pool3"), spatial=join("spatial"), logits=join("logits"), image_size=image_size)

    def _fixed_batches(self, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
        pending, count, shape = [], 0, None
        for batch in batches:
            batch = check_images(batch)
            if shape is None:
                shape = batch.shape[1:]
            elif batch.shape[1:] != shape:
                raise ValueError(f"images of one set must share a size: {shape} and then {batch.shape[1:]}")
            pending.append(batch)
            count += len(batch)
            while count >= self.batch_size:
                joined = np.concatenate(pending)
                yield joined[: self.batch_size], self.batch_size
                pending, count = [joined[self.batch_size:]], count - self.batch_size
        if count:
            joined = np.concatenate(pending)
            padding = np.zeros((self.batch_size - count, *shape), np.uint8)
            yield np.concatenate([joined, padding]), count

    def features_of_array(self, images, desc: str = "inception features", progress: bool = True) -> Features:
        images = check_images(images)
        chunks = (images[start:start + self.batch_size] for start in range(0, len(images), self.batch_size))
        return self(chunks, total=len(images), desc=desc, progress=progress)


# ----------------------------------------------------------------------------- npz files


def npz_keys(path: str) -> list[str]:
    """The array names in an npz file (ValueError for a missing file or one that is not an npz)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an npz file") from None


def stream_npz_images(path: str, key: str = "arr_0", batch_size: int = 500) -> tuple[int, Iterator[np.ndarray]]:
    """(image count, iterator of uint8 batches) of `key` in an npz, read a batch at a time."""
    keys = npz_keys(path)
    if key not in keys:
        raise ValueError(f"{path} has no {key!r} (its arrays: {keys}); "
                         f"expected images [N, H, W, 3] uint8 under {key!r}")
    archive = zipfile.ZipFile(path)
    member = archive.open(f"{key}.npy")
    version = np.lib.format.read_magic(member)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise ValueError(f"{path}:{key} uses npy format version {version}; expected 1.0 or 2.0")
    shape, fortran_order, dtype = read_header[version](member)
    if fortran_order or dtype.hasobject:
        raise ValueError(f"{path}:{key} is Fortran-ordered or holds objects; expected C-ordered uint8 images")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}:{key} has shape {shape}; expected images [N, H, W, 3]")
    if dtype != np.uint8:
        raise ValueError(f"{path}:{key} has dtype {dtype}; expected uint8 pixels in [0, 255]")
    image_bytes = int(np.prod(shape[1:]))

    def batches():
        with archive, member:
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = member.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    last = start + len(data) // image_bytes
                    raise ValueError(f"{path}:{key} ends early (image {last} of {shape[0]})")
                yield np.frombuffer(data, np.uint8).reshape(count, *shape[1:])

    return int(shape[0]), batches()
