"""LlamaGen GPT checkpoints -> softmax LASADGen: parity with an independent PyTorch forward of LlamaGen's
GPT (written here from its published architecture), and refusals by name."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_error

from lasadgen_jax import convert_llamagen
from lasadgen_jax.model_io import load_params
from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
from lasadgen_jax.sample import SamplingConfig, generate, guided_logits

torch = pytest.importorskip("torch", reason="the converter tests need the optional extra torch")
F = torch.nn.functional

VOCAB, CLASSES = 40, 7
# Two tiny GPTs (no LlamaGen size: the head count is passed), each on both grids.
SIZES = {"d64h4": {"depth": 2, "dim": 64, "heads": 4}, "d96h6": {"depth": 2, "dim": 96, "heads": 6}}
GRIDS = {"16x16": 256, "24x24": 384}   # image size in pixels; VQ-16 tokens per side = size / 16
CASES = [pytest.param(size, image_size, id=f"{size}-{grid}") for size in SIZES for grid, image_size in GRIDS.items()]


# ----------------------------------------------------------------------------- LlamaGen's GPT in PyTorch


def ffn_hidden(dim: int) -> int:
    """LlamaGen's SwiGLU width: int(2/3 * 4 dim), rounded up to a multiple of 256."""
    hidden = int(2 * 4 * dim / 3)
    return hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256


def llamagen_state_dict(depth: int, dim: int, seed: int) -> dict:
    """A random state_dict with LlamaGen's c2i GPT names and [out, in] shapes (null class = last row)."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=generator)
    hidden = ffn_hidden(dim)
    state = {"tok_embeddings.weight": normal(VOCAB, dim),
             "cls_embedding.embedding_table.weight": normal(CLASSES + 1, dim),
             "norm.weight": 1 + normal(dim, scale=0.2), "output.weight": normal(VOCAB, dim, scale=dim**-0.5)}
    for i in range(depth):
        state.update({
            f"layers.{i}.attention.wqkv.weight": normal(3 * dim, dim, scale=2 * dim**-0.5),
            f"layers.{i}.attention.wo.weight": normal(dim, dim, scale=dim**-0.5),
            f"layers.{i}.feed_forward.w1.weight": normal(hidden, dim, scale=dim**-0.5),
            f"layers.{i}.feed_forward.w3.weight": normal(hidden, dim, scale=dim**-0.5),
            f"layers.{i}.feed_forward.w2.weight": normal(dim, hidden, scale=hidden**-0.5),
            f"layers.{i}.attention_norm.weight": 1 + normal(dim, scale=0.2),
            f"layers.{i}.ffn_norm.weight": 1 + normal(dim, scale=0.2),
        })
    return state


def rope_table(side: int, head_dim: int):
    """[1 + side^2, head_dim/2, 2] (cos, sin): the class token's row is zero; each cell's first half of the
    pairs turns with its row, the second half with its column, frequencies base^(-2j / (head_dim/2))."""
    half = head_dim // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(0, half, 2).float() / half))
    rows = torch.arange(side).float()[:, None, None] * freqs            # [side, 1, hd/4]
    cols = torch.arange(side).float()[None, :, None] * freqs            # [1, side, hd/4]
    angles = torch.cat([rows.expand(side, side, -1), cols.expand(side, side, -1)], dim=-1).reshape(side * side, half)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(1, half, 2), table])


def rotate_interleaved(x, table):
    """x [batch, n, heads, head_dim]: the pairs (2i, 2i+1) turned by table [n, head_dim/2, (cos, sin)]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return turned.flatten(3)


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def llamagen_logits(state: dict, heads: int, side: int, labels, tokens) -> np.ndarray:
    """Teacher-forced logits [batch, 1 + len, vocab]: the class token, then the tokens' embeddings; the
    logits at position j predict token j. labels [batch] (CLASSES = null), tokens [batch, len]."""
    labels, tokens = torch.tensor(np.asarray(labels)), torch.tensor(np.asarray(tokens), dtype=torch.long)
    h = torch.cat([state["cls_embedding.embedding_table.weight"][labels][:, None],
                   state["tok_embeddings.weight"][tokens]], dim=1)
    batch, length, dim = h.shape
    table = rope_table(side, dim // heads)[:length]
    layer = 0
    while f"layers.{layer}.attention.wqkv.weight" in state:
        weight = lambda name, layer=layer: state[f"layers.{layer}.{name}.weight"]
        x = rms_norm(h, weight("attention_norm"))
        q, k, v = (x @ weight("attention.wqkv").T).split(dim, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, dim // heads) for t in (q, k, v))
        q, k = rotate_interleaved(q, table), rotate_interleaved(k, table)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        h = h + attended.transpose(1, 2).reshape(batch, length, dim) @ weight("attention.wo").T
        x = rms_norm(h, weight("ffn_norm"))
        ffn = F.silu(x @ weight("feed_forward.w1").T) * (x @ weight("feed_forward.w3").T)
        h = h + ffn @ weight("feed_forward.w2").T
        layer += 1
    return (rms_norm(h, state["norm.weight"]) @ state["output.weight"].T).numpy()


# ----------------------------------------------------------------------------- converting


def convert(directory, size: str, image_size: int, seed: int = 0, **overrides):
    """(torch state_dict, LASADGen loaded from the converted directory, the directory's record)."""
    spec = SIZES[size]
    state = llamagen_state_dict(spec["depth"], spec["dim"], seed)
    src = directory / f"c2i_{size}_{image_size}.pt"
    torch.save({"model": state, "steps": 3}, src)
    record = convert_llamagen.convert_checkpoint(str(src), str(directory / "params"), num_heads=spec["heads"],
                                                 **overrides)
    model = LASADGen(model_config(record), rngs=nnx.Rngs(1))
    load_params(model, str(directory / "params"))
    model.eval()
    return state, model, record


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convert() once per (size, image size) for the whole module: Orbax writes and reads take seconds."""
    cache = {}

    def get(size: str, image_size: int):
        if (size, image_size) not in cache:
            directory = tmp_path_factory.mktemp(f"{size}_{image_size}")
            cache[size, image_size] = convert(directory, size, image_size, seed=len(cache))
        return cache[size, image_size]

    return get


def model_config(record: dict) -> ModelConfig:
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["model"].items()})


def random_tokens(seed: int, batch: int, num_tokens: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, num_tokens), dtype=np.int32)


@pytest.mark.parametrize("size,image_size", CASES)
def test_teacher_forced_logits_match_llamagen(converted, size, image_size):
    state, model, record = converted(size, image_size)
    side = image_size // 16
    assert record["model"]["grid"] == [side, side] and record["model"]["rope_layout"] == "llamagen"
    labels = np.array([3, 0, CLASSES - 1], np.int32)
    tokens = random_tokens(1, 3, side * side)
    expected = llamagen_logits(state, SIZES[size]["heads"], side, labels, tokens[:, :-1])
    actual = model(jnp.asarray(tokens), jnp.asarray(labels))
    assert actual.shape == expected.shape == (3, side * side, VOCAB)
    assert rel_error(actual, expected) < 1e-5


@pytest.mark.parametrize("size,image_size", CASES)
def test_null_class_logits_match_llamagen(converted, size, image_size):
    state, model, _ = converted(size, image_size)
    side = image_size // 16
    null = np.full((2,), CLASSES, np.int32)
    assert model.class_embedder.null_class == CLASSES
    tokens = random_tokens(3, 2, side * side)
    expected = llamagen_logits(state, SIZES[size]["heads"], side, null, tokens[:, :-1])
    assert rel_error(model(jnp.asarray(tokens), jnp.asarray(null)), expected) < 1e-5


@pytest.mark.parametrize("size,image_size", CASES)
def test_guided_decode_steps_match_llamagen(converted, size, image_size):
    """Prefill, then decode steps across the first row end, of the conditional and null-class halves
    stacked as the sampler stacks them; each half and the guided logits against LlamaGen's."""
    state, model, _ = converted(size, image_size)
    side, heads, scale = image_size // 16, SIZES[size]["heads"], 1.75
    labels = np.array([5, 1], np.int32)
    stacked = jnp.asarray(np.concatenate([labels, np.full_like(labels, CLASSES)]))
    steps = side + 2
    tokens = random_tokens(5, 2, steps)
    cond = llamagen_logits(state, heads, side, labels, tokens[:, : steps - 1])
    uncond = llamagen_logits(state, heads, side, np.full_like(labels, CLASSES), tokens[:, : steps - 1])
    decode_state = model.init_decode_state(4)
    logits, decode_state = model.prefill(stacked, decode_state)
    for cell in range(steps):
        if cell:
            previous = jnp.asarray(np.concatenate([tokens[:, cell - 1]] * 2))
            logits, decode_state = model.decode_step(previous, decode_state, cell, row_start=cell % side == 0)
        assert rel_error(logits[:2], cond[:, cell]) < 1e-5, cell
        assert rel_error(logits[2:], uncond[:, cell]) < 1e-5, cell
        guided = uncond[:, cell] + (cond[:, cell] - uncond[:, cell]) * scale   # LlamaGen's combination
        assert rel_error(guided_logits(logits[:2], logits[2:], scale), guided) < 1e-5, cell


@pytest.mark.parametrize("size,image_size", [CASES[0], CASES[3]])
def test_greedy_guided_sampling_follows_llamagen(converted, size, image_size):
    """The whole jitted sampler (greedy, CFG 2): every token is the argmax of LlamaGen's guided logits."""
    state, model, _ = converted(size, image_size)
    side, heads, scale = image_size // 16, SIZES[size]["heads"], 2.0
    labels = np.array([2, 6], np.int32)
    sampled = np.asarray(generate(model, labels, jax.random.PRNGKey(0), SamplingConfig(cfg_scale=scale, temperature=0)))
    tokens = sampled.reshape(2, side * side)
    cond = llamagen_logits(state, heads, side, labels, tokens[:, :-1])
    uncond = llamagen_logits(state, heads, side, np.full_like(labels, CLASSES), tokens[:, :-1])
    np.testing.assert_array_equal(tokens, np.argmax(uncond + (cond - uncond) * scale, axis=-1))


# ----------------------------------------------------------------------------- refusals and the CLI


def saved_state(tmp_path, state, name="c2i_d64h4_256.pt"):
    src = tmp_path / name
    torch.save({"model": state}, src)
    return str(src)


def test_unknown_tensor_is_refused_by_name(tmp_path):
    state = llamagen_state_dict(2, 64, seed=0)
    state["layers.1.attention.wqkv.bias"] = torch.zeros(3 * 64)
    with pytest.raises(ValueError, match=r"unknown \['layers\.1\.attention\.wqkv\.bias'\]"):
        convert_llamagen.convert_checkpoint(saved_state(tmp_path, state), str(tmp_path / "out"), num_heads=4)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_is_refused_by_name(tmp_path):
    state = llamagen_state_dict(2, 64, seed=0)
    state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"].T.contiguous()
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight \(256, 64\) \(expected \(64, 256\)\)"):
        convert_llamagen.convert_checkpoint(saved_state(tmp_path, state), str(tmp_path / "out"), num_heads=4)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_size_mismatch_are_named(tmp_path):
    state = llamagen_state_dict(2, 64, seed=0)
    del state["layers.0.ffn_norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['layers\.0\.ffn_norm\.weight'\]"):
        convert_llamagen.convert_checkpoint(saved_state(tmp_path, state), str(tmp_path / "out"), num_heads=4)
    src = saved_state(tmp_path, llamagen_state_dict(2, 64, seed=0), "c2i_other_256.pt")
    with pytest.raises(ValueError, match=r"--size B is depth 12, dim 768; the checkpoint has depth 2, dim 64"):
        convert_llamagen.convert_checkpoint(src, str(tmp_path / "out"), size="B")
    with pytest.raises(ValueError, match=r"depth 2, dim 64 is none of LlamaGen's sizes"):
        convert_llamagen.convert_checkpoint(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_freqs_cis_must_be_the_grids_rope_table(tmp_path):
    state = llamagen_state_dict(2, 64, seed=0)
    state["freqs_cis"] = rope_table(24, 16)   # a 24x24 table in a file named _256
    with pytest.raises(ValueError, match=r"freqs_cis \(577, 8, 2\) is not LlamaGen's 2D RoPE table of a 16x16 grid"):
        convert_llamagen.convert_checkpoint(saved_state(tmp_path, state), str(tmp_path / "out"), num_heads=4)
    record = convert_llamagen.convert_checkpoint(saved_state(tmp_path, state), str(tmp_path / "out"), num_heads=4,
                                                 image_size=384)
    assert record["model"]["grid"] == [24, 24]


def test_cli_writes_a_new_directory_and_refuses_an_existing_one(tmp_path):
    """The FSDP releases' layout (state_dict at the top level), the grid from the file name, the record."""
    src = tmp_path / "c2i_d96h6_384.pt"
    torch.save(llamagen_state_dict(2, 96, seed=0), src)
    dst = tmp_path / "converted"
    command = [sys.executable, "-m", "lasadgen_jax.convert_llamagen", f"--src={src}", f"--dst={dst}", "--num_heads=6"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr
    record = json.loads((dst / convert_llamagen.RECORD_FILE).read_text())
    assert record["source"] == {"file": src.name, "sha256": convert_llamagen.file_sha256(str(src)), "key": ""}
    assert model_config(record) == dataclasses.replace(model_config(record), grid=(24, 24), dim=96, num_heads=6,
                                                       attention="softmax", rope_layout="llamagen")
    before = {name: os.path.getmtime(dst / name) for name in os.listdir(dst)}
    with pytest.raises(ValueError, match="exists; nothing was overwritten"):
        convert_llamagen.convert_checkpoint(str(src), str(dst), num_heads=6)
    assert {name: os.path.getmtime(dst / name) for name in os.listdir(dst)} == before
    assert [name for name in os.listdir(tmp_path) if "partial" in name] == []


def test_rope_layout_llamagen_needs_softmax_attention():
    with pytest.raises(ValueError, match="rope_layout 'llamagen'.*needs attention 'softmax'"):
        ModelConfig(attention="2d", rope_layout="llamagen")
    with pytest.raises(ValueError, match="rope_layout must be one of"):
        ModelConfig(attention="softmax", rope_layout="halves")
