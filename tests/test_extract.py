"""Token extraction: crops, the record layout, shards that hold the encoder's codes, resuming, hosts."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from flax import nnx
from helpers import tiny_vq_architecture
from PIL import Image

from lasadgen_jax.data import crops, extract, records, sources
from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.sources import ImageFolderSource, open_source
from lasadgen_jax.tokenizer import load_tokenizer, save_tokenizer
from lasadgen_jax.tokenizer.model import create_vq_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16          # tiny VQ: 16x16 crops -> 4x4 codes
GOOD_IMAGES = {"cat": [(20, 24), (30, 18), (16, 16)], "dog": [(40, 33), (17, 21)]}
ENCODE = nnx.jit(lambda model, images: model.encode(images.astype(jnp.float32) / 127.5 - 1.0))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer") / "tiny")
    save_tokenizer(create_vq_model(tiny_vq_architecture(), seed=0), directory)
    return directory


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of random JPEGs of odd sizes, one truncated JPEG, and a non-image file (ignored)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, sizes in GOOD_IMAGES.items():
        os.makedirs(root / name)
        for number, (height, width) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{number}.jpg", quality=95)
    whole = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "9_truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


def read_shard(path):
    reader = ArrayRecordReader(path)
    try:
        return [records.decode_record(record) for record in reader.read_all()]
    finally:
        reader.close()


def read_all_records(out):
    manifest = manifests.read_manifest(out)
    return [record for shard in manifest["shards"] for record in read_shard(os.path.join(out, shard["file"]))]


def expected_records(tokenizer_dir, source, mode):
    """What the shards must hold: the tokenizer's codes of each readable image's crops, in source order."""
    model = load_tokenizer(tokenizer_dir)
    expected = []
    for index in range(len(source)):
        image, label = source.load(index)
        if image is not None:
            codes = np.asarray(ENCODE(model, jnp.asarray(crops.make_crops(image, IMAGE_SIZE, mode))))
            expected.append((codes.reshape(codes.shape[0], -1), label))
    return expected


def run(tokenizer_dir, source, out, **kwargs):
    options = dict(image_size=IMAGE_SIZE, crops="flip", shard_size=2, batch_size=3, workers=2)
    return extract.extract(tokenizer_dir, source, str(out), **{**options, **kwargs})


# ---------------------------------------------------------------- crops and records


def test_five_and_ten_crops_follow_torchvision_order():
    image = np.arange(7 * 9 * 3, dtype=np.int64).reshape(7, 9, 3)
    tl, tr, bl, br, center = crops.five_crop(image, 4)
    np.testing.assert_array_equal(tl, image[:4, :4])
    np.testing.assert_array_equal(tr, image[:4, 5:])
    np.testing.assert_array_equal(bl, image[3:, :4])
    np.testing.assert_array_equal(br, image[3:, 5:])
    np.testing.assert_array_equal(center, image[2:6, 2:6])   # round(1.5) = 2, round(2.5) = 2


def test_make_crops_tencrop_and_flip():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ten = crops.make_crops(image, 16, "tencrop")
    assert ten.shape == (10, 16, 16, 3) and ten.dtype == np.uint8
    square = crops.center_crop_resized(image, int(16 * 1.1))
    assert square.shape == (17, 17, 3)
    np.testing.assert_array_equal(ten[:5], np.stack(crops.five_crop(square, 16)))
    np.testing.assert_array_equal(ten[5], square[:, ::-1][:16, :16])   # the mirror's top-left
    flip = crops.make_crops(image, 16, "flip")
    assert flip.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(flip[1], flip[0][:, ::-1])
    with pytest.raises(ValueError, match="unknown --crops 'fivecrop'"):
        crops.make_crops(image, 16, "fivecrop")


def test_center_crop_keeps_the_center_of_a_wide_image():
    image = np.zeros((40, 200, 3), np.uint8)
    image[:, 90:110] = 255                          # a white band: the middle tenth
    square = crops.center_crop_resized(image, 20)   # box-halved once, bicubic to 20x100, then columns 40..60
    assert square.shape == (20, 20, 3)
    assert square[:, 7:13].min() > 200 and square[:, :3].max() < 30 and square[:, -3:].max() < 30


def test_record_layout_round_trip_and_refusals():
    codes = np.array([[0, 5, 16383], [7, 8, 9]])
    record = records.encode_record(codes, 417, records.code_bytes_for(16384))
    assert len(record) == 20 + 6 * 2
    assert record[:4] == b"LTOK"
    decoded, label = records.decode_record(record)
    np.testing.assert_array_equal(decoded, codes)
    assert decoded.dtype == np.int32 and label == 417
    assert records.code_bytes_for(32768) == 2 and records.code_bytes_for(32769) == 4
    wide = records.encode_record(np.array([[70000]]), 3, 4)
    assert records.decode_record(wide)[0][0, 0] == 70000
    with pytest.raises(ValueError, match="needs 32"):
        records.decode_record(record[:-1])
    with pytest.raises(ValueError, match="not a version-1 token record"):
        records.decode_record(b"XXXX" + record[4:])
    with pytest.raises(ValueError, match="outside"):
        records.encode_record(np.array([[40000]]), 0, 2)


def test_batch_decoding_equals_record_decoding_and_checks_headers():
    rng = np.random.default_rng(2)
    batch = [records.encode_record(rng.integers(0, 1000, (3, 5)), label, 2) for label in range(4)]
    codes, labels = records.decode_records(batch, 3, 5)
    for record, record_codes, label in zip(batch, codes, labels):
        want_codes, want_label = records.decode_record(record)
        np.testing.assert_array_equal(record_codes, want_codes)
        assert label == want_label
    with pytest.raises(ValueError, match="4 crops x 5 tokens x 2 bytes need 60"):
        records.decode_records(batch, 4, 5)
    with pytest.raises(ValueError, match="expected magic b'LTOK', version 1, 5 crops x 3 tokens"):
        records.decode_records(batch, 5, 3)
    wrong_magic = batch[:2] + [b"XXXX" + batch[2][4:]] + batch[3:]
    with pytest.raises(ValueError, match="token record 2 of the batch has header"):
        records.decode_records(wrong_magic, 3, 5)
    with pytest.raises(ValueError, match="needs 50"):
        records.decode_records(batch[:3] + [batch[3][:-2]], 3, 5)


# ---------------------------------------------------------------- extraction


def test_imagefolder_source_labels_and_corrupt_file(image_folder):
    source = ImageFolderSource(image_folder)
    assert source.classes == ["cat", "dog"] and len(source) == 6   # notes.txt is not an image
    loaded = [source.load(i) for i in range(len(source))]
    assert [label for _, label in loaded] == [0, 0, 0, 0, 1, 1]
    assert [image is None for image, _ in loaded] == [False, False, False, True, False, False]
    assert loaded[1][0].shape == (30, 18, 3)


def test_extracted_shards_hold_the_encoders_codes(tokenizer_dir, image_folder, tmp_path):
    out = tmp_path / "tokens"
    summary = run(tokenizer_dir, f"imagefolder:{image_folder}", out)
    assert summary["written"] == [0, 1, 2] and summary["skipped_finished"] == []
    manifest = manifests.read_manifest(str(out))
    assert manifest["num_records"] == 5 and manifest["num_skipped"] == 1
    assert manifest["spec"]["grid"] == [4, 4] and manifest["spec"]["codebook_size"] == 64
    assert manifest["spec"]["num_crops"] == 2 and manifest["spec"]["code_bytes"] == 2
    assert [shard["records"] for shard in manifest["shards"]] == [2, 1, 2]   # shard 1 lost the truncated file
    got = read_all_records(str(out))
    want = expected_records(tokenizer_dir, ImageFolderSource(image_folder), "flip")
    assert len(got) == len(want) == 5
    for (codes, label), (want_codes, want_label) in zip(got, want):
        np.testing.assert_array_equal(codes, want_codes)
        assert label == want_label
    assert not np.array_equal(got[0][0][0], got[0][0][1]), "a flip should change the codes of a random image"
    assert not any(name.count(".tmp") for name in os.listdir(out)), "temporary files left behind"


def test_rerun_skips_finished_shards_and_redoes_missing_ones(tokenizer_dir, image_folder, tmp_path):
    out = tmp_path / "tokens"
    run(tokenizer_dir, f"imagefolder:{image_folder}", out)
    shard = lambda k: out / manifests.shard_name(k, 3)
    stamps = {k: os.stat(shard(k)).st_mtime_ns for k in range(3)}
    again = run(tokenizer_dir, f"imagefolder:{image_folder}", out)
    assert again["written"] == [] and again["skipped_finished"] == [0, 1, 2]
    assert {k: os.stat(shard(k)).st_mtime_ns for k in range(3)} == stamps
    # A shard without its sidecar (a crash between the two renames) counts as unfinished.
    os.remove(manifests.sidecar_path(str(shard(1))))
    os.remove(shard(1))
    third = run(tokenizer_dir, f"imagefolder:{image_folder}", out)
    assert third["written"] == [1] and third["manifest"]["num_records"] == 5
    assert os.stat(shard(0)).st_mtime_ns == stamps[0]


def test_resume_with_another_tokenizer_is_refused(tokenizer_dir, image_folder, tmp_path):
    out = tmp_path / "tokens"
    run(tokenizer_dir, f"imagefolder:{image_folder}", out)
    other = str(tmp_path / "other_tokenizer")
    save_tokenizer(create_vq_model(tiny_vq_architecture(), seed=1), other)
    with pytest.raises(ValueError, match="shards of another extraction"):
        run(other, f"imagefolder:{image_folder}", out)
    with pytest.raises(ValueError, match="shards of another extraction"):
        run(tokenizer_dir, f"imagefolder:{image_folder}", out, crops="tencrop")


def test_hosts_write_disjoint_shards_and_the_last_writes_the_manifest(tokenizer_dir, image_folder, tmp_path):
    out = tmp_path / "tokens"
    first = run(tokenizer_dir, f"imagefolder:{image_folder}", out, process_index=0, process_count=2)
    assert first["written"] == [0, 2] and first["manifest"] is None
    assert not os.path.exists(out / manifests.MANIFEST_FILE)
    second = run(tokenizer_dir, f"imagefolder:{image_folder}", out, process_index=1, process_count=2)
    assert second["written"] == [1] and second["manifest"]["num_records"] == 5
    single = tmp_path / "single"
    run(tokenizer_dir, f"imagefolder:{image_folder}", single)
    for (codes, label), (single_codes, single_label) in zip(read_all_records(str(out)), read_all_records(str(single))):
        np.testing.assert_array_equal(codes, single_codes)
        assert label == single_label


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lasadgen_jax.data.extract", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)


def test_tencrop_extraction_through_the_cli(tokenizer_dir, image_folder, tmp_path):
    out = tmp_path / "tokens"
    result = run_cli(f"--tokenizer={tokenizer_dir}", f"--source=imagefolder:{image_folder}",
                     f"--image_size={IMAGE_SIZE}", "--crops=tencrop", f"--out={out}", "--shard_size=4",
                     "--batch_size=2", "--workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifests.read_manifest(str(out))["spec"]["shard_size"] == 4 and len(os.listdir(out)) == 5
    got = read_all_records(str(out))
    want = expected_records(tokenizer_dir, ImageFolderSource(image_folder), "tencrop")
    assert [codes.shape for codes, _ in got] == [(10, 16)] * 5
    for (codes, label), (want_codes, want_label) in zip(got, want):
        np.testing.assert_array_equal(codes, want_codes)
        assert label == want_label


def test_image_size_defaults_to_the_tokenizers_and_another_is_refused(tokenizer_dir, image_folder, tmp_path):
    trained_at_16 = str(tmp_path / "tokenizer16")
    save_tokenizer(create_vq_model(tiny_vq_architecture(), seed=0), trained_at_16, image_size=IMAGE_SIZE)
    options = dict(crops="flip", shard_size=10, batch_size=3, workers=1, max_images=2)
    summary = extract.extract(trained_at_16, f"imagefolder:{image_folder}", str(tmp_path / "default"), **options)
    assert summary["manifest"]["spec"]["image_size"] == IMAGE_SIZE
    with pytest.raises(ValueError, match=r"--image_size=32, but the tokenizer .* was trained at 16 px.*"
                                         r"--allow_other_image_size"):
        extract.extract(trained_at_16, f"imagefolder:{image_folder}", str(tmp_path / "big"), image_size=32, **options)
    assert not os.path.exists(tmp_path / "big")
    summary = extract.extract(trained_at_16, f"imagefolder:{image_folder}", str(tmp_path / "big"), image_size=32,
                              allow_other_image_size=True, **options)
    assert summary["manifest"]["spec"]["image_size"] == 32
    with pytest.raises(ValueError, match="does not record the image size it was trained at; give --image_size"):
        extract.extract(tokenizer_dir, f"imagefolder:{image_folder}", str(tmp_path / "unrecorded"), **options)


def test_outputs_are_checked_before_the_work(tokenizer_dir, image_folder, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_cli(f"--tokenizer={tokenizer_dir}", f"--source=imagefolder:{image_folder}",
                     f"--image_size={IMAGE_SIZE}", f"--out={tmp_path / 'a_file'}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'a_file'} is a file, not a directory; choose another --out"]


def test_max_images_takes_the_first_images(tokenizer_dir, image_folder, tmp_path):
    summary = run(tokenizer_dir, f"imagefolder:{image_folder}", tmp_path / "tokens", max_images=4, shard_size=10)
    manifest = summary["manifest"]
    assert manifest["spec"]["num_images"] == 4 and summary["num_shards"] == 1
    assert manifest["num_records"] == 3 and manifest["num_skipped"] == 1   # the 4th image is the truncated one
    assert [label for _, label in read_all_records(str(tmp_path / "tokens"))] == [0, 0, 0]


def test_bad_arguments_are_refused(tokenizer_dir, image_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown --source 'imagenet'"):
        open_source("imagenet")
    with pytest.raises(ValueError, match="is not a directory"):
        open_source(f"imagefolder:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="not a positive multiple of the tokenizer's downsample factor 4"):
        run(tokenizer_dir, f"imagefolder:{image_folder}", tmp_path / "out", image_size=18)
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        run(str(tmp_path), f"imagefolder:{image_folder}", tmp_path / "out")


def test_tfds_mock_imagenet2012(tokenizer_dir, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is the optional extra tfds")
    out = tmp_path / "tokens"
    with tfds.testing.mock_data(num_examples=5):
        summary = run(tokenizer_dir, "tfds:imagenet2012", out, shard_size=3)
        source = open_source("tfds:imagenet2012", "train")
        want = expected_records(tokenizer_dir, source, "flip")
    assert summary["manifest"]["num_records"] == 5 and summary["manifest"]["spec"]["num_classes"] == 1000
    got = read_all_records(str(out))
    for (codes, label), (want_codes, want_label) in zip(got, want):
        np.testing.assert_array_equal(codes, want_codes)
        assert label == want_label


# ---------------------------------------------------------------- odd inputs and failures


def test_16_bit_greyscale_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """value >> 8: 0 -> 0, 65535 -> 255, 8-bit values stretched to 16 bits (v * 257) back to v exactly."""
    values = np.array([[0, 255, 256, 20000], [257 * 17, 257 * 200, 65280, 65535]], np.uint16)
    for name in ("cat/grey16.png", "dog/grey16.tif"):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        Image.fromarray(values).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I;16"
    source = ImageFolderSource(str(tmp_path))
    want = np.array([[0, 0, 1, 78], [17, 200, 255, 255]], np.uint8)
    for index in range(len(source)):
        image, _ = source.load(index)
        assert image.dtype == np.uint8 and image.shape == (2, 4, 3)
        np.testing.assert_array_equal(image, np.repeat(want[..., None], 3, axis=-1))
    np.testing.assert_array_equal(sources.to_rgb(values)[..., 0], want)        # uint16 arrays (tfds) alike
    with pytest.raises(ValueError, match="expected uint8 or uint16 pixels, got float32"):
        sources.to_rgb(values.astype(np.float32))
    Image.fromarray(values.astype(np.int32) * 4).save(tmp_path / "cat" / "int32.tif")   # no known range: unreadable
    wide = ImageFolderSource(str(tmp_path))
    assert wide.load([path for path, _ in wide.files].index(str(tmp_path / "cat" / "int32.tif")))[0] is None


def test_a_class_directory_without_images_is_refused_or_skipped_by_choice(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("ant", "cat"):
        os.makedirs(tmp_path / name)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name / "0.png")
    os.makedirs(tmp_path / "bee")                              # empty
    os.makedirs(tmp_path / "dog" / "nested")
    (tmp_path / "dog" / "readme.txt").write_text("no image")   # no image file either
    with pytest.raises(ValueError, match=rf"class directory '{tmp_path / 'bee'}' holds no image files .* 2 such"):
        ImageFolderSource(str(tmp_path))
    with pytest.raises(ValueError, match="--skip-empty-classes"):
        open_source(f"imagefolder:{tmp_path}")
    source = open_source(f"imagefolder:{tmp_path}", skip_empty_classes=True)
    assert source.classes == ["ant", "cat"] and source.num_classes == 2
    assert [label for _, label in source.files] == [0, 1]


class FailingEncoder(extract.ShardedEncoder):
    """The real encoder, raising `error` on its second call: mid-shard, after records were written."""

    error: BaseException = RuntimeError("the accelerator went away")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        if self.calls == 2:
            raise self.error
        return super().__call__(images)


@pytest.mark.parametrize("failure", ["encoder-error", "keyboard-interrupt", "image-error"])
def test_a_failure_mid_shard_leaves_no_temporary_file(tokenizer_dir, image_folder, tmp_path, monkeypatch, failure):
    if failure == "image-error":
        monkeypatch.setattr(ImageFolderSource, "load", lambda self, index: 1 / 0 if index == 4 else (None, 0))
        expected = ZeroDivisionError
    else:
        error = KeyboardInterrupt() if failure == "keyboard-interrupt" else RuntimeError("the accelerator went away")
        monkeypatch.setattr(FailingEncoder, "error", error)
        monkeypatch.setattr(extract, "ShardedEncoder", FailingEncoder)
        expected = type(error)
    out = tmp_path / "tokens"
    with pytest.raises(expected):
        run(tokenizer_dir, f"imagefolder:{image_folder}", out, shard_size=6, batch_size=2)
    assert os.listdir(out) == [], "a failed shard left files behind"


def test_temporaries_of_a_killed_run_are_removed_when_its_shard_is_redone(tokenizer_dir, image_folder, tmp_path):
    out = tmp_path / "tokens"
    os.makedirs(out)
    shard = out / manifests.shard_name(1, 3)
    stale = [f"{shard}.tmp-999999", f"{manifests.sidecar_path(str(shard))}.tmp-999999"]
    for path in stale:
        with open(path, "w") as f:
            f.write("half written")
    run(tokenizer_dir, f"imagefolder:{image_folder}", out)
    assert not any(".tmp" in name for name in os.listdir(out)), os.listdir(out)
    assert manifests.read_manifest(str(out))["num_records"] == 5
