"""Training metrics to TensorBoard event files and to a JSON-lines file, without TensorFlow.

TensorBoard's own event-file writer and protos (the `tensorboard` package) write scalars and PNG
images; `metrics.jsonl` holds one JSON object per logged step for scripts. Only process 0 writes.

A workdir on an object store (gs://...) cannot be appended to: GCS objects are immutable, and
gcsfs's append mode silently overwrites (so would TensorBoard's fsspec writer, record by record).
There both files are written in a local staging directory and copied whole to the workdir through
etils.epath every `upload_every_seconds` and on flush/close.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
from etils import epath


def is_remote(path: str) -> bool:
    """A URI such as gs://bucket/run (read and written through etils.epath), not a local path."""
    return "://" in str(path)


class MetricWriter:
    """write_scalars(step, {name: float}) and write_image(step, name, uint8 [H, W, 3]).

    On resume, `truncate_after(step)` drops JSONL lines of steps after the restored checkpoint, so the
    file describes one run without the steps that were redone.
    """

    def __init__(self, logdir: str, enabled: bool = True, upload_every_seconds: float = 60.0):
        self.logdir, self.enabled = str(logdir), enabled
        self.remote = is_remote(logdir)
        self.upload_every_seconds = upload_every_seconds
        self._events, self._staging, self._last_upload = None, None, 0.0
        local_dir = self.logdir
        if enabled and self.remote:
            self._staging = tempfile.mkdtemp(prefix="lasadgen_metrics_")
            local_dir = self._staging
            remote_jsonl = epath.Path(self.logdir) / "metrics.jsonl"
            if remote_jsonl.is_file():   # a resumed run continues the workdir's file
                with open(os.path.join(local_dir, "metrics.jsonl"), "wb") as f:
                    f.write(remote_jsonl.read_bytes())
        self.jsonl_path = os.path.join(local_dir, "metrics.jsonl")
        if enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            os.makedirs(local_dir, exist_ok=True)
            self._events = EventFileWriter(os.path.join(local_dir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.isfile(self.jsonl_path):
            return
        with open(self.jsonl_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        temporary = self.jsonl_path + ".tmp"
        with open(temporary, "w") as f:
            f.writelines(kept)
        os.replace(temporary, self.jsonl_path)
        self._upload(force=True)

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = {name: float(value) for name, value in scalars.items()}
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, simple_value=value)
                                             for name, value in values.items()])
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        record = {"step": int(step), "time": round(time.time(), 3),
                  **{name: (value if math.isfinite(value) else str(value)) for name, value in values.items()}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._upload(force=False)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if not self.enabled:
            return
        from PIL import Image
        from tensorboard.compat.proto import event_pb2, summary_pb2

        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"write_image({name!r}) wants uint8 [H, W, 3], got {image.dtype} {image.shape}")
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        proto = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                          encoded_image_string=buffer.getvalue())
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, image=proto)])
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def _upload(self, force: bool) -> None:
        """Copy the staged files whole to the remote workdir (a no-op for a local one)."""
        if self._staging is None or (not force and time.time() - self._last_upload < self.upload_every_seconds):
            return
        if self._events is not None:
            self._events.flush()
        remote = epath.Path(self.logdir)
        for root, _, files in os.walk(self._staging):
            for name in files:
                local = os.path.join(root, name)
                target = remote / os.path.relpath(local, self._staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(local, "rb") as f:
                    target.write_bytes(f.read())
        self._last_upload = time.time()

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()
        self._upload(force=True)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
            self._upload(force=True)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
