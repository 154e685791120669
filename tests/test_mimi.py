"""The Mimi codec (native/src/mimi*.cpp, pycsm.codec) against transformers' MimiModel.

Tiny model: the session fixture `tiny_dir` (tests/conftest.py). Full size: a seeded random
kyutai/mimi-shaped codec (hidden 512, 8 layers, 64 filters, 2048 x 256 codebooks, 32 quantizers) in a
CSM checkpoint with the tiny backbone, converted to GGUF, cached in .fixture-cache/mimi-full-*.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixture_cache import cached_build

from pycsm import codec
from pycsm._native import lib
from pycsm.errors import CSMError

REPO = Path(__file__).resolve().parents[1]
MAKE_TINY = REPO / "tests" / "reference" / "make_tiny.py"
SPF = 1920
FULL_VERSION = b"mimi-full-v1"  # bump when the full-size fixture below changes


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - x) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(err, 1e-30)))


def load_model(path: Path):
    handle = lib.csm_model_load(str(path).encode(), lib.csm_model_default_params())
    if not handle:
        raise CSMError(f"load {path}: {lib.csm_last_error().decode()}")
    return handle


def _make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", MAKE_TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_signal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24000.0
    sig = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 587 * t + 1.0) \
        + 0.1 * np.sin(2 * np.pi * 1500 * t) + 0.02 * rng.standard_normal(n)
    return sig.astype(np.float32)


test_signal.__test__ = False  # a helper, not a test


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """Loaded tiny models by file type: {"f32": handle, "f16": handle}."""
    handles = {ft: load_model(tiny_dir / f"tiny-{ft}.gguf") for ft in ("f32", "f16")}
    yield handles
    for h in handles.values():
        lib.csm_model_free(h)


@pytest.fixture(scope="module")
def tiny_mimi(tiny_dir):
    """transformers' MimiModel of the tiny checkpoint (fp32, eval)."""
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration.from_pretrained(tiny_dir / "checkpoint").eval()
    return model.codec_model


def _ref_decode(mimi, codes: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = mimi.decode(torch.tensor(codes.T[None], dtype=torch.long)).audio_values
    return out.numpy().reshape(-1)


def _ref_encode(mimi, pcm: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        codes = mimi.encode(torch.from_numpy(pcm)[None, None]).audio_codes
    return codes[0].T.numpy().astype(np.int32)


def _build_full(out: Path, tokenizer_json: Path):
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration

    from pycsm.convert import convert

    mt = _make_tiny()
    cfg = mt.tiny_config().to_dict()
    cfg["codec_config"] = {"model_type": "mimi"}  # MimiConfig defaults = kyutai/mimi sizes
    torch.manual_seed(77)
    model = CsmForConditionalGeneration(CsmConfig(**cfg)).eval()
    mimi_cfg = model.codec_model.config
    assert (mimi_cfg.hidden_size, mimi_cfg.num_hidden_layers, mimi_cfg.num_attention_heads, mimi_cfg.num_filters,
            mimi_cfg.codebook_dim, mimi_cfg.codebook_size, mimi_cfg.num_quantizers) == (512, 8, 8, 64, 256, 2048, 32)
    mt.randomize(model, seed=77)  # seeded, scaled weights; random non-zero codebooks
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt)
    shutil.copy(tokenizer_json, ckpt / "tokenizer.json")
    rng = np.random.default_rng(77)
    codes = rng.integers(0, 2048, size=(30, 32)).astype(np.int32)  # > one internal 25-frame chunk
    pcm = _ref_decode(model.codec_model, codes)
    sig = test_signal(31000, seed=77)  # 16.1 frames: a partial last frame
    enc = _ref_encode(model.codec_model, sig)
    np.savez(out / "reference.npz", mimi_codes=codes, mimi_pcm=pcm, mimi_enc_input=sig, mimi_enc_codes=enc)
    for outtype in ("f32", "f16"):
        convert(ckpt, out / f"full-{outtype}.gguf", outtype)
    shutil.rmtree(ckpt)  # 480 MB; the GGUFs and the reference are all the tests need


@pytest.fixture(scope="module")
def full_dir(tiny_dir):
    # rebuilt when the recipe changes: this file's builder functions, make_tiny's randomize, the converter
    sources = [FULL_VERSION] + [inspect.getsource(f).encode() for f in (_build_full, _ref_decode, _ref_encode, test_signal)]
    sources += [p.read_bytes() for p in (MAKE_TINY, REPO / "pycsm" / "convert.py", REPO / "pycsm" / "gguf_writer.py")]
    digest = hashlib.sha256(b"".join(sources)).hexdigest()[:16]
    return cached_build("mimi-full", digest, lambda tmp: _build_full(tmp, tiny_dir / "checkpoint" / "tokenizer.json"))


# ------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ft,min_snr", [("f32", 60.0), ("f16", 35.0)])
def test_decode_matches_transformers(tiny, ref, ft, min_snr):
    pcm = codec.decode(tiny[ft], ref["mimi_codes"], n_threads=2)
    assert pcm.dtype == np.float32 and pcm.shape == ref["mimi_pcm"].shape
    assert snr_db(ref["mimi_pcm"], pcm) >= min_snr


def test_decode_long_crosses_window_and_chunks(tiny, tiny_mimi):
    """140 frames = 280 transformer positions: past the 250-position attention window and across
    several internal 25-frame chunks."""
    codes = np.random.default_rng(3).integers(0, 2048, size=(140, 32)).astype(np.int32)
    ref = _ref_decode(tiny_mimi, codes)
    pcm = codec.decode(tiny["f32"], codes)
    assert snr_db(ref, pcm) >= 60.0
    # the tail alone, where the window has slid, must match too
    assert snr_db(ref[-20 * SPF:], pcm[-20 * SPF:]) >= 60.0


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_stream_equals_one_shot(tiny, chunk):
    codes = np.random.default_rng(4).integers(0, 2048, size=(40, 32)).astype(np.int32)
    whole = codec.decode(tiny["f32"], codes)
    with codec.MimiStreamDecoder(tiny["f32"], n_threads=2) as dec:
        parts = [dec.decode(codes[i:i + chunk]) for i in range(0, len(codes), chunk)]
        assert dec.frames == len(codes)
        streamed = np.concatenate(parts)
        np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5)
        # reset starts a new utterance: the same frames give the same audio again
        dec.reset()
        again = np.concatenate([dec.decode(codes[i:i + 5]) for i in range(0, 15, 5)])
        np.testing.assert_allclose(again, whole[:15 * SPF], rtol=0, atol=1e-5)


def test_stream_mixed_chunks_and_single_frame(tiny):
    codes = np.random.default_rng(5).integers(0, 2048, size=(34, 32)).astype(np.int32)
    whole = codec.decode(tiny["f32"], codes)
    dec = codec.MimiStreamDecoder(tiny["f32"])
    sizes, parts, i = [2, 1, 30], [], 0  # 30 > the internal chunk of 25
    for n in sizes:
        parts.append(dec.decode(codes[i:i + n]))
        i += n
    parts.append(dec.decode(codes[i]))  # one frame as a 1-D [32] array
    assert dec.decode(np.zeros((0, 32), np.int32)).shape == (0,)
    dec.close()
    assert dec.closed
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-5)
    with pytest.raises(CSMError, match="closed"):
        dec.decode(codes[:1])


def test_threads_agree(tiny, ref):
    one = codec.decode(tiny["f32"], ref["mimi_codes"], n_threads=1)
    two = codec.decode(tiny["f32"], ref["mimi_codes"], n_threads=2)
    default = codec.decode(tiny["f32"], ref["mimi_codes"])
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one, default, rtol=0, atol=1e-6)


def test_other_weight_types(tiny_dir, ref, tmp_path):
    """bf16 GGUF (convolutions in bf16) and a q8_0 file (quantised transformer matrices)."""
    from pycsm.convert import convert

    convert(tiny_dir / "checkpoint", tmp_path / "tiny-bf16.gguf", "bf16")
    params = lib.csm_quantize_default_params()
    params.type = 8  # GGML_TYPE_Q8_0
    assert lib.csm_quantize(str(tiny_dir / "tiny-f32.gguf").encode(), str(tmp_path / "tiny-q8_0.gguf").encode(),
                            params) == 0, lib.csm_last_error()
    for name in ("tiny-bf16.gguf", "tiny-q8_0.gguf"):
        h = load_model(tmp_path / name)
        try:
            pcm = codec.decode(h, ref["mimi_codes"])
            assert snr_db(ref["mimi_pcm"], pcm) >= 30.0, name  # measured: bf16 43 dB, q8_0 46 dB
            # rounded weights are another model: the residual codebooks drift apart level by level
            # (measured: codebook 0 matches 94 % / 75 %, codebook 31 19 % / 0 %)
            codes = codec.encode(h, ref["mimi_enc_input"])
            assert codes.shape == ref["mimi_enc_codes"].shape
            assert (codes[:, :4] == ref["mimi_enc_codes"][:, :4]).mean() >= 0.6, name
        finally:
            lib.csm_model_free(h)


# ------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ft,min_match", [("f32", 0.99), ("f16", 0.9)])
def test_encode_matches_transformers(tiny, ref, ft, min_match):
    codes = codec.encode(tiny[ft], ref["mimi_enc_input"], n_threads=2)
    want = ref["mimi_enc_codes"]
    assert codes.dtype == np.int32 and codes.shape == want.shape
    assert (codes == want).mean() >= min_match


@pytest.mark.parametrize("n", [1, 959, 1920, 1921, 5000, 3 * 1920 + 1, 25 * 1920 + 1])  # the last: a 1-sample 2nd chunk
def test_encode_framing(tiny, tiny_mimi, n):
    """Frame count and codes of short and partial inputs as transformers pads them."""
    sig = test_signal(n, seed=n)
    ref = _ref_encode(tiny_mimi, sig)
    assert len(ref) == int(tiny_mimi.get_encoded_length(n)) == -(-n // SPF)
    codes = codec.encode(tiny["f32"], sig)
    assert codes.shape == ref.shape
    assert (codes == ref).mean() >= 0.99


def test_encode_long_crosses_window_and_chunks(tiny, tiny_mimi):
    """11.2 s: several internal encoder chunks and past the attention window."""
    sig = test_signal(140 * SPF + 700, seed=9)
    ref = _ref_encode(tiny_mimi, sig)
    codes = codec.encode(tiny["f32"], sig)
    assert codes.shape == ref.shape == (141, 32)
    assert (codes == ref).mean() >= 0.99
    assert (codes[-20:] == ref[-20:]).mean() >= 0.99


def test_encode_input_forms(tiny, ref):
    x = ref["mimi_enc_input"]
    a = codec.encode(tiny["f32"], x)
    b = codec.encode(tiny["f32"], x.astype(np.float64)[:, None])
    np.testing.assert_array_equal(a, b)
    assert codec.encode(tiny["f32"], np.zeros(100, np.float32)).shape == (1, 32)
    with pytest.raises(CSMError, match="int16 / 32768"):
        codec.encode(tiny["f32"], np.zeros(100, np.int16))


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------


def test_bad_codes(tiny):
    codes = np.zeros((4, 32), np.int32)
    codes[2, 5] = 2048
    with pytest.raises(CSMError, match=r"code 2048 at frame 2, codebook 5 is outside \[0, 2048\)"):
        codec.decode(tiny["f32"], codes)
    codes[2, 5] = -1
    with pytest.raises(CSMError, match=r"code -1 at frame 2, codebook 5"):
        codec.decode(tiny["f32"], codes)
    big = codes.astype(np.int64)
    big[2, 5] = 2 ** 40 + 3  # would wrap into a valid int32 code
    with pytest.raises(CSMError, match="out of range"):
        codec.decode(tiny["f32"], big)
    with pytest.raises(CSMError, match="shape"):
        codec.decode(tiny["f32"], np.zeros((4, 31), np.int32))
    with pytest.raises(CSMError, match="integers"):
        codec.decode(tiny["f32"], np.zeros((4, 32), np.float32))
    with pytest.raises(CSMError, match="n_frames must be positive"):
        codec.decode(tiny["f32"], np.zeros((0, 32), np.int32))


def test_bad_codes_leave_stream_state_untouched(tiny):
    codes = np.random.default_rng(6).integers(0, 2048, size=(6, 32)).astype(np.int32)
    whole = codec.decode(tiny["f32"], codes)
    with codec.MimiStreamDecoder(tiny["f32"]) as dec:
        first = dec.decode(codes[:3])
        bad = codes[3:].copy()
        bad[1, 31] = 4000
        with pytest.raises(CSMError, match="frame 1, codebook 31"):
            dec.decode(bad)
        rest = dec.decode(codes[3:])
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=0, atol=1e-5)


def test_bad_pcm(tiny):
    x = test_signal(4000)
    for bad, pos in ((np.nan, 17), (np.inf, 3999), (-np.inf, 0)):
        y = x.copy()
        y[pos] = bad
        with pytest.raises(CSMError, match=f"sample {pos} is not finite"):
            codec.encode(tiny["f32"], y)
    with pytest.raises(CSMError, match="n_samples must be positive"):
        codec.encode(tiny["f32"], np.zeros(0, np.float32))
    with pytest.raises(CSMError, match="mono"):
        codec.encode(tiny["f32"], np.zeros((2, 100), np.float32))


def test_bad_handles(tiny):
    with pytest.raises(CSMError, match="NULL"):
        codec.decode(0, np.zeros((1, 32), np.int32))
    with pytest.raises(CSMError, match="None"):
        codec.encode(None, np.zeros(10, np.float32))
    with pytest.raises(CSMError, match="NULL"):
        codec.MimiStreamDecoder(ctypes.c_void_p())
    with pytest.raises(TypeError):
        codec.decode("model", np.zeros((1, 32), np.int32))


def test_c_api_buffer_checks(tiny):
    """Checks only reachable through the C API: NULL buffers, short outputs."""
    i32p, f32p = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)
    m = tiny["f32"]
    codes = np.zeros((3, 32), np.int32)
    out = np.zeros(3 * SPF, np.float32)
    cp, op = codes.ctypes.data_as(i32p), out.ctypes.data_as(f32p)

    def err():
        return lib.csm_last_error().decode()

    assert lib.csm_mimi_decode(m, cp, 3, op, 3 * SPF - 1, 1) == -1
    assert "max_samples 5759 is too small: 3 frames decode to 5760 samples" in err()
    assert lib.csm_mimi_decode(None, cp, 3, op, out.size, 1) == -1 and "model is NULL" in err()
    assert lib.csm_mimi_decode(m, None, 3, op, out.size, 1) == -1 and "codes is NULL" in err()
    assert lib.csm_mimi_decode(m, cp, 3, None, out.size, 1) == -1 and "out_pcm is NULL" in err()
    assert lib.csm_mimi_decode(m, cp, -5, op, out.size, 1) == -1 and "n_frames" in err()
    assert lib.csm_mimi_decode(m, cp, 3, op, out.size, 1) == 3 * SPF and err() == ""

    pcm = test_signal(2 * SPF + 1)
    pp = pcm.ctypes.data_as(f32p)
    oc = np.zeros((3, 32), np.int32)
    ocp = oc.ctypes.data_as(i32p)
    assert lib.csm_mimi_encode(m, pp, pcm.size, ocp, 2, 1) == -1
    assert "max_frames 2 is too small: 3841 samples encode to 3 frames" in err()
    assert lib.csm_mimi_encode(m, None, pcm.size, ocp, 3, 1) == -1 and "pcm is NULL" in err()
    assert lib.csm_mimi_encode(m, pp, pcm.size, None, 3, 1) == -1 and "out_codes is NULL" in err()
    assert lib.csm_mimi_encode(m, pp, -1, ocp, 3, 1) == -1 and "n_samples" in err()
    assert lib.csm_mimi_encode(m, pp, 1 << 62, ocp, 3, 1) == -1 and "absurd" in err()
    assert lib.csm_mimi_encode(m, pp, pcm.size, ocp, 3, 1) == 3

    assert lib.csm_mimi_codec_new(None, 1) is None and "model is NULL" in err()
    assert lib.csm_mimi_codec_decode(None, cp, 1, op, out.size) == -1 and "codec is NULL" in err()
    c = lib.csm_mimi_codec_new(m, 1)
    assert c
    try:
        assert lib.csm_mimi_codec_decode(c, cp, 2, op, SPF) == -1 and "too small" in err()
        assert lib.csm_mimi_codec_decode(c, cp, 1 << 30, op, out.size) == -1 and "absurd" in err()
        assert lib.csm_mimi_codec_decode(c, cp, 0, op, 0) == 0
    finally:
        lib.csm_mimi_codec_free(c)
    lib.csm_mimi_codec_free(None)
    lib.csm_mimi_codec_reset(None)


def test_loader_rejects_missing_mimi_tensor(tiny_dir, tmp_path):
    data = (tiny_dir / "tiny-f32.gguf").read_bytes()
    name = b"mimi.decoder.model.5.conv2.weight"
    assert data.count(name) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data.replace(name, b"mimi.decoder.model.5.conv2.weighX"))
    handle = lib.csm_model_load(str(bad).encode(), lib.csm_model_default_params())
    assert not handle
    assert "mimi.decoder.model.5.conv2.weight" in lib.csm_last_error().decode()


# ------------------------------------------------------------------------------------------
# full size (kyutai/mimi shapes, random weights)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ft,min_snr,min_match", [("f32", 60.0, 0.99), ("f16", 35.0, 0.9)])
def test_full_size_matches_transformers(full_dir, ft, min_snr, min_match):
    ref = np.load(full_dir / "reference.npz")
    h = load_model(full_dir / f"full-{ft}.gguf")
    try:
        pcm = codec.decode(h, ref["mimi_codes"], n_threads=2)
        assert snr_db(ref["mimi_pcm"], pcm) >= min_snr
        codes = codec.encode(h, ref["mimi_enc_input"], n_threads=2)
        assert codes.shape == ref["mimi_enc_codes"].shape
        assert (codes == ref["mimi_enc_codes"]).mean() >= min_match
        if ft == "f32":
            with codec.MimiStreamDecoder(h, n_threads=2) as dec:
                streamed = np.concatenate([dec.decode(ref["mimi_codes"][i:i + 4]) for i in range(0, 30, 4)])
            np.testing.assert_allclose(streamed, pcm, rtol=0, atol=1e-5)
    finally:
        lib.csm_model_free(h)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))


PACKED_SCRIPT = r"""
import re
import sys
import numpy as np
from pycsm import codec
from pycsm.model import Model, set_log_callback, system_info
lines = []
set_log_callback(lambda level, text: lines.append(text.strip()))
with Model(sys.argv[1]) as m:
    vocab = int(m.hparams.audio_vocab_size)
    codes = np.random.default_rng(3).integers(0, vocab, (6, 32)).astype(np.int32)
    pcm = codec.decode(m.handle, codes)
np.save(sys.argv[2], np.asarray(pcm, np.float32))
print("pycsm kernel" if "matmul: pycsm" in system_info() else "no kernel")
found = [re.search(r"(\d+) convolutions and (\d+) transformer matrices packed", l) for l in lines]
print(sum(int(f.group(1)) for f in found if f), sum(int(f.group(2)) for f in found if f))
"""


@pytest.mark.parametrize("ftype", ["f16", "q8_0"])
def test_mimi_products_run_on_pycsm_kernel(tiny_dir, tmp_path, ftype):
    """Mimi's F16 convolutions and its transformer's matrices (F16 or Q8_0) run on pycsm's kernel
    when one runs (the library's log says how many were packed), ggml's products with
    PYCSM_KERNEL=ggml; both decode the same codes to the same audio within what ggml's rounding of
    the inputs (to f16, or to Q8_0 blocks with f16 scales) allows."""
    model = tiny_dir / "tiny-f16.gguf"
    if ftype == "q8_0":
        model = tmp_path / "tiny-q8_0.gguf"
        params = lib.csm_quantize_default_params()
        params.type = 8  # GGML_TYPE_Q8_0
        assert lib.csm_quantize(str(tiny_dir / "tiny-f16.gguf").encode(), str(model).encode(), params) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = {}
    for kernel in ("", "ggml"):
        out_file = tmp_path / f"pcm-{kernel or 'pick'}.npy"
        e = {**env, "PYCSM_KERNEL": kernel} if kernel else {k: v for k, v in env.items() if k != "PYCSM_KERNEL"}
        out = subprocess.run([sys.executable, "-c", PACKED_SCRIPT, str(model), str(out_file)],
                             capture_output=True, text=True, check=True, env=e).stdout.split()
        runs[kernel] = (out[-4:-2], int(out[-2]), int(out[-1]), np.load(out_file))
    kernel_line, convs, matrices, pcm = runs[""]
    if kernel_line == ["pycsm", "kernel"]:
        if ftype == "f16":
            assert convs >= 1, "the F16 convolutions were not packed for pycsm's kernel"
        # 4 per layer of the decoder and the encoder
        assert matrices >= 8, f"the {ftype} transformer matrices were not packed for pycsm's kernel"
    assert runs["ggml"][1:3] == (0, 0), "PYCSM_KERNEL=ggml still packed matrices"
    assert pcm.shape == runs["ggml"][3].shape and np.all(np.isfinite(pcm))
    assert snr_db(runs["ggml"][3], pcm) >= 40.0
