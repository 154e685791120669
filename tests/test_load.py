"""Loading GGUF files: hyper-parameters, and a clear exception (never a crash) for bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pycsm.errors import CSMError
from pycsm.model import Model

from gguf_edit import rewrite


@pytest.fixture(scope="module")
def src(tiny_dir, tmp_path_factory):
    """The tiny f32 model without its tokenizer arrays (the native loader does not read them), so
    that each edited copy below is quick to write."""
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    rewrite(tiny_dir / "tiny-f32.gguf", path, drop_kv={"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})
    Model(path).close()
    return path


def test_hparams_of_tiny_model(tiny_dir):
    import json

    cfg = json.loads((tiny_dir / "checkpoint" / "config.json").read_text())
    for name in ("tiny-f32.gguf", "tiny-f16.gguf"):
        with Model(tiny_dir / name) as m:
            h = m.hparams
            assert h.bb_d_model == cfg["hidden_size"]
            assert h.bb_n_layers == cfg["num_hidden_layers"]
            assert h.dp_d_model == cfg["depth_decoder_config"]["hidden_size"]
            assert h.text_vocab_size == 128256 and h.audio_vocab_size == 2051 and h.n_codebooks == 32
            assert h.mimi_dim == cfg["codec_config"]["hidden_size"]
            assert h.sample_rate == 24000 and h.samples_per_frame == 1920
            assert m.n_tensors > 100 and m.n_bytes > 0
            info = m.info()
            assert info["bb_d_model"] == h.bb_d_model and info["path"].endswith(name)


def load_error(path) -> str:
    with pytest.raises(CSMError) as e:
        Model(path)
    return str(e.value)


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "nope.gguf")
    (tmp_path / "x.gguf").write_bytes(b"hello world, not a gguf at all")
    assert "not a GGUF" in load_error(tmp_path / "x.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "not a GGUF" in load_error(tmp_path / "empty.gguf")
    assert "not a regular file" in load_error(tmp_path)


def test_truncated_files_raise(src, tmp_path):
    data = src.read_bytes()
    offsets = sorted(set([4, 8, 16, 23, 24, 25, 40, 100, 1000, 5000, 20000]
                         + list(np.linspace(100, len(data) - 1, 40).astype(int))))
    for off in offsets:
        p = tmp_path / "t.gguf"
        p.write_bytes(data[:off])
        msg = load_error(p)
        assert any(w in msg for w in ("truncated", "corrupt", "not a GGUF")), (off, msg)


def test_missing_tensor(src, tmp_path):
    rewrite(src, tmp_path / "m.gguf", drop_tensors={"backbone.blk.1.ffn_up.weight"})
    assert "'backbone.blk.1.ffn_up.weight' is missing" in load_error(tmp_path / "m.gguf")


def test_wrong_shape(src, tmp_path):
    import gguf

    t = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "depth.blk.0.attn_q.weight")
    shape = tuple(reversed([int(x) for x in t.shape]))
    rewrite(src, tmp_path / "s.gguf", reshape={t.name: (shape[0] // 2, shape[1] * 2)})
    assert "'depth.blk.0.attn_q.weight' has shape" in load_error(tmp_path / "s.gguf")


def test_wrong_type(src, tmp_path):
    rewrite(src, tmp_path / "w.gguf", retype={"backbone.output_norm.weight": "f16"})
    assert "expected f32" in load_error(tmp_path / "w.gguf")
    rewrite(src, tmp_path / "i.gguf", retype={"backbone.blk.0.attn_k.weight": "i32"})
    assert "attn_k" in load_error(tmp_path / "i.gguf")


def test_wrong_architecture(src, tmp_path):
    rewrite(src, tmp_path / "a.gguf", set_kv={"general.architecture": "llama"})
    msg = load_error(tmp_path / "a.gguf")
    assert "unsupported architecture 'llama'" in msg


@pytest.mark.parametrize("key, value, match", [
    ("csm.backbone.n_layers", 0, "out of range"),
    ("csm.backbone.d_model", 2**31 - 1, "out of range"),
    ("csm.depth.backbone_hidden", 7, "differs"),
    ("csm.backbone.n_kv_heads", 3, "multiple"),
    ("csm.backbone.rope_theta", "fast", "expected a number"),
    ("csm.depth.rope_scaling_type", "yarn", "unsupported RoPE scaling"),
])
def test_bad_metadata(src, tmp_path, key, value, match):
    rewrite(src, tmp_path / "k.gguf", set_kv={key: value})
    assert match in load_error(tmp_path / "k.gguf")


def test_missing_metadata(src, tmp_path):
    rewrite(src, tmp_path / "d.gguf", drop_kv={"csm.audio_vocab_size"})
    assert "missing metadata key 'csm.audio_vocab_size'" in load_error(tmp_path / "d.gguf")
    rewrite(src, tmp_path / "r.gguf", drop_kv={"csm.depth.rope_low_freq_factor"})
    assert "partial RoPE" in load_error(tmp_path / "r.gguf")


def test_absurd_header_counts(src, tmp_path):
    data = bytearray(src.read_bytes())
    cases = {
        "n_tensors": (8, struct.pack("<Q", 2**62)),
        "n_kv": (16, struct.pack("<Q", 2**62)),
        "key length": (24, struct.pack("<Q", 2**62)),
        "key length 2": (24, struct.pack("<Q", len(data) * 4)),
        "version": (4, struct.pack("<I", 999)),
    }
    for name, (off, patch) in cases.items():
        bad = bytearray(data)
        bad[off:off + len(patch)] = patch
        p = tmp_path / "h.gguf"
        p.write_bytes(bytes(bad))
        msg = load_error(p)
        assert "corrupt" in msg or "truncated" in msg, (name, msg)
