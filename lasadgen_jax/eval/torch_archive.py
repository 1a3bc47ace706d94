"""Reads the tensors out of a PyTorch zip archive without running anything stored in it.

A TorchScript file (`torch.jit.save`) and a modern `torch.save` file are both zip archives: a
pickle (`<prefix>/data.pkl`) describing the object tree, whose tensors point by key to raw storages
(`<prefix>/data/<key>`). `torch.jit.load` would compile and run the serialized program (the
`code/` entries); plain `pickle` would import whatever the pickle names. Here the unpickler
resolves a short list of names and nothing else: the TorchScript module classes become inert
records of their attributes, tensors become numpy arrays viewed from the storages. Any other name
in the pickle is an error. No torch is needed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

# Storage classes the archives name, and the numpy dtype of their bytes (little-endian, as saved
# on every platform torch supports; the archive's `byteorder` entry is checked where present).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class ScriptObject:
    """An inert stand-in for one pickled TorchScript module: its class name and its attributes.

    The pickle creates it with NEWOBJ (cls.__new__(cls), no __init__) and fills it with BUILD
    (__setstate__ with the module's attribute dict)."""

    class_name = "?"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"{self.class_name}: expected a dict of attributes, got {type(state).__name__}")
        self.attributes = state

    def __repr__(self):
        return f"ScriptObject({self.class_name})"


def _script_class(class_name: str) -> type:
    """A subclass of ScriptObject per TorchScript class name, so each record knows what it stands for."""
    return type("ScriptObject", (ScriptObject,), {"class_name": class_name})


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2 for numpy: a strided view of the storage, copied."""
    itemsize = storage.dtype.itemsize
    if len(size) == 0:
        return storage[offset].copy()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if min(size) > 0 and (offset < 0 or last >= storage.size):
        raise pickle.UnpicklingError(f"tensor of size {tuple(size)} stride {tuple(stride)} offset {offset} "
                                     f"runs past its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor, a module record or a "
                                     f"container this reader knows")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, type) or dtype not in STORAGE_DTYPES.values():
            raise pickle.UnpicklingError(f"storage {key!r} of unsupported type {dtype!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
            if array.size != numel:
                raise pickle.UnpicklingError(f"storage {key!r}: {array.size} elements on disk, the pickle says {numel}")
            self._storages[key] = array
        return self._storages[key]


def read_archive(source) -> object:
    """The object tree of a PyTorch zip archive (path, bytes or file), tensors as numpy arrays.

    TorchScript modules come back as `ScriptObject`s (class name + attribute dict), state dicts as
    OrderedDicts. Raises ValueError for a file that is no PyTorch zip archive (e.g. the legacy
    pre-1.6 `torch.save` format) and pickle.UnpicklingError for any name outside the allowed set.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile:
        raise ValueError(f"{source}: not a zip archive (a legacy torch.save file? load it with "
                         f"torch.load(weights_only=True) instead)") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{source}: expected one '<prefix>/data.pkl' in the archive, found {pickles}")
        prefix = pickles[0].split("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise ValueError(f"{source}: big-endian archive, not supported")
        with archive.open(pickles[0]) as f:
            return _RestrictedUnpickler(io.BytesIO(f.read()), archive, prefix).load()
