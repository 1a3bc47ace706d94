"""Loading an ml_collections config file outside the command line (benchmarks, tests, the demo).

`load_config("configs/imagenet256.py:size=L")` is what `--config=configs/imagenet256.py:size=L`
gives a command-line entry: the file's get_config(argument), or get_config() without one. Config files
build on each other with `config_beside` and read their "key=value,..." argument with `config_knobs`.
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


def config_beside(config_file: str, name_and_argument: str) -> ml_collections.ConfigDict:
    """load_config of "NAME[:ARG]", the config file NAME.py in config_file's directory."""
    name, separator, argument = name_and_argument.partition(":")
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py")
    return load_config(path + (":" + argument if separator else ""))


def config_knobs(arg: str | None, defaults: dict) -> dict:
    """defaults updated by a config file's argument "key=value,..." (None or "": the defaults); a key
    not in defaults, or a part without "=", is a ValueError."""
    knobs = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config arg {part!r}: expected key=value with key in {sorted(defaults)}")
        knobs[key] = value
    return knobs
