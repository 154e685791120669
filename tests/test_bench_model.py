"""benchmarks/make_model.py: the random-weight model files follow the GGUF schema and run.

Uses --size tiny (same schema as csm-1b, small widths), so the whole module takes a few seconds.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from pycsm.generator import Generator
from pycsm.model import Model
from pycsm.prompt import text_rows

from gguf_edit import expected_type

REPO = Path(__file__).resolve().parents[1]
MAKE_MODEL = REPO / "benchmarks" / "make_model.py"
Q = gguf.GGMLQuantizationType
QTYPES = {"f16": None, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K}

# benchmarks/make_model.py config("tiny"), as the native library reports it
TINY_HPARAMS = dict(bb_n_layers=2, bb_d_model=128, bb_n_heads=4, bb_n_kv_heads=2, bb_head_dim=32, bb_ff_dim=256,
                    bb_max_pos=2048, dp_n_layers=2, dp_d_model=64, dp_n_heads=4, dp_n_kv_heads=2, dp_head_dim=16,
                    dp_ff_dim=256, text_vocab_size=128256, audio_vocab_size=2051, n_codebooks=32,
                    audio_eos_token_id=128003, audio_token_id=128002, bos_token_id=128000,
                    codebook_eos_token_id=0, codebook_pad_token_id=2050, mimi_dim=64, mimi_n_heads=4,
                    mimi_n_layers=2, mimi_codebook_dim=32, mimi_codebook_size=2048, mimi_n_quantizers=32,
                    mimi_n_semantic=1, sample_rate=24000, samples_per_frame=1920)




def read_tensor_infos(path):
    """(name, ne, ggml type, absolute data offset) of every tensor, without parsing the tokenizer arrays
    into Python objects (gguf.GGUFReader takes ~7 s on the 408k tokenizer strings)."""
    buf = Path(path).read_bytes()
    assert buf[:4] == b"GGUF" and struct.unpack_from("<I", buf, 4)[0] == 3
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    V = gguf.GGUFValueType
    fixed = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
             V.BOOL: 1, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}

    def skip_str(p):
        return p + 8 + struct.unpack_from("<Q", buf, p)[0]

    def skip_value(p, vtype):
        if vtype == V.STRING:
            return skip_str(p)
        if vtype == V.ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if etype in fixed:
                return p + count * fixed[V(etype)]
            for _ in range(count):
                p = skip_value(p, V(etype))
            return p
        return p + fixed[vtype]

    for _ in range(n_kv):
        pos = skip_str(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(pos + 4, V(vtype))
    infos = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{nd}Q", buf, pos + 4)
        ttype, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        infos.append((name, list(ne), Q(ttype), off))
    data_start = pos + (-pos) % 32
    return [(name, ne, t, data_start + off) for name, ne, t, off in infos]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-model")
    out = {}
    for outtype in QTYPES:  # f16 first: the quantised files reuse it from --cache-dir
        path = folder / f"tiny-{outtype}.gguf"
        subprocess.run([sys.executable, str(MAKE_MODEL), "--size", "tiny", "--outtype", outtype, "-o", str(path),
                        "--cache-dir", str(folder), "--threads", "2"], check=True, capture_output=True, text=True)
        out[outtype] = path
    return out


@pytest.mark.parametrize("outtype", list(QTYPES))
def test_loads_with_right_hparams(tiny_files, outtype):
    with Model(tiny_files[outtype], device="cpu") as m:
        hp = m.hparams
        for key, value in TINY_HPARAMS.items():
            assert getattr(hp, key) == value, key
        assert m.n_tensors == 178
        assert m.name == "csm-1b"
        assert m.file_type == {"f16": "f16/f32 (unset)", "q8_0": "q8_0", "q4_k": "q4_k"}[outtype]
        if outtype == "f16":  # the same arrays in all three files; building the tokenizer takes ~1 s
            assert m.tokenizer.n_vocab == 128256
            assert m.tokenizer.encode_segment("Hello", 0)[0] == 128000


def test_full_size_matches_csm_1b():
    """The full-size config gives csm-1b's tensor count and shapes (computed, nothing written)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import make_model
    finally:
        sys.path.pop(0)
    import pycsm.convert as convert

    shapes = convert.expected_shapes(convert._hparams(make_model.config("full")))
    assert len(shapes) == 442
    assert shapes["backbone.text_embd.weight"] == (128256, 2048)
    assert shapes["backbone.blk.15.ffn_down.weight"] == (2048, 8192)
    assert shapes["depth.blk.3.attn_k.weight"] == (256, 1024)
    assert shapes["depth.codebooks_head.weight"] == (31, 1024, 2051)
    assert shapes["mimi.dec_tfm.layers.7.attn.qkv_w"] == (1536, 512)
    assert shapes["mimi.quantizer.rvq_rest.vq.layers.30._codebook.embedding"] == (2048, 256)
    names = make_model.ordered_names(shapes)
    assert sorted(names) == sorted(shapes) and names[-1] == "mimi.enc_tfm.layers.7.attn.qkv_w"


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k"])
def test_quantised_types_follow_the_rule(tiny_files, outtype):
    src = {name: ne for name, ne, _, _ in read_tensor_infos(tiny_files["f16"])}
    if outtype == "q4_k":  # the gguf package's own reader, once (slow: it parses the tokenizer arrays)
        got = [(t.name, t.tensor_type) for t in gguf.GGUFReader(str(tiny_files[outtype])).tensors]
    else:
        got = [(name, t) for name, _, t, _ in read_tensor_infos(tiny_files[outtype])]
    assert [name for name, _ in got] == list(src)
    seen = set()
    for name, ttype in got:
        ne = src[name]
        want = expected_type(name, len(ne), int(ne[0]), QTYPES[outtype])
        assert ttype == want, (name, ttype, want)
        seen.add(ttype)
    expected_seen = {Q.F32, Q.F16, QTYPES[outtype]} | ({Q.Q4_0} if outtype == "q4_k" else set())
    assert seen == expected_seen


def test_f16_types_and_values(tiny_files):
    path = tiny_files["f16"]
    for name, ne, ttype, offset in read_tensor_infos(path):
        assert ttype == (Q.F32 if len(ne) == 1 else Q.F16), name
        n = int(np.prod(ne))
        vals = np.fromfile(path, dtype=np.float32 if ttype == Q.F32 else np.float16, count=n, offset=offset)
        vals = vals.astype(np.float32)
        assert np.isfinite(vals).all() and np.abs(vals).max() < 20, name
        assert vals.std() > 0 or name.endswith(".bias"), name


@pytest.fixture(scope="module")
def prompt_ids(tiny_files):
    with Model(tiny_files["f16"], device="cpu") as m:
        return m.tokenizer.encode_segment("Hello from the benchmark.", 0)


@pytest.mark.parametrize("outtype", list(QTYPES))
def test_generates_frames(tiny_files, prompt_ids, outtype):
    ids = prompt_ids
    with Model(tiny_files[outtype], device="cpu") as m, Generator(m, n_threads=2) as g:
        res = g.generate(text_rows(ids), temperature=0, max_frames=2, stop_at_eos=False)
    assert res.codes.shape == (2, 32)
    assert res.stop_reason == "max_frames"
    assert ((res.codes >= 0) & (res.codes < 2048)).all()
    assert res.t_backbone_ms >= 0 and res.t_depth_ms > 0
