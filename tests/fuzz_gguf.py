"""Structure-aware fuzzer for pycsm's GGUF loader (and what runs on a file that loads).

Each case takes a valid CSM GGUF, mutates it (bit flips, byte patches, truncation, absurd counts
and lengths, wrong types, non-UTF-8 and huge strings, duplicated / missing keys and tensors,
offsets past the end / misaligned / overlapping, NaN weights, ...) and hands it to the C API in a
worker process: csm_model_load must either fail with a message in csm_last_error() or give a
model, and a model must then survive a context, one generated frame, a Mimi decode / encode and
(sometimes) csm_quantize. A worker that dies (signal, abort, sanitizer report) or stops answering
is a crash or a hang of that case; the parent writes the case's file to the findings folder and
carries on with a fresh worker.

Cases are deterministic: case i of seed S is always the same bytes, whichever worker runs it.

    python tests/fuzz_gguf.py --cases 100000 --seed 1 [--workers 2] [--findings DIR]
    python tests/fuzz_gguf.py --replay FILE.gguf            # one file, in this process
    python tests/fuzz_gguf.py --dump DIR --cases 500        # write the cases (for a C driver)

The bases are built from the tiny test model (tests/conftest.py's fixture, found in
.fixture-cache/ or given with --model): "micro" copies shrunk to a few MB (text vocabulary 64,
Mimi codebooks of 64 codes) in f32, f16 and a quantised type, plus, for a few cases, the full
tiny f32 file with header-only mutations.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import re
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# GGUF layout
# ---------------------------------------------------------------------------------------------

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
SCALAR = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
          T_BOOL: "<B", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}
INT_TYPES = (T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_U64, T_I64)
DEFAULT_ALIGNMENT = 32


@dataclass
class Tensor:
    name: bytes
    ne: list
    ttype: int
    offset: int
    src: tuple = (0, 0)        # (start, length) of its bytes in the base's data section
    nd: int | None = None      # n_dims to write instead of len(ne)


@dataclass
class Span:
    off: int                   # absolute file offset
    width: int                 # bytes
    kind: str                  # "count", "strlen", "type", "arrtype", "arrn", "ndims", "ne", "ttype", "toff", "value"


@dataclass
class Gguf:
    version: int
    kvs: list                  # [key bytes, gguf type, payload bytes (what follows the type field)]
    tensors: list
    alignment: int
    data_offset: int
    spans: list = field(default_factory=list)

    def copy(self) -> "Gguf":
        return Gguf(self.version, [list(kv) for kv in self.kvs],
                    [Tensor(t.name, list(t.ne), t.ttype, t.offset, t.src) for t in self.tensors],
                    self.alignment, self.data_offset, self.spans)

    def find(self, key: bytes):
        for i, kv in enumerate(self.kvs):
            if kv[0] == key:
                return i
        return -1


class _Reader:
    def __init__(self, buf, spans):
        self.buf, self.pos, self.spans = buf, 0, spans

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise ValueError("truncated")
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def num(self, fmt, kind=None):
        size = struct.calcsize(fmt)
        if kind:
            self.spans.append(Span(self.pos, size, kind))
        return struct.unpack(fmt, self.take(size))[0]

    def string(self):
        n = self.num("<Q", "strlen")
        return self.take(n)


def _skip_value(r: _Reader, vtype: int, top: bool):
    if vtype == T_STR:
        r.string()
    elif vtype == T_ARR:
        et = r.num("<I", "arrtype")
        n = r.num("<Q", "arrn")
        if et in SCALAR:
            r.take(n * struct.calcsize(SCALAR[et]))
        else:
            for _ in range(n):
                _skip_value(r, et, False)
    elif vtype in SCALAR:
        r.num(SCALAR[vtype], "value" if top else None)
    else:
        raise ValueError(f"bad type {vtype}")


def parse(buf) -> Gguf:
    """Parses the header of a GGUF v2/v3 file (buf: bytes or mmap) and records where each
    count, length, type and shape field lies."""
    spans = []
    r = _Reader(buf, spans)
    if r.take(4) != b"GGUF":
        raise ValueError("not a GGUF")
    version = r.num("<I", "count")
    n_tensors = r.num("<Q", "count")
    n_kv = r.num("<Q", "count")
    kvs = []
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string()
        spans.append(Span(r.pos, 4, "type"))
        vtype = r.num("<I")
        start = r.pos
        _skip_value(r, vtype, True)
        payload = bytes(buf[start:r.pos])
        kvs.append([key, vtype, payload])
        if key == b"general.alignment" and vtype == T_U32:
            alignment = struct.unpack("<I", payload)[0]
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.num("<I", "ndims")
        ne = [r.num("<q", "ne") for _ in range(nd)]
        tt = r.num("<i", "ttype")
        off = r.num("<Q", "toff")
        tensors.append(Tensor(name, ne, tt, off))
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    g = Gguf(version, kvs, tensors, alignment, data_offset, spans)
    for t in tensors:
        t.src = (t.offset, nbytes(t.ne, t.ttype) or 0)
    return g


# ggml type table (block size, bytes per block), from the loaded ggml when possible.
_TYPES: dict | None = None


def ggml_types() -> dict:
    global _TYPES
    if _TYPES is None:
        _TYPES = {}
        try:
            import libggml

            base = Path(libggml.__file__).parent
            lib = next(iter(sorted(base.glob("lib*/libggml-base.so*"))), None)
            g = ctypes.CDLL(str(lib))
            g.ggml_blck_size.restype = ctypes.c_int64
            g.ggml_blck_size.argtypes = [ctypes.c_int]
            g.ggml_type_size.restype = ctypes.c_size_t
            g.ggml_type_size.argtypes = [ctypes.c_int]
            # ggml_type_name() does not check its argument: take the count from ggml.h.
            hdr = (base / "include" / "ggml.h").read_text()
            count = int(re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", hdr).group(1))
            for i in range(count):
                _TYPES[i] = (int(g.ggml_blck_size(i)), int(g.ggml_type_size(i)))
        except Exception:  # no libggml module: the gguf package's table
            import gguf

            for t, (blck, size) in gguf.GGML_QUANT_SIZES.items():
                _TYPES[int(t)] = (blck, size)
    return _TYPES


def nbytes(ne, ttype):
    tt = ggml_types().get(ttype)
    if not tt or tt[0] <= 0 or tt[1] <= 0 or any(x < 0 for x in ne):
        return None
    n = list(ne) + [1] * (4 - len(ne))
    if n[0] % tt[0]:
        return None
    return n[0] // tt[0] * tt[1] * n[1] * n[2] * n[3]


def enc_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def enc_value(vtype: int, value) -> bytes:
    """Payload of a scalar or string value (no type field)."""
    if vtype == T_STR:
        return enc_str(value if isinstance(value, bytes) else str(value).encode())
    fmt = SCALAR[vtype]
    if fmt[-1] in "fd":
        return struct.pack(fmt, float(value))
    bits = struct.calcsize(fmt) * 8
    v = int(value) & ((1 << bits) - 1)
    if fmt[-1].islower():  # signed
        v = v - (1 << bits) if v >= 1 << (bits - 1) else v
    return struct.pack(fmt, v)


def enc_array(etype: int, values) -> bytes:
    return struct.pack("<IQ", etype, len(values)) + b"".join(enc_value(etype, v) for v in values)


def dec_value(vtype: int, payload: bytes):
    if vtype == T_STR:
        return payload[8:]
    if vtype in SCALAR:
        return struct.unpack(SCALAR[vtype], payload[:struct.calcsize(SCALAR[vtype])])[0]
    return None


def serialize_header(g: Gguf, n_tensors=None, n_kv=None, relayout=True, pad_to=None) -> tuple[bytes, list]:
    """Header bytes padded to the data section, and the layout [(tensor, new nbytes)] when
    relayout (offsets recomputed back to back as ggml requires)."""
    out = [b"GGUF", struct.pack("<IQQ", g.version, len(g.tensors) if n_tensors is None else n_tensors,
                                len(g.kvs) if n_kv is None else n_kv)]
    for key, vtype, payload in g.kvs:
        out += [enc_str(key), struct.pack("<I", vtype & 0xFFFFFFFF), payload]
    align = pad_to or g.alignment
    if align <= 0 or align & (align - 1):
        align = DEFAULT_ALIGNMENT
    layout = []
    off = 0
    for t in g.tensors:
        nb = nbytes(t.ne, t.ttype)
        if relayout:
            t.offset = off
            off += ((nb or 0) + align - 1) // align * align
        layout.append((t, nb))
        nd = len(t.ne) if t.nd is None else t.nd
        out += [enc_str(t.name), struct.pack("<I", nd & 0xFFFFFFFF)]
        out += [struct.pack("<Q", x & 0xFFFFFFFFFFFFFFFF) for x in t.ne]
        out += [struct.pack("<I", t.ttype & 0xFFFFFFFF), struct.pack("<Q", t.offset & 0xFFFFFFFFFFFFFFFF)]
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    return head, layout


DATA_CAP = 48 << 20  # a relaid data section is cut here (the file then ends early)


def relaid_data(layout, base_data, align, fill=b"\0") -> list:
    """Data section parts for relayout: each tensor's base bytes cut or zero-extended to its new
    size. Returns a list of bytes / (start, length) references into the base data."""
    parts, total = [], 0
    for t, nb in layout:
        nb = nb or 0
        start, length = t.src
        if total + nb > DATA_CAP:
            parts.append(b"\0" * max(0, min(DATA_CAP - total, 1 << 20)))
            return parts
        take = min(nb, length)
        parts.append((start, take))
        if nb > take:
            parts.append(fill * (nb - take) if len(fill) == 1 else (fill * (nb // len(fill) + 1))[:nb - take])
        pad = -nb % align
        if pad:
            parts.append(b"\0" * pad)
        total += nb + pad
    return parts


# ---------------------------------------------------------------------------------------------
# bases
# ---------------------------------------------------------------------------------------------

MICRO_TEXT_VOCAB = 64
MICRO_CODEBOOK = 64


def make_micro(tiny_f32: Path, dst: Path, dtype: str = "f32") -> Path:
    """A shrunk but complete CSM GGUF: text vocabulary 64, Mimi codebooks of 64 codes (audio vocab
    67), the tokenizer arrays dropped; matrices f32 or f16 (1-D tensors stay f32)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(tiny_f32))
    V = int(r.fields["csm.audio_vocab_size"].contents())
    ncb = int(r.fields["csm.audio_num_codebooks"].contents())
    Vn = MICRO_CODEBOOK + (V - int(r.fields["csm.mimi.codebook_size"].contents()))
    set_kv = {"csm.text_vocab_size": MICRO_TEXT_VOCAB, "csm.bos_token_id": 1, "csm.audio_eos_token_id": 2,
              "csm.audio_token_id": 3, "csm.mimi.codebook_size": MICRO_CODEBOOK, "csm.audio_vocab_size": Vn,
              "csm.codebook_pad_token_id": Vn - 1}
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name.startswith("tokenizer.") or name == "general.architecture":
            continue
        if name in set_kv:
            w.add_uint32(name, set_kv[name])
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), vt)
    for t in r.tensors:
        a = np.asarray(t.data)
        n = t.name
        if n == "backbone.text_embd.weight":
            a = a[:MICRO_TEXT_VOCAB]
        elif n in ("backbone.audio_embd.weight", "depth.token_embd.weight"):
            a = a.reshape(ncb, V, -1)[:, :Vn].reshape(ncb * Vn, -1)
        elif n == "backbone.codebook0_head.weight":
            a = a[:Vn]
        elif n == "depth.codebooks_head.weight":
            a = a[..., :Vn]
        elif n.endswith("_codebook.embedding"):
            a = a[:MICRO_CODEBOOK]
        a = np.ascontiguousarray(a)
        if dtype == "f16" and a.ndim >= 2:
            a = a.astype(np.float16)
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def find_tiny() -> Path:
    """tiny-f32.gguf of the test fixture (tests/conftest.py): the cache of the current sources,
    else the newest cache."""
    try:
        import hashlib

        sys.path.insert(0, str(REPO / "tests"))
        import conftest

        digest = hashlib.sha256(b"".join(p.read_bytes() for p in conftest.FIXTURE_SOURCES)).hexdigest()[:16]
        p = REPO / ".fixture-cache" / f"tiny-{digest}" / "tiny-f32.gguf"
        if p.exists():
            return p
    except Exception:  # noqa: BLE001 - fall back to whatever cache there is
        pass
    cands = sorted((REPO / ".fixture-cache").glob("tiny-*/tiny-f32.gguf"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    if not cands:
        raise SystemExit("no tiny test model in .fixture-cache/: run `pytest tests/test_load.py` once, or pass --model")
    return cands[0]


def make_bases(tiny_f32: Path, out_dir: Path, quant: bool = True) -> dict:
    """{name: path} of the fuzzing bases (built once into out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bases = {}
    for dt in ("f32", "f16"):
        p = out_dir / f"micro-{dt}.gguf"
        if not p.exists():
            make_micro(tiny_f32, out_dir / f"tmp-{dt}.gguf", dt).rename(p)
        bases[f"micro-{dt}"] = p
    if quant:
        p = out_dir / "micro-q4_k.gguf"
        if not p.exists():
            from pycsm import _native as N

            qp = N.lib.csm_quantize_default_params()
            qp.type = 12  # Q4_K (rows of 128 fall back to Q4_0)
            qp.n_threads = 1
            N.check_status(N.lib.csm_quantize(os.fsencode(bases["micro-f32"]), os.fsencode(p), qp), "quantize")
        bases["micro-q4_k"] = p
    bases["full-f32"] = Path(tiny_f32)
    return bases


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------

U64_INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 4095,
                   4096, 65535, 65536, (1 << 20), (1 << 24), (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
                   1 << 40, 1 << 48, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1]
U32_INTERESTING = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 29, 30, 31, 32, 33, 34, 35, 36, 38, 39, 40,
                   41, 63, 64, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, (1 << 31) - 1, 1 << 31,
                   (1 << 32) - 1]
FLOAT_INTERESTING = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-30, 1e-9, 1e-3, 12.5, 24000.0, 1e6, 1e12, 1e30,
                     3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
NON_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"\x80", b"\xed\xa0\x80"]
CSM_KEYS_INT = [b"csm.backbone.n_layers", b"csm.backbone.d_model", b"csm.backbone.n_heads", b"csm.backbone.n_kv_heads",
                b"csm.backbone.head_dim", b"csm.backbone.ff_dim", b"csm.backbone.max_pos", b"csm.depth.n_layers",
                b"csm.depth.d_model", b"csm.depth.n_heads", b"csm.depth.n_kv_heads", b"csm.depth.head_dim",
                b"csm.depth.ff_dim", b"csm.depth.backbone_hidden", b"csm.text_vocab_size", b"csm.audio_vocab_size",
                b"csm.audio_num_codebooks", b"csm.audio_eos_token_id", b"csm.audio_token_id", b"csm.bos_token_id",
                b"csm.codebook_eos_token_id", b"csm.codebook_pad_token_id", b"csm.mimi.dim", b"csm.mimi.n_heads",
                b"csm.mimi.n_layers", b"csm.mimi.codebook_dim", b"csm.mimi.codebook_size",
                b"csm.mimi.n_quantizers", b"csm.mimi.n_semantic", b"csm.mimi.sample_rate", b"general.file_type",
                b"csm.backbone.rope_orig_max_pos", b"csm.depth.rope_orig_max_pos", b"general.alignment"]
CSM_KEYS_FLOAT = [b"csm.backbone.rope_theta", b"csm.backbone.rms_norm_eps", b"csm.depth.rope_theta",
                  b"csm.mimi.frame_rate", b"csm.backbone.rope_scaling_factor", b"csm.backbone.rope_low_freq_factor",
                  b"csm.backbone.rope_high_freq_factor", b"csm.depth.rope_scaling_factor",
                  b"csm.depth.rope_low_freq_factor", b"csm.depth.rope_high_freq_factor"]
CSM_KEYS_STR = [b"general.architecture", b"general.name", b"csm.backbone.rope_scaling_type",
                b"csm.depth.rope_scaling_type"]


@dataclass
class Case:
    """A mutated file: header bytes then data parts (bytes, or (start, length) of the base's data
    section, or ("raw", start, length) of the base file)."""

    desc: list
    parts: list


class Mutator:
    """Makes the cases. bases: {name: path of a valid GGUF}; in_memory: {name: bytes}."""

    def __init__(self, bases: dict, in_memory: dict | None = None):
        import mmap

        self.bases = {}
        for name, path in bases.items():
            f = open(path, "rb")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.bases[name] = (Path(path), buf, parse(buf), f)
        for name, data in (in_memory or {}).items():
            self.bases[name] = (None, data, parse(data), None)

    def op_any(self, rng, bname):
        """One random mutation of base `bname` (for the atheris mode)."""
        ops = [self.op_bitflip, self.op_bytepatch, self.op_span, self.op_truncate, self.op_kv, self.op_tensor,
               self.op_counts, self.op_strings, self.op_alignment, self.op_data, self.op_multi, self.op_depth,
               self.op_tokenizer]
        return rng.choice(ops)(rng, self.bases[bname], False)

    def build(self, base, g, desc, relayout=True, n_tensors=None, n_kv=None, fill=b"\0", truncate=None):
        head, layout = serialize_header(g, n_tensors, n_kv, relayout)
        if relayout:
            parts = [head] + relaid_data(layout, base[1], g.alignment if g.alignment > 0 and not
                                         g.alignment & (g.alignment - 1) else DEFAULT_ALIGNMENT, fill)
            parts = [(("data", p[0], p[1]) if isinstance(p, tuple) else p) for p in parts]
        else:
            parts = [head, ("data", 0, len(base[1]) - base[2].data_offset)]
        c = Case(desc, parts)
        if truncate is not None:
            c.parts.append(("truncate", truncate))
        return c

    # --- the case generator
    def case(self, seed, i) -> tuple[str, Case]:
        rng = random.Random(f"pycsm-fuzz:{seed}:{i}")
        names = list(self.bases)
        weights = [{"micro-f32": 50, "micro-f16": 25, "micro-q4_k": 22, "full-f32": 3}.get(n, 10) for n in names]
        bname = rng.choices(names, weights)[0]
        base = self.bases[bname]
        full = bname.startswith("full")
        ops = [(self.op_bitflip, 14), (self.op_bytepatch, 8), (self.op_span, 22), (self.op_truncate, 6),
               (self.op_kv, 20), (self.op_tensor, 18), (self.op_counts, 4), (self.op_strings, 6),
               (self.op_alignment, 3), (self.op_data, 0 if full else 6), (self.op_multi, 5), (self.op_none, 1),
               (self.op_depth, 0 if full else 3), (self.op_tokenizer, 3)]
        fn = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        c = fn(rng, base, full)
        c.desc.insert(0, bname)
        return bname, c

    def op_none(self, rng, base, full):
        return self.build(base, base[2].copy(), ["unchanged"], relayout=False)

    def op_multi(self, rng, base, full):
        """A structural edit, then byte flips in its header."""
        c = rng.choice([self.op_kv, self.op_tensor, self.op_strings])(rng, base, full)
        if not isinstance(c.parts[0], bytes):
            return c
        head, flips = self._flip(rng, c.parts[0], rng.randint(1, 4))
        c.parts[0] = head
        c.desc.append("flip " + flips)
        return c

    @staticmethod
    def _flip(rng, head: bytes, n) -> tuple[bytes, str]:
        b = bytearray(head)
        flips = []
        for _ in range(n):
            pos = rng.randrange(len(b))
            bit = rng.randrange(8)
            b[pos] ^= 1 << bit
            flips.append(f"{pos}:{bit}")
        return bytes(b), ",".join(flips)

    def op_bitflip(self, rng, base, full):
        g, buf = base[2], base[1]
        n = rng.choice([1, 1, 1, 2, 3, 8, 32])
        if full or rng.random() < 0.9:  # header
            head, flips = self._flip(rng, bytes(buf[:g.data_offset]), n)
            return Case(["flip " + flips], [head, ("raw", g.data_offset, len(buf) - g.data_offset)])
        b = bytearray(buf[:])
        flips = []
        for _ in range(n):
            pos = rng.randrange(g.data_offset, len(b))
            bit = rng.randrange(8)
            b[pos] ^= 1 << bit
            flips.append(f"{pos}:{bit}")
        return Case(["data flip " + ",".join(flips)], [bytes(b)])

    def op_bytepatch(self, rng, base, full):
        g, buf = base[2], base[1]
        head = bytearray(buf[:g.data_offset])
        pos = rng.randrange(len(head))
        kind = rng.randrange(4)
        if kind == 0:
            patch = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 1:
            patch = bytes([rng.choice([0, 0xFF, 0x7F, 0x80, 0x01])]) * rng.choice([1, 2, 4, 8, 16])
        elif kind == 2:
            patch = struct.pack("<Q", rng.choice(U64_INTERESTING))
        else:
            patch = struct.pack("<I", rng.choice(U32_INTERESTING))
        head[pos:pos + len(patch)] = patch
        head = bytes(head[:g.data_offset])
        return Case([f"patch {pos} {patch.hex()}"], [head, ("raw", len(head), len(buf) - len(head))])

    def op_span(self, rng, base, full):
        """An interesting value in a count / length / type / shape / offset field."""
        g, buf = base[2], base[1]
        kinds = sorted({s.kind for s in g.spans})
        kind = rng.choice(kinds)
        span = rng.choice([s for s in g.spans if s.kind == kind])
        old = int.from_bytes(buf[span.off:span.off + span.width], "little")
        pool = U64_INTERESTING if span.width == 8 else U32_INTERESTING if span.width == 4 else list(range(256))
        r = rng.random()
        if r < 0.55:
            v = rng.choice(pool)
        elif r < 0.8:
            v = old + rng.choice([-2, -1, 1, 2, 8, 64, 1 << 20])
        elif r < 0.9:
            v = len(buf) + rng.choice([-1, 0, 1, 1 << 20])
        else:
            v = rng.getrandbits(span.width * 8)
        v &= (1 << (span.width * 8)) - 1
        head = bytearray(buf[:g.data_offset])
        head[span.off:span.off + span.width] = v.to_bytes(span.width, "little")
        return Case([f"{span.kind}@{span.off} {old}->{v}"], [bytes(head), ("raw", g.data_offset, len(buf) - g.data_offset)])

    def op_truncate(self, rng, base, full):
        g, buf = base[2], base[1]
        r = rng.random()
        if r < 0.5:
            cut = rng.randrange(0, g.data_offset + 1)
        elif r < 0.9:
            cut = rng.randrange(g.data_offset, len(buf))
        else:
            cut = len(buf) - rng.choice([1, 2, 16, 31, 32, 33])
        c = Case([f"truncate {cut}/{len(buf)}"], [("raw", 0, cut)])
        if rng.random() < 0.1:  # junk appended instead
            c = Case(["append junk"], [("raw", 0, len(buf)), bytes(rng.randrange(256) for _ in range(rng.randint(1, 999)))])
        return c

    def op_counts(self, rng, base, full):
        g = base[2].copy()
        which = rng.choice(["n_tensors", "n_kv", "both"])
        d = lambda n: rng.choice([0, n - 1, n + 1, n * 2, n + 1000, 1 << 31, 1 << 62, (1 << 64) - 1])
        nt = d(len(g.tensors)) if which != "n_kv" else None
        nk = d(len(g.kvs)) if which != "n_tensors" else None
        return self.build(base, g, [f"counts n_tensors={nt} n_kv={nk}"], relayout=False, n_tensors=nt, n_kv=nk)

    def op_kv(self, rng, base, full):
        g = base[2].copy()
        op = rng.choice(["drop", "dup", "retype", "value", "value", "value", "swap", "rename", "add", "many",
                         "empty_key", "array"])
        desc = [f"kv {op}"]
        keys = CSM_KEYS_INT + CSM_KEYS_FLOAT + CSM_KEYS_STR
        if op == "drop":
            i = g.find(rng.choice(keys)) if rng.random() < 0.7 else rng.randrange(len(g.kvs))
            if i >= 0:
                desc.append(g.kvs[i][0].decode(errors="replace"))
                del g.kvs[i]
        elif op == "dup":
            i = rng.randrange(len(g.kvs))
            desc.append(g.kvs[i][0].decode(errors="replace"))
            g.kvs.insert(rng.randrange(len(g.kvs) + 1), list(g.kvs[i]))
        elif op == "swap":
            rng.shuffle(g.kvs)
        elif op == "rename":
            i = rng.randrange(len(g.kvs))
            k = g.kvs[i][0]
            g.kvs[i][0] = rng.choice([k.upper(), k + b"\0", k[:-1], k + rng.choice(NON_UTF8), b"x" * 300,
                                      rng.choice(keys)])
            desc.append(f"{k!r}->{g.kvs[i][0][:40]!r}")
        elif op == "add":
            k = rng.choice([b"general.alignment", b"csm.unknown", b"tokenizer.ggml.tokens", b"general.name"] + keys)
            i = g.find(k)
            vt = rng.choice([T_U8, T_I8, T_U16, T_I32, T_U32, T_U64, T_I64, T_F32, T_F64, T_BOOL, T_STR])
            val = rng.choice(U32_INTERESTING) if vt != T_STR else b"llama"
            if vt in (T_F32, T_F64):
                val = rng.choice(FLOAT_INTERESTING)
            kv = [k, vt, enc_value(vt, val)]
            if i >= 0 and rng.random() < 0.5:
                g.kvs[i] = kv
            else:
                g.kvs.insert(rng.randrange(len(g.kvs) + 1), kv)
            desc.append(f"{k.decode()}:{vt}={val!r}")
        elif op == "many":
            n = rng.choice([100, 1000, 20000])
            for j in range(n):
                g.kvs.append([b"junk.%d" % j, T_U8, b"\1"])
            desc.append(str(n))
        elif op == "empty_key":
            g.kvs.insert(rng.randrange(len(g.kvs) + 1), [b"", T_U32, enc_value(T_U32, 1)])
        elif op == "array":
            k = rng.choice(keys)
            i = g.find(k)
            et = rng.choice([T_U32, T_I32, T_U8, T_STR, T_F32, T_U64])
            n = rng.choice([0, 1, 2, 5])
            vals = [b"x"] * n if et == T_STR else [1] * n
            kv = [k, T_ARR, enc_array(et, vals)]
            if i >= 0:
                g.kvs[i] = kv
            else:
                g.kvs.append(kv)
            desc.append(f"{k.decode()} = array<{et}>[{n}]")
        elif op == "retype":
            k = rng.choice(keys)
            i = g.find(k)
            if i >= 0:
                old = dec_value(g.kvs[i][1], g.kvs[i][2])
                vt = rng.choice([T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_U64, T_I64, T_F32, T_F64, T_BOOL, T_STR])
                if vt == T_STR:
                    val = str(old).encode() if not isinstance(old, bytes) else old
                elif isinstance(old, bytes):
                    val = len(old)
                elif isinstance(old, float) and vt not in (T_F32, T_F64):
                    val = int(old) if math.isfinite(old) else 0
                else:
                    val = old
                g.kvs[i] = [k, vt, enc_value(vt, val)]
                desc.append(f"{k.decode()} -> type {vt} ({val!r})")
        else:  # value
            r = rng.random()
            if r < 0.55:
                k = rng.choice(CSM_KEYS_INT)
                i = g.find(k)
                old = dec_value(g.kvs[i][1], g.kvs[i][2]) if i >= 0 else 0
                if not isinstance(old, int):
                    old = 0
                v = rng.choice(U32_INTERESTING + [old - 1, old + 1, old * 2, old // 2, -1, -(1 << 31), 0])
                vt = g.kvs[i][1] if i >= 0 and g.kvs[i][1] in INT_TYPES else T_U32
                if rng.random() < 0.2:
                    vt = rng.choice([T_I32, T_I64, T_U64])
                kv = [k, vt, enc_value(vt, v)]
            elif r < 0.85:
                k = rng.choice(CSM_KEYS_FLOAT)
                i = g.find(k)
                v = rng.choice(FLOAT_INTERESTING + [rng.uniform(-10, 10), 10 ** rng.uniform(-40, 40)])
                vt = rng.choice([T_F32, T_F32, T_F64])
                kv = [k, vt, enc_value(vt, v)]
            else:
                k = rng.choice(CSM_KEYS_STR)
                i = g.find(k)
                v = rng.choice([b"", b"csm", b"csm_tts", b"llama", b"none", b"default", b"llama3", b"yarn",
                                b"csm-tts\0x", b"csm-tts" + rng.choice(NON_UTF8), rng.choice(NON_UTF8)])
                kv = [k, T_STR, enc_str(v)]
            if i >= 0:
                g.kvs[i] = kv
            else:
                g.kvs.append(kv)
            desc.append(f"{k.decode()}={v!r}")
        return self.build(base, g, desc, relayout=not full)

    def op_strings(self, rng, base, full):
        g = base[2].copy()
        op = rng.choice(["huge_value", "huge_key", "nonutf8_key", "nonutf8_tensor", "long_tensor_name",
                         "nul", "lie_length"])
        desc = [f"str {op}"]
        if op == "huge_value":
            k = rng.choice(CSM_KEYS_STR + [b"csm.something"])
            n = rng.choice([1 << 16, 1 << 20, 3 << 20])
            i = g.find(k)
            kv = [k, T_STR, enc_str(b"A" * n)]
            if i >= 0:
                g.kvs[i] = kv
            else:
                g.kvs.append(kv)
            desc.append(f"{k.decode()} len {n}")
        elif op == "huge_key":
            g.kvs.insert(rng.randrange(len(g.kvs) + 1), [b"k" * rng.choice([1 << 12, 1 << 20]), T_U8, b"\1"])
        elif op == "nonutf8_key":
            i = rng.randrange(len(g.kvs))
            g.kvs[i][0] = rng.choice(NON_UTF8) + g.kvs[i][0]
        elif op == "nonutf8_tensor":
            t = rng.choice(g.tensors)
            t.name = t.name[:40] + rng.choice(NON_UTF8)
        elif op == "long_tensor_name":
            t = rng.choice(g.tensors)
            t.name = t.name + b"_" * rng.choice([63 - len(t.name), 64 - len(t.name), 200, 1 << 16])
        elif op == "nul":
            t = rng.choice(g.tensors)
            t.name = t.name + b"\0tail"
        else:  # a string whose length field claims more than there is (raw patch of a strlen span)
            spans = [s for s in g.spans if s.kind == "strlen"]
            s = rng.choice(spans)
            head = bytearray(base[1][:g.data_offset])
            v = rng.choice([1 << 20, 64 << 20, (64 << 20) + 1, 1 << 40, len(base[1])])
            head[s.off:s.off + 8] = struct.pack("<Q", v)
            return Case(desc + [f"strlen@{s.off}={v}"], [bytes(head), ("raw", g.data_offset, len(base[1]) - g.data_offset)])
        return self.build(base, g, desc, relayout=not full)

    def op_alignment(self, rng, base, full):
        g = base[2].copy()
        vt = rng.choice([T_U32, T_U32, T_U32, T_U64, T_U8, T_I32, T_STR, T_ARR, T_F32])
        v = rng.choice([0, 1, 2, 3, 8, 16, 24, 32, 64, 4096, 1 << 16, 1 << 20, 1 << 24, 1 << 31, (1 << 32) - 1])
        if vt == T_STR:
            payload = enc_str(b"32")
        elif vt == T_ARR:
            payload = enc_array(T_U32, [32, 32])
        else:
            payload = enc_value(vt, v)
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), [b"general.alignment", vt, payload])
        if vt == T_U32 and v and not v & (v - 1) and v <= (1 << 16) and rng.random() < 0.7:
            g.alignment = v  # a consistent file with that alignment
            relayout = not full
        else:
            relayout = False
        return self.build(base, g, [f"alignment type {vt} = {v}"], relayout=relayout and not full)

    def op_tensor(self, rng, base, full):
        g = base[2].copy()
        op = rng.choice(["drop", "dup", "rename", "ndims", "ne", "ne", "reshape", "type", "type", "offset",
                         "offset", "swap", "extra", "zero_ne"])
        ti = rng.randrange(len(g.tensors))
        t = g.tensors[ti]
        desc = [f"tensor {op} {t.name.decode(errors='replace')}"]
        relayout = not full
        if op == "drop":
            del g.tensors[ti]
        elif op == "dup":
            g.tensors.insert(rng.randrange(len(g.tensors) + 1), Tensor(t.name, list(t.ne), t.ttype, t.offset, t.src))
        elif op == "rename":
            other = rng.choice(g.tensors)
            t.name = rng.choice([other.name, t.name.replace(b"weight", b"wieght"), b"", t.name.upper()])
            desc.append(repr(t.name))
        elif op == "ndims":
            nd = rng.choice([0, 1, 2, 3, 4, 5, 8, 1 << 31])
            if nd <= 8:
                t.ne = (t.ne + [1] * 8)[:nd] if nd >= len(t.ne) else t.ne[:nd]
            else:  # the count claims more dims than are written
                relayout = False
                t.nd = nd
            desc.append(f"ndims {nd}")
        elif op in ("ne", "zero_ne"):
            j = rng.randrange(len(t.ne)) if t.ne else 0
            if not t.ne:
                t.ne = [1]
            v = 0 if op == "zero_ne" else rng.choice([0, 1, 2, t.ne[j] - 1, t.ne[j] + 1, t.ne[j] * 2, -1, -(1 << 63),
                                                      (1 << 31), (1 << 32), (1 << 62), (1 << 63) - 1, 1 << 40])
            t.ne[j] = v
            desc.append(f"ne[{j}]={v}")
            if rng.random() < 0.3:
                relayout = False
        elif op == "reshape":  # same element count, other shape
            if len(t.ne) >= 2:
                t.ne = [t.ne[1], t.ne[0]] + t.ne[2:]
            else:
                t.ne = [1, t.ne[0]] if rng.random() < 0.5 else t.ne + [1]
            desc.append(str(t.ne))
        elif op == "type":
            types = list(ggml_types())
            t.ttype = rng.choice(types + [len(types), len(types) + 1, 4, 5, 31, 32, 33, 40, 1 << 20, -1, -(1 << 31)])
            desc.append(f"type {t.ttype}")
        elif op == "offset":
            relayout = False
            kind = rng.choice(["past_end", "misaligned", "overlap", "random", "reverse"])
            if kind == "past_end":
                t.offset = len(base[1]) + rng.choice([0, 32, 1 << 30, (1 << 63)])
            elif kind == "misaligned":
                t.offset += rng.choice([1, 4, 16, 31])
            elif kind == "overlap":
                t.offset = g.tensors[max(0, ti - 1)].offset
            elif kind == "random":
                t.offset = rng.getrandbits(64)
            else:
                for x in g.tensors:
                    x.offset = (len(base[1]) - g.data_offset) - x.offset - (x.src[1])
            desc.append(kind)
        elif op == "swap":
            rng.shuffle(g.tensors)
        elif op == "extra":
            g.tensors.append(Tensor(b"extra.tensor", [rng.choice([1, 32, 1 << 20])], 0, 0, (0, 0)))
        return self.build(base, g, desc, relayout=relayout and not full)

    # the sizes that set the graphs' sizes: blocks of the backbone and the depth decoder, Mimi layers
    DEPTH_KEYS = {b"backbone.blk.": b"csm.backbone.n_layers", b"depth.blk.": b"csm.depth.n_layers",
                  b"mimi.dec_tfm.layers.": b"csm.mimi.n_layers", b"mimi.enc_tfm.layers.": b"csm.mimi.n_layers"}

    def op_depth(self, rng, base, full):
        """A deeper (or shallower) model that is consistent: blocks added as copies of block 0 (same
        bytes), or dropped, with the layer count set to match; sometimes off by one."""
        g = base[2].copy()
        prefix = rng.choice([b"backbone.blk.", b"depth.blk.", b"mimi.dec_tfm.layers."])
        key = self.DEPTH_KEYS[prefix]
        prefixes = [p for p, k in self.DEPTH_KEYS.items() if k == key]  # Mimi: encoder and decoder together
        n = rng.choice([1, 3, 17, 64, 129, 140, 200, 300])
        for pfx in prefixes:
            have = {t.name for t in g.tensors if t.name.startswith(pfx)}
            block0 = [t for t in g.tensors if t.name.startswith(pfx + b"0.")]
            g.tensors = [t for t in g.tensors if not t.name.startswith(pfx) or int(t.name[len(pfx):].split(b".")[0]) < n]
            for i in range(1, n):
                for t in block0:
                    name = pfx + str(i).encode() + t.name[len(pfx) + 1:]
                    if name not in have:
                        g.tensors.append(Tensor(name, list(t.ne), t.ttype, 0, t.src))
        claimed = n + rng.choice([0, 0, 0, 0, 1, -1])
        i = g.find(key)
        g.kvs[i] = [key, T_U32, enc_value(T_U32, claimed)]
        return self.build(base, g, [f"depth {key.decode()} = {claimed} ({n} blocks)"])

    def op_tokenizer(self, rng, base, full):
        """tokenizer.ggml.tokens / merges: as long as the vocabulary, one longer, far longer, empty,
        of another element type or not an array."""
        g = base[2].copy()
        vocab = dec_value(T_U32, g.kvs[g.find(b"csm.text_vocab_size")][2])
        key = rng.choice([b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges"])
        kind = rng.choice(["count", "count", "count", "etype", "scalar"])
        if kind == "count":
            n = rng.choice([0, 1, vocab - 1, vocab, vocab + 1, 2 * vocab, 100_000, (1 << 20) + 1])
            payload = enc_array(T_STR, [b"t%d" % j for j in range(n)])
            vt, desc = T_ARR, f"{n} strings"
        elif kind == "etype":
            vt, desc = T_ARR, "u32 elements"
            payload = enc_array(T_U32, list(range(rng.choice([1, vocab, vocab + 1]))))
        else:
            vt, payload, desc = T_U32, enc_value(T_U32, vocab), "a u32"
        i = g.find(key)
        if i >= 0:
            g.kvs[i] = [key, vt, payload]
        else:
            g.kvs.append([key, vt, payload])
        return self.build(base, g, [f"{key.decode()}: {desc}"], relayout=not full)

    def op_data(self, rng, base, full):
        """Non-finite or extreme weights in a valid file."""
        g = base[2].copy()
        buf = base[1]
        b = bytearray(buf[:])
        targets = [t for t in g.tensors if t.ttype in (0, 1)]
        desc = ["data"]
        for _ in range(rng.randint(1, 4)):
            t = rng.choice(targets)
            start = g.data_offset + t.src[0]
            width = 4 if t.ttype == 0 else 2
            n = t.src[1] // width
            val = rng.choice(["nan", "inf", "-inf", "big", "zero_all"])
            if val == "zero_all":
                b[start:start + t.src[1]] = b"\0" * t.src[1]
            else:
                pat = {("nan", 4): struct.pack("<f", math.nan), ("inf", 4): struct.pack("<f", math.inf),
                       ("-inf", 4): struct.pack("<f", -math.inf), ("big", 4): struct.pack("<f", 3e38),
                       ("nan", 2): b"\x00\x7e", ("inf", 2): b"\x00\x7c", ("-inf", 2): b"\x00\xfc",
                       ("big", 2): b"\xff\x7b"}[(val, width)]
                for _ in range(rng.choice([1, 8, max(1, n // 10), n])):
                    k = rng.randrange(n)
                    b[start + k * width:start + (k + 1) * width] = pat
            desc.append(f"{t.name.decode()}:{val}")
        return Case(desc, [bytes(b)])

    # --- writing
    def write(self, bname, c: Case, path: Path):
        with open(path, "wb") as f:
            self._emit(bname, c, f, True)

    def to_bytes(self, bname, c: Case) -> bytes:
        import io

        f = io.BytesIO()
        self._emit(bname, c, f, False)
        return f.getvalue()

    def _emit(self, bname, c: Case, f, sendfile: bool):
        base = self.bases[bname]
        buf, g = base[1], base[2]
        fsrc = base[3]
        for p in c.parts:
            if isinstance(p, (bytes, bytearray)):
                f.write(p)
            elif p[0] == "truncate":
                f.truncate(p[1])
            else:
                start = p[1] + (g.data_offset if p[0] == "data" else 0)
                length = max(0, min(p[2], len(buf) - start))
                if length > (4 << 20) and fsrc is not None and sendfile:
                    f.flush()
                    done = 0
                    while done < length:
                        n = os.sendfile(f.fileno(), fsrc.fileno(), start + done, length - done)
                        if n <= 0:
                            break
                        done += n
                elif length:
                    f.write(buf[start:start + length])


# ---------------------------------------------------------------------------------------------
# running one file through the C API (in a worker process)
# ---------------------------------------------------------------------------------------------

def run_file(path: Path, rng: random.Random, quantize_out: Path | None = None) -> dict:
    """Loads `path` through csm_model_load and exercises a model that loads; with quantize_out,
    also runs csm_quantize on it (and loads its output). Returns a result dict: outcome
    'rejected' (a clean error), 'ok', or 'bad' (a broken contract: an error without a message,
    codes out of range, ...)."""
    from pycsm import _native as N

    res = {"outcome": "rejected"}
    mp = N.lib.csm_model_default_params()
    mp.device = N.CSM_DEVICE_CPU
    mp.use_mmap = rng.random() < 0.7
    mp.use_repack = rng.random() < 0.5
    _load_and_run(path, rng, mp, res)
    if quantize_out is not None:
        _quantize(path, rng, mp, quantize_out, res)
    return res


def _load_and_run(path, rng, mp, res):
    from pycsm import _native as N
    import numpy as np

    lib = N.lib
    m = lib.csm_model_load(os.fsencode(path), mp)
    if not m:
        msg = N.last_error()
        res["msg"] = msg[:300]
        res["msg_len"] = len(msg)
        if not msg:
            res.update(outcome="bad", why="csm_model_load returned NULL without a message")
        return
    try:
        h = lib.csm_model_hparams(m)
        lib.csm_model_name(m), lib.csm_model_n_params(m), lib.csm_model_n_bytes(m), lib.csm_model_device(m)
        res["outcome"] = "ok"
        steps = []
        cp = lib.csm_context_default_params()
        cp.n_threads = 1
        cp.max_pos = min(h.bb_max_pos, 32)
        ctx = lib.csm_context_new(m, cp)
        if not ctx:
            steps.append("context: " + N.last_error()[:120])
        else:
            try:
                V = h.text_vocab_size
                prompt = np.full((4, N.CSM_N_COLUMNS), -1, np.int32)
                prompt[:3, N.CSM_TEXT_COLUMN] = [h.bos_token_id % V, 5 % V, 7 % V]
                prompt[3, :N.CSM_N_CODEBOOKS] = np.arange(32) % max(1, min(h.mimi_codebook_size, h.audio_vocab_size))
                gp = lib.csm_generate_default_params()
                gp.sampling.temperature = rng.choice([0.0, 0.9, 1.5])
                gp.sampling.top_k = rng.choice([0, 1, 50])
                gp.sampling.seed = rng.getrandbits(64)
                gp.max_frames = 1
                gp.stop_at_eos = False
                out = np.full((2, N.CSM_N_CODEBOOKS), -7, np.int32)
                r = N.csm_generate_result()
                n = lib.csm_generate(ctx, prompt.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), prompt.shape[0], gp,
                                     out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 2, ctypes.byref(r))
                if n < 0:
                    msg = N.last_error()
                    steps.append("generate: " + msg[:120])
                    if not msg:
                        res.update(outcome="bad", why="csm_generate failed without a message")
                elif n != 1 or r.n_frames != 1:
                    res.update(outcome="bad", why=f"asked for 1 frame, got {n}")
                else:
                    codes = out[:1]
                    if codes.min() < 0 or codes.max() >= h.mimi_codebook_size:
                        res.update(outcome="bad", why=f"code out of range: {codes.tolist()}")
                    steps.append("generated")
            finally:
                lib.csm_context_free(ctx)
        # Mimi: decode the codes, encode a little noise (errors are fine, crashes are not)
        codes = np.zeros((2, N.CSM_N_CODEBOOKS), np.int32)
        pcm = np.zeros(2 * max(1, h.samples_per_frame), np.float32)
        ns = lib.csm_mimi_decode(m, codes.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 2,
                                 pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), pcm.size, 1)
        steps.append(f"decode {ns}" if ns >= 0 else "decode: " + N.last_error()[:80])
        if ns < 0 and not N.last_error():
            res.update(outcome="bad", why="csm_mimi_decode failed without a message")
        sig = np.asarray(rng.random() * np.sin(np.arange(3000) / 7.0), np.float32)
        ecodes = np.zeros((8, N.CSM_N_CODEBOOKS), np.int32)
        nf = lib.csm_mimi_encode(m, sig.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), sig.size,
                                 ecodes.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 8, 1)
        steps.append(f"encode {nf}" if nf >= 0 else "encode: " + N.last_error()[:80])
        res["steps"] = steps
    finally:
        lib.csm_model_free(m)


def _quantize(path, rng, mp, quantize_out, res):
    from pycsm import _native as N

    lib = N.lib
    qp = lib.csm_quantize_default_params()
    qp.type = rng.choice([8, 2, 12, 1])
    qp.n_threads = 1
    st = lib.csm_quantize(os.fsencode(path), os.fsencode(quantize_out), qp)
    if st != 0:
        res["quantize"] = "error: " + N.last_error()[:120]
        if not N.last_error():
            res.update(outcome="bad", why="csm_quantize failed without a message")
        return
    m2 = lib.csm_model_load(os.fsencode(quantize_out), mp)
    res["quantize"] = "ok, reload " + ("ok" if m2 else "error: " + N.last_error()[:80])
    lib.csm_model_free(m2)
    try:
        os.unlink(quantize_out)
    except OSError:
        pass


def worker_main(args):
    """Reads case numbers on stdin, answers one JSON line per case on stdout."""
    if args.rlimit_gb and "asan" not in os.environ.get("LD_PRELOAD", ""):
        import resource

        lim = int(args.rlimit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    bases = json.loads(args.bases)
    mut = Mutator(bases)
    work = Path(args.workdir)
    path = work / f"case-{os.getpid()}.gguf"
    qpath = work / f"q-{os.getpid()}.gguf"
    # The answers go to the original stdout; whatever else writes to fd 1 (the library must not)
    # lands in stdout-<pid>.log, which the parent reports.
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    fd = os.open(work / f"stdout-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.close(fd)
    for line in sys.stdin:
        task = json.loads(line)
        t0 = time.monotonic()
        if "file" in task:  # an explicit file
            fpath, desc = Path(task["file"]), task.get("desc", task["file"])
            rng = random.Random(f"pycsm-run:{task['file']}")
            q = task.get("quantize", False)
        else:  # case i of the seed
            i = task["i"]
            bname, c = mut.case(args.seed, i)
            mut.write(bname, c, path)
            fpath, desc = path, " | ".join(c.desc)
            rng = random.Random(f"pycsm-run:{args.seed}:{i}")
            q = rng.random() < args.quantize_rate
        res = run_file(fpath, rng, qpath if q else None)
        res.update(i=task["i"], desc=desc[:300], ms=round((time.monotonic() - t0) * 1000, 1),
                   size=fpath.stat().st_size)
        out.write(json.dumps(res) + "\n")
        out.flush()
    for p in (path, qpath):
        try:
            p.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# the parent: a pool of worker processes that may die
# ---------------------------------------------------------------------------------------------

def signature(msg: str) -> str:
    """An error message without its numbers and quoted names, to count kinds of rejection."""
    s = re.sub(r"'[^']*'", "'_'", msg)
    s = re.sub(r"(?<![\w])/[\w./-]+", "PATH", s)
    s = re.sub(r"gguf_init_from_\w+: ", "", s)
    s = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", s)
    return s.strip()[:100]


@dataclass
class Summary:
    cases: int = 0
    outcomes: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)     # crashes, hangs, bad results
    signatures: dict = field(default_factory=dict)   # rejection kinds -> count
    steps: dict = field(default_factory=dict)        # what ran on models that loaded -> count
    results: list = field(default_factory=list)      # every result (runs over given files only)
    bases: dict = field(default_factory=dict)
    seconds: float = 0.0
    slowest: list = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{self.cases} cases in {self.seconds:.1f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
                 "bases: " + ", ".join(f"{k} {v}" for k, v in sorted(self.bases.items())),
                 f"{len(self.signatures)} kinds of rejection; most common:"]
        for sig, n in sorted(self.signatures.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"  {n:6d}  {sig}")
        lines.append("on models that loaded:")
        for sig, n in sorted(self.steps.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"  {n:6d}  {sig}")
        lines.append("slowest: " + ", ".join(f"#{i} {ms:.0f} ms" for ms, i in self.slowest[:5]))
        for f in self.findings:
            lines.append(f"FINDING {f['kind']}: case {f['i']} ({f.get('desc', '')}) {f.get('detail', '')}")
        return "\n".join(lines)


class _Worker:
    def __init__(self, cmd, env, log):
        self.log = open(log, "ab")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                  bufsize=0)
        self.buf = b""
        self.case = None
        self.t0 = 0.0
        self.logpath = log

    def send(self, task):
        self.case = task["i"]
        self.task = task
        self.t0 = time.monotonic()
        self.p.stdin.write(json.dumps(task).encode() + b"\n")
        self.p.stdin.flush()

    def kill(self):
        try:
            self.p.kill()
        except OSError:
            pass
        self.p.wait()
        self.log.close()

    def stderr_tail(self, n=3000) -> str:
        try:
            data = Path(self.logpath).read_bytes()
            return data[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


def run(cases: int, seed: int = 0, workers: int = 2, bases: dict | None = None, workdir: Path | None = None,
        findings_dir: Path | None = None, timeout: float = 60.0, quantize_rate: float = 0.08, start: int = 0,
        rlimit_gb: float = 16.0, progress=None, env=None, files=None) -> Summary:
    """Runs cases [start, start + cases) of `seed` in `workers` processes; or, given files
    ([(path, description, quantize)]), those files."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="pycsm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)) \
        if own else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if bases is None:
        tiny = find_tiny()
        bases = make_bases(tiny, tiny.parent / "fuzz-bases")
    bases = {k: str(v) for k, v in bases.items()}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(seed), "--bases", json.dumps(bases),
           "--workdir", str(workdir), "--quantize-rate", str(quantize_rate), "--rlimit-gb", str(rlimit_gb)]
    env = dict(os.environ if env is None else env)
    env["GGML_NO_BACKTRACE"] = "1"  # ggml_abort would start gdb, which writes to our stdout
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    s = Summary()
    t_start = time.monotonic()
    if files is not None:
        todo = [{"i": k, "file": str(f), "desc": d, "quantize": q} for k, (f, d, q) in enumerate(files)][::-1]
    else:
        todo = [{"i": i} for i in range(start + cases - 1, start - 1, -1)]
    sel = selectors.DefaultSelector()
    pool: list[_Worker] = []
    nlog = [0]

    def spawn():
        nlog[0] += 1
        w = _Worker(cmd, env, workdir / f"worker-{nlog[0]}.log")
        sel.register(w.p.stdout, selectors.EVENT_READ, w)
        pool.append(w)
        return w

    def retire(w):
        sel.unregister(w.p.stdout)
        pool.remove(w)
        w.kill()

    def record_finding(kind, task, detail):
        i = task["i"]
        if "file" in task:
            f = {"kind": kind, "i": i, "desc": task.get("desc", ""), "detail": detail[-2000:], "file": task["file"]}
            s.findings.append(f)
            if findings_dir is not None:
                findings_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(task["file"], findings_dir / f"{kind}-{Path(task['file']).name}")
            return
        mut = Mutator(bases)
        bname, c = mut.case(seed, i)
        f = {"kind": kind, "i": i, "desc": " | ".join(c.desc)[:300], "detail": detail[-2000:]}
        if findings_dir is not None:
            findings_dir.mkdir(parents=True, exist_ok=True)
            p = findings_dir / f"{kind}-seed{seed}-case{i}.gguf"
            mut.write(bname, c, p)
            f["file"] = str(p)
            f["replay"] = f"python {Path(__file__).name} --replay {p} --seed {seed} --case {i} --quantize-rate {quantize_rate}"
            (findings_dir / f"{kind}-seed{seed}-case{i}.txt").write_text(json.dumps(f, indent=1))
        s.findings.append(f)

    def replace_lost(w, kind, detail):
        """A worker that crashed or hung: count its case as a finding, start another worker."""
        task = w.task
        retire(w)
        s.cases += 1
        s.outcomes[kind] = s.outcomes.get(kind, 0) + 1
        record_finding(kind, task, detail)
        w2 = spawn()
        if todo:
            w2.send(todo.pop())

    try:
        for _ in range(max(1, min(workers, cases))):
            w = spawn()
            if todo:
                w.send(todo.pop())
        while any(w.case is not None for w in pool):
            events = sel.select(timeout=1.0)
            for key, _ in events:
                w = key.data
                chunk = os.read(w.p.stdout.fileno(), 1 << 16)
                if not chunk:  # the worker died
                    rc = w.p.wait()
                    replace_lost(w, "crash", f"exit status {rc}; stderr: {w.stderr_tail()}")
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    try:
                        res = json.loads(line)
                    except ValueError:
                        s.findings.append({"kind": "protocol", "i": w.case, "detail": line[:500].decode("utf-8", "replace")})
                        continue
                    s.cases += 1
                    o = res["outcome"]
                    s.outcomes[o] = s.outcomes.get(o, 0) + 1
                    if files is not None:
                        s.results.append(res)
                    base = res["desc"].split(" | ")[0]
                    s.bases[base] = s.bases.get(base, 0) + 1
                    s.slowest = sorted(s.slowest + [(res["ms"], res["i"])], reverse=True)[:10]
                    if o == "rejected":
                        sig = signature(res.get("msg", ""))
                        s.signatures[sig] = s.signatures.get(sig, 0) + 1
                    for step in res.get("steps", []) + ([("quantize " + res["quantize"])] if "quantize" in res else []):
                        sig = signature(step)
                        s.steps[sig] = s.steps.get(sig, 0) + 1
                    if o == "bad":
                        record_finding("bad", w.task, res.get("why", "") + " " + json.dumps(res)[:500])
                    w.case = None
                    if progress and s.cases % 500 == 0:
                        progress(s)
                    if todo:
                        w.send(todo.pop())
            now = time.monotonic()
            for w in list(pool):
                if w.case is not None and now - w.t0 > timeout:
                    replace_lost(w, "hang", f"no answer in {timeout:.0f} s; stderr: {w.stderr_tail()}")
    finally:
        for w in list(pool):
            try:
                w.p.stdin.close()
            except OSError:
                pass
        for w in list(pool):
            try:
                w.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            sel.unregister(w.p.stdout)
            w.kill()
            tail = w.stderr_tail()
            if w.p.returncode not in (0, None):
                s.findings.append({"kind": "exit", "i": -1, "detail": f"worker exited with {w.p.returncode} at "
                                                                         f"shutdown; stderr: {tail}"})
            elif re.search(r"ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:", tail):
                s.findings.append({"kind": "sanitizer", "i": -1, "detail": tail})
        for log in sorted(workdir.glob("stdout-*.log")):
            text = log.read_bytes()
            if text:
                s.findings.append({"kind": "stdout", "i": -1, "detail": "the library wrote to stdout: "
                                   + text[:2000].decode("utf-8", "replace")})
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    s.seconds = time.monotonic() - t_start
    return s


TYPE_ROLES = [  # a tensor of each kind of use, on the micro f32 base
    "backbone.blk.0.attn_q.weight",            # matrix product, rows of 128
    "backbone.blk.0.ffn_down.weight",          # matrix product, rows of 256 (K-quants fit)
    "depth.blk.1.ffn_down.weight",
    "depth.projection.weight",
    "backbone.codebook0_head.weight",
    "backbone.text_embd.weight",               # row lookups
    "backbone.audio_embd.weight",
    "depth.token_embd.weight",
    "depth.codebooks_head.weight",             # 3-D, transposed at load
    "backbone.output_norm.weight",             # 1-D
    "mimi.dec_tfm.layers.0.attn.qkv_w",        # Mimi matrices, convolutions, codebooks
    "mimi.enc_tfm.layers.1.ffn_down_w",
    "mimi.decoder.model.0.conv2.weight",
    "mimi.encoder.model.0.conv2.weight",
    "mimi.upsample.conv3.weight",
    "mimi.downsample.conv3.weight",
    "mimi.quantizer.rvq_first.vq.layers.0._codebook.embedding",
    "mimi.quantizer.rvq_rest.input_proj.weight",
    "mimi.decoder.model.0.conv2.bias",
]


def type_matrix(bases: dict, out_dir: Path, roles=TYPE_ROLES, types=None) -> list:
    """Files of the micro f32 model with one tensor retyped to each ggml type (zero data, offsets
    consistent): [(path, description, quantize)]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mut = Mutator({"micro-f32": bases["micro-f32"]})
    base = mut.bases["micro-f32"]
    types = sorted(ggml_types()) + [len(ggml_types())] if types is None else types
    files = []
    for role in roles:
        for tt in types:
            g = base[2].copy()
            t = next((t for t in g.tensors if t.name == role.encode()), None)
            if t is None:
                continue
            t.ttype = tt
            c = mut.build(base, g, [f"{role} as type {tt}"])
            c.desc.insert(0, "micro-f32")
            p = out_dir / f"type-{tt}-{role}.gguf"
            mut.write("micro-f32", c, p)
            files.append((p, " | ".join(c.desc), True))
    return files


def regression_files(bases: dict, out_dir: Path) -> list:
    """Hand-made files for the crashes, hangs and abuses found so far:
    [(path, description, quantize, expected outcome, message regex or None)]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mut = Mutator({k: bases[k] for k in ("micro-f32", "micro-q4_k")})
    out = []

    def add(name, bname, edit, expect="rejected", match=None, quantize=False, relayout=True, data=None):
        base = mut.bases[bname]
        g = base[2].copy()
        edit(g)
        c = mut.build(base, g, [name], relayout=relayout)
        p = out_dir / f"{name}.gguf"
        mut.write(bname, c, p)
        if data is not None:
            data(p, g)
        out.append((p, f"{bname} | {name}", quantize, expect, match))

    def set_kv(key, vtype, value):
        def edit(g):
            payload = enc_value(vtype, value)
            i = g.find(key)
            if i >= 0:
                g.kvs[i] = [key, vtype, payload]
            else:
                g.kvs.append([key, vtype, payload])
        return edit

    def retype(name, ttype):
        def edit(g):
            next(t for t in g.tensors if t.name == name).ttype = ttype
        return edit

    def many_keys(n):
        def edit(g):
            g.kvs += [[b"junk.%d" % j, T_U8, b"\1"] for j in range(n)]
        return edit

    def many_tensors(n):
        def edit(g):
            g.tensors += [Tensor(b"junk.%d" % j, [1], 0, 0, (0, 0)) for j in range(n)]
        return edit

    def zero_dim(g):
        next(t for t in g.tensors if t.name == b"mimi.enc_tfm.layers.1.attn.out_w").ne[0] = 0

    def poke(name, values, rows=None):
        """Overwrites f32 elements of tensor `name` in the written file."""
        def data(path, g):
            import numpy as np

            head, _ = serialize_header(g)
            t = next(t for t in g.tensors if t.name == name)
            with open(path, "r+b") as f:
                f.seek(len(head) + t.offset)
                a = np.frombuffer(f.read(nbytes(t.ne, t.ttype)), np.float32).copy().reshape(-1, t.ne[0])
                idx = slice(None) if rows is None else rows
                a[idx] = values
                f.seek(len(head) + t.offset)
                f.write(a.tobytes())
        return data

    # ggml's parser compares every key (tensor name) with all earlier ones: quadratic time
    add("many-keys", "micro-q4_k", many_keys(300_000), match="key/value pairs")
    add("many-tensors", "micro-q4_k", many_tensors(200_000), match="tensors, more than")
    # a zero dimension reached csm_quantize's rows = n / ne[0] (SIGFPE)
    add("zero-dim", "micro-q4_k", zero_dim, quantize=True)
    # Q8_1 / Q8_K matrices: quantised types without to_float / vec_dot (null function call)
    add("q8_1-matrix", "micro-f32", retype(b"backbone.blk.0.attn_q.weight", 9), match="not a weight type", quantize=True)
    add("q8_1-embedding", "micro-f32", retype(b"backbone.text_embd.weight", 9), match="not a weight type")
    add("q8_k-matrix", "micro-f32", retype(b"backbone.blk.1.ffn_down.weight", 15), match="not a weight type")
    add("q8_1-mimi", "micro-f32", retype(b"mimi.dec_tfm.layers.0.attn.qkv_w", 9), match="weight type|type q8_1")
    # a Mimi without transformer layers left the attention inputs unallocated (GGML_ASSERT)
    add("mimi-no-layers", "micro-f32", set_kv(b"csm.mimi.n_layers", T_U32, 0), expect="any")
    # general.alignment of every wrong kind
    for vt, v in ((T_STR, b"32"), (T_U64, 32), (T_U8, 32), (T_I32, 32), (T_U32, 0), (T_U32, 3), (T_U32, 1 << 31)):
        add(f"alignment-{vt}-{v!r}", "micro-f32", set_kv(b"general.alignment", vt, v), relayout=False)
    add("alignment-array", "micro-f32",
        lambda g: g.kvs.append([b"general.alignment", T_ARR, enc_array(T_U32, [32])]), relayout=False)
    # error messages quote strings from the file: they must stay readable
    add("huge-architecture", "micro-f32", set_kv(b"general.architecture", T_STR, b"A" * (1 << 20)),
        match="unsupported architecture")
    add("huge-rope-type", "micro-f32", set_kv(b"csm.backbone.rope_scaling_type", T_STR, b"B" * (1 << 20)),
        match="RoPE")
    # weights that make NaN / inf logits: generation must still give codes in range
    add("nan-head-rows", "micro-f32", lambda g: None, expect="ok",
        data=poke(b"backbone.codebook0_head.weight", float("nan"), rows=slice(0, None, 2)))
    add("nan-head-all", "micro-f32", lambda g: None, expect="ok",
        data=poke(b"backbone.codebook0_head.weight", float("nan")))
    add("inf-depth-heads", "micro-f32", lambda g: None, expect="ok",
        data=poke(b"depth.codebooks_head.weight", float("inf"), rows=slice(0, None, 3)))
    add("inf-embedding", "micro-f32", lambda g: None, expect="ok", data=poke(b"backbone.text_embd.weight", float("inf")))
    return out


def dump(cases: int, seed: int, out_dir: Path, bases: dict, start: int = 0):
    """Writes the cases' files (for a native driver, e.g. .ci/sanitize's leak check)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mut = Mutator(bases)
    for i in range(start, start + cases):
        bname, c = mut.case(seed, i)
        if bname.startswith("full"):
            continue
        mut.write(bname, c, out_dir / f"case-{seed}-{i:07d}.gguf")


def atheris_main(bases: dict, argv: list):
    """libFuzzer through atheris, in this process: the inputs are whole GGUF files (seeded with the
    micro bases), mutated half by libFuzzer's byte mutations and half by this file's structural
    ones. A crash or sanitizer report ends the run with libFuzzer's crash-<sha1> file."""
    import atheris

    from pycsm import _native as N

    N.lib.csm_log_set(N.csm_log_callback(), None)
    work = Path(tempfile.mkdtemp(prefix="pycsm-atheris-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    path = work / "input.gguf"
    corpus = [a for a in argv if not a.startswith("-")]
    if corpus and not any(Path(corpus[0]).iterdir()):
        for name in ("micro-q4_k", "micro-f16"):
            shutil.copy(bases[name], Path(corpus[0]) / f"{name}.gguf")

    def test_one(data: bytes):
        path.write_bytes(data)
        res = run_file(path, random.Random(len(data)))
        if res["outcome"] == "bad":
            raise RuntimeError(res["why"])

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        try:
            mut = Mutator({}, {"input": data})
            out = mut.to_bytes("input", mut.op_any(rng, "input"))
        except Exception:  # noqa: BLE001 - not parseable any more: bytes only
            return atheris.Mutate(data, max_size)
        return out[:max_size]

    atheris.instrument_all()  # Python coverage at least (outcomes, steps); see docs/hardening.md
    atheris.Setup([sys.argv[0]] + argv, test_one, custom_mutator=mutate)
    atheris.Fuzz()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--model", type=Path, help="tiny-f32.gguf (default: the test fixture's)")
    ap.add_argument("--bases-dir", type=Path, help="where the bases are built (default: next to the model)")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--quantize-rate", type=float, default=0.08)
    ap.add_argument("--rlimit-gb", type=float, default=16.0, help="address-space limit of a worker (not under ASan)")
    ap.add_argument("--replay", type=Path, help="run one file in this process")
    ap.add_argument("--case", type=int, help="with --replay: the case number (and --seed) it came from")
    ap.add_argument("--dump", type=Path, help="write the cases' files into this folder instead of running them")
    ap.add_argument("--atheris", nargs=argparse.REMAINDER,
                    help="run libFuzzer through atheris in this process; the rest goes to libFuzzer "
                         "(e.g. CORPUS_DIR -max_len=4000000 -timeout=60 -rss_limit_mb=8192)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bases", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(REPO))
        return worker_main(args)
    sys.path.insert(0, str(REPO))
    if args.replay:
        # --case i (with --seed) repeats the choices the worker made for that case
        rng = random.Random(f"pycsm-run:{args.seed}:{args.case}") if args.case is not None else random.Random(0)
        q = rng.random() < args.quantize_rate if args.case is not None else True
        res = run_file(args.replay, rng, Path(tempfile.mkdtemp()) / "q.gguf" if q else None)
        print(json.dumps(res, indent=1))
        return 0 if res["outcome"] != "bad" else 1
    model = args.model or find_tiny()
    bases = make_bases(model, args.bases_dir or model.parent / "fuzz-bases")
    if args.dump:
        dump(args.cases, args.seed, args.dump, bases, args.start)
        return 0
    if args.atheris is not None:
        return atheris_main(bases, args.atheris)
    s = run(args.cases, args.seed, args.workers, bases, findings_dir=args.findings, timeout=args.timeout,
            quantize_rate=args.quantize_rate, start=args.start, rlimit_gb=args.rlimit_gb,
            progress=lambda s: print(f"... {s.cases} cases, {len(s.findings)} findings",
                                     file=sys.stderr, flush=True))
    print(s.text())
    return 1 if s.findings else 0


if __name__ == "__main__":
    sys.exit(main())
