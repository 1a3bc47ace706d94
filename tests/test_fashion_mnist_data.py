"""Where Fashion-MNIST is read from: a root, $LASADGEN_FASHION_MNIST, Debian's package, the embedded subset."""

import gzip
import os

import numpy as np
import pytest

from lasadgen_jax import config_files
from lasadgen_jax.data import fashion_mnist
from lasadgen_jax.data.fashion_mnist_cut import EMBEDDED_COUNTS, cut_subset

DEBIAN_ROOT = fashion_mnist.DEBIAN_ROOT
HAS_DEBIAN = not fashion_mnist.missing_files(DEBIAN_ROOT)
CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def load_config(name: str, *args):
    path = os.path.join(CONFIGS, f"{name}.py")
    return config_files.load_config(":".join([path, *args]))


@pytest.fixture
def embedded_only(monkeypatch, tmp_path):
    """A machine without Debian's package and without $LASADGEN_FASHION_MNIST."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", str(tmp_path / "no-debian-package"))
    monkeypatch.delenv(fashion_mnist.ROOT_ENV_VAR, raising=False)


def small_copy(directory, train: int, test: int) -> str:
    """A directory of the four IDX files holding the first `train` / `test` images of the embedded subset."""
    cut_subset(fashion_mnist.EMBEDDED_ROOT, str(directory), {"train": train, "test": test})
    return str(directory)


def test_the_embedded_subset_is_read_when_nothing_else_is_found(embedded_only, capsys):
    location = fashion_mnist.resolve_location()
    assert location.embedded and location.root == fashion_mnist.EMBEDDED_ROOT
    images, labels = fashion_mnist.load_fashion_mnist("train")
    assert images.shape == (EMBEDDED_COUNTS["train"], 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (EMBEDDED_COUNTS["train"],) and set(np.unique(labels)) == set(range(10))
    assert "embedded subset of 12000 images" in capsys.readouterr().out
    test_images, _ = fashion_mnist.load_fashion_mnist("test", count=1000)   # configs/vq_small.py's eval_images
    assert test_images.shape == (1000, 32, 32, 3)
    assert (images[:, :2] == 0).all() and (images[..., 0] == images[..., 2]).all()   # black padding, grey RGB


@pytest.mark.skipif(not HAS_DEBIAN, reason=f"the full dataset ({DEBIAN_ROOT}) is not installed")
def test_the_embedded_subset_is_the_first_images_of_the_full_dataset_byte_for_byte():
    for split, names in fashion_mnist.SPLIT_FILES.items():
        for name, ndim in zip(names, (3, 1)):
            embedded = fashion_mnist.read_idx_uint8(os.path.join(fashion_mnist.EMBEDDED_ROOT, name), ndim)
            full = fashion_mnist.read_idx_uint8(os.path.join(DEBIAN_ROOT, name), ndim)
            assert len(embedded) == EMBEDDED_COUNTS[split] and len(full) == fashion_mnist.FULL_SPLIT_SIZES[split]
            assert embedded.tobytes() == full[: len(embedded)].tobytes(), name


@pytest.mark.skipif(not HAS_DEBIAN, reason=f"the full dataset ({DEBIAN_ROOT}) is not installed")
def test_the_cut_regenerates_the_embedded_files(tmp_path):
    cut_subset(DEBIAN_ROOT, str(tmp_path), EMBEDDED_COUNTS)
    for name in fashion_mnist.all_file_names():
        with gzip.open(tmp_path / name) as cut, gzip.open(os.path.join(fashion_mnist.EMBEDDED_ROOT, name)) as shipped:
            assert cut.read() == shipped.read(), name


def test_more_images_than_the_embedded_subset_holds_is_a_one_line_error(embedded_only):
    from lasadgen_jax.data.sources import open_source
    from lasadgen_jax.eval.reference import dataset_images

    attempts = {"load 60000": lambda: fashion_mnist.load_fashion_mnist("train", count=60000),
                "extraction": lambda: open_source("fashion_mnist", "train", max_images=12001),
                "reference": lambda: dataset_images("fashion_mnist:test:2001")}
    for what, attempt in attempts.items():
        with pytest.raises(ValueError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message, what
        for needed in ("apt-get install -y dataset-fashion-mnist", "$LASADGEN_FASHION_MNIST", "fashion_mnist_root",
                       "embedded subset"):
            assert needed in message, (what, message)


def test_the_resolution_order(monkeypatch, tmp_path, embedded_only):
    from_env = small_copy(tmp_path / "env", train=7, test=3)
    explicit = small_copy(tmp_path / "explicit", train=5, test=4)
    monkeypatch.setenv(fashion_mnist.ROOT_ENV_VAR, from_env)
    assert fashion_mnist.resolve_location() == fashion_mnist.DataLocation(from_env, "$LASADGEN_FASHION_MNIST")
    assert len(fashion_mnist.load_fashion_mnist("train")[0]) == 7
    assert len(fashion_mnist.load_fashion_mnist("train", explicit)[0]) == 5   # an explicit root wins
    assert fashion_mnist.resolve_location(fashion_mnist.EMBEDDED_ROOT).embedded   # and may name the subset
    with pytest.raises(ValueError, match=r"6 images asked for, but .*explicit \(from fashion_mnist_root\) holds only"):
        fashion_mnist.load_fashion_mnist("train", explicit, count=6)

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(fashion_mnist.ROOT_ENV_VAR, str(empty))   # a named root without the files: no fallback
    with pytest.raises(FileNotFoundError, match=r"\$LASADGEN_FASHION_MNIST is .*lacks train-images-idx3-ubyte.gz"):
        fashion_mnist.load_fashion_mnist("train")
    with pytest.raises(FileNotFoundError, match="fashion_mnist_root is .*lacks"):
        fashion_mnist.load_fashion_mnist("test", str(tmp_path / "typo"))


@pytest.mark.skipif(not HAS_DEBIAN, reason=f"the full dataset ({DEBIAN_ROOT}) is not installed")
def test_debian_package_comes_after_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(fashion_mnist.ROOT_ENV_VAR, raising=False)
    assert fashion_mnist.resolve_location().root == DEBIAN_ROOT
    monkeypatch.setenv(fashion_mnist.ROOT_ENV_VAR, small_copy(tmp_path, train=2, test=2))
    assert fashion_mnist.resolve_location().root == str(tmp_path)


def test_every_consumer_honours_the_root(tmp_path, embedded_only):
    from lasadgen_jax.data.sources import open_source
    from lasadgen_jax.eval.reference import _cache_path, dataset_images
    from lasadgen_jax.tokenizer.train import load_training_data

    root = small_copy(tmp_path / "root", train=9, test=6)
    config = load_config("vq_small", "smoke")
    config.data.update(fashion_mnist_root=root, eval_images=4)
    train_images, test_images = load_training_data(config)
    assert train_images.shape == (9, 32, 32, 3) and test_images.shape == (4, 32, 32, 3)
    assert len(open_source("fashion_mnist", "test", fashion_mnist_root=root)) == 6
    assert len(open_source("fashion_mnist", "train", fashion_mnist_root=root, max_images=3)) == 3
    embedded_test_images = fashion_mnist.load_fashion_mnist("test")[0]
    np.testing.assert_array_equal(dataset_images("fashion_mnist:test", root), embedded_test_images[:6])

    class Extractor:
        weights_id = "w"

    # A reference cached from one copy of the data is not read back for another.
    assert _cache_path("fashion_mnist:test", Extractor(), str(tmp_path), root) != _cache_path(
        "fashion_mnist:test", Extractor(), str(tmp_path))


def test_the_demo_sets_every_consumers_root_with_one_field():
    config = load_config("demo")
    assert config.prepare.fashion_mnist_root is None and config.eval.fashion_mnist_root is None
    config.prepare.fashion_mnist_root = "/data/fashion-mnist"
    assert config.prepare.vq.data.fashion_mnist_root == "/data/fashion-mnist"
    assert config.eval.fashion_mnist_root == "/data/fashion-mnist"


def test_the_tokenizer_trains_on_the_embedded_subset(embedded_only, tmp_path, capsys):
    from lasadgen_jax.tokenizer.train import train_and_evaluate

    config = load_config("vq_small", "smoke")
    config.num_steps = 2
    config.checkpoint_every = 2
    result = train_and_evaluate(config, str(tmp_path / "vq"))
    assert result["eval_images"] == config.data.eval_images and np.isfinite(result["psnr_db"])
    assert "embedded subset of 12000 images" in capsys.readouterr().out
