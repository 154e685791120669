"""Write a csm-1b-shaped GGUF with random weights, for benchmarks (no checkpoint download needed).

    python3 benchmarks/make_model.py --size full --outtype q8_0            # -> benchmarks/models/
    python3 benchmarks/make_model.py --size tiny --outtype q4_k -o /tmp/t.gguf --seed 3

The file follows docs/gguf-schema.md exactly as `pycsm convert` writes it for a real checkpoint: the
metadata comes from pycsm.convert's own config parser and writer (`_hparams`, `_write_metadata`), the
tensor names and shapes from `pycsm.convert.expected_shapes`, the tensor order is the converter's
(sorted transformers names, mapped with `pycsm.convert.map_name`, fused Mimi qkv last), the tokenizer
is the real Llama-3 vocabulary (tests/llama3_vocab.py, needs the `llama-models` package) or, without
it, a synthetic byte-level vocabulary of the same size with the same special tokens.

Only the weights are fake: seeded normal values of sane scale (linear weights N(0, 1/fan_in), heads
3x that, RMSNorm/LayerNorm weights near 1, Mimi layer scales 0.01..0.1, codebooks N(0, 0.3^2)), so
activations stay finite. Every tensor is generated from its own seed (seed, crc32(name)), so the
backbone and depth copies of the audio embedding are identical, as in csm-1b.

f16 is written by pycsm.gguf_writer, one tensor at a time (peak memory ~2x the largest tensor,
~1.1 GB for the full model); q8_0 / q4_k are made from it with pycsm.model.quantize. The f16 file is
kept in --cache-dir (default benchmarks/models) and reused, so making all three costs one f16 write.
Files are written under a temporary name and renamed, so an existing file is always complete.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pycsm.convert as C
from pycsm.gguf_writer import GGUFWriter

DEFAULT_DIR = REPO / "benchmarks" / "models"
OUTTYPES = ("f16", "q8_0", "q4_k")

# csm-1b's RoPE scaling (config.json of sesame/csm-1b; also pycsm's native defaults).
BACKBONE_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=0.125,
                     high_freq_factor=0.5, original_max_position_embeddings=1024)
DEPTH_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1 / 512,
                  high_freq_factor=1 / 128, original_max_position_embeddings=16)


def config(size: str) -> dict:
    """A transformers-style CSM config.json dict (csm-1b for "full", a small one for "tiny")."""
    if size == "full":
        bb = dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=64, intermediate_size=8192)
        dd = dict(num_hidden_layers=4, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=128, intermediate_size=8192, backbone_hidden_size=2048)
        mimi = dict(hidden_size=512, num_filters=64, codebook_dim=256, vector_quantization_hidden_dimension=256,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                    intermediate_size=2048, upsample_groups=512)
    elif size == "tiny":
        # Widths chosen so the quantiser sees both rules: rows of 128/64 (q4_k -> q4_0 fallback)
        # and rows of 256 (q4_k proper).
        bb = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=256)
        dd = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=256, backbone_hidden_size=128)
        mimi = dict(hidden_size=64, num_filters=8, codebook_dim=32, vector_quantization_hidden_dimension=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                    intermediate_size=128, upsample_groups=64)
    else:
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    common = dict(hidden_act="silu", attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5, vocab_size=2051,
                  num_codebooks=32)
    codec = dict(model_type="mimi", sampling_rate=24000, audio_channels=1, num_residual_layers=1,
                 upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3, residual_kernel_size=3,
                 dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant", compress=2,
                 trim_right_ratio=1.0, codebook_size=2048, num_quantizers=32, use_conv_shortcut=False,
                 num_semantic_quantizers=1, hidden_act="gelu", max_position_embeddings=8000, norm_eps=1e-5,
                 rope_parameters=dict(rope_theta=10000.0, rope_type="default"), sliding_window=250,
                 layer_scale_initial_scale=0.01, attention_bias=False, **mimi)
    depth = dict(model_type="csm_depth_decoder_model", max_position_embeddings=33, rope_parameters=DEPTH_ROPE,
                 **common, **dd)
    return dict(model_type="csm", text_vocab_size=128256, max_position_embeddings=2048,
                rope_parameters=BACKBONE_ROPE, bos_token_id=128000, audio_token_id=128002,
                audio_eos_token_id=128003, codebook_eos_token_id=0, codebook_pad_token_id=2050,
                depth_decoder_config=depth, codec_config=codec, **common, **bb)


# ------------------------------------------------------------------------------------------
# Names: GGUF name -> the transformers name it comes from (checked against convert.map_name)
# ------------------------------------------------------------------------------------------

_INV_FIXED = {g: t for t, g in C._FIXED.items()}
_INV_LLAMA = {g: t for t, g in C._LLAMA_LAYER.items()}
_INV_MIMI = {g: t for t, g in C._MIMI_LAYER.items()}
_INV_RVQ = {g: t for t, g in C._RVQ.items()}


def transformers_name(gname: str) -> str:
    """The transformers checkpoint name pycsm.convert maps to `gname` (fused qkv: its q_proj name)."""
    if gname in _INV_FIXED:
        return _INV_FIXED[gname]
    m = re.fullmatch(r"(backbone|depth)\.blk\.(\d+)\.(.+)", gname)
    if m:
        part = "backbone_model" if m[1] == "backbone" else "depth_decoder.model"
        return f"{part}.layers.{m[2]}.{_INV_LLAMA[m[3]]}"
    m = re.fullmatch(r"mimi\.(en|de)c_tfm\.layers\.(\d+)\.(.+)", gname)
    if m:
        leaf = "attn.q" if m[3] == "attn.qkv_w" else m[3]
        return f"codec_model.{m[1]}coder_transformer.layers.{m[2]}.{_INV_MIMI[leaf]}"
    m = re.fullmatch(r"mimi\.(encoder|decoder)\.model\.(\d+)\.conv2\.(weight|bias)", gname)
    if m:
        return f"codec_model.{m[1]}.layers.{m[2]}.conv.{m[3]}"
    m = re.fullmatch(r"mimi\.(encoder|decoder)\.model\.(\d+)\.blk(\d+)\.(weight|bias)", gname)
    if m:
        return f"codec_model.{m[1]}.layers.{m[2]}.block.{m[3]}.conv.{m[4]}"
    m = re.fullmatch(r"mimi\.quantizer\.(rvq_first|rvq_rest)\.(.+)", gname)
    if m:
        rvq = f"codec_model.quantizer.{_INV_RVQ[m[1]]}_residual_vector_quantizer"
        k = re.fullmatch(r"vq\.layers\.(\d+)\._codebook\.embedding", m[2])
        return f"{rvq}.layers.{k[1]}.codebook.embed_sum" if k else f"{rvq}.{m[2]}"
    raise ValueError(f"no transformers name for {gname}")


def ordered_names(shapes: dict) -> list[str]:
    """GGUF names in the order pycsm.convert writes them: sorted transformers names, fused qkv last."""
    plain, fused = [], []
    for g in shapes:
        t = transformers_name(g)
        if g.endswith(".attn.qkv_w"):
            if C.map_name(t) != g.replace(".attn.qkv_w", ".attn.q"):
                raise AssertionError(f"name round trip failed: {g} -> {t}")
            fused.append(g)
        else:
            if C.map_name(t) != g:
                raise AssertionError(f"name round trip failed: {g} -> {t} -> {C.map_name(t)}")
            plain.append((t, g))
    return [g for _, g in sorted(plain)] + sorted(fused, key=lambda g: g.rsplit(".attn.", 1)[0])


# ------------------------------------------------------------------------------------------
# Random values
# ------------------------------------------------------------------------------------------

_CHUNK = 1 << 24  # values generated per step (64 MB of float32)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def normal_f16(rng: np.random.Generator, shape, std: float, mean: float = 0.0) -> np.ndarray:
    """N(mean, std^2) straight into a float16 array, in chunks (no full-size float32 copy)."""
    out = np.empty(shape, dtype=np.float16)
    flat = out.reshape(-1)
    buf = np.empty(min(flat.size, _CHUNK), dtype=np.float32)
    for start in range(0, flat.size, _CHUNK):
        n = min(_CHUNK, flat.size - start)
        b = buf[:n]
        rng.standard_normal(dtype=np.float32, out=b)
        b *= np.float32(std)
        if mean:
            b += np.float32(mean)
        flat[start:start + n] = b
    return out


def tensor_spec(name: str, shape: tuple, cfg: dict) -> tuple[str, float, float]:
    """(kind, scale, extra) of the random values for one tensor."""
    if len(shape) == 1:
        if name.endswith((".ls1", ".ls2")):
            return "uniform", 0.01, 0.1                  # Mimi layer scales
        if "norm" in name and name.endswith("weight"):
            return "uniform", 0.9, 1.1                   # RMSNorm / LayerNorm gains
        return "normal", 0.02, 0.0                       # biases
    if name == "backbone.text_embd.weight":
        return "normal", 1.0, 0.0
    if name in ("backbone.audio_embd.weight", "depth.token_embd.weight"):
        return "normal", 32 ** -0.5, 0.0                 # 32 rows are summed per frame
    if name.endswith("._codebook.embedding"):
        return "normal", 0.3, 0.0
    if name == "depth.codebooks_head.weight":           # numpy [31, d_in, vocab]
        return "normal", 3.0 / np.sqrt(shape[1]), 0.0
    if name == "backbone.codebook0_head.weight":
        return "normal", 3.0 / np.sqrt(shape[1]), 0.0
    if len(shape) == 3 and name.startswith("mimi."):
        if name == "mimi.upsample.conv3.weight":         # depthwise ConvTranspose [dim, 1, k]
            fan_in = shape[2] / 2
        elif ".decoder.model." in name and ".conv2." in name and name not in _plain_dec_convs(cfg):
            fan_in = shape[0] * shape[2] / 2             # ConvTranspose [in, out, k], stride k/2
        else:
            fan_in = shape[1] * shape[2]                 # Conv [out, in, k]
        scale = fan_in ** -0.5
        if name == _last_dec_conv(cfg):
            scale *= 0.2                                 # PCM mostly within [-1, 1]
        return "normal", scale, 0.0
    return "normal", shape[-1] ** -0.5, 0.0              # Linear [out, in]: N(0, 1/fan_in)


def _plain_dec_convs(cfg):
    n = len(cfg["codec_config"]["upsampling_ratios"])
    return {"mimi.decoder.model.0.conv2.weight", f"mimi.decoder.model.{3 * n + 2}.conv2.weight"}


def _last_dec_conv(cfg):
    return f"mimi.decoder.model.{3 * len(cfg['codec_config']['upsampling_ratios']) + 2}.conv2.weight"


def make_tensor(name: str, shape: tuple, cfg: dict, seed: int) -> np.ndarray:
    kind, a, b = tensor_spec(name, shape, cfg)
    # the depth decoder's audio embedding is a copy of the backbone's (as in csm-1b)
    rng = _rng(seed, "backbone.audio_embd.weight" if name == "depth.token_embd.weight" else name)
    if len(shape) == 1:  # F32 in the file
        if kind == "uniform":
            return rng.uniform(a, b, size=shape).astype(np.float32)
        return (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(a))
    arr = normal_f16(rng, shape, a)
    if name in ("backbone.codebook0_head.weight",):
        arr[2048:] *= np.float16(0.01)     # codes 2048..2050 are not Mimi codes
    elif name == "depth.codebooks_head.weight":
        arr[:, :, 2048:] *= np.float16(0.01)
    return arr


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------

def tokenizer_arrays(kind: str = "auto") -> tuple[list[str], list[str], str]:
    """(tokens, merges, description). kind: "llama3" (needs llama-models), "synthetic" or "auto"."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import llama3_vocab as V
    finally:
        sys.path.pop(0)
    if kind in ("auto", "llama3"):
        try:
            tokens, merges = V.llama3_tokens_and_merges()
            return list(tokens), list(merges), "llama3"
        except ImportError:
            if kind == "llama3":
                raise
    # Synthetic: the 256 byte symbols, all 65536 byte pairs (each with its merge), unused fillers,
    # then csm-1b's 256 special tokens at 128000..128255.
    syms = [V.bytes_to_unicode()[b] for b in range(256)]
    tokens = list(syms)
    merges = []
    for a in syms:
        for c in syms:
            tokens.append(a + c)
            merges.append(f"{a} {c}")
    tokens += [f"<|unused_{i}|>" for i in range(V.N_BASE - len(tokens))]
    tokens += V.special_token_names()
    assert len(tokens) == V.N_VOCAB
    return tokens, merges, "synthetic"


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------

def default_path(size: str, outtype: str, seed: int, folder: Path = DEFAULT_DIR) -> Path:
    stem = "csm-1b-random" if size == "full" else "csm-tiny-random"
    if seed:
        stem += f"-s{seed}"
    return Path(folder) / f"{stem}-{outtype}.gguf"


def write_f16(path: Path, size: str, seed: int = 0, vocab: str = "auto", log=print) -> Path:
    cfg = config(size)
    hp = C._hparams(cfg)
    shapes = C.expected_shapes(hp)
    names = ordered_names(shapes)
    w = GGUFWriter(path)
    C._write_metadata(w, hp)
    tokens, merges, kind = tokenizer_arrays(vocab)
    w.add_str_array("tokenizer.ggml.tokens", tokens)
    w.add_str_array("tokenizer.ggml.merges", merges)
    for g in names:
        shape = shapes[g]
        w.add_tensor(g, shape, C._out_type(len(shape), "f16"),
                     lambda g=g, shape=shape: make_tensor(g, shape, cfg, seed))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    log(f"writing {path} ({size}, f16, {len(names)} tensors, {n_params / 1e9:.3f} G params, {kind} vocabulary)")
    tmp = Path(str(path) + ".tmp")
    w.path = tmp
    try:
        w.write()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _looks_complete(path: Path, size: str) -> bool:
    """A cached file is reused when it exists (files are renamed into place) and has the right width."""
    if not path.exists():
        return False
    try:
        from pycsm.tokenizer import read_gguf_metadata
        md = read_gguf_metadata(path, ["csm.backbone.d_model"])
    except Exception:  # noqa: BLE001  (unreadable or partial: rebuild it)
        return False
    want = config(size)["hidden_size"]
    return md.get("csm.backbone.d_model") == want


def make(size: str = "full", outtype: str = "f16", out: Path | None = None, seed: int = 0,
         cache_dir: Path = DEFAULT_DIR, force: bool = False, threads: int | None = None,
         vocab: str = "auto", log=print) -> Path:
    """Make (or reuse) the file; returns its path."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    f16 = default_path(size, "f16", seed, cache_dir)
    out = Path(out) if out is not None else default_path(size, outtype, seed, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not force and _looks_complete(out, size):
        log(f"{out} exists (use --force to rebuild)")
        return out
    t0 = time.perf_counter()
    if outtype == "f16":
        write_f16(out, size, seed, vocab, log)
        log(f"f16 written in {time.perf_counter() - t0:.1f} s")
        return out
    if force or not _looks_complete(f16, size):
        write_f16(f16, size, seed, vocab, log)
        log(f"f16 written in {time.perf_counter() - t0:.1f} s")
    else:
        log(f"reusing {f16}")
    from pycsm.model import quantize

    t1 = time.perf_counter()
    tmp = Path(str(out) + ".tmp")
    try:
        quantize(f16, tmp, outtype, n_threads=threads)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"{out}: quantised to {outtype} in {time.perf_counter() - t1:.1f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f16")
    ap.add_argument("-o", "--output", type=Path, help="output path (default: CACHE_DIR/<name>.gguf)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_DIR,
                    help="folder of the default outputs and of the cached f16 file (default benchmarks/models)")
    ap.add_argument("--vocab", choices=("auto", "llama3", "synthetic"), default="auto",
                    help="tokenizer arrays: real Llama-3 (needs llama-models), synthetic, or llama3 when available")
    ap.add_argument("--threads", type=int, default=None, help="quantisation threads (default: all cores)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the file exists")
    args = ap.parse_args(argv)
    path = make(args.size, args.outtype, args.output, args.seed, args.cache_dir, args.force, args.threads,
                args.vocab)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
