"""The VQ tokenizer's architecture as one frozen, self-validating value, and its named presets.

`VQ16` is LlamaGen's VQ-16 (the public `vq_ds16_c2i.pt` checkpoint): channel multipliers
[1, 1, 2, 2, 4] on 128 base channels, z 256, a 16384 x 8 l2-normalised codebook, 16x downsampling.
`VQ_SMALL` is the same code path shrunk for the CPU demo: 32x32 images to an 8x8 grid.
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class VQArchitecture:
    """Every size that decides the tokenizer's parameter shapes (training knobs live in the config).

    The encoder has one level per channel multiplier and downsamples between levels, so the grid is
    image_size / 2**(len(channel_multipliers) - 1). Every GroupNorm has `num_groups` groups (32 in
    LlamaGen), so every level's channel count must be divisible by it.
    """

    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    codebook_l2_norm: bool = True
    num_groups: int = 32
    image_channels: int = 3

    def __post_init__(self):
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        positive = dict(base_channels=self.base_channels, num_res_blocks=self.num_res_blocks,
                        z_channels=self.z_channels, codebook_size=self.codebook_size,
                        codebook_dim=self.codebook_dim, num_groups=self.num_groups,
                        image_channels=self.image_channels)
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VQArchitecture.{name} must be a positive int, got {value!r}")
        if not self.channel_multipliers or min(self.channel_multipliers) <= 0:
            raise ValueError("VQArchitecture.channel_multipliers must be positive ints, "
                             f"got {self.channel_multipliers}")
        for multiplier in self.channel_multipliers:
            channels = self.base_channels * multiplier
            if channels % self.num_groups:
                raise ValueError(f"VQArchitecture: {channels} channels (base_channels {self.base_channels} x "
                                 f"{multiplier}) are not divisible by num_groups {self.num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def grid(self, image_size: int) -> tuple[int, int]:
        """The (h, w) code grid of a square image of side image_size."""
        if image_size <= 0 or image_size % self.downsample_factor:
            raise ValueError(f"image_size {image_size} is not a positive multiple of the tokenizer's "
                             f"downsample factor {self.downsample_factor}")
        side = image_size // self.downsample_factor
        return side, side

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, fields: dict) -> "VQArchitecture":
        """Build from a dict, refusing unknown keys (a typo must fail, not fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown VQArchitecture fields {unknown}; known: {sorted(known)}")
        return cls(**fields)


VQ16 = VQArchitecture()

# Sized for training on 2 CPU cores in minutes (configs/vq_small.py); the decoder, not the encoder,
# dominates its cost (LlamaGen's decoder has one more res block per level).
VQ_SMALL = VQArchitecture(
    base_channels=16,
    channel_multipliers=(1, 2, 2),
    num_res_blocks=1,
    z_channels=32,
    codebook_size=1024,
    codebook_dim=8,
    num_groups=8,
)

PRESETS = {"vq16": VQ16, "vq_small": VQ_SMALL}


def preset(name: str) -> VQArchitecture:
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
