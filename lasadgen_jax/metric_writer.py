"""Training metrics to TensorBoard event files and to a JSON-lines file, without TensorFlow.

TensorBoard's own event-file writer and protos (the `tensorboard` package) write scalars and PNG
images; `metrics.jsonl` holds one JSON object per logged step for scripts. Only process 0 writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

import numpy as np


class MetricWriter:
    """write_scalars(step, {name: float}) and write_image(step, name, uint8 [H, W, 3]).

    On resume, `truncate_after(step)` drops JSONL lines of steps after the restored checkpoint, so the
    file describes one run without the steps that were redone.
    """

    def __init__(self, logdir: str, enabled: bool = True):
        self.logdir, self.enabled = logdir, enabled
        self.jsonl_path = os.path.join(logdir, "metrics.jsonl")
        self._events = None
        if enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            os.makedirs(logdir, exist_ok=True)
            self._events = EventFileWriter(os.path.join(logdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.isfile(self.jsonl_path):
            return
        with open(self.jsonl_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        temporary = self.jsonl_path + ".tmp"
        with open(temporary, "w") as f:
            f.writelines(kept)
        os.replace(temporary, self.jsonl_path)

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

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
