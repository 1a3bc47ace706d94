"""Reference statistics: ADM-style reference batches, datasets the pipeline reads, and their cache.

A reference is what samples are compared with: pool3 mean/covariance (FID), spatial
mean/covariance (sFID), and the reference pool3 features themselves with their k-NN radii
(precision/recall). Sources (`--ref`):
- an ADM-style `.npz`: `arr_0` (uint8 images [N, H, W, 3]) and/or precomputed `mu`, `sigma`
  (2048-d) and `mu_s`, `sigma_s` (2023-d), e.g. ADM's VIRTUAL_imagenet256_labeled.npz. As in
  ADM's evaluator, precomputed statistics win over the images' for FID/sFID; precision/recall
  always use features of `arr_0`. A file with statistics only gives FID (and sFID) alone.
- `fashion_mnist:test` (or `:train`; `fashion_mnist:test:2000` takes the first 2000): the
  Fashion-MNIST split as the data pipeline reads it (32x32, grey repeated to RGB), the demo's
  reference, from `fashion_mnist_root` or the default locations (lasadgen_jax.data.fashion_mnist;
  the embedded subset holds the first 2000 test images).
Computed references are cached in `cache_dir` as ADM-compatible npz files (mu, sigma, mu_s,
sigma_s) plus the pool3 features, their radii, the image size and the Inception weights' hash; a
cache made with other weights, or of a changed file, is not used.

A file named like one of ADM's published reference batches (ADM_REFERENCE_BATCHES, e.g.
VIRTUAL_imagenet256_labeled.npz) must have that batch's structure, read from the npz headers alone:
`arr_0` uint8 [10000, S, S, 3] (ADM: "pre-computed statistics over the whole dataset, as well as
10,000 images for computing Precision and Recall") and float `mu` [2048], `sigma` [2048, 2048],
`mu_s` [2023], `sigma_s` [2023, 2023] (the keys ADM's evaluator reads); other arrays are not looked
at. No checksum is published with these files, so the structure is checked, not the content.

Every reference records the (height, width) of its images; `load_reference(..., image_size=)`
refuses samples of another size (an FID across image sizes measures the resize, not the model). An
npz of statistics only knows no size, unless it stores `meta_image_size` ([height, width]): that is
said once, and the check is skipped. Statistics that hold NaN or inf are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile

import numpy as np

from lasadgen_jax.eval.features import FeatureExtractor, npz_keys, stream_npz_images
from lasadgen_jax.eval.inception import POOL_DIM, SPATIAL_DIM
from lasadgen_jax.eval.metrics import PR_NEIGHBOURHOOD, check_finite, feature_statistics, manifold_radii

logger = logging.getLogger(__name__)

DATASETS = {"fashion_mnist": ("train", "test")}
CACHE_FORMAT = "lasadgen_jax.eval.reference/2"   # /2: with meta_image_size
STAT_PAIRS = (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM))
IMAGE_SIZE_KEY = "meta_image_size"
_SAID_NO_IMAGE_SIZE: set[str] = set()   # references whose missing image size was reported (once each)


@dataclasses.dataclass
class Reference:
    """FID statistics (pool3), sFID statistics (spatial; None if unknown), pool3 features and radii for P/R,
    and the (height, width) of the reference images (None if unknown). Refuses NaN or inf statistics."""

    source: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool3: np.ndarray | None = None
    radii: np.ndarray | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self):
        for name in ("mu", "sigma", "mu_s", "sigma_s", "pool3"):
            if getattr(self, name) is not None:
                check_finite(f"the reference {self.source}: {name!r}", getattr(self, name))
        if self.image_size is not None:
            self.image_size = tuple(int(length) for length in self.image_size)

    @property
    def num_images(self) -> int | None:
        return None if self.pool3 is None else len(self.pool3)

    def ensure_radii(self) -> np.ndarray:
        if self.pool3 is None:
            raise ValueError(f"reference {self.source} has no features (statistics only): no precision/recall")
        if self.radii is None:
            self.radii = manifold_radii(self.pool3, PR_NEIGHBOURHOOD)
        return self.radii


def _check_stats(path: str, arrays: dict) -> None:
    for mean_key, cov_key, dim in STAT_PAIRS:
        present = [key for key in (mean_key, cov_key) if key in arrays]
        if len(present) == 1:
            raise ValueError(f"{path}: has {present[0]!r} without {({mean_key, cov_key} - set(present)).pop()!r}")
        if present:
            mean, cov = arrays[mean_key], arrays[cov_key]
            if mean.shape != (dim,) or cov.shape != (dim, dim):
                raise ValueError(f"{path}: {mean_key!r} {mean.shape} / {cov_key!r} {cov.shape}, expected ({dim},) and "
                                 f"({dim}, {dim}) (TF-FID Inception statistics)")


# ADM's reference batches (openai/guided-diffusion, evaluations/README.md) by file name: the image side.
ADM_REFERENCE_BATCHES = {
    "VIRTUAL_imagenet64_labeled.npz": 64, "VIRTUAL_imagenet128_labeled.npz": 128,
    "VIRTUAL_imagenet256_labeled.npz": 256, "VIRTUAL_imagenet512.npz": 512,
    "VIRTUAL_lsun_bedroom256.npz": 256, "VIRTUAL_lsun_cat256.npz": 256, "VIRTUAL_lsun_horse256.npz": 256,
}
ADM_REFERENCE_IMAGES = 10000


def npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of every array in an npz, from the .npy headers (no data is read)."""
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                if version not in read_header:
                    raise ValueError(f"{path}:{name[:-4]} uses npy format version {version}; expected 1.0 or 2.0")
                shape, _, dtype = read_header[version](member)
            headers[name[:-4]] = (tuple(shape), dtype)
    return headers


def check_adm_reference_batch(path: str) -> None:
    """A file named like an ADM reference batch must have its arrays, shapes and dtypes (module docstring)."""
    name = os.path.basename(path)
    if name not in ADM_REFERENCE_BATCHES:
        return
    side = ADM_REFERENCE_BATCHES[name]
    expected = {"arr_0": ((ADM_REFERENCE_IMAGES, side, side, 3), "uint8"), "mu": ((POOL_DIM,), "float"),
                "sigma": ((POOL_DIM, POOL_DIM), "float"), "mu_s": ((SPATIAL_DIM,), "float"),
                "sigma_s": ((SPATIAL_DIM, SPATIAL_DIM), "float")}
    headers = npz_headers(path)
    differences = []
    for key, (shape, kind) in expected.items():
        if key not in headers:
            differences.append(f"no {key!r}")
            continue
        found_shape, dtype = headers[key]
        dtype_fits = dtype == np.uint8 if kind == "uint8" else np.issubdtype(dtype, np.floating)
        if found_shape != shape or not dtype_fits:
            differences.append(f"{key!r} {found_shape} {dtype}, expected {shape} {kind}")
    if differences:
        raise ValueError(f"{path} is not ADM's {name} reference batch: " + "; ".join(differences))


def check_reference_file(path: str) -> list[str]:
    """The keys of an ADM-style reference npz, after checking it has images or statistics and, for a file
    named like one of ADM's reference batches, that batch's structure (fails fast)."""
    keys = npz_keys(path)
    if "arr_0" not in keys and "mu" not in keys:
        raise ValueError(f"{path}: a reference file needs 'arr_0' (uint8 images [N, H, W, 3]) or 'mu' and 'sigma' "
                         f"(precomputed Inception pool3 statistics); it has {keys}")
    check_adm_reference_batch(path)
    return keys


def reference_from_npz(path: str, extractor: FeatureExtractor | None, batch_size: int = 500,
                       progress: bool = True) -> Reference:
    """A Reference from an ADM-style npz (see the module docstring); `extractor` is needed when it has images."""
    keys = check_reference_file(path)
    with np.load(path, allow_pickle=False) as npz:
        stat_keys = [key for key in ("mu", "sigma", "mu_s", "sigma_s") if key in npz.files]
        stats = {key: np.asarray(npz[key], np.float64) for key in stat_keys}
    _check_stats(path, stats)
    if "arr_0" not in keys:   # statistics only
        image_size = stored_image_size(path)
        if image_size is None:
            say_no_image_size(path)
        return Reference(source=path, mu=stats["mu"], sigma=stats["sigma"], mu_s=stats.get("mu_s"),
                         sigma_s=stats.get("sigma_s"), image_size=image_size)
    if extractor is None:
        raise ValueError(f"{path} holds images: computing their statistics needs the Inception network")
    total, batches = stream_npz_images(path, "arr_0", batch_size)
    features = extractor(batches, total=total, desc=f"reference features ({os.path.basename(path)})",
                         progress=progress)
    reference = reference_from_features(path, features.pool3, features.spatial, image_size=features.image_size)
    if stats:  # ADM: precomputed statistics take precedence over the images' own
        reference = dataclasses.replace(reference, mu=stats["mu"], sigma=stats["sigma"], mu_s=stats.get("mu_s"),
                                        sigma_s=stats.get("sigma_s"))
    return reference


def stored_image_size(path: str) -> tuple[int, int] | None:
    """The [height, width] an npz stores under meta_image_size, if it does."""
    with np.load(path, allow_pickle=False) as npz:
        if IMAGE_SIZE_KEY not in npz.files:
            return None
        size = np.asarray(npz[IMAGE_SIZE_KEY])
    if size.shape != (2,) or size.dtype.kind not in "iu" or size.min() < 1:
        raise ValueError(f"{path}: {IMAGE_SIZE_KEY!r} must be [height, width] (positive integers), got {size}")
    return int(size[0]), int(size[1])


def say_no_image_size(source: str) -> None:
    """Logs once per reference that its image size is unknown (statistics only), so samples of any size pass."""
    if source not in _SAID_NO_IMAGE_SIZE:
        _SAID_NO_IMAGE_SIZE.add(source)
        logger.warning("reference %s holds statistics only, no image size: the samples' image size cannot be "
                       "checked against it (store [height, width] as %r to check it)", source, IMAGE_SIZE_KEY)


def check_image_size(reference: Reference, image_size: tuple[int, int] | None) -> None:
    """ValueError when the samples' (height, width) differs from the reference images'. Nothing to check
    when either is unknown (a reference without a size was reported when it was read)."""
    if image_size is None or reference.image_size is None:
        return
    if tuple(image_size) != tuple(reference.image_size):
        (h, w), (rh, rw) = image_size, reference.image_size
        raise ValueError(f"the samples are {h}x{w} images, the reference {reference.source} holds {rh}x{rw} "
                         f"images: compare samples with a reference of their own image size")


def reference_from_features(source: str, pool3, spatial=None, *, image_size: tuple[int, int] | None = None
                            ) -> Reference:
    mu, sigma = feature_statistics(pool3)
    mu_s, sigma_s = feature_statistics(spatial) if spatial is not None else (None, None)
    return Reference(source=source, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                     pool3=np.asarray(pool3, np.float32), image_size=image_size)


def parse_dataset_spec(spec: str) -> tuple[str, int | None]:
    """(split, count or None) of a dataset spec 'name:split' or 'name:split:count'."""
    name, split, *count = spec.split(":")
    if name not in DATASETS or split not in DATASETS[name] or len(count) > 1 or (count and not count[0].isdigit()):
        known = [f"{n}:{s}" for n, splits in DATASETS.items() for s in splits]
        raise ValueError(f"unknown reference dataset {spec!r}; known: {known} (optionally ':COUNT'), or an .npz file")
    if count and int(count[0]) < 1:
        raise ValueError(f"{spec}: the count must be at least 1")
    return split, int(count[0]) if count else None


def dataset_images(spec: str, fashion_mnist_root: str | None = None) -> np.ndarray:
    """uint8 images [N, H, W, 3] of a dataset spec 'name:split' or 'name:split:count' (the first `count`).
    fashion_mnist_root: see lasadgen_jax.data.fashion_mnist (None: the default locations)."""
    from lasadgen_jax.data.fashion_mnist import load_fashion_mnist

    split, count = parse_dataset_spec(spec)
    images, _ = load_fashion_mnist(split, fashion_mnist_root, count)
    return images


def is_dataset_spec(spec: str) -> bool:
    return not spec.endswith(".npz") and spec.partition(":")[0] in DATASETS


# ----------------------------------------------------------------------------- cache


def _cache_path(spec: str, extractor: FeatureExtractor, cache_dir: str, fashion_mnist_root: str | None = None) -> str:
    if is_dataset_spec(spec):
        from lasadgen_jax.data.fashion_mnist import location_identity

        # Keyed by where the images come from too: the embedded subset's split is not the full one.
        identity = {"dataset": spec, "data": location_identity(parse_dataset_spec(spec)[0], fashion_mnist_root)}
        stem = spec.replace(":", "-")
    else:
        info = os.stat(spec)
        identity = {"file": os.path.abspath(spec), "size": info.st_size, "mtime_ns": info.st_mtime_ns}
        stem = os.path.splitext(os.path.basename(spec))[0]
    identity["inception"] = extractor.weights_id
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{stem}-{digest}.npz")


def save_reference(reference: Reference, path: str, inception_id: str) -> None:
    """An ADM-compatible npz (mu, sigma, mu_s, sigma_s) plus pool3 features, radii and metadata; atomic."""
    arrays = {"mu": reference.mu, "sigma": reference.sigma, "meta_format": np.array(CACHE_FORMAT),
              "meta_source": np.array(reference.source), "meta_inception": np.array(inception_id)}
    optional = {"mu_s": reference.mu_s, "sigma_s": reference.sigma_s, "pool3": reference.pool3,
                "radii": reference.radii,
                IMAGE_SIZE_KEY: None if reference.image_size is None else np.array(reference.image_size, np.int64)}
    arrays.update({key: value for key, value in optional.items() if value is not None})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".reference-", suffix=".npz", dir=directory)
    with os.fdopen(handle, "wb") as f:
        np.savez(f, **arrays)
    os.chmod(staging, 0o644)
    os.replace(staging, path)


def _load_cached(path: str, inception_id: str) -> Reference | None:
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as npz:
        if str(npz.get("meta_format", "")) != CACHE_FORMAT or str(npz.get("meta_inception", "")) != inception_id:
            return None
        get = lambda key: npz[key] if key in npz.files else None
        return Reference(source=str(npz["meta_source"]), mu=npz["mu"], sigma=npz["sigma"], mu_s=get("mu_s"),
                         sigma_s=get("sigma_s"), pool3=get("pool3"), radii=get("radii"),
                         image_size=get(IMAGE_SIZE_KEY))


def load_reference(spec: str, extractor: FeatureExtractor, cache_dir: str | None = None,
                   with_radii: bool = True, progress: bool = True, *,
                   image_size: tuple[int, int] | None = None, fashion_mnist_root: str | None = None) -> Reference:
    """The Reference of `spec` (an .npz path or 'fashion_mnist:test'), from `cache_dir` when computed before.

    Dataset references are always cached when `cache_dir` is given; npz files holding images too
    (keyed by path, size and mtime). `with_radii` also computes (and caches) the k-NN radii.
    image_size: the samples' (height, width); a reference of another image size is refused (ValueError).
    fashion_mnist_root: where a `fashion_mnist:` spec reads its images (see lasadgen_jax.data.fashion_mnist).
    """
    if not is_dataset_spec(spec) and not os.path.isfile(spec):
        raise ValueError(f"--ref {spec} is neither an existing .npz file nor a known dataset "
                         f"({[f'{n}:{s}' for n, ss in DATASETS.items() for s in ss]})")
    cache = _cache_path(spec, extractor, cache_dir, fashion_mnist_root) if cache_dir else None
    reference = _load_cached(cache, extractor.weights_id) if cache else None
    if reference is not None and (reference.radii is not None or reference.pool3 is None or not with_radii):
        check_image_size(reference, image_size)
        return reference
    if reference is None:
        if is_dataset_spec(spec):
            features = extractor.features_of_array(dataset_images(spec, fashion_mnist_root),
                                                   desc=f"reference features ({spec})",
                                                   progress=progress)
            reference = reference_from_features(spec, features.pool3, features.spatial, image_size=features.image_size)
        else:
            reference = reference_from_npz(spec, extractor, progress=progress)
    if with_radii and reference.pool3 is not None:
        reference.ensure_radii()
    if cache and reference.pool3 is not None:
        save_reference(reference, cache, extractor.weights_id)
    check_image_size(reference, image_size)
    return reference
