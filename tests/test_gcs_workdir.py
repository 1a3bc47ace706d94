"""A gs:// workdir: run.json, metrics, TensorBoard events and sample grids go through etils.epath.

GCS itself cannot be reached here, so an in-memory fsspec filesystem stands in for gcsfs under the
gs:// scheme, refusing append mode as GCS does (gcsfs turns 'a' into an overwrite). The Orbax
checkpoints and params_ema (tensorstore's own GCS driver) are not covered: that needs a bucket.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from helpers import write_synthetic_token_dir
from train_runs import tiny_config

from lasadgen_jax import demo, train, workdir
from lasadgen_jax.metric_writer import MetricWriter
from lasadgen_jax.model_io import model_config_from


class FakeGCS(MemoryFileSystem):
    """gs:// in memory; like GCS, no appending to an object."""

    protocol = ("gs", "gcs")
    store = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):   # epath passes gcsfs's option
        super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"GCS objects cannot be appended to ({path})")
        return super()._open(path, mode, **kwargs)


def _forget_filesystems():
    registry = importlib.import_module("fsspec.registry")   # the module; fsspec.registry is its read-only view
    for name in ("gs", "gcs"):
        registry._registry.pop(name, None)
    type(epath.backend.fsspec_backend)._get_filesystem.cache_clear()


@pytest.fixture
def bucket():
    _forget_filesystems()
    FakeGCS.store.clear()
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    yield "gs://bucket/runs/one"
    _forget_filesystems()


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    return write_synthetic_token_dir(str(tmp_path_factory.mktemp("tokens")))


def read_events(remote_dir: epath.Path, local_dir) -> list:
    """(step, tag) of every event in the TensorBoard files of remote_dir, read from local copies."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for path in sorted(remote_dir.iterdir()):
        local = os.path.join(local_dir, path.name)
        with open(local, "wb") as f:
            f.write(path.read_bytes())
        events += [(event.step, value.tag) for event in EventFileLoader(local).Load() for value in event.summary.value]
    return events


def test_metric_writer_stages_locally_and_uploads_whole_files(bucket, tmp_path):
    writer = MetricWriter(bucket, upload_every_seconds=0)
    writer.write_scalars(1, {"loss": 2.0})
    writer.write_scalars(2, {"loss": 1.5})
    writer.write_image(2, "samples/ema", np.zeros((4, 6, 3), np.uint8))
    remote = epath.Path(bucket)
    assert [json.loads(line)["step"] for line in (remote / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    writer.close()
    assert sorted(read_events(remote / "tensorboard", tmp_path)) == [(1, "loss"), (2, "loss"), (2, "samples/ema")]

    # A resumed run: the workdir's lines up to the checkpoint, then the new ones.
    writer = MetricWriter(bucket, upload_every_seconds=3600)
    writer.truncate_after(1)
    writer.write_scalars(2, {"loss": 1.25})
    writer.close()
    lines = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 2.0), (2, 1.25)]
    assert len(list((remote / "tensorboard").iterdir())) == 2   # one event file per run


def test_claim_workdir_and_sample_grids_on_gs(bucket, tokens_dir):
    config = tiny_config(tokens_dir, 4)
    model_config = model_config_from(config)
    train.claim_train_workdir(bucket, model_config, config)
    run = json.loads((epath.Path(bucket) / "run.json").read_text())
    assert run["kind"] == train.RUN_KIND and run["model_identity"]["dim"] == 32
    train.claim_train_workdir(bucket, model_config, config)   # the same model resumes
    config.model.dim = 64
    with pytest.raises(ValueError, match="incompatible model.*dim"):
        train.claim_train_workdir(bucket, model_config_from(config), config)

    foreign = "gs://bucket/runs/foreign"
    (epath.Path(foreign) / "checkpoints" / "7").mkdir(parents=True)
    with pytest.raises(ValueError, match="has checkpoints/ but no run.json"):
        train.claim_train_workdir(foreign, model_config, config)
    assert not (epath.Path(foreign) / "run.json").exists()

    writer = MetricWriter(bucket)
    picture = np.full((8, 12, 3), 200, np.uint8)
    path = train.write_sample_grid(picture, bucket, 5, writer)
    writer.close()
    assert path == f"{bucket}/samples/step_0000005.png"
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(epath.Path(path).read_bytes()))), picture)
    assert str(workdir.workdir_path(bucket, "checkpoints")) == f"{bucket}/checkpoints"   # not made absolute


def test_locations_that_cannot_be_remote_are_refused_by_name(tokens_dir):
    config = tiny_config(tokens_dir, 4)
    config.data.tokens_dir = "gs://bucket/tokens"
    with pytest.raises(ValueError, match="config.data.tokens_dir.*local \\(or mounted"):
        workdir.check_locations(config, "/tmp/workdir")
    config = tiny_config(tokens_dir, 4)
    with pytest.raises(ValueError, match="nosuchfs"):
        workdir.check_locations(config, "nosuchfs://bucket/run")
    with pytest.raises(ValueError, match="demo's data preparation.*local workdir only"):
        demo.check_local_workdir("gs://bucket/run")


def test_gs_workdir_without_gcsfs_says_what_to_install(tokens_dir):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(ValueError, match="pip install gcsfs"):
        workdir.check_locations(tiny_config(tokens_dir, 4), "gs://bucket/run")
