"""LlamaGen's VQ tokenizer (taming-style conv encoder/decoder + l2-normalised codebook) in Flax NNX.

Images are NHWC float in [-1, 1]. Module and attribute names mirror LlamaGen's PyTorch modules
(`encoder.conv_blocks.N.res.M.conv1`, `quantize.embedding`, ...) so that the converter maps a
PyTorch parameter to this tree by name alone. LlamaGen's dropout (p = 0 in every released config)
is left out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lasadgen_jax.tokenizer.architecture import VQArchitecture

GROUP_NORM_EPS = 1e-6


def conv3x3(in_channels: int, out_channels: int, rngs: nnx.Rngs, stride: int = 1, padding=((1, 1), (1, 1))):
    return nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, padding=padding, rngs=rngs)


def conv1x1(in_channels: int, out_channels: int, rngs: nnx.Rngs):
    return nnx.Conv(in_channels, out_channels, (1, 1), padding="VALID", rngs=rngs)


def group_norm(channels: int, arch: VQArchitecture, rngs: nnx.Rngs):
    # Two-pass variance, as torch.nn.GroupNorm computes it: the one-pass E[x^2] - E[x]^2 drifts
    # far enough from PyTorch to flip near-tied codes.
    return nnx.GroupNorm(channels, num_groups=arch.num_groups, epsilon=GROUP_NORM_EPS,
                         use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
    """norm-swish-conv twice plus a residual; a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, arch: VQArchitecture, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_channels, arch, rngs)
        self.conv1 = conv3x3(in_channels, out_channels, rngs)
        self.norm2 = group_norm(out_channels, arch, rngs)
        self.conv2 = conv3x3(out_channels, out_channels, rngs)
        self.nin_shortcut = conv1x1(in_channels, out_channels, rngs) if in_channels != out_channels else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nnx.Module):
    """Single-head softmax self-attention over all grid cells, with 1x1-conv projections."""

    def __init__(self, channels: int, arch: VQArchitecture, rngs: nnx.Rngs):
        self.norm = group_norm(channels, arch, rngs)
        self.q, self.k, self.v = (conv1x1(channels, channels, rngs) for _ in range(3))
        self.proj_out = conv1x1(channels, channels, rngs)

    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = self.norm(x)
        flat = lambda t: t.reshape(batch, height * width, channels)
        q, k, v = flat(self.q(h)), flat(self.k(h)), flat(self.v(h))
        weights = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", q, k) * channels ** -0.5, axis=-1)
        out = jnp.einsum("bnm,bmc->bnc", weights, v).reshape(batch, height, width, channels)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding one pixel at the bottom and right (LlamaGen's asymmetric pad)."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = conv3x3(channels, channels, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = conv3x3(channels, channels, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class EncoderLevel(nnx.Module):
    """One resolution of the encoder: res blocks (each followed by attention on the last level)."""

    def __init__(self, in_channels, out_channels, num_blocks, with_attention, with_downsample, arch, rngs):
        channels = [in_channels] + [out_channels] * num_blocks
        self.res = nnx.List([ResnetBlock(channels[i], channels[i + 1], arch, rngs) for i in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(out_channels, arch, rngs) for _ in range(num_blocks if with_attention else 0)])
        self.downsample = Downsample(out_channels, rngs) if with_downsample else None

    def __call__(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nnx.Module):
    """One resolution of the decoder: res blocks (attention on the first, lowest level), then upsample."""

    def __init__(self, in_channels, out_channels, num_blocks, with_attention, with_upsample, arch, rngs):
        channels = [in_channels] + [out_channels] * num_blocks
        self.res = nnx.List([ResnetBlock(channels[i], channels[i + 1], arch, rngs) for i in range(num_blocks)])
        self.attn = nnx.List([AttnBlock(out_channels, arch, rngs) for _ in range(num_blocks if with_attention else 0)])
        self.upsample = Upsample(out_channels, rngs) if with_upsample else None

    def __call__(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x if self.upsample is None else self.upsample(x)


def mid_blocks(channels: int, arch: VQArchitecture, rngs: nnx.Rngs):
    return nnx.List([ResnetBlock(channels, channels, arch, rngs), AttnBlock(channels, arch, rngs),
                     ResnetBlock(channels, channels, arch, rngs)])


class Encoder(nnx.Module):
    def __init__(self, arch: VQArchitecture, rngs: nnx.Rngs):
        multipliers, base = arch.channel_multipliers, arch.base_channels
        last = len(multipliers) - 1
        self.conv_in = conv3x3(arch.image_channels, base, rngs)
        in_multipliers = (1,) + multipliers
        self.conv_blocks = nnx.List([
            EncoderLevel(base * in_multipliers[level], base * multipliers[level], arch.num_res_blocks,
                         with_attention=level == last, with_downsample=level != last, arch=arch, rngs=rngs)
            for level in range(len(multipliers))
        ])
        top = base * multipliers[-1]
        self.mid = mid_blocks(top, arch, rngs)
        self.norm_out = group_norm(top, arch, rngs)
        self.conv_out = conv3x3(top, arch.z_channels, rngs)

    def __call__(self, images):
        h = self.conv_in(images)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """Mirror of the encoder; `conv_blocks[0]` is the lowest resolution (LlamaGen's order)."""

    def __init__(self, arch: VQArchitecture, rngs: nnx.Rngs):
        multipliers, base = arch.channel_multipliers, arch.base_channels
        last = len(multipliers) - 1
        top = base * multipliers[-1]
        self.conv_in = conv3x3(arch.z_channels, top, rngs)
        self.mid = mid_blocks(top, arch, rngs)
        levels, in_channels = [], top
        for level in reversed(range(len(multipliers))):
            out_channels = base * multipliers[level]
            levels.append(DecoderLevel(in_channels, out_channels, arch.num_res_blocks + 1,
                                       with_attention=level == last, with_upsample=level != 0, arch=arch, rngs=rngs))
            in_channels = out_channels
        self.conv_blocks = nnx.List(levels)
        self.norm_out = group_norm(in_channels, arch, rngs)
        self.conv_out = conv3x3(in_channels, arch.image_channels, rngs)

    def __call__(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class VectorQuantizer(nnx.Module):
    """Nearest-code lookup in a [codebook_size, codebook_dim] table; l2-normalised when configured."""

    def __init__(self, arch: VQArchitecture, rngs: nnx.Rngs):
        size, dim = arch.codebook_size, arch.codebook_dim
        table = jax.random.uniform(rngs.params(), (size, dim), jnp.float32, -1.0 / size, 1.0 / size)
        self.l2_norm = arch.codebook_l2_norm
        self.embedding = nnx.Param(l2_normalize(table) if self.l2_norm else table)

    def codebook(self):
        table = self.embedding[...]
        return l2_normalize(table) if self.l2_norm else table

    def normalize_latents(self, z):
        return l2_normalize(z) if self.l2_norm else z

    def nearest_codes(self, z):
        """Index of the nearest code for every latent vector z [..., dim] (after normalisation)."""
        z = self.normalize_latents(z)
        codebook = self.codebook()
        distances = (jnp.sum(z**2, axis=-1, keepdims=True) + jnp.sum(codebook**2, axis=-1)
                     - 2.0 * jnp.einsum("...d,nd->...n", z, codebook))
        return jnp.argmin(distances, axis=-1).astype(jnp.int32)

    def lookup(self, codes):
        return jnp.take(self.codebook(), codes, axis=0)

    def __call__(self, z):
        """Straight-through quantisation for training: (quantised z, codes, codebook loss, commitment loss)."""
        z = self.normalize_latents(z)
        codes = self.nearest_codes(z)
        quantized = self.lookup(codes)
        codebook_loss = jnp.mean((quantized - jax.lax.stop_gradient(z)) ** 2)
        commitment_loss = jnp.mean((jax.lax.stop_gradient(quantized) - z) ** 2)
        straight_through = z + jax.lax.stop_gradient(quantized - z)
        return straight_through, codes, codebook_loss, commitment_loss


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class VQModel(nnx.Module):
    """encode: images [B, H, W, C] in [-1, 1] -> codes int32 [B, h, w]; decode: codes -> images."""

    def __init__(self, arch: VQArchitecture, *, rngs: nnx.Rngs):
        self.arch = arch
        self.encoder = Encoder(arch, rngs)
        self.decoder = Decoder(arch, rngs)
        self.quant_conv = conv1x1(arch.z_channels, arch.codebook_dim, rngs)
        self.post_quant_conv = conv1x1(arch.codebook_dim, arch.z_channels, rngs)
        self.quantize = VectorQuantizer(arch, rngs)

    def check_images(self, images):
        expected = self.arch.image_channels
        if images.ndim != 4 or images.shape[-1] != expected:
            raise ValueError(f"images must be [batch, height, width, {expected}], got {images.shape}")
        factor = self.arch.downsample_factor
        if images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"image height and width must be multiples of {factor}, got {images.shape[1:3]}")

    def latents(self, images):
        """Pre-quantisation latents [B, h, w, codebook_dim] (not yet normalised)."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images):
        return self.quantize.nearest_codes(self.latents(images))

    def decode_latents(self, quantized):
        return self.decoder(self.post_quant_conv(quantized))

    def decode(self, codes):
        if codes.ndim != 3:
            raise ValueError(f"codes must be [batch, h, w], got {codes.shape}")
        return self.decode_latents(self.quantize.lookup(codes))

    def __call__(self, images):
        """Training forward: (reconstruction, codes, codebook loss, commitment loss)."""
        quantized, codes, codebook_loss, commitment_loss = self.quantize(self.latents(images))
        return self.decode_latents(quantized), codes, codebook_loss, commitment_loss


def init_rngs(seed: int) -> nnx.Rngs:
    """Initialisation RNGs on the `rbg` PRNG.

    Why not the default threefry: XLA:CPU takes seconds to compile threefry for some array shapes,
    once per parameter shape, which made building even a tiny VQModel take ~20 s. rbg compiles in
    ~0.1 s. The initial values differ from threefry's, never the distributions.
    """
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def create_vq_model(arch: VQArchitecture, seed: int = 0) -> VQModel:
    return VQModel(arch, rngs=init_rngs(seed))


def abstract_vq_model(arch: VQArchitecture) -> VQModel:
    """A VQModel whose parameters are shapes only (no compute): the target for loading weights."""
    return nnx.eval_shape(lambda: VQModel(arch, rngs=nnx.Rngs(0)))
