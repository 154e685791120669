"""Test helper: copy a GGUF with edits (dropped/reshaped/retyped tensors, changed metadata), using the
`gguf` package (a test-only dependency) so the files under test are not made by our own writer."""

from __future__ import annotations

import numpy as np
import gguf


def rewrite(src, dst, *, drop_tensors=(), reshape=None, retype=None, set_kv=None, drop_kv=(), add_tensors=None):
    """reshape: {name: numpy shape}; retype: {name: 'f16'|'f32'|'i32'}; set_kv: {key: value}
    (str -> string, int -> u32, float -> f32, list -> array); add_tensors: {name: np.ndarray}."""
    reshape, retype, set_kv = reshape or {}, retype or {}, set_kv or {}
    r = gguf.GGUFReader(str(src))
    arch = set_kv.get("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_kv or name in set_kv:
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(name, field.contents())
        else:
            w.add_key_value(name, field.contents(), vt)
    for key, value in set_kv.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = np.asarray(t.data)
        if t.name in retype:
            data = data.astype({"f16": np.float16, "f32": np.float32, "i32": np.int32}[retype[t.name]])
        if t.name in reshape:
            data = data.reshape(reshape[t.name])
        if data.dtype in (np.float32, np.float16, np.int32):
            w.add_tensor(t.name, data)
        else:  # quantised: raw bytes with the type and the numpy-order shape
            w.add_tensor(t.name, data, raw_shape=tuple(int(x) for x in reversed(t.shape)), raw_dtype=t.tensor_type)
    for name, data in (add_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


Q = gguf.GGMLQuantizationType


def expected_type(name: str, n_dims: int, ne0: int, qtype):
    """docs/gguf-schema.md: which ggml type a tensor has in a q8_0 / q4_k file."""
    if n_dims <= 1:
        return Q.F32
    if qtype is None:
        return Q.F16
    eligible = n_dims == 2 and ("weight" in name or name.endswith("_w")) and "norm" not in name
    if eligible:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if ne0 % block == 0:
            return qtype
        if qtype == Q.Q4_K and ne0 % 32 == 0:
            return Q.Q4_0
    return Q.F16
