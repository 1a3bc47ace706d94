"""The gated head norm that ends a LASAD block (docs/model.md, "The attention block"):

    y = RMSNorm(x per head) * scale * SiLU(gate),   float32 arithmetic, y in the compute dtype

Algorithms (`impl`): 'xla' (reference.py, plain jnp, any backend) and 'pallas' (kernel_gpu.py: one
forward and one backward kernel, GPU, head dims that are powers of two >= 16). 'auto' is 'xla' on
every backend: the kernels have not been timed on a GPU yet (`benchmarks/gated_norm.py` times them
against the XLA form, `benchmarks/train_step.py --gated_norm_impl pallas` and `xla` the step), so
they are chosen by name only.
"""

from __future__ import annotations

import jax

from lasadgen_jax.ops.gated_norm.kernel_gpu import GatedNormBlocks, gated_head_norm_kernels
from lasadgen_jax.ops.gated_norm.reference import gated_head_norm_reference

__all__ = ["IMPLS", "GatedNormBlocks", "gated_head_norm", "gated_head_norm_pallas", "gated_head_norm_reference",
           "resolve_impl"]

IMPLS = ("auto", "xla", "pallas")


def _tiles_head_dim(head_dim: int) -> bool:
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def resolve_impl(impl: str, head_dim: int | None = None) -> str:
    """'xla' or 'pallas' for `impl` ('auto': 'xla', module docstring). With head_dim, 'pallas' for a head
    dim the kernels do not tile is refused here (before a model is built) rather than at its first call."""
    if impl not in IMPLS:
        raise ValueError(f"gated norm impl must be one of {IMPLS}, got {impl!r}")
    if impl == "pallas" and head_dim is not None and not _tiles_head_dim(head_dim):
        raise ValueError(f"gated norm impl='pallas' needs a head dim that is a power of two >= 16, got {head_dim}")
    return "xla" if impl == "auto" else impl


def _check(x, gate, scale):
    if x.ndim < 2 or scale.shape != x.shape[-2:]:
        raise ValueError(f"gated head norm: x [..., heads, e] and scale [heads, e] disagree: x {x.shape}, "
                         f"scale {scale.shape}")
    if gate.shape != x.shape:
        raise ValueError(f"gated head norm: gate must have x's shape [..., heads, e] {x.shape}, got {gate.shape}")


def gated_head_norm(x, gate, scale, *, eps: float, out_dtype=None, impl: str = "auto"):
    """x [..., heads, e] (the attention's output), gate [..., heads, e], scale [heads, e] -> [..., heads, e]
    in out_dtype (default: the gate's dtype). impl: 'auto' (= 'xla'), 'xla' or 'pallas' (GPU)."""
    _check(x, gate, scale)
    out_dtype = gate.dtype if out_dtype is None else out_dtype
    impl = resolve_impl(impl)
    if impl == "xla":
        return gated_head_norm_reference(x, gate, scale, eps=eps, out_dtype=out_dtype)
    if jax.default_backend() not in ("gpu", "cuda", "rocm"):
        raise ValueError(f"gated norm impl='pallas' runs on a GPU only (default backend {jax.default_backend()!r}); "
                         "gated_head_norm_pallas(..., interpret=True) runs the kernels on the CPU")
    return gated_head_norm_pallas(x, gate, scale, eps=eps, out_dtype=out_dtype)


def gated_head_norm_pallas(x, gate, scale, *, eps: float, out_dtype=None, interpret: bool = False,
                           blocks: GatedNormBlocks = GatedNormBlocks()):
    """The kernels of kernel_gpu.py, optionally in interpret mode (how the tests run them on CPU)."""
    _check(x, gate, scale)
    resolve_impl("pallas", head_dim=x.shape[-1])
    out_dtype = gate.dtype if out_dtype is None else out_dtype
    kernels = gated_head_norm_kernels(float(eps), jax.numpy.dtype(out_dtype).name, bool(interpret), blocks)
    return kernels(x, gate, scale)
