"""A small GGUF v3 writer (numpy only).

File layout (all integers little-endian):

    magic "GGUF", u32 version=3, u64 n_tensors, u64 n_kv
    n_kv x   (key: str, value_type: u32, value)
    n_tensors x (name: str, n_dims: u32, ne[n_dims]: u64, ggml_type: u32, offset: u64)
    zero padding up to the alignment
    tensor data, each tensor starting at an aligned offset (relative to the data start)

A str is a u64 byte length followed by UTF-8 bytes. `ne` is in ggml order, i.e. the
reverse of the numpy shape (ne[0] is the fastest-varying dimension).

Tensors may be given as arrays or as zero-argument callables returning arrays, so a
converter can stream a large model through without holding it all in memory.
"""

from __future__ import annotations

import struct
from typing import Callable, Union

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF default; we never write general.alignment

# GGUF metadata value types
_T_UINT32, _T_FLOAT32, _T_BOOL, _T_STRING, _T_ARRAY = 4, 6, 7, 8, 9

# ggml tensor types we write: name -> (ggml type id, bytes per element)
GGML_TYPES = {"F32": (0, 4), "F16": (1, 2), "BF16": (30, 2)}

ArrayLike = Union[np.ndarray, Callable[[], np.ndarray]]


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class GGUFWriter:
    def __init__(self, path):
        self.path = path
        self._kv: list[bytes] = []
        self._keys: set[str] = set()
        self._tensors: list[tuple[str, tuple, str, ArrayLike]] = []
        self._names: set[str] = set()

    # ---- metadata -------------------------------------------------------------
    def _add(self, key: str, payload: bytes):
        if key in self._keys:
            raise ValueError(f"duplicate GGUF key {key!r}")
        self._keys.add(key)
        self._kv.append(_str(key) + payload)

    def add_u32(self, key: str, value: int):
        if not 0 <= int(value) < 2**32:
            raise ValueError(f"{key}: {value} does not fit in u32")
        self._add(key, struct.pack("<II", _T_UINT32, int(value)))

    def add_f32(self, key: str, value: float):
        self._add(key, struct.pack("<If", _T_FLOAT32, float(value)))

    def add_bool(self, key: str, value: bool):
        self._add(key, struct.pack("<IB", _T_BOOL, 1 if value else 0))

    def add_str(self, key: str, value: str):
        self._add(key, struct.pack("<I", _T_STRING) + _str(value))

    def add_str_array(self, key: str, values):
        values = list(values)
        body = b"".join(_str(v) for v in values)
        self._add(key, struct.pack("<IIQ", _T_ARRAY, _T_STRING, len(values)) + body)

    # ---- tensors --------------------------------------------------------------
    def add_tensor(self, name: str, shape, dtype: str, data: ArrayLike):
        """Register a tensor of numpy `shape` stored as `dtype` ("F32", "F16" or "BF16").

        `data` is an array (any float dtype; converted on write) or a callable giving one.
        """
        if dtype not in GGML_TYPES:
            raise ValueError(f"unsupported tensor type {dtype!r}")
        if name in self._names:
            raise ValueError(f"duplicate tensor {name!r}")
        if len(name.encode("utf-8")) >= 64:  # GGML_MAX_NAME
            raise ValueError(f"tensor name too long for ggml: {name!r}")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"{name}: ggml tensors have 1..4 dims, got shape {shape}")
        self._names.add(name)
        self._tensors.append((name, shape, dtype, data))

    @staticmethod
    def _encode(arr: np.ndarray, dtype: str) -> bytes:
        if dtype == "F32":
            return np.ascontiguousarray(arr, dtype="<f4").tobytes()
        if dtype == "F16":
            return np.ascontiguousarray(arr, dtype="<f2").tobytes()
        return f32_to_bf16_bits(np.asarray(arr, dtype=np.float32)).astype("<u2").tobytes()

    def write(self):
        pad = lambda n: (-n) % ALIGNMENT  # noqa: E731
        # Tensor infos; offsets are known up front from shapes and types.
        infos, offset = [], 0
        for name, shape, dtype, _ in self._tensors:
            type_id, elsize = GGML_TYPES[dtype]
            ne = shape[::-1]
            infos.append(_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, type_id, offset))
            nbytes = int(np.prod(shape)) * elsize
            offset += nbytes + pad(nbytes)

        header = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))
        with open(self.path, "wb") as f:
            f.write(header)
            for kv in self._kv:
                f.write(kv)
            for info in infos:
                f.write(info)
            f.write(b"\0" * pad(f.tell()))
            for name, shape, dtype, data in self._tensors:
                arr = data() if callable(data) else data
                arr = np.asarray(arr)
                if arr.shape != shape:
                    raise ValueError(f"{name}: data shape {arr.shape} != declared {shape}")
                raw = self._encode(arr, dtype)
                f.write(raw)
                f.write(b"\0" * pad(len(raw)))
