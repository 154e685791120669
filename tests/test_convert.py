"""pycsm.convert / pycsm.gguf_writer against the schema (docs/gguf-schema.md).

The GGUF files are read back with the `gguf` package's GGUFReader (tests only). Expected names
and values are derived here independently of the converter: from the schema table and from the
transformers checkpoint itself.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from safetensors import safe_open
from safetensors.numpy import save_file

from pycsm.convert import convert, main
from pycsm.gguf_writer import GGUFWriter

# tiny model (tests/reference/make_tiny.py): layer counts and widths
LB, LD, LM, NQ = 2, 2, 2, 32
U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING

EXPECTED_META = {
    "general.architecture": (STR, "csm-tts"),
    "general.name": (STR, "csm-1b"),
    **{f"csm.backbone.{k}": (U32, v) for k, v in dict(n_layers=LB, d_model=128, n_heads=4, n_kv_heads=2,
                                                      head_dim=32, ff_dim=256, max_pos=2048).items()},
    "csm.backbone.rope_theta": (F32, 500000.0),
    "csm.backbone.rms_norm_eps": (F32, 1e-5),
    **{f"csm.depth.{k}": (U32, v) for k, v in dict(n_layers=LD, d_model=64, n_heads=4, n_kv_heads=2,
                                                   head_dim=16, ff_dim=256, backbone_hidden=128).items()},
    **{f"csm.{k}": (U32, v) for k, v in dict(text_vocab_size=128256, audio_vocab_size=2051,
                                             audio_num_codebooks=32, audio_eos_token_id=128003,
                                             audio_token_id=128002, bos_token_id=128000,
                                             codebook_eos_token_id=0, codebook_pad_token_id=2050).items()},
    **{f"csm.mimi.{k}": (U32, v) for k, v in dict(dim=64, n_heads=4, n_layers=LM, codebook_dim=32,
                                                  codebook_size=2048, n_quantizers=NQ, n_semantic=1,
                                                  sample_rate=24000).items()},
    "csm.mimi.frame_rate": (F32, 12.5),
    # optional RoPE group, from the config's rope_parameters (csm-1b's llama3 values)
    "csm.backbone.rope_scaling_type": (STR, "llama3"),
    "csm.backbone.rope_scaling_factor": (F32, 32.0),
    "csm.backbone.rope_low_freq_factor": (F32, 0.125),
    "csm.backbone.rope_high_freq_factor": (F32, 0.5),
    "csm.backbone.rope_orig_max_pos": (U32, 1024),
    "csm.depth.rope_scaling_type": (STR, "llama3"),
    "csm.depth.rope_scaling_factor": (F32, 32.0),
    "csm.depth.rope_low_freq_factor": (F32, 1 / 512),
    "csm.depth.rope_high_freq_factor": (F32, 1 / 128),
    "csm.depth.rope_orig_max_pos": (U32, 16),
    "csm.depth.rope_theta": (F32, 500000.0),
}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # GGUFReader takes seconds on the 400k tokenizer strings
def _read_gguf(path: str, mtime: float):
    r = GGUFReader(path)
    meta = {k: (f.types[0] if f.types[0] != GGUFValueType.ARRAY else f.types[1], f.contents())
            for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = []
    for t in r.tensors:
        ne = tuple(int(x) for x in t.shape)
        data = t.data
        if t.tensor_type.name == "BF16":
            data = np.asarray(data).view("<u2").reshape(ne[::-1])
        tensors.append((t.name, t.tensor_type.name, ne, np.asarray(data)))
    return meta, tensors


def read_gguf(path):
    """(metadata {key: (type, value)}, [(name, type name, ne tuple, numpy data in numpy order)])."""
    return _read_gguf(str(path), Path(path).stat().st_mtime)


def load_checkpoint(folder):
    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(p), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def schema_mapping():
    """[(GGUF name, transformers name)] per the schema table, for the tiny layer counts.

    Fused Mimi qkv and codebooks map to a tuple of their source names.
    """
    m = [("backbone.text_embd.weight", "embed_text_tokens.weight"),
         ("backbone.audio_embd.weight", "depth_decoder.model.embed_tokens.weight"),  # tied copy
         ("backbone.output_norm.weight", "backbone_model.norm.weight"),
         ("backbone.codebook0_head.weight", "lm_head.weight"),
         ("depth.projection.weight", "depth_decoder.model.inputs_embeds_projector.weight"),
         ("depth.token_embd.weight", "depth_decoder.model.embed_tokens.weight"),
         ("depth.output_norm.weight", "depth_decoder.model.norm.weight"),
         ("depth.codebooks_head.weight", "depth_decoder.codebooks_head.weight"),
         ("mimi.upsample.conv3.weight", "codec_model.upsample.conv.weight"),
         ("mimi.downsample.conv3.weight", "codec_model.downsample.conv.weight")]
    llama = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj",
                 attn_output="self_attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj",
                 ffn_down="mlp.down_proj", attn_norm="input_layernorm", ffn_norm="post_attention_layernorm")
    for part, src, n in (("backbone", "backbone_model", LB), ("depth", "depth_decoder.model", LD)):
        for i in range(n):
            m += [(f"{part}.blk.{i}.{g}.weight", f"{src}.layers.{i}.{h}.weight") for g, h in llama.items()]
    mimi = {"attn.out_w": "self_attn.o_proj.weight", "ffn_up_w": "mlp.fc1.weight", "ffn_down_w": "mlp.fc2.weight",
            "norm1.weight": "input_layernorm.weight", "norm1.bias": "input_layernorm.bias",
            "norm2.weight": "post_attention_layernorm.weight", "norm2.bias": "post_attention_layernorm.bias",
            "ls1": "self_attn_layer_scale.scale", "ls2": "mlp_layer_scale.scale"}
    for t, src in (("enc_tfm", "encoder_transformer"), ("dec_tfm", "decoder_transformer")):
        for i in range(LM):
            b = f"codec_model.{src}.layers.{i}."
            m += [(f"mimi.{t}.layers.{i}.{g}", b + h) for g, h in mimi.items()]
            m.append((f"mimi.{t}.layers.{i}.attn.qkv_w", tuple(b + f"self_attn.{x}_proj.weight" for x in "qkv")))
    for part in ("encoder", "decoder"):
        convs, blocks = ((0, 3, 6, 9, 12, 14), (1, 4, 7, 10)) if part == "encoder" else \
            ((0, 2, 5, 8, 11, 14), (3, 6, 9, 12))
        for n in convs:
            m += [(f"mimi.{part}.model.{n}.conv2.{x}", f"codec_model.{part}.layers.{n}.conv.{x}")
                  for x in ("weight", "bias")]
        for n in blocks:
            m += [(f"mimi.{part}.model.{n}.blk{j}.{x}", f"codec_model.{part}.layers.{n}.block.{j}.conv.{x}")
                  for j in (1, 3) for x in ("weight", "bias")]
    for rvq, src, n in (("rvq_first", "semantic", 1), ("rvq_rest", "acoustic", NQ - 1)):
        q = f"codec_model.quantizer.{src}_residual_vector_quantizer"
        m += [(f"mimi.quantizer.{rvq}.{x}_proj.weight", f"{q}.{x}_proj.weight") for x in ("input", "output")]
        m += [(f"mimi.quantizer.{rvq}.vq.layers.{i}._codebook.embedding",
               (f"{q}.layers.{i}.codebook.embed_sum", f"{q}.layers.{i}.codebook.cluster_usage")) for i in range(n)]
    return m


def expected_value(sd, src, gname):
    """The float32 array the schema says a GGUF tensor holds (numpy order)."""
    if gname.endswith("attn.qkv_w"):
        return np.concatenate([sd[s] for s in src], axis=0)
    if gname.endswith("_codebook.embedding"):
        return sd[src[0]] / np.maximum(sd[src[1]], 1e-5)[:, None]
    return sd[src]


def gguf_type(ndim, outtype):
    return "F32" if outtype == "f32" or ndim == 1 else outtype.upper()


def n_tensors(lb, ld, lm, nq):
    """Schema tensor count: backbone, depth, two Mimi transformers, two SEANets, up/down, RVQ."""
    return (4 + 9 * lb) + (4 + 9 * ld) + 2 * 10 * lm + 2 * 28 + 2 + (nq + 4)


@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return load_checkpoint(tiny_dir / "checkpoint")


@pytest.fixture(scope="module", params=["f32", "f16"])
def gguf_file(request, tiny_dir):
    return request.param, read_gguf(tiny_dir / f"tiny-{request.param}.gguf")


# ------------------------------------------------------------------------------------------
# the tiny f32 / f16 files
# ------------------------------------------------------------------------------------------


def test_tensor_count_formula():
    assert n_tensors(16, 4, 8, 32) == 442  # csm-1b
    assert len(schema_mapping()) == n_tensors(LB, LD, LM, NQ) == 178


def test_metadata(gguf_file):
    _, (meta, _) = gguf_file
    tokenizer_keys = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}
    assert set(meta) == set(EXPECTED_META) | tokenizer_keys
    for key, (vtype, value) in EXPECTED_META.items():
        got_type, got = meta[key]
        assert got_type == vtype, key
        if vtype == F32:
            assert got == pytest.approx(value, rel=1e-7), key
        else:
            assert got == value, key


def test_tensor_names_shapes_types(gguf_file, ckpt):
    outtype, (_, tensors) = gguf_file
    mapping = dict(schema_mapping())
    assert len(tensors) == len(mapping) == len({t[0] for t in tensors})
    for name, ttype, ne, _ in tensors:
        src = mapping[name]
        shape = expected_value(ckpt, src, name).shape
        assert ne == shape[::-1], name
        assert ttype == gguf_type(len(ne), outtype), name
    shapes = {name: ne for name, _, ne, _ in tensors}
    # spot checks against the schema table's layouts
    assert shapes["backbone.audio_embd.weight"] == (128, 32 * 2051)
    assert shapes["depth.codebooks_head.weight"] == (2051, 64, 31)
    assert shapes["mimi.dec_tfm.layers.0.attn.qkv_w"] == (64, 3 * 64)
    assert shapes["mimi.quantizer.rvq_first.vq.layers.0._codebook.embedding"] == (32, 2048)
    assert shapes["mimi.quantizer.rvq_rest.output_proj.weight"] == (1, 32, 64)
    assert shapes["mimi.quantizer.rvq_rest.input_proj.weight"] == (1, 64, 32)
    assert shapes["mimi.upsample.conv3.weight"] == (4, 1, 64)
    assert shapes["mimi.decoder.model.2.conv2.weight"] == (16, 64, 128)  # ConvTranspose [in,out,k] as stored
    assert shapes["mimi.encoder.model.3.conv2.weight"] == (8, 8, 16)  # Conv1d [out,in,k] as stored


def test_tensor_order(gguf_file):
    _, (_, tensors) = gguf_file
    names = [t[0] for t in tensors]
    pairs = schema_mapping()
    fused = sorted(g for g, s in pairs if g.endswith("attn.qkv_w"))
    plain = [g for _, g in sorted((s if isinstance(s, str) else s[0], g) for g, s in pairs
                                  if not g.endswith("attn.qkv_w"))]
    # backbone.audio_embd sorts under its own transformers name, not the depth copy it came from
    plain.remove("backbone.audio_embd.weight")
    plain.insert(0, "backbone.audio_embd.weight")  # "backbone_model.embed_tokens..." sorts first
    assert names == plain + fused


def test_tensor_values(gguf_file, ckpt):
    outtype, (_, tensors) = gguf_file
    mapping = dict(schema_mapping())
    for name, ttype, ne, data in tensors:
        want = expected_value(ckpt, mapping[name], name)
        if ttype == "F16":
            want = want.astype(np.float16)
        np.testing.assert_array_equal(data, want, err_msg=name)


def test_audio_embedding_written_twice(gguf_file, ckpt):
    _, (_, tensors) = gguf_file
    assert "backbone_model.embed_tokens.embed_audio_tokens.weight" not in ckpt  # as transformers 5 saves
    data = {t[0]: t[3] for t in tensors}
    np.testing.assert_array_equal(data["backbone.audio_embd.weight"], data["depth.token_embd.weight"])


def test_codebook_clamp(tiny_dir, ckpt):
    _, tensors = read_gguf(tiny_dir / "tiny-f32.gguf")
    data = {t[0]: t[3] for t in tensors}
    q = "codec_model.quantizer.acoustic_residual_vector_quantizer.layers.3.codebook."
    usage, embed_sum = ckpt[q + "cluster_usage"], ckpt[q + "embed_sum"]
    assert (usage < 1e-5).any() and (usage == 0).any() and ((usage > 1e-5) & (usage < 1)).any()
    got = data["mimi.quantizer.rvq_rest.vq.layers.3._codebook.embedding"]
    np.testing.assert_array_equal(got, embed_sum / np.maximum(usage, 1e-5)[:, None])
    assert not np.allclose(got, embed_sum / np.maximum(usage, 1.0)[:, None])  # the wrong clamp
    # and it matches what transformers' MimiEuclideanCodebook.embed computes
    import torch
    ref = torch.from_numpy(embed_sum) / torch.from_numpy(usage).clamp(min=1e-5)[:, None]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)


def test_fused_qkv(tiny_dir, ckpt):
    _, tensors = read_gguf(tiny_dir / "tiny-f32.gguf")
    data = {t[0]: t[3] for t in tensors}
    b = "codec_model.decoder_transformer.layers.1.self_attn."
    qkv = data["mimi.dec_tfm.layers.1.attn.qkv_w"]
    for i, x in enumerate("qkv"):
        np.testing.assert_array_equal(qkv[64 * i:64 * (i + 1)], ckpt[b + f"{x}_proj.weight"])


def test_tokenizer(tiny_dir, gguf_file):
    _, (meta, _) = gguf_file
    (ttype, tokens), (mtype, merges) = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert ttype == STR and mtype == STR
    assert len(tokens) == 128256 and len(merges) == 280147
    assert tokens[128000:128004] == ["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"]
    assert tokens[128255] == "<|reserved_special_token_247|>"
    assert tokens[9906] == "Hello" and tokens[1917] == "Ġworld" and tokens[220] == "Ġ"
    assert merges[0] == "Ġ Ġ" and all(m.count(" ") == 1 for m in merges)
    tok = json.loads((tiny_dir / "checkpoint" / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]


# ------------------------------------------------------------------------------------------
# other inputs and outtypes
# ------------------------------------------------------------------------------------------


def _checkpoint_copy(tiny_dir, dst: Path, tensors: dict | None = None, shards: int = 1):
    """config + tokenizer of the tiny checkpoint, with `tensors` (default: the originals)."""
    src = tiny_dir / "checkpoint"
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (dst / f).symlink_to(src / f)
    if tensors is None:
        (dst / "model.safetensors").symlink_to(src / "model.safetensors")
        return dst
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, str(dst / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    if shards > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_with_backbone_audio_embedding(tiny_dir, ckpt, tmp_path):
    """A hub-style checkpoint (both audio tables, sharded) gives the very same file."""
    sd = dict(ckpt)
    sd["backbone_model.embed_tokens.embed_audio_tokens.weight"] = sd["depth_decoder.model.embed_tokens.weight"]
    folder = _checkpoint_copy(tiny_dir, tmp_path / "ck", sd, shards=3)
    convert(folder, tmp_path / "out.gguf", "f32")
    assert (tmp_path / "out.gguf").read_bytes() == (tiny_dir / "tiny-f32.gguf").read_bytes()


def test_only_backbone_audio_embedding(tiny_dir, ckpt, tmp_path):
    sd = dict(ckpt)
    sd["backbone_model.embed_tokens.embed_audio_tokens.weight"] = sd.pop("depth_decoder.model.embed_tokens.weight")
    convert(_checkpoint_copy(tiny_dir, tmp_path / "ck", sd), tmp_path / "out.gguf", "f16")
    assert (tmp_path / "out.gguf").read_bytes() == (tiny_dir / "tiny-f16.gguf").read_bytes()


def test_nested_mimi_names(tiny_dir, ckpt, tmp_path):
    """Mimi keys as the nested transformers modules name them convert like the saved flat keys."""
    nested = {"codec_model.encoder.layers.": "codec_model.encoder.encoder_seanet.layers.",
              "codec_model.decoder.layers.": "codec_model.decoder.decoder_seanet.layers.",
              "codec_model.encoder_transformer.": "codec_model.encoder.encoder_transformer.",
              "codec_model.decoder_transformer.": "codec_model.decoder.decoder_transformer.",
              "codec_model.downsample.": "codec_model.encoder.downsample.",
              "codec_model.upsample.": "codec_model.decoder.upsample."}

    def rename(k):
        for a, b in nested.items():
            if k.startswith(a):
                return b + k[len(a):]
        return k

    sd = {rename(k): v for k, v in ckpt.items()}
    assert len(set(sd) - set(ckpt)) > 50
    convert(_checkpoint_copy(tiny_dir, tmp_path / "ck", sd), tmp_path / "out.gguf", "f16")
    assert (tmp_path / "out.gguf").read_bytes() == (tiny_dir / "tiny-f16.gguf").read_bytes()


def test_bf16_outtype(tiny_dir, ckpt, tmp_path):
    import torch

    convert(_checkpoint_copy(tiny_dir, tmp_path / "ck"), tmp_path / "out.gguf", "bf16")
    mapping = dict(schema_mapping())
    _, tensors = read_gguf(tmp_path / "out.gguf")
    assert len(tensors) == 178
    for name, ttype, ne, data in tensors:
        assert ttype == gguf_type(len(ne), "bf16"), name
        want = expected_value(ckpt, mapping[name], name)
        if ttype == "BF16":  # torch's float32 -> bfloat16 rounding, as bit patterns
            want = torch.from_numpy(np.ascontiguousarray(want)).to(torch.bfloat16).view(torch.int16).numpy()
            want = want.view(np.uint16)
        np.testing.assert_array_equal(data, want, err_msg=name)


def test_bf16_checkpoint(tiny_dir, ckpt, tmp_path):
    """bf16 safetensors (numpy cannot load them) are read from raw bytes: the result equals the
    conversion of an f32 checkpoint holding the same (bf16-rounded) values."""
    import torch
    from safetensors.torch import save_file as save_torch

    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in ckpt.items()}
    f32 = _checkpoint_copy(tiny_dir, tmp_path / "f32", {k: v.float().numpy() for k, v in bf16.items()})
    dst = _checkpoint_copy(tiny_dir, tmp_path / "bf16", {"x": np.zeros(1, np.float32)})  # config + tokenizer
    save_torch(bf16, str(dst / "model.safetensors"))
    convert(dst, tmp_path / "a.gguf", "f32")
    convert(f32, tmp_path / "b.gguf", "f32")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def _legacy(cfg: dict) -> dict:
    """The 4.x config form the hub's sesame/csm-1b uses: rope_theta + rope_scaling, codec frame_rate."""
    cfg = json.loads(json.dumps(cfg))
    for c in (cfg, cfg["depth_decoder_config"]):
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = rp
    mc = cfg["codec_config"]
    mc.pop("rope_parameters")
    mc.pop("_frame_rate", None)
    mc.update(rope_theta=10000.0, frame_rate=12.5)
    return cfg


def test_legacy_rope_config(tiny_dir, tmp_path):
    folder = _checkpoint_copy(tiny_dir, tmp_path / "ck")
    cfg = json.loads((tiny_dir / "checkpoint" / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(_legacy(cfg)))
    convert(folder, tmp_path / "out.gguf", "f16")
    assert (tmp_path / "out.gguf").read_bytes() == (tiny_dir / "tiny-f16.gguf").read_bytes()


class _Recorder:
    def __init__(self):
        self.kv = {}

    def __getattr__(self, name):  # add_u32 / add_f32 / add_str ...
        return lambda key, value: self.kv.__setitem__(key, (name[4:], value))


def test_plain_rope_metadata(tiny_dir):
    """Readers default to csm-1b's llama3 scaling, so plain RoPE must be written as type "none"."""
    from pycsm.convert import _hparams, _write_metadata

    cfg = json.loads((tiny_dir / "checkpoint" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    w = _Recorder()
    _write_metadata(w, _hparams(cfg))
    assert w.kv["csm.backbone.rope_theta"] == ("f32", 10000.0)
    assert w.kv["csm.backbone.rope_scaling_type"] == ("str", "none")
    assert w.kv["csm.depth.rope_scaling_type"] == ("str", "llama3")
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope"):
        _hparams(cfg)


def test_tokenizer_padding(tmp_path):
    """Ids the tokenizer does not name get unique reserved names up to text_vocab_size."""
    from pycsm.convert import _write_tokenizer

    tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
           "added_tokens": [{"id": 4, "content": "<|reserved_special_token_0|>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    w = _Recorder()
    _write_tokenizer(w, tmp_path / "tokenizer.json", 7)
    assert w.kv["tokenizer.ggml.tokens"] == ("str_array", ["a", "b", "ab", "<|reserved_special_token_1|>",
                                                          "<|reserved_special_token_0|>",
                                                          "<|reserved_special_token_2|>",
                                                          "<|reserved_special_token_3|>"])
    assert w.kv["tokenizer.ggml.merges"] == ("str_array", ["a b"])
    with pytest.raises(ValueError, match="text_vocab_size"):
        _write_tokenizer(w, tmp_path / "tokenizer.json", 4)


def test_not_csm_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="not a CSM checkpoint"):
        convert(tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_missing_tensor(tiny_dir, ckpt, tmp_path):
    sd = {k: v for k, v in ckpt.items() if k != "depth_decoder.model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor.*depth\.blk\.1\.ffn_up\.weight"):
        convert(_checkpoint_copy(tiny_dir, tmp_path / "ck", sd), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unexpected_tensor(tiny_dir, ckpt, tmp_path):
    sd = dict(ckpt, **{"backbone_model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor"):
        convert(_checkpoint_copy(tiny_dir, tmp_path / "ck", sd), tmp_path / "out.gguf")


def test_missing_files(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        convert(tmp_path, tmp_path / "out.gguf")
    shutil.copy(tiny_dir / "checkpoint" / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="safetensors"):
        convert(tmp_path, tmp_path / "out.gguf")
    (tmp_path / "model.safetensors").symlink_to(tiny_dir / "checkpoint" / "model.safetensors")
    with pytest.raises(ValueError, match="tokenizer"):
        convert(tmp_path, tmp_path / "out.gguf")


def test_main(tiny_dir, tmp_path, capsys):
    assert main([str(tiny_dir / "checkpoint"), "-o", str(tmp_path / "a.gguf"), "--outtype", "f16"]) == 0
    assert (tmp_path / "a.gguf").read_bytes() == (tiny_dir / "tiny-f16.gguf").read_bytes()
    assert main([str(tmp_path), "-o", str(tmp_path / "b.gguf")]) == 1
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# the writer on its own
# ------------------------------------------------------------------------------------------


def test_writer_roundtrip(tmp_path):
    import torch

    w = GGUFWriter(tmp_path / "t.gguf")
    w.add_u32("a.u32", 7)
    w.add_f32("a.f32", 0.25)
    w.add_str("a.str", "héllo")
    w.add_bool("a.bool", True)
    w.add_str_array("a.strs", ["x y", "", "ü"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    w.add_tensor("t.f32", x.shape, "F32", x)
    w.add_tensor("t.f16", (7, 5), "F16", lambda: x[0].T)
    w.add_tensor("t.bf16", (7,), "BF16", x[1, 1])
    w.add_tensor("t.odd", (1,), "F32", np.ones(1))
    with pytest.raises(ValueError):
        w.add_u32("a.u32", 1)  # duplicate key
    w.write()

    r = GGUFReader(str(tmp_path / "t.gguf"))
    assert r.fields["GGUF.version"].contents() == 3
    got = {k: r.fields[k].contents() for k in ("a.u32", "a.f32", "a.str", "a.bool", "a.strs")}
    assert got == {"a.u32": 7, "a.f32": 0.25, "a.str": "héllo", "a.bool": True, "a.strs": ["x y", "", "ü"]}
    t = {t.name: t for t in r.tensors}
    assert [int(n) for n in t["t.f32"].shape] == [7, 5, 3]  # ggml ne = reversed numpy shape
    np.testing.assert_array_equal(t["t.f32"].data, x)
    np.testing.assert_array_equal(t["t.f16"].data, x[0].T.astype(np.float16))
    bits = torch.from_numpy(x[1, 1].copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(np.asarray(t["t.bf16"].data).view("<u2").reshape(-1), bits)
    assert all(tt.data_offset % 32 == 0 for tt in r.tensors)
