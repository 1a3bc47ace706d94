"""The token directory's manifest: what the shards hold and which tokenizer made them.

`manifest.json` is written once every shard is finished. Its `spec` (tokenizer hash, grid,
codebook size, crops, image size, source, shard size) is also stored in each shard's sidecar JSON,
so a resumed or multi-host extraction can prove that every shard came from the same recipe.
"""

from __future__ import annotations

import json
import os

FORMAT = "lasadgen_jax.tokens/1"
MANIFEST_FILE = "manifest.json"


def shard_name(index: int, count: int) -> str:
    return f"tokens-{index:05d}-of-{count:05d}.array_record"


def sidecar_path(shard_path: str) -> str:
    return shard_path[: -len(".array_record")] + ".json"


def write_json_atomically(path: str, value: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_manifest(directory: str) -> dict:
    """The manifest of a token directory, with its shard files checked to exist."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no {MANIFEST_FILE}: not a finished token directory "
                         f"(run python -m lasadgen_jax.data.extract, and let every shard finish)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for shard in manifest["shards"]:
        if not os.path.isfile(os.path.join(directory, shard["file"])):
            raise ValueError(f"{path} lists {shard['file']}, which is missing from {directory!r}")
    return manifest


def check_manifest_matches(manifest: dict, path: str, grid: tuple[int, int], codebook_size: int) -> None:
    """Refuse tokens made for another model: grid and codebook size must equal the config's."""
    spec = manifest["spec"]
    if tuple(spec["grid"]) != tuple(grid):
        raise ValueError(f"{path}: tokens are on a {spec['grid'][0]}x{spec['grid'][1]} grid, "
                         f"the config wants {grid[0]}x{grid[1]}")
    if spec["codebook_size"] != codebook_size:
        raise ValueError(f"{path}: tokens come from a codebook of {spec['codebook_size']}, "
                         f"the config wants {codebook_size}")


def shard_record_count(path: str) -> int:
    """The number of records an ArrayRecord shard holds (its footer only); ValueError naming an unreadable one."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()   # a truncated or corrupt footer is reported here, not by the constructor
    except (RuntimeError, OSError) as error:
        raise ValueError(f"token shard {path} cannot be opened: {error}") from None
    return count


def check_shard_record_counts(directory: str, manifest: dict) -> list[int]:
    """Each shard's record count, after checking it equals the manifest's: a manifest that claims fewer
    would leave records unread, one that claims more would index past a shard's end."""
    counts = []
    for shard in manifest["shards"]:
        path = os.path.join(directory, shard["file"])
        count = shard_record_count(path)
        if count != shard["records"]:
            raise ValueError(f"token shard {path} holds {count} records, its manifest "
                             f"{os.path.join(directory, MANIFEST_FILE)} says {shard['records']}")
        counts.append(count)
    return counts
