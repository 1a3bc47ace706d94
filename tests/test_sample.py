"""Sampling: guidance, filtering, greedy self-consistency, the null class, params on disk, the CLI."""

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
from helpers import fake_devices_flags, start_processes, tiny_model, tiny_vq_architecture

from lasadgen_jax import model_io, sample
from lasadgen_jax.models.lasadgen import LASADGen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = sample.SamplingConfig(temperature=0.0)


def test_guidance_scale_one_gives_the_conditional_logits():
    cond, uncond = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 50))
    np.testing.assert_allclose(sample.guided_logits(cond, uncond, 1.0), cond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sample.guided_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond), rtol=1e-6)
    linear = sample.SamplingConfig(cfg_scale=4.0, cfg_schedule="linear")
    assert float(sample.cfg_scale_at(0, 16, linear)) == 1.0
    assert float(sample.cfg_scale_at(15, 16, linear)) == pytest.approx(4.0)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda k, p: np.isfinite(np.asarray(sample.filter_logits(logits, k, p)))[0].tolist()
    assert kept(2, 1.0) == [True, False, True, False]
    assert kept(0, 0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0, 0.6) == [True, False, True, False]  # 0.5 + 0.3
    assert kept(0, 0.9) == [True, False, True, True]
    assert kept(0, 1.0) == [True, True, True, True]


@pytest.mark.parametrize(
    "attention, grid",
    [("2d", (3, 5)), ("2d_row", (3, 5)), ("softmax", (3, 5)), ("2d", (1, 5)), ("2d", (4, 1)), ("2d_row", (4, 1))],
)
def test_greedy_tokens_are_the_argmax_of_the_parallel_forward(attention, grid):
    model = tiny_model(attention, grid=grid)
    labels = jnp.array([0, 2, 4], jnp.int32)
    tokens = sample.generate(model, labels, jax.random.PRNGKey(0), GREEDY)
    assert tokens.shape == (3, *grid) and tokens.dtype == jnp.int32
    flat = tokens.reshape(3, grid[0] * grid[1])
    np.testing.assert_array_equal(np.argmax(model(flat, labels), axis=-1), flat)


@pytest.mark.parametrize("attention", ["2d", "softmax"])
def test_guided_greedy_tokens_follow_the_guided_parallel_logits_and_a_sweep_compiles_once(attention):
    """Greedy with CFG s: each token is argmax(u + s (c - u)) of the parallel forward on the sampled
    grid; a second scale reuses the compiled sampler (the scale is traced, not static)."""
    model = tiny_model(attention, grid=(3, 4))
    model.eval()
    labels = jnp.array([0, 2], jnp.int32)
    null = jnp.full_like(labels, model.class_embedder.null_class)
    compiled_before = None
    for scale in (2.5, 4.0):
        tokens = sample.generate(model, labels, jax.random.PRNGKey(0),
                                 sample.SamplingConfig(cfg_scale=scale, temperature=0.0))
        flat = tokens.reshape(2, 12)
        guided = sample.guided_logits(model(flat, labels), model(flat, null), scale)
        np.testing.assert_array_equal(np.argmax(guided, axis=-1), flat)
        if compiled_before is None:
            compiled_before = sample._generate._cache_size()
    assert sample._generate._cache_size() == compiled_before


def test_top_k_one_equals_greedy():
    model = tiny_model("2d")
    labels = jnp.array([1, 3], jnp.int32)
    greedy = sample.generate(model, labels, jax.random.PRNGKey(0), GREEDY)
    top1 = sample.generate(model, labels, jax.random.PRNGKey(7), sample.SamplingConfig(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(top1, greedy)


def test_unconditional_half_uses_the_null_class():
    """Guidance scale 0 keeps only the unconditional logits: greedy then equals null-class greedy."""
    model = tiny_model("2d")
    labels = jnp.array([0, 1, 2], jnp.int32)
    only_uncond = sample.generate(model, labels, jax.random.PRNGKey(0),
                                  sample.SamplingConfig(cfg_scale=0.0, temperature=0.0))
    null = jnp.full_like(labels, model.class_embedder.null_class)
    np.testing.assert_array_equal(only_uncond, sample.generate(model, null, jax.random.PRNGKey(0), GREEDY))
    conditional = sample.generate(model, labels, jax.random.PRNGKey(0), GREEDY)
    assert not np.array_equal(only_uncond, conditional)


def test_seeds_reproduce_and_differ():
    model = tiny_model("2d_row")
    labels = jnp.array([1, 1, 2, 3, 4], jnp.int32)
    config = sample.SamplingConfig(cfg_scale=2.0, temperature=1.0, top_p=0.9)
    first = sample.generate(model, labels, jax.random.PRNGKey(5), config)
    np.testing.assert_array_equal(first, sample.generate(model, labels, jax.random.PRNGKey(5), config))
    assert not np.array_equal(first, sample.generate(model, labels, jax.random.PRNGKey(6), config))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=-2), "top_k must be"),
        (dict(cfg_schedule="cosine"), "cfg_schedule must be one of"),
    ],
)
def test_bad_sampling_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample.SamplingConfig(**kwargs)


def test_class_id_out_of_range_raises():
    model = tiny_model("2d")
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\]"):
        sample.generate(model, jnp.array([0, 9], jnp.int32), jax.random.PRNGKey(0), GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        sample.parse_classes("1,7", num_classes=5)


def test_params_round_trip_through_a_checkpoint(tmp_path):
    model = tiny_model("2d")
    model_io.save_params(model, str(tmp_path / "params"))
    fresh = LASADGen(model.config, rngs=nnx.Rngs(123))
    model_io.load_params(fresh, str(tmp_path / "params"))
    fresh.eval()
    tokens = jnp.zeros((1, 16), jnp.int32)
    labels = jnp.array([2], jnp.int32)
    np.testing.assert_array_equal(fresh(tokens, labels), model(tokens, labels))
    other = LASADGen(dataclasses.replace(model.config, dim=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not fit this model config"):
        model_io.load_params(other, str(tmp_path / "params"))


def test_a_small_request_runs_a_batch_of_its_size_not_batch_size(monkeypatch):
    """4 images with batch_size 32 run one batch of 4 rows (counted at the jitted sampler), in
    generate_in_batches and in the FID sampling loop; 9 with batch_size 4 run 4 + 4 + 1."""
    from lasadgen_jax.eval import scores
    from lasadgen_jax.tokenizer.model import create_vq_model

    arch = tiny_vq_architecture()
    model = tiny_model("2d")  # 4x4 grids of ids < 40: valid codes of the 4x4-code, 64-entry tokenizer
    original, batch_rows = sample._generate, []

    def counting_generate(graphdef, params, labels, *args, **kwargs):
        batch_rows.append(labels.shape[0])
        return original(graphdef, params, labels, *args, **kwargs)

    monkeypatch.setattr(sample, "_generate", counting_generate)
    config = sample.SamplingConfig(cfg_scale=2.0)
    tokens = sample.generate_in_batches(model, np.array([0, 1, 2, 3]), jax.random.PRNGKey(0), config, batch_size=32)
    assert tokens.shape == (4, 4, 4) and batch_rows == [4]
    batch_rows.clear()
    images, labels = scores.sample_images(model, create_vq_model(arch), 4, jax.random.PRNGKey(0), config,
                                          batch_size=32, progress=False)
    assert images.shape == (4, 16, 16, 3) and labels.tolist() == [0, 1, 2, 3] and batch_rows == [4]
    batch_rows.clear()
    tokens = sample.generate_in_batches(model, np.arange(9) % 5, jax.random.PRNGKey(0), config, batch_size=4)
    assert tokens.shape == (9, 4, 4) and batch_rows == [4, 4, 1]


def test_batches_follow_one_key_split_per_batch():
    """Batch i of generate_in_batches uses the i-th split of the key: the same tokens as generate on that batch."""
    model = tiny_model("2d_row")
    config = sample.SamplingConfig(cfg_scale=3.0, top_k=8)
    labels = np.array([4, 0, 1, 2, 3], np.int32)
    got = sample.generate_in_batches(model, labels, jax.random.PRNGKey(3), config, batch_size=3)
    key, first_key = jax.random.split(jax.random.PRNGKey(3))
    _, second_key = jax.random.split(key)
    np.testing.assert_array_equal(got[:3], sample.generate(model, labels[:3], first_key, config))
    np.testing.assert_array_equal(got[3:], sample.generate(model, labels[3:], second_key, config))
    with pytest.raises(ValueError, match="batch_size >= 1"):
        sample.generate_in_batches(model, labels, jax.random.PRNGKey(3), config, batch_size=0)


DATA_PARALLEL_SCRIPT = r"""
import sys
import jax
import numpy as np
sys.path.insert(0, sys.argv[1])
from helpers import tiny_model
from lasadgen_jax import sample

assert jax.local_device_count() == 8, jax.local_devices()
original, placements = sample._generate, []

def recording_generate(graphdef, params, labels, *args, **kwargs):
    placements.append((labels.shape[0], len(labels.sharding.device_set)))
    return original(graphdef, params, labels, *args, **kwargs)

sample._generate = recording_generate
for attention, cfg_scale in (("2d", 3.0),):  # guided: the (label, null class) row pairs split over devices
    model = tiny_model(attention, grid=(3, 4))
    config = sample.SamplingConfig(cfg_scale=cfg_scale, temperature=1.0, top_p=0.95)
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 2], np.int32)
    placements.clear()
    spread = sample.generate_in_batches(model, labels, jax.random.PRNGKey(1), config, batch_size=10)
    # 11 labels, batch_size 10: a batch of 10 padded to 16 rows, then 1 padded to 8, each over 8 devices.
    assert placements == [(16, 8), (8, 8)], placements
    placements.clear()
    alone = sample.generate_in_batches(model, labels, jax.random.PRNGKey(1), config, batch_size=10,
                                       devices=jax.local_devices()[:1])
    assert placements == [(10, 1), (1, 1)], placements
    np.testing.assert_array_equal(spread, alone)
    assert spread.shape == (11, 3, 4) and len(np.unique(spread)) > 3, spread
print("ok")
"""


@pytest.mark.xdist_group("fake_devices")  # tests/run.sh: --dist loadgroup
def test_sampling_split_over_8_devices_gives_the_tokens_of_one_device():
    env = dict(os.environ, XLA_FLAGS=fake_devices_flags(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT, os.path.join(REPO, "tests")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "lasadgen_jax.sample", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )


def test_command_line_writes_token_grids_and_decoded_images(tmp_path):
    from lasadgen_jax.tokenizer import save_tokenizer
    from lasadgen_jax.tokenizer.model import create_vq_model

    tokenizer_dir = tmp_path / "tokenizer"
    arch = tiny_vq_architecture()  # codebook 64, 4x downsampling
    save_tokenizer(create_vq_model(arch), str(tokenizer_dir))
    out = tmp_path / "samples"
    result = run_cli(
        "--config=configs/imagenet256.py:size=B,attention=2d", "--config.model.depth=1",
        "--config.model.grid=(3,4)", f"--config.model.vocab_size={arch.codebook_size}", "--random_init",
        "--classes=3,5", "--num=2", "--batch_size=3", "--cfg_scale=2", f"--tokenizer={tokenizer_dir}", f"--out={out}",
        "--decode_state_dtype=bfloat16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "sampling.json").read_text())["model"]["decode_state_dtype"] == "bfloat16"
    data = np.load(out / "tokens.npz")
    assert data["tokens"].shape == (4, 3, 4) and data["labels"].tolist() == [3, 3, 5, 5]
    images = np.load(out / "images.npz")["arr_0"]
    assert images.shape == (4, 12, 16, 3) and images.dtype == np.uint8
    assert (out / "tokens.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0
    assert "Wrote 4 samples" in result.stdout and "images/s" in result.stdout


def test_command_line_refuses_a_tokenizer_of_another_codebook(tmp_path):
    from lasadgen_jax.tokenizer import save_tokenizer
    from lasadgen_jax.tokenizer.model import create_vq_model

    save_tokenizer(create_vq_model(tiny_vq_architecture()), str(tmp_path / "tokenizer"))
    result = run_cli(
        "--config=configs/imagenet256.py:size=B", "--config.model.depth=1", "--config.model.grid=(2,2)",
        "--random_init", f"--tokenizer={tmp_path / 'tokenizer'}", f"--out={tmp_path / 'out'}",
    )
    assert result.returncode == 2
    assert "has a codebook of 64, the model's vocab_size is 16384" in result.stderr


def test_command_line_refuses_bad_classes(tmp_path):
    result = run_cli(
        "--config=configs/imagenet256.py:size=B", "--config.model.depth=1", "--config.model.grid=(2,2)",
        "--random_init", "--classes=1000", f"--out={tmp_path}",
    )
    assert result.returncode == 2
    assert "--classes [1000] out of range [0, 999]" in result.stderr


def test_command_line_refuses_an_out_that_is_a_file_before_sampling(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_cli(
        "--config=configs/imagenet256.py:size=B", "--config.model.depth=1", "--config.model.grid=(2,2)",
        "--random_init", f"--out={tmp_path / 'a_file'}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'a_file'} is a file, not a directory; choose another --out"]


def test_command_line_errors_are_one_line(tmp_path):
    result = run_cli("--config=configs/no_such_config.py", "--random_init", f"--out={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --config configs/no_such_config.py: [Errno 2] No such file or directory: 'configs/no_such_config.py'"]
    result = run_cli("--random_init", f"--out={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --random_init needs --config=... (the model to initialise)"


# ----------------------------------------------------------------------------- several processes


def test_host_batches_deal_every_batch_once():
    dealt = [list(sample.host_batches(7, index, 3)) for index in range(3)]
    assert dealt == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(sample.host_batches(1, 1, 2)) == []


def test_processes_share_a_request_and_each_returns_all_of_it(tmp_path):
    """Two processes of two devices each sample every other batch; both return the whole request, equal to
    one process sampling it alone, also when one process has no batch of its own, and when the parameters are
    arrays over both processes' devices (replicated or split, as the trainer's periodic evaluation passes them)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import sample_hosts

    start_processes([sys.executable, os.path.join(REPO, "tests", "sample_hosts.py"), str(tmp_path)], str(tmp_path))
    alone = sample_hosts.sample_requests()
    assert alone["four_batches_rows_sampled_here"].tolist() == [2, 2, 2, 1]
    shared = [np.load(tmp_path / f"process_{index}.npz") for index in range(2)]
    assert [s["four_batches_rows_sampled_here"].tolist() for s in shared] == [[2, 2], [2, 1]]   # batches 0, 2 | 1, 3
    assert [s["one_batch_rows_sampled_here"].tolist() for s in shared] == [[2], []]
    for index in range(2):
        for name in sample_hosts.REQUESTS:
            np.testing.assert_array_equal(shared[index][name], alone[name], err_msg=f"process {index}, {name}")
            np.testing.assert_array_equal(shared[index][f"spread_{name}"], alone[name],   # trainer-held parameters
                                          err_msg=f"process {index}, {name}, parameters over both processes")


def test_command_line_on_two_processes_writes_once_what_one_process_writes(tmp_path):
    args = ["--config=configs/imagenet256.py:size=B,attention=2d_row", "--config.model.depth=1",
            "--config.model.grid=(2,3)", "--config.model.vocab_size=64", "--random_init", "--classes=1,2,3",
            "--num=3", "--batch_size=2", "--cfg_scale=2", "--seed=4"]
    alone = run_cli(*args, f"--out={tmp_path / 'alone'}")
    assert alone.returncode == 0, alone.stderr[-3000:]
    shared = tmp_path / "shared"
    logs = start_processes([sys.executable, "-m", "lasadgen_jax.sample", *args, f"--out={shared}"], str(tmp_path))
    assert "of 2 processes" in logs[0] and "process 0 writes them" in logs[1]
    assert sorted(os.listdir(shared)) == ["sampling.json", "tokens.npz", "tokens.png"]
    np.testing.assert_array_equal(np.load(shared / "tokens.npz")["tokens"],
                                  np.load(tmp_path / "alone" / "tokens.npz")["tokens"])


def test_a_rerun_loads_its_compiled_programs_from_the_compilation_cache(tmp_path):
    """cli.run's --compilation_cache_dir: the first run writes every compiled program (all are kept here, whatever
    their compile time), the rerun reads the sampler back and writes nothing new; '' leaves the cache alone."""
    cache = tmp_path / "cache"
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environment.update(PYTHONPATH=REPO, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args = ["--config=configs/imagenet256.py:size=B,attention=2d", "--config.model.depth=1",
            "--config.model.grid=(2,3)", "--config.model.vocab_size=64", "--random_init", "--classes=1,2", "--num=2",
            "--cfg_scale=2", f"--compilation_cache_dir={cache}"]

    def run(out, *extra):
        done = subprocess.run([sys.executable, "-m", "lasadgen_jax.sample", *args, *extra, f"--out={tmp_path / out}"],
                              cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return np.load(tmp_path / out / "tokens.npz")["tokens"]

    def sampler_access_times():   # the cache stamps an entry's -atime file when it writes or reads it
        return {p.name: int.from_bytes(p.read_bytes(), "little") for p in cache.glob("jit__generate*-atime")}

    def program_mtimes():   # a write (a miss, compiled again) would replace the file
        return {p.name: p.stat().st_mtime_ns for p in cache.glob("*-cache")}

    first = run("first")
    programs = program_mtimes()
    written = sampler_access_times()
    assert len(written) == 1, sorted(programs)
    np.testing.assert_array_equal(run("second"), first)
    assert program_mtimes() == programs
    read = sampler_access_times()
    assert read.keys() == written.keys() and all(read[name] > written[name] for name in read)
    np.testing.assert_array_equal(run("off", "--compilation_cache_dir="), first)
    assert program_mtimes() == programs and sampler_access_times() == read
    (tmp_path / "a_file").write_text("")
    done = subprocess.run([sys.executable, "-m", "lasadgen_jax.sample", *args, f"--out={tmp_path / 'unwritable'}",
                           f"--compilation_cache_dir={tmp_path / 'a_file' / 'cache'}"],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "warning: compilation cache off:" in done.stderr, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "unwritable" / "tokens.npz")["tokens"], first)
