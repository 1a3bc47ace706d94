"""Loading an ml_collections config file outside the command line (benchmarks, tests, the demo).

`load_config("configs/imagenet256.py:size=L")` is what `--config=configs/imagenet256.py:size=L`
gives a command-line entry: the file's get_config(argument), or get_config() without one.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(path_and_argument: str) -> ml_collections.ConfigDict:
    """get_config(ARG) of the config file PATH in "PATH[:ARG]" (a relative PATH is from the working directory)."""
    path, separator, argument = path_and_argument.partition(".py:")
    path = path + ".py" if separator else path
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"lasadgen_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if separator else module.get_config()
