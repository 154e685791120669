"""Convert a transformers `CsmForConditionalGeneration` checkpoint folder to the CSM GGUF file.

    pycsm convert CHECKPOINT_DIR -o out.gguf [--outtype f32|f16|bf16]

The output follows docs/gguf-schema.md (the file contract shared with CrispASR). Only json,
numpy and safetensors are used; bf16 safetensors are read from their raw bytes because
numpy has no bfloat16. safetensors (the `pycsm-tts[convert]` extra) is imported on the first
tensor read, so importing this module, or pycsm, costs nothing extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from .gguf_writer import GGUFWriter, bf16_bits_to_f32

OUTTYPES = ("f32", "f16", "bf16")
CODEBOOK_EPS = 1e-5  # MimiEuclideanCodebook: embed = embed_sum / cluster_usage.clamp(min=1e-5)

AUDIO_EMBD_BB = "backbone_model.embed_tokens.embed_audio_tokens.weight"
AUDIO_EMBD_DD = "depth_decoder.model.embed_tokens.weight"

# ------------------------------------------------------------------------------------------
# Tensor names
# ------------------------------------------------------------------------------------------

_LLAMA_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}

_MIMI_LAYER = {
    "self_attn.q_proj.weight": "attn.q",  # q/k/v are fused into attn.qkv_w by convert()
    "self_attn.k_proj.weight": "attn.k",
    "self_attn.v_proj.weight": "attn.v",
    "self_attn.o_proj.weight": "attn.out_w",
    "mlp.fc1.weight": "ffn_up_w",
    "mlp.fc2.weight": "ffn_down_w",
    "input_layernorm.weight": "norm1.weight",
    "input_layernorm.bias": "norm1.bias",
    "post_attention_layernorm.weight": "norm2.weight",
    "post_attention_layernorm.bias": "norm2.bias",
    "self_attn_layer_scale.scale": "ls1",
    "mlp_layer_scale.scale": "ls2",
}
_RVQ = {"semantic": "rvq_first", "acoustic": "rvq_rest"}

_FIXED = {
    "embed_text_tokens.weight": "backbone.text_embd.weight",
    AUDIO_EMBD_BB: "backbone.audio_embd.weight",
    "backbone_model.norm.weight": "backbone.output_norm.weight",
    "lm_head.weight": "backbone.codebook0_head.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "depth.projection.weight",
    AUDIO_EMBD_DD: "depth.token_embd.weight",
    "depth_decoder.model.norm.weight": "depth.output_norm.weight",
    "depth_decoder.codebooks_head.weight": "depth.codebooks_head.weight",
    "codec_model.upsample.conv.weight": "mimi.upsample.conv3.weight",
    "codec_model.downsample.conv.weight": "mimi.downsample.conv3.weight",
}

# transformers holds Mimi as nested encoder/decoder submodules but saves flat names; accept both.
_ALIASES = [
    (r"^codec_model\.(en|de)coder\.\1coder_seanet\.", r"codec_model.\1coder."),
    (r"^codec_model\.(en|de)coder\.(\1coder_transformer)\.", r"codec_model.\2."),
    (r"^codec_model\.encoder\.downsample\.", "codec_model.downsample."),
    (r"^codec_model\.decoder\.upsample\.", "codec_model.upsample."),
]

# Not stored: rotary caches, codebook bookkeeping (cluster_usage is folded into the codebook).
_SKIP = re.compile(r"(\.rotary_emb\.|\.codebook\.(cluster_usage|initialized)$)")


def _flat_name(name: str) -> str:
    for pat, rep in _ALIASES:
        name = re.sub(pat, rep, name)
    return name


def map_name(name: str) -> str | None:
    """transformers name -> GGUF name; None for tensors that are not stored (see _SKIP).

    Mimi q/k/v map to `<prefix>.attn.{q,k,v}`, which the converter fuses into `attn.qkv_w`.
    Raises ValueError for a name this converter does not know.
    """
    if _SKIP.search(name):
        return None
    if name in _FIXED:
        return _FIXED[name]
    m = re.fullmatch(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)", name)
    if m and m[3] in _LLAMA_LAYER:
        part = "backbone" if m[1] == "backbone_model" else "depth"
        return f"{part}.blk.{m[2]}.{_LLAMA_LAYER[m[3]]}"
    m = re.fullmatch(r"codec_model\.(en|de)coder_transformer\.layers\.(\d+)\.(.+)", name)
    if m and m[3] in _MIMI_LAYER:
        return f"mimi.{m[1]}c_tfm.layers.{m[2]}.{_MIMI_LAYER[m[3]]}"
    # SEANet: plain/transposed convs and the two convs of each residual block
    m = re.fullmatch(r"codec_model\.(encoder|decoder)\.layers\.(\d+)\.conv\.(weight|bias)", name)
    if m:
        return f"mimi.{m[1]}.model.{m[2]}.conv2.{m[3]}"
    m = re.fullmatch(r"codec_model\.(encoder|decoder)\.layers\.(\d+)\.block\.(\d+)\.conv\.(weight|bias)", name)
    if m:
        return f"mimi.{m[1]}.model.{m[2]}.blk{m[3]}.{m[4]}"
    m = re.fullmatch(r"codec_model\.quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(.+)", name)
    if m:
        rvq = f"mimi.quantizer.{_RVQ[m[1]]}"
        if m[2] in ("input_proj.weight", "output_proj.weight"):
            return f"{rvq}.{m[2]}"
        k = re.fullmatch(r"layers\.(\d+)\.codebook\.embed_sum", m[2])
        if k:
            return f"{rvq}.vq.layers.{k[1]}._codebook.embedding"
    raise ValueError(f"unexpected tensor in checkpoint: {name}")


# ------------------------------------------------------------------------------------------
# Checkpoint reading
# ------------------------------------------------------------------------------------------


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("converting a checkpoint needs safetensors: pip install 'pycsm-tts[convert]'") from e
    return safe_open(str(path), framework="numpy")


class _Checkpoint:
    """Tensors of a (possibly sharded) safetensors checkpoint, loaded one at a time as float32."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            paths = [folder / f for f in files]
        else:
            paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise ValueError(f"no *.safetensors files in {folder}")
        # flat name -> (file, header entry, data start, name as stored)
        self.where: dict[str, tuple[Path, dict, int, str]] = {}
        for p in paths:
            if not p.exists():
                raise ValueError(f"missing checkpoint shard {p}")
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self.where[_flat_name(name)] = (p, entry, 8 + n, name)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name):
        return name in self.where

    def shape(self, name) -> tuple:
        return tuple(self.where[name][1]["shape"])

    def load(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ValueError(f"missing tensor in checkpoint: {name}")
        path, entry, data_start, orig = self.where[name]
        if entry["dtype"] == "BF16":  # numpy cannot represent bf16: read the raw bits
            begin, end = entry["data_offsets"]
            with open(path, "rb") as f:
                f.seek(data_start + begin)
                bits = np.frombuffer(f.read(end - begin), dtype="<u2")
            return bf16_bits_to_f32(bits).reshape(entry["shape"])
        if path not in self._handles:
            self._handles[path] = _safe_open(path)
        return self._handles[path].get_tensor(orig).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Config -> metadata
# ------------------------------------------------------------------------------------------


def _rope(c: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, llama3 scaling dict or None) from `rope_parameters` (5.x) or `rope_scaling`/`rope_theta`."""
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = float(rp.get("rope_theta", c.get("rope_theta", default_theta)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope type {kind!r} (only default and llama3 are representable)")
    return theta, rp


def _check_value(where: str, c: dict, key: str, expected):
    if key in c and c[key] is not None and c[key] != expected:
        raise ValueError(f"{where}.{key} = {c[key]!r} is not representable in the CSM GGUF (expects {expected!r})")


def _hparams(cfg: dict) -> dict:
    """Validate the config and collect what the converter needs."""
    if cfg.get("model_type") != "csm":
        raise ValueError(f"not a CSM checkpoint: config.json model_type is {cfg.get('model_type')!r}, expected 'csm'")
    dd, mc = cfg.get("depth_decoder_config"), cfg.get("codec_config")
    if not isinstance(dd, dict) or not isinstance(mc, dict):
        raise ValueError("CSM config.json lacks depth_decoder_config or codec_config")
    if mc.get("model_type", "mimi") != "mimi":
        raise ValueError(f"codec_config.model_type is {mc.get('model_type')!r}, expected 'mimi'")
    for where, c in (("config", cfg), ("depth_decoder_config", dd)):
        _check_value(where, c, "hidden_act", "silu")
        _check_value(where, c, "attention_bias", False)
        _check_value(where, c, "mlp_bias", False)
    # Mimi settings the file cannot carry: readers hard-code them (see docs/model.md)
    mimi_fixed = dict(num_residual_layers=1, use_conv_shortcut=False, use_causal_conv=True, pad_mode="constant",
                      trim_right_ratio=1.0, hidden_act="gelu", norm_eps=1e-5, sliding_window=250,
                      attention_bias=False, audio_channels=1, compress=2)
    for key, value in mimi_fixed.items():
        _check_value("codec_config", mc, key, value)

    def block(c):
        heads = int(c["num_attention_heads"])
        return dict(n_layers=int(c["num_hidden_layers"]), d_model=int(c["hidden_size"]), n_heads=heads,
                    n_kv_heads=int(c.get("num_key_value_heads") or heads),
                    head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                    ff_dim=int(c["intermediate_size"]))

    hp = {"backbone": block(cfg), "depth": block(dd)}
    hp["backbone"]["max_pos"] = int(cfg.get("max_position_embeddings", 2048))
    hp["depth"]["max_pos"] = int(dd.get("max_position_embeddings", 33))  # not written (33 = 1 + 32 codebooks)
    hp["backbone"]["rope_theta"], hp["backbone_rope"] = _rope(cfg, 500000.0)
    hp["depth"]["rope_theta"], hp["depth_rope"] = _rope(dd, 500000.0)
    hp["backbone"]["rms_norm_eps"] = float(cfg.get("rms_norm_eps", 1e-5))
    if float(dd.get("rms_norm_eps", 1e-5)) != hp["backbone"]["rms_norm_eps"]:
        raise ValueError("depth decoder rms_norm_eps differs from the backbone's; the GGUF has one value")
    hp["depth"]["backbone_hidden"] = int(dd.get("backbone_hidden_size", hp["backbone"]["d_model"]))
    if hp["depth"]["backbone_hidden"] != hp["backbone"]["d_model"]:
        raise ValueError("depth_decoder_config.backbone_hidden_size must equal the backbone hidden_size")

    hp["text_vocab_size"] = int(cfg.get("text_vocab_size", 128256))
    hp["audio_vocab_size"] = int(cfg.get("vocab_size", 2051))
    hp["audio_num_codebooks"] = int(cfg.get("num_codebooks", 32))
    if int(dd.get("vocab_size", 2051)) != hp["audio_vocab_size"] or \
            int(dd.get("num_codebooks", 32)) != hp["audio_num_codebooks"]:
        raise ValueError("depth decoder vocab_size / num_codebooks differ from the backbone's")
    for key, default in (("audio_eos_token_id", 128003), ("audio_token_id", 128002), ("bos_token_id", 128000),
                         ("codebook_eos_token_id", 0), ("codebook_pad_token_id", 2050)):
        value = cfg.get(key, default)
        hp[key] = int(default if value is None else value)

    heads = int(mc.get("num_attention_heads", 8))
    dim = int(mc.get("hidden_size", 512))
    if int(mc.get("num_key_value_heads") or heads) != heads or int(mc.get("head_dim") or dim // heads) != dim // heads:
        raise ValueError("Mimi attention must have num_key_value_heads == num_attention_heads and head_dim == dim/heads")
    mimi_theta, mimi_scaling = _rope(mc, 10000.0)
    if mimi_theta != 10000.0 or mimi_scaling is not None:
        raise ValueError("Mimi RoPE must be plain RoPE with theta 10000")
    ratios = list(mc.get("upsampling_ratios") or [8, 6, 5, 4])
    frame_rate = mc.get("frame_rate") or mc.get("_frame_rate")
    if frame_rate is None:  # MimiConfig.frame_rate: sampling_rate / (prod(ratios) * 2)
        frame_rate = int(mc.get("sampling_rate", 24000)) / (int(np.prod(ratios)) * 2)
    hp["mimi"] = dict(dim=dim, n_heads=heads, n_layers=int(mc.get("num_hidden_layers", 8)),
                      codebook_dim=int(mc.get("codebook_dim") or dim),
                      codebook_size=int(mc.get("codebook_size", 2048)),
                      n_quantizers=int(mc.get("num_quantizers", 32)),
                      n_semantic=int(mc.get("num_semantic_quantizers", 1)),
                      sample_rate=int(mc.get("sampling_rate", 24000)), frame_rate=float(frame_rate))
    hp["mimi_cfg"] = dict(mc, upsampling_ratios=ratios)
    if int(mc.get("vector_quantization_hidden_dimension", hp["mimi"]["codebook_dim"])) != hp["mimi"]["codebook_dim"]:
        raise ValueError("Mimi vector_quantization_hidden_dimension must equal codebook_dim")
    return hp


def _write_metadata(w: GGUFWriter, hp: dict):
    w.add_str("general.architecture", "csm-tts")
    w.add_str("general.name", "csm-1b")
    for part in ("backbone", "depth"):
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ff_dim"):
            w.add_u32(f"csm.{part}.{key}", hp[part][key])
        if part == "backbone":
            w.add_u32("csm.backbone.max_pos", hp[part]["max_pos"])
            w.add_f32("csm.backbone.rope_theta", hp[part]["rope_theta"])
            w.add_f32("csm.backbone.rms_norm_eps", hp[part]["rms_norm_eps"])
    w.add_u32("csm.depth.backbone_hidden", hp["depth"]["backbone_hidden"])
    for key in ("text_vocab_size", "audio_vocab_size", "audio_num_codebooks", "audio_eos_token_id",
                "audio_token_id", "bos_token_id", "codebook_eos_token_id", "codebook_pad_token_id"):
        w.add_u32(f"csm.{key}", hp[key])
    for key, value in hp["mimi"].items():
        (w.add_f32 if key == "frame_rate" else w.add_u32)(f"csm.mimi.{key}", value)
    # Optional RoPE scaling group. Readers default to csm-1b's llama3 scaling when it is absent,
    # so a model with plain RoPE says so explicitly with type "none".
    for part in ("backbone", "depth"):
        rp = hp[f"{part}_rope"]
        if rp is None:
            vals = ("none", 1.0, 1.0, 1.0, hp[part]["max_pos"])
        else:
            vals = ("llama3", rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"],
                    rp["original_max_position_embeddings"])
        w.add_str(f"csm.{part}.rope_scaling_type", vals[0])
        w.add_f32(f"csm.{part}.rope_scaling_factor", vals[1])
        w.add_f32(f"csm.{part}.rope_low_freq_factor", vals[2])
        w.add_f32(f"csm.{part}.rope_high_freq_factor", vals[3])
        w.add_u32(f"csm.{part}.rope_orig_max_pos", vals[4])
        if part == "depth":
            w.add_f32("csm.depth.rope_theta", hp["depth"]["rope_theta"])


def _write_tokenizer(w: GGUFWriter, path: Path, n_vocab: int):
    if not path.exists():
        raise ValueError(f"missing tokenizer file {path}")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("vocab"):
        raise ValueError(f"{path}: expected a BPE tokenizer with a vocab, got type {model.get('type')!r}")
    id_to_tok = {int(i): t for t, i in model["vocab"].items()}
    id_to_tok.update({int(a["id"]): a["content"] for a in tok.get("added_tokens", [])})
    if max(id_to_tok) >= n_vocab:
        raise ValueError(f"{path}: token id {max(id_to_tok)} >= text_vocab_size {n_vocab}")
    # Ids the tokenizer leaves unnamed get fresh reserved names (unique).
    used, k, tokens = set(id_to_tok.values()), 0, []
    for i in range(n_vocab):
        if i not in id_to_tok:
            while f"<|reserved_special_token_{k}|>" in used:
                k += 1
            id_to_tok[i] = f"<|reserved_special_token_{k}|>"
            used.add(id_to_tok[i])
        tokens.append(id_to_tok[i])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_str_array("tokenizer.ggml.tokens", tokens)
    w.add_str_array("tokenizer.ggml.merges", merges)


# ------------------------------------------------------------------------------------------
# Expected tensors (names and numpy shapes) for a config
# ------------------------------------------------------------------------------------------


def expected_shapes(hp: dict) -> dict[str, tuple]:
    """GGUF tensor name -> numpy shape (the reverse of ggml `ne`) that the config implies."""
    out = {}
    bb, dd, mm = hp["backbone"], hp["depth"], hp["mimi"]
    n_audio = hp["audio_vocab_size"] * hp["audio_num_codebooks"]

    def llama(part, p, d_in):
        q, kv = p["n_heads"] * p["head_dim"], p["n_kv_heads"] * p["head_dim"]
        for i in range(p["n_layers"]):
            b = f"{part}.blk.{i}."
            out.update({b + "attn_q.weight": (q, d_in), b + "attn_k.weight": (kv, d_in),
                        b + "attn_v.weight": (kv, d_in), b + "attn_output.weight": (d_in, q),
                        b + "ffn_gate.weight": (p["ff_dim"], d_in), b + "ffn_up.weight": (p["ff_dim"], d_in),
                        b + "ffn_down.weight": (d_in, p["ff_dim"]), b + "attn_norm.weight": (d_in,),
                        b + "ffn_norm.weight": (d_in,)})
        out[f"{part}.output_norm.weight"] = (d_in,)

    out["backbone.text_embd.weight"] = (hp["text_vocab_size"], bb["d_model"])
    out["backbone.audio_embd.weight"] = (n_audio, bb["d_model"])
    out["backbone.codebook0_head.weight"] = (hp["audio_vocab_size"], bb["d_model"])
    llama("backbone", bb, bb["d_model"])
    out["depth.projection.weight"] = (dd["d_model"], dd["backbone_hidden"])
    out["depth.token_embd.weight"] = (n_audio, dd["backbone_hidden"])
    out["depth.codebooks_head.weight"] = (hp["audio_num_codebooks"] - 1, dd["d_model"], hp["audio_vocab_size"])
    llama("depth", dd, dd["d_model"])

    # Mimi transformers
    dim, ff = mm["dim"], int(hp["mimi_cfg"].get("intermediate_size", 2048))
    for t in ("enc_tfm", "dec_tfm"):
        for i in range(mm["n_layers"]):
            b = f"mimi.{t}.layers.{i}."
            out.update({b + "attn.qkv_w": (3 * dim, dim), b + "attn.out_w": (dim, dim),
                        b + "ffn_up_w": (ff, dim), b + "ffn_down_w": (dim, ff)})
            out.update({b + n: (dim,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                "ls1", "ls2")})
    # SEANet (MimiEncoder / MimiDecoder layer numbering; ELUs take an index but hold no weights)
    mc = hp["mimi_cfg"]
    nf, ratios, k, lk, rk = (int(mc.get("num_filters", 64)), mc["upsampling_ratios"], int(mc.get("kernel_size", 7)),
                             int(mc.get("last_kernel_size", 3)), int(mc.get("residual_kernel_size", 3)))

    def conv(prefix, shape):  # Conv1d weight [out, in, k]
        out[prefix + ".weight"], out[prefix + ".bias"] = shape, (shape[0],)

    def res(prefix, ch):
        out[prefix + ".blk1.weight"], out[prefix + ".blk1.bias"] = (ch // 2, ch, rk), (ch // 2,)
        out[prefix + ".blk3.weight"], out[prefix + ".blk3.bias"] = (ch, ch // 2, 1), (ch,)

    enc, idx, ch = "mimi.encoder.model", 0, nf
    conv(f"{enc}.0.conv2", (nf, 1, k))
    for r in reversed(ratios):
        res(f"{enc}.{idx + 1}", ch)
        conv(f"{enc}.{idx + 3}.conv2", (2 * ch, ch, 2 * r))
        idx, ch = idx + 3, 2 * ch
    conv(f"{enc}.{idx + 2}.conv2", (dim, ch, lk))

    dec, idx = "mimi.decoder.model", 0
    conv(f"{dec}.0.conv2", (ch, dim, k))
    for r in ratios:
        w = (ch, ch // 2, 2 * r)  # ConvTranspose1d: [in, out, k]
        out[f"{dec}.{idx + 2}.conv2.weight"], out[f"{dec}.{idx + 2}.conv2.bias"] = w, (ch // 2,)
        res(f"{dec}.{idx + 3}", ch // 2)
        idx, ch = idx + 3, ch // 2
    conv(f"{dec}.{idx + 2}.conv2", (1, ch, lk))

    stride = 2  # latent_stride: 25 Hz SEANet frames -> 12.5 Hz codes
    out["mimi.upsample.conv3.weight"] = (dim, 1, 2 * stride)  # depthwise ConvTranspose1d (groups = dim)
    out["mimi.downsample.conv3.weight"] = (dim, dim, 2 * stride)
    cb = mm["codebook_dim"]
    for rvq, n in (("rvq_first", mm["n_semantic"]), ("rvq_rest", mm["n_quantizers"] - mm["n_semantic"])):
        out[f"mimi.quantizer.{rvq}.input_proj.weight"] = (cb, dim, 1)
        out[f"mimi.quantizer.{rvq}.output_proj.weight"] = (dim, cb, 1)
        for i in range(n):
            out[f"mimi.quantizer.{rvq}.vq.layers.{i}._codebook.embedding"] = (mm["codebook_size"], cb)
    return out


# ------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------


def _out_type(ndim: int, outtype: str) -> str:
    if outtype == "f32" or ndim == 1:
        return "F32"
    return "F16" if outtype == "f16" else "BF16"


def _finite(name: str, arr: np.ndarray, outtype: str) -> np.ndarray:
    limit = 65504.0 if outtype == "f16" else np.finfo(np.float32).max
    if not np.all(np.abs(arr) <= limit):
        raise ValueError(f"{name}: values are not finite or overflow {outtype}")
    return arr


def convert(checkpoint_dir, out_path, outtype: str = "f16") -> dict:
    """Write the CSM GGUF for a transformers checkpoint folder. Returns a small summary dict."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    folder = Path(checkpoint_dir)
    if not (folder / "config.json").exists():
        raise ValueError(f"missing {folder / 'config.json'}")
    hp = _hparams(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    ckpt = _Checkpoint(folder)

    # The audio embedding is tied: checkpoints may hold either copy (or both); we write both.
    if AUDIO_EMBD_BB not in ckpt and AUDIO_EMBD_DD not in ckpt:
        raise ValueError(f"missing tensor in checkpoint: {AUDIO_EMBD_DD} (or {AUDIO_EMBD_BB})")
    twin = {AUDIO_EMBD_BB: AUDIO_EMBD_DD, AUDIO_EMBD_DD: AUDIO_EMBD_BB}
    source = lambda n: n if n in ckpt else twin[n]  # noqa: E731

    # Plan: sorted transformers names -> GGUF names; Mimi q/k/v held back for fusion.
    plan, qkv = [], {}
    for name in sorted(set(ckpt.where) | set(twin)):
        gname = map_name(name)
        if gname is None:
            continue
        prefix, _, leaf = gname.rpartition(".attn.")
        if leaf in ("q", "k", "v"):
            qkv.setdefault(prefix, {})[leaf] = name
            continue
        plan.append((gname, name))

    expected = expected_shapes(hp)
    names = [g for g, _ in plan] + [f"{p}.attn.qkv_w" for p in qkv]
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing:
        raise ValueError(f"missing tensor(s) in checkpoint for GGUF: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) for this config: {', '.join(unexpected[:8])}")

    w = GGUFWriter(out_path)
    _write_metadata(w, hp)
    _write_tokenizer(w, folder / "tokenizer.json", hp["text_vocab_size"])

    def add(gname, loader):
        shape = expected[gname]
        w.add_tensor(gname, shape, _out_type(len(shape), outtype),
                     lambda: _finite(gname, loader(), outtype))

    for gname, name in plan:
        src = source(name)
        if ckpt.shape(src) != expected[gname]:
            raise ValueError(f"{name}: shape {ckpt.shape(src)} does not match the config ({expected[gname]})")
        if gname.endswith("._codebook.embedding"):
            usage = name.replace(".embed_sum", ".cluster_usage")
            if usage not in ckpt:
                raise ValueError(f"missing tensor in checkpoint: {usage}")

            def loader(name=name, usage=usage):
                return ckpt.load(name) / np.maximum(ckpt.load(usage), CODEBOOK_EPS)[:, None]
        else:
            loader = lambda src=src: ckpt.load(src)  # noqa: E731
        add(gname, loader)

    for prefix in sorted(qkv):  # fused Mimi attention weights: concat along the output dim
        parts = qkv[prefix]
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"missing tensor(s): {prefix} needs q, k and v projections")
        add(f"{prefix}.attn.qkv_w",
            lambda p=parts: np.concatenate([ckpt.load(p["q"]), ckpt.load(p["k"]), ckpt.load(p["v"])], axis=0))

    # Write next to the target and rename, so a failure never leaves a truncated .gguf behind. The
    # temporary name is unpredictable and created exclusively: a fixed "<out>.tmp" let a planted
    # symlink redirect the write to another file.
    out_path = Path(out_path)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    w.path = tmp
    try:
        w.write()
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise become the model file's mode
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"tensors": len(names), "outtype": outtype, "path": str(out_path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pycsm convert",
                                 description="Convert a transformers CSM checkpoint folder to GGUF.")
    ap.add_argument("checkpoint_dir", help="folder with config.json, *.safetensors and tokenizer.json")
    ap.add_argument("-o", "--output", required=True, help="output .gguf path")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f16",
                    help="f16 (default): matrices F16, vectors F32; f32: all F32; bf16: matrices BF16")
    args = ap.parse_args(argv)
    try:
        info = convert(args.checkpoint_dir, args.output, args.outtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {info['path']}: {info['tensors']} tensors ({info['outtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
