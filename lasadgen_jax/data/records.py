"""The token record: an explicit little-endian binary layout, decoded with np.frombuffer (never pickle).

    offset  size  field
    0       4     magic b"LTOK"
    4       2     layout version (uint16, = 1)
    6       2     bytes per code (uint16: 2 = int16, 4 = int32)
    8       4     number of crops C (uint32)
    12      4     tokens per crop N = h*w (uint32)
    16      4     class label (int32)
    20      C*N*bytes  codes [C, N], row-major, little-endian signed ints

int16 holds every code of a codebook up to 32768 entries (VQ-16 has 16384); larger codebooks use
int32. A record whose size or header does not add up is refused with a ValueError.
"""

from __future__ import annotations

import numpy as np

MAGIC = b"LTOK"
VERSION = 1
HEADER = np.dtype([("magic", "S4"), ("version", "<u2"), ("code_bytes", "<u2"), ("num_crops", "<u4"),
                   ("num_tokens", "<u4"), ("label", "<i4")])
CODE_DTYPES = {2: np.dtype("<i2"), 4: np.dtype("<i4")}


def code_bytes_for(codebook_size: int) -> int:
    """2 (int16) when every code of the codebook fits, else 4 (int32)."""
    if codebook_size <= 0:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    return 2 if codebook_size <= np.iinfo(np.int16).max + 1 else 4


def encode_record(codes: np.ndarray, label: int, code_bytes: int) -> bytes:
    """One record from codes [crops, tokens] (any integer dtype) and a class label."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [crops, tokens], got shape {codes.shape}")
    if code_bytes not in CODE_DTYPES:
        raise ValueError(f"code_bytes must be one of {sorted(CODE_DTYPES)}, got {code_bytes}")
    dtype = CODE_DTYPES[code_bytes]
    info = np.iinfo(dtype)
    if codes.size and (codes.min() < 0 or codes.max() > info.max):
        raise ValueError(f"codes span [{codes.min()}, {codes.max()}], outside [0, {info.max}] of {dtype}")
    header = np.array([(MAGIC, VERSION, code_bytes, codes.shape[0], codes.shape[1], int(label))], HEADER)
    return header.tobytes() + codes.astype(dtype).tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
    """(codes int32 [crops, tokens], label) of one record."""
    if len(record) < HEADER.itemsize:
        raise ValueError(f"token record of {len(record)} bytes is shorter than its {HEADER.itemsize}-byte header")
    header = np.frombuffer(record, HEADER, count=1)[0]
    if header["magic"] != MAGIC or header["version"] != VERSION:
        raise ValueError(f"not a version-{VERSION} token record: magic {header['magic']!r}, "
                         f"version {header['version']}")
    code_bytes = int(header["code_bytes"])
    if code_bytes not in CODE_DTYPES:
        raise ValueError(f"token record has {code_bytes} bytes per code; known: {sorted(CODE_DTYPES)}")
    shape = (int(header["num_crops"]), int(header["num_tokens"]))
    expected = HEADER.itemsize + shape[0] * shape[1] * code_bytes
    if len(record) != expected:
        raise ValueError(f"token record of {len(record)} bytes; its header ({shape[0]} crops x {shape[1]} tokens x "
                         f"{code_bytes} bytes) needs {expected}")
    codes = np.frombuffer(record, CODE_DTYPES[code_bytes], offset=HEADER.itemsize).reshape(shape)
    return codes.astype(np.int32), int(header["label"])


def decode_records(batch: list[bytes], num_crops: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes [B, crops, tokens] in the records' int dtype, labels int32 [B]) of equal-layout records,
    decoded in one np.frombuffer over their concatenation (the input pipeline's hot path)."""
    if not batch:
        raise ValueError("decode_records got an empty batch")
    header = np.frombuffer(batch[0], HEADER, count=1)[0] if len(batch[0]) >= HEADER.itemsize else None
    code_bytes = int(header["code_bytes"]) if header is not None else 0
    if code_bytes not in CODE_DTYPES or any(len(record) != len(batch[0]) for record in batch):
        for record in batch:   # name the offending record precisely
            decode_record(record)
        raise ValueError("token records of one batch have different layouts")
    layout = np.dtype([("header", HEADER), ("codes", CODE_DTYPES[code_bytes], (num_crops, num_tokens))])
    if layout.itemsize != len(batch[0]):
        raise ValueError(f"token records of {len(batch[0])} bytes; {num_crops} crops x {num_tokens} tokens x "
                         f"{code_bytes} bytes need {layout.itemsize}")
    parsed = np.frombuffer(b"".join(batch), layout)
    headers = parsed["header"]
    good = ((headers["magic"] == MAGIC) & (headers["version"] == VERSION) & (headers["code_bytes"] == code_bytes)
            & (headers["num_crops"] == num_crops) & (headers["num_tokens"] == num_tokens))
    if not good.all():
        bad = int(np.argmin(good))
        raise ValueError(f"token record {bad} of the batch has header {headers[bad]}, expected magic {MAGIC!r}, "
                         f"version {VERSION}, {num_crops} crops x {num_tokens} tokens")
    return parsed["codes"], headers["label"].astype(np.int32)
