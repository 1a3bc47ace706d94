"""The grain pipeline over token shards: determinism, host shards, epochs, resumable state, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from lasadgen_jax.data import extract, records
from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.pipeline import token_dataset, token_iterator

GRID, CODEBOOK, CROPS, RECORDS = (2, 3), 50, 4, 23


def record_codes(record_id: int, codebook_size: int = CODEBOOK) -> np.ndarray:
    """Codes [crops, tokens] that identify the record and the crop: each crop differs."""
    crop = np.arange(CROPS)[:, None]
    token = np.arange(GRID[0] * GRID[1])[None, :]
    return (record_id * 7 + crop * 11 + token) % codebook_size


def write_token_dir(directory, num_records=RECORDS, shard_size=5, codes_of=record_codes, codebook_size=CODEBOOK):
    """A finished token directory as extraction leaves it; record i has label i."""
    os.makedirs(directory, exist_ok=True)
    ranges = extract.shard_ranges(num_records, shard_size)
    spec = {"tokenizer_hash": "test", "grid": list(GRID), "codebook_size": codebook_size, "code_bytes": 2,
            "crops": "test", "num_crops": CROPS, "image_size": 0, "source": "test", "num_images": num_records,
            "num_classes": num_records, "shard_size": shard_size}
    for index, (start, stop) in enumerate(ranges):
        path = os.path.join(directory, manifests.shard_name(index, len(ranges)))
        writer = ArrayRecordWriter(path, "group_size:1")
        for record_id in range(start, stop):
            writer.write(records.encode_record(codes_of(record_id), record_id, 2))
        writer.close()
        manifests.write_json_atomically(manifests.sidecar_path(path), {
            "spec": spec, "file": os.path.basename(path), "records": stop - start, "skipped": 0})
    assert extract.write_manifest_if_complete(str(directory), spec, len(ranges)) is not None
    return str(directory)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


def dataset(directory, **kwargs):
    options = dict(grid=GRID, codebook_size=CODEBOOK, batch_size=4, seed=0, shard_index=0, shard_count=1)
    return token_dataset(directory, **{**options, **kwargs})


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["label"], b["label"])


def crop_of(example_tokens, record_id):
    """Which crop of the record these tokens are (fails if they are none of them)."""
    matches = [c for c, codes in enumerate(record_codes(record_id)) if np.array_equal(codes, example_tokens)]
    assert len(matches) == 1, f"tokens {example_tokens} are no crop of record {record_id}"
    return matches[0]


def test_batches_are_tokens_and_labels_of_real_crops(token_dir):
    batch = next(token_iterator(dataset(token_dir)))
    assert set(batch) == {"tokens", "label"}
    assert batch["tokens"].shape == (4, 6) and batch["tokens"].dtype == np.int32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    for tokens, label in zip(batch["tokens"], batch["label"]):
        crop_of(tokens, int(label))


def test_order_is_deterministic_for_a_seed(token_dir):
    first = take(token_iterator(dataset(token_dir, seed=3)), 6)
    assert_same_batches(first, take(token_iterator(dataset(token_dir, seed=3)), 6))
    other = take(token_iterator(dataset(token_dir, seed=4)), 6)
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))


def test_each_epoch_is_a_fresh_permutation_with_fresh_crops(token_dir):
    batches = take(token_iterator(dataset(token_dir, batch_size=RECORDS, num_epochs=3)), 3)
    for batch in batches:
        assert sorted(batch["label"].tolist()) == list(range(RECORDS))   # every record once per epoch
    assert batches[0]["label"].tolist() != batches[1]["label"].tolist()
    crops = [{int(label): crop_of(t, int(label)) for t, label in zip(b["tokens"], b["label"])} for b in batches]
    assert any(crops[0][r] != crops[1][r] for r in range(RECORDS)), "the crop choice never changed between epochs"
    assert len({c for epoch in crops for c in epoch.values()}) == CROPS, "some crop is never picked"


def test_finite_epochs_end(token_dir):
    iterator = token_iterator(dataset(token_dir, batch_size=5, num_epochs=1))
    assert len(take(iterator, 4)) == 4          # 23 records: 4 full batches, the rest dropped
    with pytest.raises(StopIteration):
        next(iterator)


def test_host_shards_are_disjoint_and_cover_the_data(token_dir):
    seen = []
    for host in range(3):
        batches = list(token_iterator(dataset(token_dir, batch_size=1, num_epochs=1, shard_index=host, shard_count=3)))
        seen.append({int(b["label"][0]) for b in batches})
        assert len(seen[-1]) == len(batches), "a host saw a record twice in one epoch"
    assert seen[0].isdisjoint(seen[1]) and seen[0].isdisjoint(seen[2]) and seen[1].isdisjoint(seen[2])
    assert set().union(*seen) == set(range(RECORDS))


def test_state_restore_resumes_at_the_exact_next_batch(token_dir):
    iterator = token_iterator(dataset(token_dir, seed=5))
    take(iterator, 7)                           # past the first epoch boundary (5 batches of 4 per epoch)
    state = json.loads(json.dumps(iterator.get_state()))   # what a checkpoint stores must survive JSON
    expected = take(iterator, 4)
    restored = token_iterator(dataset(token_dir, seed=5))
    restored.set_state(state)
    assert_same_batches(take(restored, 4), expected)
    fresh = take(token_iterator(dataset(token_dir, seed=5)), 4)
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(fresh, expected))


def test_multiprocess_prefetch_matches_and_resumes(token_dir):
    in_process = take(token_iterator(dataset(token_dir, seed=6)), 6)
    iterator = token_iterator(dataset(token_dir, seed=6), num_workers=2)
    assert_same_batches(take(iterator, 3), in_process[:3])
    state = iterator.get_state()
    restored = token_iterator(dataset(token_dir, seed=6), num_workers=2)
    restored.set_state(state)
    assert_same_batches(take(restored, 3), in_process[3:])


def test_manifest_for_another_model_is_refused(token_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tokens are on a 2x3 grid, the config wants 3x2"):
        dataset(token_dir, grid=(3, 2))
    with pytest.raises(ValueError, match=r"codebook of 50, the config wants 64"):
        dataset(token_dir, codebook_size=64)
    with pytest.raises(ValueError, match="holds no manifest.json"):
        dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"shard_index 3 is not in \[0, shard_count=3\)"):
        dataset(token_dir, shard_index=3, shard_count=3)


def test_out_of_range_codes_are_refused(tmp_path):
    bad = lambda record_id: record_codes(record_id, codebook_size=60) + (10 if record_id == 2 else 0)
    directory = write_token_dir(tmp_path / "bad", num_records=4, codes_of=bad, codebook_size=CODEBOOK)
    iterator = token_iterator(dataset(directory, batch_size=4, num_epochs=1))
    with pytest.raises(ValueError, match=r"outside the codebook \[0, 50\)"):
        next(iterator)
