"""Guards of the token pipeline: shard counts against the manifest, corrupt shards named (or skipped and
counted), prefetch workers that do not outlive their parent. Odd files are made here, in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from test_data_pipeline import CROPS, GRID, dataset, record_codes, write_token_dir

from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.pipeline import token_iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rewrite_manifest_count(directory, shard_number, records):
    path = os.path.join(directory, manifests.MANIFEST_FILE)
    with open(path) as f:
        manifest = json.load(f)
    manifest["shards"][shard_number]["records"] = records
    manifests.write_json_atomically(path, manifest)
    return os.path.join(directory, manifest["shards"][shard_number]["file"])


@pytest.mark.parametrize("claimed", [3, 8], ids=["manifest-claims-fewer", "manifest-claims-more"])
def test_a_shard_whose_record_count_differs_from_the_manifest_is_refused(tmp_path, claimed):
    directory = write_token_dir(tmp_path / "tokens", num_records=12, shard_size=5)   # shards of 5, 5, 2
    shard = rewrite_manifest_count(directory, 1, claimed)
    with pytest.raises(ValueError, match=rf"token shard {shard} holds 5 records, its manifest .* says {claimed}$"):
        dataset(directory)


def test_a_truncated_shard_is_refused_by_name_when_the_data_is_opened(tmp_path):
    directory = write_token_dir(tmp_path / "tokens", num_records=12, shard_size=5)
    shard = os.path.join(directory, manifests.shard_name(2, 3))
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=rf"token shard {shard} cannot be opened: .*64KB"):
        dataset(directory)


def unreadable_records(path):
    """Indices of the records of a shard that ArrayRecord itself fails to read, one at a time."""
    reader = ArrayRecordReader(path)
    try:
        failing = []
        for index in range(reader.num_records()):
            try:
                reader.read([index])
            except RuntimeError:
                failing.append(index)
        return failing
    finally:
        reader.close()


def flip_a_byte_inside_one_record(path):
    """Flips one byte of a shard so that exactly one record (not the first) fails its checksum; returns it.
    The records are compressed: the byte is found by trying, the failing record told by ArrayRecord."""
    with open(path, "rb") as f:
        original = f.read()
    for offset in range(400, 4000, 7):
        data = bytearray(original)
        data[offset] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(data))
        failing = unreadable_records(path)
        if len(failing) == 1 and failing[0] > 0:
            return failing[0]
    raise AssertionError("no byte flip corrupts exactly one record")


def corrupt_token_dir(tmp_path, num_records=20, shard_size=10):
    """(directory, corrupt shard, record number in it): two shards of 10 records, one record of the second
    with a flipped byte (a failed checksum on read, as on a bad disk)."""
    directory = write_token_dir(tmp_path / "tokens", num_records=num_records, shard_size=shard_size)
    path = os.path.join(directory, manifests.shard_name(1, 2))
    return directory, path, flip_a_byte_inside_one_record(path)


def test_a_corrupt_record_is_named_by_shard_and_index_on_every_read(tmp_path):
    directory, path, bad = corrupt_token_dir(tmp_path)
    for _ in range(2):   # the same error on a resume: a fresh iterator at the same place
        iterator = token_iterator(dataset(directory, batch_size=20, num_epochs=1))
        with pytest.raises(ValueError, match=rf"token shard {path} record {bad} cannot be read: .*Corrupted"):
            next(iterator)


def test_skip_corrupt_records_replaces_skips_and_counts_them(tmp_path, caplog):
    directory, path, bad = corrupt_token_dir(tmp_path)
    caplog.set_level(logging.WARNING, logger="lasadgen_jax.data.pipeline")
    batches = list(token_iterator(dataset(directory, batch_size=20, num_epochs=2, skip_corrupt_records=True)))
    assert len(batches) == 2
    for batch in batches:
        labels = batch["label"].tolist()
        assert len(labels) == 20 and 10 + bad not in labels, "the corrupt record was not skipped"
        assert set(labels) == set(range(20)) - {10 + bad} and len(labels) - len(set(labels)) == 1   # one duplicate
        assert batch["tokens"].shape == (20, GRID[0] * GRID[1])
    messages = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(messages) == 2
    assert f"skipped corrupt token shard {path} record {bad} " in messages[0]
    assert "1 corrupt token record(s) skipped so far" in messages[0]
    assert "2 corrupt token record(s) skipped so far" in messages[1]


def test_skipping_is_deterministic_and_resumes_exactly(tmp_path):
    directory, _, _ = corrupt_token_dir(tmp_path)
    make = lambda: token_iterator(dataset(directory, batch_size=4, seed=2, skip_corrupt_records=True))
    first = make()
    expected = [next(first) for _ in range(8)]
    restored = make()
    for _ in range(3):
        next(restored)
    state = restored.get_state()
    again = make()
    again.set_state(state)
    for batch, want in zip([next(again) for _ in range(5)], expected[3:]):
        np.testing.assert_array_equal(batch["tokens"], want["tokens"])
        np.testing.assert_array_equal(batch["label"], want["label"])


def test_a_record_with_a_wrong_layout_is_named(tmp_path):
    directory = write_token_dir(tmp_path / "tokens", num_records=8, shard_size=4,
                                codes_of=lambda i: record_codes(i)[: CROPS - 1] if i == 6 else record_codes(i))
    iterator = token_iterator(dataset(directory, batch_size=8, num_epochs=1))
    shard = os.path.join(directory, manifests.shard_name(1, 2))
    with pytest.raises(ValueError, match=rf"token shard {shard} record 2 cannot be read: 3 crops x 6 tokens"):
        next(iterator)


# ----------------------------------------------------------------------------- prefetch workers and their parent


ORPHAN_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from test_data_pipeline import dataset
from lasadgen_jax.data.pipeline import token_iterator

def children(pid):
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{entry}}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found += [int(entry)] + children(int(entry))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found

iterator = token_iterator(dataset({directory!r}, batch_size=2), num_workers=2)
next(iterator)
print(json.dumps(children(os.getpid())), flush=True)   # the 2 workers and multiprocessing's resource tracker
time.sleep(600)
"""


def process_alive(pid):
    """True while pid runs (a zombie, exited but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prefetch_workers_exit_when_their_parent_is_killed(tmp_path):
    directory = write_token_dir(tmp_path / "tokens", num_records=12, shard_size=5)
    script = ORPHAN_SCRIPT.format(tests=os.path.join(REPO, "tests"), directory=directory)
    with open(tmp_path / "stderr", "w") as stderr:
        parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr,
                                  text=True, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    try:
        workers = json.loads(parent.stdout.readline() or "[]")
        assert len(workers) >= 2 and all(process_alive(pid) for pid in workers), (tmp_path / "stderr").read_text()
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if process_alive(pid)]
    for pid in survivors:   # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"prefetch workers {survivors} outlived their killed parent"
