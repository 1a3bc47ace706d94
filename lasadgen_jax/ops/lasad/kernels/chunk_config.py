"""How the chunk kernel family is configured: `BlockSizes` (tile sizes and launch parameters) and
`ChunkOptions` (which algorithm each pass runs). Both are frozen dataclasses that validate
themselves; chunk.py takes them, and the bodies (chunk_gpu.py, chunk_mgpu.py, chunk_tpu.py,
sweep_2d.py) read them. Why each default: benchmarks/RESULTS.md, the sections cited per field.
"""

from __future__ import annotations

import dataclasses

BACKWARDS_2D = ("refwd", "sweep")
BACKWARDS_GENERIC = ("chunks", "refwd")
GPU_LOWERINGS = ("auto", "triton", "mosaic")


def _is_power_of_two(value) -> bool:
    return isinstance(value, int) and value >= 1 and not value & (value - 1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the chunk kernels, checked on construction.

    block_tokens: target tokens per chunk of the generic kernel (`2d_row` rounds to whole rows).
    dv_block: value columns per program of the generic kernel (the state is d x dv_block).
    block_tokens_2d: target slots per chunk of the `2d` kernel (R = block_tokens_2d // wp rows).
    d_block_2d, dv_block_2d: the `2d` kernel's tile of each column state (wp x d_block x dv_block
      floats stay on chip); key-dim tiles give partial outputs that are summed afterwards.
      d_block_2d = 0: the largest tile whose states fit `chunk_gpu.STATE_FLOATS_2D` (at least 16).
    gradient_block: the GPU chunk backward forms its within-chunk products per pair of sub-blocks
      of this many slots (larger T x T float32 tiles spill registers: RESULTS.md, "The generic
      kernel with its chunk backward").
    num_warps, num_stages: Triton launch parameters (GPU only) of the generic kernel.
    num_warps_2d, num_stages_2d: the same for the `2d` kernel and its sweep backward; num_warps_2d
      0: 4 warps while the column states fit STATE_FLOATS_2D, else 8; num_stages_2d 1: the setting
      the `2d` kernel's timings were taken with.
    num_warps_gradients: the chunk backward's per-chunk kernel (0: num_warps).
    Every field a power of two (>= 16 for the tile sizes; 0 where it means "choose"), but the
    stage counts: any int >= 1. The defaults are the tiles of RESULTS.md, "The generic kernel with
    its chunk backward" (generic) and "The chunked kernels (`impl="pallas"`)" (`2d`).
    """

    block_tokens: int = 64
    dv_block: int = 64
    block_tokens_2d: int = 64
    d_block_2d: int = 0
    dv_block_2d: int = 16
    gradient_block: int = 64
    num_warps: int = 4
    num_warps_2d: int = 0
    num_warps_gradients: int = 0
    num_stages: int = 3
    num_stages_2d: int = 1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("num_stages", "num_stages_2d"):  # any count of pipeline stages
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"BlockSizes.{field.name} must be an int >= 1, got {value!r}")
                continue
            choose = field.name in ("d_block_2d", "num_warps_2d", "num_warps_gradients") and value == 0
            if not choose and not _is_power_of_two(value):
                raise ValueError(f"BlockSizes.{field.name} must be a power of two >= 1, got {value!r}")
        for name in ("block_tokens", "dv_block", "block_tokens_2d", "d_block_2d", "dv_block_2d", "gradient_block"):
            if 0 < getattr(self, name) < 16:
                raise ValueError(f"BlockSizes.{name} must be >= 16 (matrix-unit tiles), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
    """Which algorithm each pass of the chunk kernels runs, checked on construction.

    parallel_chunks: from this many chunks on (a power of two), the generic kernel's forward runs
      in two passes: a sequential pass that writes each chunk's starting state, then every chunk in
      parallel (RESULTS.md, "The generic kernel with its chunk backward": one pass up to 127 chunks).
    backward_generic: the generic kernel's backward (`1d`, `none`, `2d_row`): "chunks" (the
      default: chunk states, their adjoints by a reverse pass, then every chunk's gradients in
      parallel; RESULTS.md, "The generic kernel with its chunk backward") or "refwd" (the forward
      kernel re-run on flipped inputs plus decay-tangent calls).
    backward_2d: the `2d` kernel's backward: "refwd" (the default: the forward kernel re-run on
      flipped grids plus two decay-tangent calls) or "sweep" (opt-in, GPU only: dq by one forward
      call, dk, dv and the decay gradients by one reverse row sweep; sweep_2d.py). "sweep" was the
      faster of the two (RESULTS.md, "The fused parallel-form kernel (`impl="pallas_parallel"`)"),
      but it is GPU-only and `auto` runs the parallel-form kernel for `2d` there, so not the default.
    gpu_lowering: the generic kernel's GPU lowering: "mosaic" (Hopper: the Mosaic GPU forward,
      output pass and gradient step of chunk_mgpu.py, with the Triton state/adjoint passes; 64-slot
      chunks, bf16/fp16 inputs, head dims up to 128, the chunk backward; anything else raises),
      "triton" (every kernel Triton), or "auto" (the default): "mosaic" where the device is a
      Hopper GPU (compute capability 9.x) and the call fits it, else "triton" (RESULTS.md, "Mosaic
      GPU bodies of the generic kernel").
    """

    parallel_chunks: int = 128
    backward_generic: str = "chunks"
    backward_2d: str = "refwd"
    gpu_lowering: str = "auto"

    def __post_init__(self):
        if not _is_power_of_two(self.parallel_chunks):
            raise ValueError(f"ChunkOptions.parallel_chunks must be a power of two >= 1, got {self.parallel_chunks!r}")
        if self.backward_2d not in BACKWARDS_2D:
            raise ValueError(f"ChunkOptions.backward_2d must be one of {BACKWARDS_2D}, got {self.backward_2d!r}")
        if self.backward_generic not in BACKWARDS_GENERIC:
            raise ValueError(
                f"ChunkOptions.backward_generic must be one of {BACKWARDS_GENERIC}, got {self.backward_generic!r}")
        if self.gpu_lowering not in GPU_LOWERINGS:
            raise ValueError(f"ChunkOptions.gpu_lowering must be one of {GPU_LOWERINGS}, got {self.gpu_lowering!r}")
        if self.gpu_lowering == "mosaic" and self.backward_generic != "chunks":
            raise ValueError(
                "ChunkOptions(gpu_lowering='mosaic') has the chunk backward only; use backward_generic='chunks'")
