"""The LASADGen decoder (Flax NNX): class prefix, pre-norm blocks of LASAD (or softmax) attention and
SwiGLU, and a zero-initialised head over the VQ codebook. LlamaGen is the reference framework.

Training: `model(tokens, labels)` gives the logits of every cell, [batch, N, vocab] float32
(`hidden_states` the head's input, for the chunked loss in loss.py); the input is the class prefix
followed by the tokens of cells 0..N-2 (alignment.py). Decoding:
`init_decode_state`, `prefill(labels)` (logits of cell 0), then `decode_step(token of cell-1, cell)`
for cells 1..N-1; with LASAD the carried state has a fixed size, with softmax it is a KV cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lasadgen_jax.models.dropout import Dropout
from lasadgen_jax.models.lasad_attention import LASADAttention
from lasadgen_jax.models.remat_names import (
    ATTENTION_INPUT_NAME,
    CUDNN_ATTENTION_FORWARD,
    GATED_PRODUCT_NAME,
    KEEP_MASK_NAME,
    LASAD_OUTPUT_NAME,
    NORM_OUTPUT_NAME,
)
from lasadgen_jax.models.rope import ROPE_LAYOUTS
from lasadgen_jax.models.softmax_attention import SOFTMAX_IMPLS, SoftmaxAttention
from lasadgen_jax.ops import gated_norm
from lasadgen_jax.ops.lasad import common

ATTENTION_TYPES = ("2d", "2d_row", "1d", "none", "softmax")


def _keeps_cudnn_attention_forward(primitive, *_, **__) -> bool:
    """A remat policy: keep the outputs of cuDNN's attention forward (remat_names.CUDNN_ATTENTION_FORWARD)."""
    return primitive.name == CUDNN_ATTENTION_FORWARD


_dots = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(KEEP_MASK_NAME, LASAD_OUTPUT_NAME),
        _keeps_cudnn_attention_forward))
# Rematerialisation of each block in training: what the backward pass may keep from the forward
# (remat_names.py). "dots" keeps matmul outputs, dropout masks and the attention op's output (LASAD's, or
# cuDNN's with its softmax statistics), so no attention forward kernel runs twice; "dots_attention_inputs"
# also keeps q and k after RoPE (and the LASAD op's cell values), so the backward does not rotate
# them again; "dots_matmul_inputs" also keeps the other projections' inputs (each block norm's output, and the
# gated products before the SwiGLU's and the LASAD block's output projections), so the backward recomputes
# no elementwise work that feeds a matmul. Their costs are in benchmarks/RESULTS.md, "Training step: what remat
# keeps of the attention" and "Training step: the loss's gradient in its forward pass, the cells' keys and
# values, and what `dots_matmul_inputs` keeps".
_dots_attention_inputs = jax.checkpoint_policies.save_from_both_policies(
    _dots, jax.checkpoint_policies.save_only_these_names(ATTENTION_INPUT_NAME))
REMAT_POLICIES = {
    "none": None,                                                    # keep everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,                # keep only block inputs
    "dots": _dots,
    "dots_attention_inputs": _dots_attention_inputs,
    "dots_matmul_inputs": jax.checkpoint_policies.save_from_both_policies(
        _dots_attention_inputs, jax.checkpoint_policies.save_only_these_names(NORM_OUTPUT_NAME, GATED_PRODUCT_NAME)),
}
# LlamaGen's GPT sizes: (depth, heads, dim), and its parameter counts with softmax attention.
SIZES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536), "3B": (24, 32, 3200)}
LLAMAGEN_PARAMS = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9, "3B": 3.1e9}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's shape and behaviour. Dtypes are names ("bfloat16")."""

    vocab_size: int = 16384
    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    attention: str = "2d"
    rope_layout: str = "target"  # softmax only: "llamagen" for LlamaGen's converted GPTs (models/rope.py)
    num_prefix: int = 1
    ffn_multiple_of: int = 256
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    use_rope: bool = True
    lasad_impl: str = "auto"
    softmax_impl: str = "auto"  # softmax only: 'auto', 'xla' or 'cudnn' (softmax_attention.resolve_softmax_impl)
    decode_impl: str = "auto"  # LASAD decode step: 'auto', 'xla' or 'pallas' (lasad.resolve_decode_impl)
    gated_norm_impl: str = "auto"  # LASAD block's output norm and gate: 'auto', 'xla' or 'pallas' (ops/gated_norm)
    decode_state_dtype: str = "float32"  # LASAD decode state storage: 'float32' or 'bfloat16'
    decay_range: tuple[float, float] = (0.5, 0.985)
    norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # Training-step levers (docs/training.md, "Speed and memory levers"); neither changes the parameters.
    loss_chunk_tokens: int = 0   # 0: loss from the full logits; C >= 1: chunked over C positions (loss.py)
    scan_layers: bool = False    # run the blocks of the teacher-forced forward as one lax.scan

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.rope_layout != "target" and (self.attention != "softmax" or not self.use_rope):
            raise ValueError(f"rope_layout {self.rope_layout!r} (LlamaGen's RoPE, for its converted checkpoints) needs "
                             f"attention 'softmax' and use_rope True, got attention {self.attention!r}, use_rope "
                             f"{self.use_rope}")
        if self.softmax_impl not in SOFTMAX_IMPLS:
            raise ValueError(f"softmax_impl must be one of {SOFTMAX_IMPLS}, got {self.softmax_impl!r}")
        gated_norm.resolve_impl(self.gated_norm_impl)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        chunk = self.loss_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
            raise ValueError(f"loss_chunk_tokens must be an int >= 0 (0: the plain loss), got {chunk!r}")
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"scan_layers must be a bool, got {self.scan_layers!r}")
        object.__setattr__(self, "loss_chunk_tokens", int(self.loss_chunk_tokens))
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        object.__setattr__(self, "grid", common.check_grid(self.grid))
        object.__setattr__(self, "decay_range", tuple(self.decay_range))
        for name in ("vocab_size", "num_classes", "dim", "depth", "num_heads", "num_prefix", "ffn_multiple_of"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        for name in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name} must name a dtype, got {getattr(self, name)!r}") from None

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def ffn_hidden(self) -> int:
        """LlamaGen's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of ffn_multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        return -(-hidden // self.ffn_multiple_of) * self.ffn_multiple_of


def model_config(size: str, **overrides) -> ModelConfig:
    """ModelConfig for a LlamaGen size ('B', 'L', 'XL', 'XXL', '3B') with field overrides."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    depth, heads, dim = SIZES[size]
    return ModelConfig(**{"depth": depth, "num_heads": heads, "dim": dim, **overrides})


# ----------------------------------------------------------------------------- layers


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x), then dropout (ffn_dropout) on that output, as LlamaGen's FeedForward."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1, self.w3 = linear(config.dim, config.ffn_hidden), linear(config.dim, config.ffn_hidden)
        self.w2 = linear(config.ffn_hidden, config.dim)
        self.dropout = Dropout(config.ffn_dropout, rngs=rngs)

    def __call__(self, x, deterministic: bool | None = None):
        product = checkpoint_name(jax.nn.silu(self.w1(x)) * self.w3(x), GATED_PRODUCT_NAME)
        return self.dropout(self.w2(product), deterministic=deterministic)


def make_attention(config: ModelConfig, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    if config.attention == "softmax":
        return SoftmaxAttention(
            config.dim, config.num_heads, use_rope=config.use_rope, rope_layout=config.rope_layout,
            impl=config.softmax_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
    return LASADAttention(
        config.dim, config.num_heads, variant=config.attention, use_rope=config.use_rope,
        decay_range=config.decay_range, impl=config.lasad_impl, decode_impl=config.decode_impl,
        gated_norm_impl=config.gated_norm_impl,
        state_dtype=config.decode_state_dtype, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


class Block(nnx.Module):
    """Pre-norm residual block: x + dropout(attention(norm(x))) (resid_dropout), then + SwiGLU(norm(x))
    (whose output carries ffn_dropout): one dropout per branch, where LlamaGen has them."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm = lambda: nnx.RMSNorm(config.dim, epsilon=config.norm_eps, param_dtype=jnp.dtype(config.param_dtype),
                                   rngs=rngs)
        self.attention_norm, self.ffn_norm = norm(), norm()
        self.attention = make_attention(config, rngs)
        self.ffn = SwiGLU(config, rngs=rngs)
        self.resid_dropout = Dropout(config.resid_dropout, rngs=rngs)
        self.dtype = jnp.dtype(config.dtype)

    def _normed(self, norm, x):
        """norm(x) in the compute dtype (the projections' input, as they would cast it), named for remat."""
        return checkpoint_name(norm(x).astype(self.dtype), NORM_OUTPUT_NAME)

    def _ffn_residual(self, h, deterministic=None):
        return h + self.ffn(self._normed(self.ffn_norm, h), deterministic)

    def __call__(self, x, *, grid, num_prefix):
        attended = self.attention(self._normed(self.attention_norm, x), grid=grid, num_prefix=num_prefix)
        return self._ffn_residual(x + self.resid_dropout(attended))

    def prefill(self, x, state, *, grid):
        attended, state = self.attention.prefill(self._normed(self.attention_norm, x), state, grid=grid)
        return self._ffn_residual(x + attended, deterministic=True), state

    def decode_step(self, x, state, cell, *, grid, row_start=None):
        attended, state = self.attention.decode_step(self._normed(self.attention_norm, x), state, cell, grid=grid,
                                                     row_start=row_start)
        return self._ffn_residual(x + attended, deterministic=True), state


class ClassEmbedder(nnx.Module):
    """num_classes + 1 rows (the last is the null class for CFG), each num_prefix tokens wide.

    In training (deterministic False) each label is replaced by the null class with probability
    `dropout`, so the model also learns the unconditional distribution.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.num_classes, self.num_prefix, self.dim = config.num_classes, config.num_prefix, config.dim
        self.embedding = nnx.Embed(
            config.num_classes + 1, config.num_prefix * config.dim,
            dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs,
        )
        self.dropout, self.deterministic = config.class_dropout, False
        self.rngs = rngs["dropout"].fork()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def __call__(self, labels, deterministic: bool | None = None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if not deterministic and self.dropout > 0:
            drop = jax.random.bernoulli(self.rngs(), self.dropout, labels.shape)
            labels = jnp.where(drop, self.null_class, labels)
        return self.embedding(labels).reshape(labels.shape[0], self.num_prefix, self.dim)


# ----------------------------------------------------------------------------- the model


class LASADGen(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.class_embedder = ClassEmbedder(config, rngs=rngs)
        self.token_embedding = nnx.Embed(config.vocab_size, config.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_dropout = Dropout(config.token_dropout, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.head = nnx.Linear(
            config.dim, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.initializers.zeros, rngs=rngs,
        )

    # ------------------------------------------------------------------ checks

    def check_labels(self, labels, allow_null: bool = True):
        """labels: int [batch] in [0, num_classes] (num_classes = null). Values checked when concrete."""
        if getattr(labels, "ndim", None) != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be an int array [batch], got {getattr(labels, 'shape', None)} "
                             f"{getattr(labels, 'dtype', None)}")
        if not isinstance(labels, jax.core.Tracer):
            top = self.config.num_classes if allow_null else self.config.num_classes - 1
            values = np.asarray(labels)
            if values.size and (values.min() < 0 or values.max() > top):
                raise ValueError(f"class ids must be in [0, {top}] (num_classes={self.config.num_classes}"
                                 f"{', the last is the null class' if allow_null else ''}), got {values}")

    def check_tokens(self, tokens):
        """tokens: int [batch, h*w] codebook ids. Values checked when concrete."""
        n = self.config.num_tokens
        if getattr(tokens, "ndim", None) != 2 or tokens.shape[1] != n or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int [batch, {n}] for grid {self.config.grid}, got "
                             f"{getattr(tokens, 'shape', None)} {getattr(tokens, 'dtype', None)}")
        if not isinstance(tokens, jax.core.Tracer):
            values = np.asarray(tokens)
            if values.min() < 0 or values.max() >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size - 1}], got range "
                                 f"[{values.min()}, {values.max()}]")

    # ------------------------------------------------------------------ training / parallel forward

    def _logits(self, h):
        return self.head(self.norm(h)).astype(jnp.float32)

    def __call__(self, tokens, labels):
        """tokens [batch, N], labels [batch] -> logits [batch, N, vocab] (float32) for cells 0..N-1."""
        return self.head(self.hidden_states(tokens, labels)).astype(jnp.float32)

    def hidden_states(self, tokens, labels):
        """tokens [batch, N], labels [batch] -> the head's input for cells 0..N-1 [batch, N, dim]: the final
        hidden states after the last norm (the chunked loss, loss.py, applies the head chunk by chunk)."""
        self.check_tokens(tokens)
        self.check_labels(labels)
        if tokens.shape[0] != labels.shape[0]:
            raise ValueError(f"tokens batch {tokens.shape[0]} != labels batch {labels.shape[0]}")
        prefix = self.class_embedder(labels)
        token_embeddings = self.token_dropout(self.token_embedding(tokens[:, :-1]))
        h = jnp.concatenate([prefix, token_embeddings.astype(prefix.dtype)], axis=1)
        h = self._scanned_blocks(h) if self.config.scan_layers else self._looped_blocks(h)
        return self.norm(h[:, self.config.num_prefix - 1 :])

    def _run_block(self):
        """block, h -> h of the teacher-forced forward, rematerialised by config.remat."""
        grid, num_prefix = self.config.grid, self.config.num_prefix
        run_block = lambda block, h: block(h, grid=grid, num_prefix=num_prefix)
        if self.config.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.config.remat])
        return run_block

    def _looped_blocks(self, h):
        run_block = self._run_block()
        for block in self.blocks:
            h = run_block(block, h)
        return h

    def _scanned_blocks(self, h):
        """The blocks as one lax.scan (one block traced and compiled, not depth of them): each block's
        state (parameters and dropout streams) is stacked inside the call and scanned over, so the
        parameters keep their per-block layout; the updated dropout streams are written back."""
        graphdef = nnx.graphdef(self.blocks[0])
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(block) for block in self.blocks])
        grid, num_prefix = self.config.grid, self.config.num_prefix

        def one_block(h, block_state):
            block = nnx.merge(graphdef, block_state)
            h = block(h, grid=grid, num_prefix=num_prefix)
            return h, nnx.state(block)

        if self.config.remat != "none":
            one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[self.config.remat])
        h, new_states = jax.lax.scan(one_block, h, stacked)
        for index, block in enumerate(self.blocks):
            nnx.update(block, jax.tree.map(lambda leaf, index=index: leaf[index], new_states))
        return h

    # ------------------------------------------------------------------ decoding

    def init_decode_state(self, batch: int) -> list:
        """One attention state per block: the LASAD state, or the KV cache for softmax."""
        return [
            block.attention.init_decode_state(batch, grid=self.config.grid, num_prefix=self.config.num_prefix)
            for block in self.blocks
        ]

    def prefill(self, labels, state: list):
        """Class prefix in; returns (logits of cell 0 [batch, vocab] float32, state). Labels are not dropped."""
        self.check_labels(labels)
        h = self.class_embedder(labels, deterministic=True)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            h, block_state = block.prefill(h, block_state, grid=self.config.grid)
            new_state.append(block_state)
        return self._logits(h[:, -1]), new_state

    def decode_step(self, previous_tokens, state: list, cell, row_start: bool | None = None):
        """previous_tokens [batch]: the tokens of cell-1; returns (logits of `cell` [batch, vocab], state).

        row_start: whether `cell` starts a row, when the caller knows it statically (the sampler
        does); it spares the 2D LASAD variants a per-token lax.cond.
        """
        h = self.token_embedding(previous_tokens)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            h, block_state = block.decode_step(h, block_state, cell, grid=self.config.grid, row_start=row_start)
            new_state.append(block_state)
        return self._logits(h), new_state


def count_params(config: ModelConfig) -> int:
    """Parameter count from shapes alone (nnx.eval_shape: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: LASADGen(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
