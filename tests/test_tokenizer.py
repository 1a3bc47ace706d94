"""The VQ tokenizer: shapes, determinism, the checkpoint directory, and parity with a PyTorch module."""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_error, tiny_vq_architecture

from lasadgen_jax.config_files import load_config
from lasadgen_jax.tokenizer import VQArchitecture, convert, load_tokenizer, save_tokenizer, tokenizer_hash
from lasadgen_jax.tokenizer.checkpoint import param_shapes, trained_image_size
from lasadgen_jax.tokenizer.model import abstract_vq_model, create_vq_model

# Tiny but complete: three levels (two downsamples), attention on the last level, a channel change
# (so nin_shortcut exists), GroupNorm groups of two channels.
TINY = tiny_vq_architecture()


encode = nnx.jit(lambda model, images: model.encode(images))
decode = nnx.jit(lambda model, codes: model.decode(codes))


def random_images(seed, batch=2, size=16, channels=3):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, channels), jnp.float32, -1.0, 1.0)


@pytest.fixture(scope="module")
def tiny_model():
    return create_vq_model(TINY, seed=0)


def test_encode_decode_shapes_and_range(tiny_model):
    images = random_images(0, batch=3, size=16)
    codes = encode(tiny_model, images)
    chex.assert_shape(codes, (3, 4, 4))
    assert codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    decoded = decode(tiny_model, codes)
    chex.assert_shape(decoded, (3, 16, 16, 3))
    chex.assert_tree_all_finite(decoded)
    # Non-square, larger images: the grid follows the image.
    chex.assert_shape(encode(tiny_model, random_images(1, batch=1, size=24)), (1, 6, 6))


def test_encode_decode_are_deterministic(tiny_model):
    images = random_images(2)
    codes = encode(tiny_model, images)
    np.testing.assert_array_equal(codes, encode(tiny_model, images))
    np.testing.assert_array_equal(decode(tiny_model, codes), decode(tiny_model, codes))
    # A model built again from the same seed encodes identically.
    np.testing.assert_array_equal(codes, encode(create_vq_model(TINY, seed=0), images))
    # Different images give different codes (the encoder is not a constant).
    assert not np.array_equal(codes, encode(tiny_model, random_images(3)))


def test_codes_are_the_nearest_normalised_codebook_entries(tiny_model):
    latents = nnx.jit(lambda model, images: model.latents(images))(tiny_model, random_images(4))
    normalised = latents / jnp.linalg.norm(latents, axis=-1, keepdims=True)
    codebook = tiny_model.quantize.codebook()
    np.testing.assert_allclose(jnp.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-6)
    expected = jnp.argmax(jnp.einsum("bhwd,nd->bhwn", normalised, codebook), axis=-1)
    np.testing.assert_array_equal(encode(tiny_model, random_images(4)), expected)


def test_training_forward_straight_through_gradients(tiny_model):
    images = random_images(5)

    def loss(model):
        reconstruction, _, codebook_loss, commitment_loss = model(images)
        return jnp.mean((reconstruction - images) ** 2) + codebook_loss + 0.25 * commitment_loss

    grads = nnx.jit(nnx.grad(loss))(tiny_model)
    flat = dict(nnx.to_flat_state(grads))
    # The reconstruction gradient reaches the encoder through the straight-through estimator.
    assert float(jnp.abs(flat[("encoder", "conv_in", "kernel")][...]).max()) > 0
    assert float(jnp.abs(flat[("quantize", "embedding")][...]).max()) > 0


def test_bad_shapes_are_refused(tiny_model):
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_model.encode(random_images(0, size=18))
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        tiny_model.encode(random_images(0, channels=1))
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        VQArchitecture(base_channels=12, num_groups=8)
    with pytest.raises(ValueError, match="unknown VQArchitecture fields"):
        VQArchitecture.from_dict({"base_chanels": 8})


def test_tokenizer_directory_round_trip(tiny_model, tmp_path):
    directory = tmp_path / "tok"
    digest = save_tokenizer(tiny_model, str(directory))
    assert digest == tokenizer_hash(str(directory))
    loaded = load_tokenizer(str(directory))
    assert loaded.arch == TINY
    images = random_images(6)
    np.testing.assert_array_equal(encode(loaded, images), encode(tiny_model, images))
    # A tampered parameter file is refused.
    params = directory / "params.npz"
    tampered = bytearray(params.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    params.write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="sha256 does not match"):
        load_tokenizer(str(directory))
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- PyTorch parity

torch = pytest.importorskip("torch", reason="the converter tests need the optional extra torch")
tnn = torch.nn
F = torch.nn.functional


class TorchResnetBlock(tnn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = tnn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = tnn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = tnn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = tnn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class TorchAttnBlock(tnn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.norm = tnn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (tnn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(n).reshape(b, c, h * w)
        v = self.v(n).reshape(b, c, h * w)
        attention = torch.softmax(torch.bmm(q, k) / c**0.5, dim=2)
        out = torch.bmm(v, attention.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class TorchDownsample(tnn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = tnn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class TorchUpsample(tnn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = tnn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def torch_level(cin, cout, blocks, attention, resample, groups):
    level = tnn.Module()
    channels = [cin] + [cout] * blocks
    level.res = tnn.ModuleList([TorchResnetBlock(channels[i], channels[i + 1], groups) for i in range(blocks)])
    level.attn = tnn.ModuleList([TorchAttnBlock(cout, groups) for _ in range(blocks if attention else 0)])
    if resample is not None:
        setattr(level, resample.__name__.replace("Torch", "").lower(), resample(cout))
    return level


class TorchVQ(tnn.Module):
    """LlamaGen's VQModel layout, parameter names included, at an arbitrary VQArchitecture."""

    def __init__(self, arch: VQArchitecture):
        super().__init__()
        mult, base, g = arch.channel_multipliers, arch.base_channels, arch.num_groups
        last = len(arch.channel_multipliers) - 1
        top = base * mult[-1]
        mid = lambda: tnn.ModuleList([TorchResnetBlock(top, top, g), TorchAttnBlock(top, g),
                                      TorchResnetBlock(top, top, g)])
        self.encoder = tnn.Module()
        self.encoder.conv_in = tnn.Conv2d(arch.image_channels, base, 3, padding=1)
        self.encoder.conv_blocks = tnn.ModuleList([
            torch_level(base * ((1,) + mult)[i], base * mult[i], arch.num_res_blocks, i == last,
                        TorchDownsample if i != last else None, g) for i in range(len(mult))])
        self.encoder.mid = mid()
        self.encoder.norm_out = tnn.GroupNorm(g, top, eps=1e-6)
        self.encoder.conv_out = tnn.Conv2d(top, arch.z_channels, 3, padding=1)
        self.decoder = tnn.Module()
        self.decoder.conv_in = tnn.Conv2d(arch.z_channels, top, 3, padding=1)
        self.decoder.mid = mid()
        levels, cin = [], top
        for i in reversed(range(len(mult))):
            levels.append(torch_level(cin, base * mult[i], arch.num_res_blocks + 1, i == last,
                                      TorchUpsample if i != 0 else None, g))
            cin = base * mult[i]
        self.decoder.conv_blocks = tnn.ModuleList(levels)
        self.decoder.norm_out = tnn.GroupNorm(g, cin, eps=1e-6)
        self.decoder.conv_out = tnn.Conv2d(cin, arch.image_channels, 3, padding=1)
        self.quant_conv = tnn.Conv2d(arch.z_channels, arch.codebook_dim, 1)
        self.post_quant_conv = tnn.Conv2d(arch.codebook_dim, arch.z_channels, 1)
        self.quantize = tnn.Module()
        self.quantize.embedding = tnn.Embedding(arch.codebook_size, arch.codebook_dim)
        self.quantize.register_buffer("codebook_used", torch.zeros(65536))

    @staticmethod
    def run_levels(levels, h, resample):
        for level in levels:
            for i, block in enumerate(level.res):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, resample):
                h = getattr(level, resample)(h)
        return h

    def encode(self, x):
        e = self.encoder
        h = self.run_levels(e.conv_blocks, e.conv_in(x), "downsample")
        for block in e.mid:
            h = block(h)
        z = self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        codebook = F.normalize(self.quantize.embedding.weight, dim=-1)
        distances = ((z**2).sum(-1, keepdim=True) + (codebook**2).sum(-1)
                     - 2 * torch.einsum("bhwd,nd->bhwn", z, codebook))
        return distances.argmin(-1)

    def decode(self, codes):
        d = self.decoder
        quantized = F.normalize(self.quantize.embedding.weight, dim=-1)[codes].permute(0, 3, 1, 2)
        h = d.conv_in(self.post_quant_conv(quantized))
        for block in d.mid:
            h = block(h)
        h = self.run_levels(d.conv_blocks, h, "upsample")
        return d.conv_out(F.silu(d.norm_out(h)))


def randomised_torch_vq(arch, seed):
    """A TorchVQ whose every tensor (norm affine parameters and biases included) is non-trivial."""
    torch.manual_seed(seed)
    module = TorchVQ(arch).eval()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return module


def test_llamagen_parameter_names_match_the_torch_layout():
    state_dict = TorchVQ(TINY).state_dict()
    flax_names = param_shapes(abstract_vq_model(TINY))
    assert {convert.torch_key(name) for name in flax_names} == set(state_dict) - convert.IGNORED_TORCH_KEYS
    # Spot-check a few names of LlamaGen's layout.
    for key in ["encoder.conv_blocks.0.res.0.norm1.weight", "encoder.conv_blocks.1.res.0.nin_shortcut.weight",
                "encoder.conv_blocks.2.attn.0.q.weight", "encoder.conv_blocks.0.downsample.conv.bias",
                "encoder.mid.1.proj_out.weight", "decoder.conv_blocks.0.attn.1.k.bias",
                "decoder.conv_blocks.1.upsample.conv.weight", "quantize.embedding.weight", "post_quant_conv.weight"]:
        assert key in state_dict


def test_converter_matches_pytorch_codes_and_reconstructions(tmp_path):
    module = randomised_torch_vq(TINY, seed=0)
    checkpoint = tmp_path / "vq.pt"
    torch.save({"model": module.state_dict(), "steps": 7}, checkpoint)
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(TINY.to_json())
    convert.convert_tokenizer(str(checkpoint), str(tmp_path / "tok"), arch=str(arch_file), image_size=16)
    model = load_tokenizer(str(tmp_path / "tok"))
    assert trained_image_size(str(tmp_path / "tok")) == 16

    images = np.array(random_images(7, batch=4, size=16))
    with torch.no_grad():
        torch_codes = module.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        torch_images = module.decode(torch.from_numpy(torch_codes)).permute(0, 2, 3, 1).numpy()
    codes = np.asarray(encode(model, jnp.asarray(images)))
    np.testing.assert_array_equal(codes, torch_codes)
    assert len(np.unique(codes)) > 4, "degenerate test: almost every cell got the same code"
    assert rel_error(decode(model, jnp.asarray(torch_codes)), torch_images) < 1e-4


def test_converter_refuses_a_checkpoint_of_another_architecture(tmp_path):
    other = VQArchitecture(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, z_channels=8,
                           codebook_size=64, codebook_dim=4, num_groups=4)
    with pytest.raises(ValueError, match="missing keys"):
        convert.convert_state_dict({k: v.numpy() for k, v in TorchVQ(other).state_dict().items()}, TINY)
    wide = VQArchitecture(**{**json.loads(TINY.to_json()), "codebook_size": 32})
    with pytest.raises(ValueError, match="quantize/embedding has shape"):
        convert.convert_state_dict({k: v.numpy() for k, v in TorchVQ(wide).state_dict().items()}, TINY)
    checkpoint = tmp_path / "vq.pt"
    torch.save({"ema": TorchVQ(TINY).state_dict()}, checkpoint)
    with pytest.raises(ValueError, match="no state_dict under --key 'model'"):
        convert.load_torch_state_dict(str(checkpoint), "model")


def test_converter_loads_only_tensors(tmp_path):
    """weights_only=True: a checkpoint that would run code on unpickling is refused."""
    checkpoint = tmp_path / "evil.pt"
    torch.save({"model": TorchVQ(TINY).state_dict(), "callback": os.system}, checkpoint)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.load_torch_state_dict(str(checkpoint), "model")


# ---------------------------------------------------------------- the small-VQ trainer


def smoke_config(**overrides):
    """configs/vq_small.py:smoke with a few fields changed (the config is locked: a typo raises)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "vq_small.py")
    config = load_config(f"{path}:smoke")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_trainer_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    from lasadgen_jax.tokenizer.train import train_and_evaluate

    straight = train_and_evaluate(smoke_config(num_steps=3, checkpoint_every=3), str(tmp_path / "straight"))
    assert straight["trained_steps_this_run"] == 3
    interrupted = tmp_path / "interrupted"
    train_and_evaluate(smoke_config(num_steps=2, checkpoint_every=2), str(interrupted))
    resumed = train_and_evaluate(smoke_config(num_steps=3, checkpoint_every=3), str(interrupted))
    assert resumed["trained_steps_this_run"] == 1
    assert resumed["tokenizer_hash"] == straight["tokenizer_hash"]   # bit-identical parameters
    assert 0 < resumed["codebook_usage"] <= 1 and np.isfinite(resumed["psnr_db"])
    assert os.path.isfile(interrupted / "reconstructions" / "step_000002.png")
    assert os.path.isfile(interrupted / "reconstructions" / "step_000003.png")
    model = load_tokenizer(str(interrupted / "tokenizer"))
    chex.assert_shape(encode(model, random_images(0, batch=1, size=32)), (1, 8, 8))
    assert trained_image_size(str(interrupted / "tokenizer")) == 32   # token extraction's default size


def test_trainer_refuses_a_workdir_of_another_model(tmp_path):
    from lasadgen_jax.tokenizer.train import claim_vq_workdir

    workdir = str(tmp_path / "run")
    claim_vq_workdir(workdir, TINY)
    claim_vq_workdir(workdir, TINY)   # the same architecture resumes
    with pytest.raises(ValueError, match="holds another model's run"):
        claim_vq_workdir(workdir, VQArchitecture(**{**json.loads(TINY.to_json()), "codebook_size": 32}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not empty and holds no vq_run.json"):
        claim_vq_workdir(str(tmp_path / "other"), TINY)
    with pytest.raises(AttributeError, match="num_stepz"):
        smoke_config(num_stepz=3)


def test_trainer_stops_a_diverging_run_and_keeps_its_checkpoints_intact(tmp_path):
    """Updates that overflow (finite losses) are skipped; config.max_consecutive_skips in a row stop the
    run with the steps named, after the in-flight save has finished: intact, summed, finite, unlocked."""
    from lasadgen_jax import checkpoints
    from lasadgen_jax.tokenizer.train import train_and_evaluate
    from lasadgen_jax.train_state import TrainingDiverged

    config = smoke_config(num_steps=6, checkpoint_every=1, max_consecutive_skips=2)
    config.optimizer.learning_rate = 1e39   # finite in float64 (the config check), inf in float32 (the step)
    workdir = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged, match="steps 1-2: 2 steps in a row skipped"):
        train_and_evaluate(config, str(workdir))   # step 1's save (of the initial state) is in flight then
    assert os.listdir(workdir / "checkpoints") == ["1"] and not (workdir / "lock").exists()
    assert (workdir / "checkpoints" / "1" / checkpoints.CHECKSUM_FILE).is_file()
    assert not (workdir / "tokenizer").exists()


@pytest.mark.parametrize("key, value", [("learning_rate", float("nan")), ("eps", -1.0), ("b2", 1.5)])
def test_trainer_refuses_bad_optimizer_settings_before_writing(tmp_path, key, value):
    from lasadgen_jax.tokenizer.train import train_and_evaluate

    config = smoke_config()
    config.optimizer[key] = value
    with pytest.raises(ValueError, match=f"config.optimizer.{key} must be"):
        train_and_evaluate(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_trainer_refuses_a_workdir_in_use(tmp_path):
    import socket
    import subprocess
    import sys

    from lasadgen_jax.tokenizer.train import claim_vq_workdir, train_and_evaluate

    config = smoke_config()
    workdir = tmp_path / "busy"
    claim_vq_workdir(str(workdir), VQArchitecture.from_dict(dict(config.model)))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (workdir / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(ValueError, match=f"in use by another run .*PID {holder.pid}"):
            train_and_evaluate(config, str(workdir))
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "checkpoints").exists()
