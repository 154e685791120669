"""The high-level API (pycsm.CSM, Audio, Segment, text splitting, resampling) on the tiny model.

The tiny random model never emits the end frame, so every generation here is bounded
(max_audio_length_ms) and stops with "max_length". Tests that produce audio run the real Mimi codec
(pycsm.codec).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest
import soundfile as sf

import pycsm
from pycsm import CSM, Audio, CSMError, GenerationOptions, Segment, Voice
from pycsm.audio import read_audio, resample
from pycsm.text import split_sentences

SPF = 1920  # samples per 80 ms frame at 24 kHz
MS = 400  # 5 frames
N = MS // 80


@pytest.fixture(scope="module")
def tts(tiny_dir):
    with CSM(tiny_dir / "tiny-f16.gguf", n_threads=1) as t:
        yield t


def sine(seconds: float, rate: int = 24000, freq: float = 220.0) -> np.ndarray:
    n = np.arange(int(seconds * rate))
    return (0.3 * np.sin(2 * np.pi * freq * n / rate)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# package surface
# ---------------------------------------------------------------------------------------------

def test_exports():
    for name in ["CSM", "Audio", "Segment", "CSMError", "Model", "quantize", "convert", "__version__"]:
        assert hasattr(pycsm, name), name
    assert pycsm.__version__.count(".") == 2
    assert issubclass(pycsm.CSMError, RuntimeError)


def test_close_and_context_manager(tiny_dir):
    t = CSM(tiny_dir / "tiny-f16.gguf", n_threads=1)
    with t:
        assert t.sample_rate == 24000
    with pytest.raises(CSMError, match="closed"):
        t.generate("Hello.", max_audio_length_ms=MS)
    t.close()  # twice is fine


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        CSM(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(CSMError):
        CSM(bad)
    with pytest.raises(ValueError, match="device"):
        CSM(bad, device="tpu")


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def test_generate_returns_audio(tts):  # codec
    a = tts.generate("Hello there.", seed=1, max_audio_length_ms=MS)
    assert isinstance(a, Audio)
    assert a.sample_rate == 24000
    assert a.codes.dtype == np.int32 and a.codes.shape == (N, 32)
    assert a.codes.min() >= 0 and a.codes.max() < 2048
    assert a.samples.dtype == np.float32 and a.samples.shape == (N * SPF,)
    assert np.all(np.isfinite(a.samples))
    assert a.stop_reason == "max_length"
    assert a.duration == pytest.approx(MS / 1000)
    assert a.seed == 1


def test_seed_reproducible_and_random_by_default(tts):  # codec
    a = tts.generate("Hello there.", seed=7, max_audio_length_ms=MS)
    b = tts.generate("Hello there.", seed=7, max_audio_length_ms=MS)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.samples, b.samples)
    c = tts.generate("Hello there.", seed=8, max_audio_length_ms=MS)
    assert not np.array_equal(a.codes, c.codes)
    r1 = tts.generate("Hello there.", max_audio_length_ms=MS)
    r2 = tts.generate("Hello there.", max_audio_length_ms=MS)
    assert r1.seed != r2.seed and not np.array_equal(r1.codes, r2.codes)
    again = tts.generate("Hello there.", seed=r1.seed, max_audio_length_ms=MS)
    np.testing.assert_array_equal(again.codes, r1.codes)


def test_sampling_options_change_the_codes(tts):  # codec
    base = tts.generate("Hi.", seed=3, max_audio_length_ms=MS).codes
    greedy = tts.generate("Hi.", seed=3, temperature=0, max_audio_length_ms=MS).codes
    np.testing.assert_array_equal(greedy, tts.generate("Hi.", seed=99, temperature=0, max_audio_length_ms=MS).codes)
    assert not np.array_equal(base, greedy)
    assert not np.array_equal(base, tts.generate("Hi.", speaker=1, seed=3, max_audio_length_ms=MS).codes)
    top1 = tts.generate("Hi.", seed=3, top_k=1, max_audio_length_ms=MS).codes
    np.testing.assert_array_equal(top1, greedy)  # top-1 sampling is argmax
    depth_greedy = tts.generate("Hi.", seed=3, depth_temperature=0, max_audio_length_ms=MS).codes
    np.testing.assert_array_equal(depth_greedy[0, 0], base[0, 0])  # codebook 0 of frame 0 still sampled alike
    assert not np.array_equal(depth_greedy, base)
    np.testing.assert_array_equal(tts.generate("Hi.", seed=3, depth_top_k=1, max_audio_length_ms=MS).codes,
                                  depth_greedy)


@pytest.mark.parametrize("ms, frames", [(80, 1), (81, 2), (560, 7), (0.4 * 1400, 7), (1, 1)])
def test_max_audio_length_rounds_up_to_frames(tts, ms, frames):  # codec
    a = tts.generate("Hi.", seed=1, max_audio_length_ms=ms)
    assert a.codes.shape[0] == frames and a.samples.shape[0] == frames * SPF


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(text=""), ValueError, "empty"),
    (dict(text="  \n\t"), ValueError, "empty"),
    (dict(text=None), TypeError, "str"),
    (dict(text=b"hi"), TypeError, "str"),
    (dict(speaker=-1), ValueError, "speaker"),
    (dict(speaker=1.0), ValueError, "speaker"),
    (dict(speaker=True), ValueError, "speaker"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="0.9"), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), ValueError, "top_k"),
    (dict(max_audio_length_ms=0), ValueError, "max_audio_length_ms"),
    (dict(max_audio_length_ms=-80), ValueError, "max_audio_length_ms"),
    (dict(max_audio_length_ms=float("nan")), ValueError, "max_audio_length_ms"),
    (dict(depth_temperature=-1.0), ValueError, "depth_temperature"),
    (dict(depth_top_k=-2), ValueError, "depth_top_k"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(temperature=1e300), ValueError, "temperature"),
    (dict(temperature=10.5), ValueError, "temperature"),
    (dict(depth_temperature=1e300), ValueError, "depth_temperature"),
    (dict(parse_special=1), TypeError, "parse_special"),
    (dict(tempreature=0.5), TypeError, "unexpected keyword argument 'tempreature'"),
    (dict(options=dict(temperature=0.5)), TypeError, "GenerationOptions"),
    (dict(context=Segment(0, "x")), TypeError, "context"),
    (dict(context=[("x",)]), TypeError, "context"),
])
def test_generate_validates_arguments(tts, kwargs, exc, match):
    args = dict(text="Hello.", max_audio_length_ms=MS) | kwargs
    with pytest.raises(exc, match=match):
        tts.generate(**args)
    with pytest.raises(exc, match=match):
        tts.stream(**args)


def test_generation_options_are_one_definition(tts):  # codec
    opts = GenerationOptions(temperature=0.5, top_k=10, seed=7, max_audio_length_ms=MS)
    ref = tts.generate("Hi there.", temperature=0.5, top_k=10, seed=7, max_audio_length_ms=MS)
    np.testing.assert_array_equal(tts.generate("Hi there.", options=opts).codes, ref.codes)
    # keywords override the object's fields
    np.testing.assert_array_equal(tts.generate("Hi there.", options=dataclasses.replace(opts, seed=8), seed=7).codes,
                                  ref.codes)
    joined = np.concatenate(list(tts.stream("Hi there.", options=opts)))
    assert np.abs(joined - ref.samples).max() < 1e-2
    np.testing.assert_array_equal(tts.generate_long("Hi there.", options=opts).codes, ref.codes)
    st = tts.stream_long("Hi there.", options=opts)
    list(st)
    np.testing.assert_array_equal(st.codes, ref.codes)
    np.testing.assert_array_equal(tts.generate_batch(["Hi there."], options=opts)[0].codes, ref.codes)
    # the defaults and checks live in one place
    assert GenerationOptions() == GenerationOptions(temperature=0.9, top_k=50, max_audio_length_ms=90_000)
    with pytest.raises(ValueError, match="top_k"):
        GenerationOptions(top_k=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.temperature = 2.0


def test_numbers_are_range_checked_before_the_native_call(tts):
    hp = tts.model.hparams
    _, native = tts._request(None, {"max_audio_length_ms": 1e12})  # an output buffer sized by the context
    assert native["max_frames"] == hp.bb_max_pos
    _, native = tts._request(GenerationOptions(max_audio_length_ms=None), {})
    assert native["max_frames"] == hp.bb_max_pos
    for k in [2**31, 2**32 + 1, 10**30]:  # no int32 wrap: a huge k is "no cut", never greedy
        _, native = tts._request(None, {"top_k": k, "depth_top_k": k})
        assert native["top_k"] == native["depth_top_k"] == hp.audio_vocab_size
    a = tts.generate("Hi.", seed=3, top_k=2**32 + 1, max_audio_length_ms=MS).codes
    np.testing.assert_array_equal(a, tts.generate("Hi.", seed=3, top_k=0, max_audio_length_ms=MS).codes)
    assert not np.array_equal(a, tts.generate("Hi.", seed=3, temperature=0, max_audio_length_ms=MS).codes)


def test_parse_special_reads_special_tokens_as_plain_text(tts):  # codec
    text = "Hi.<|end_of_text|><|begin_of_text|>[1]Bye."
    tok = tts.model.tokenizer
    special = tts.generate(text, seed=2, max_audio_length_ms=MS).codes
    plain = tts.generate(text, seed=2, max_audio_length_ms=MS, parse_special=False).codes
    assert not np.array_equal(special, plain)
    assert tok.encode(text).count(tok.encode("<|end_of_text|>")[0]) == 1
    assert len(tok.encode(text, parse_special=False)) > len(tok.encode(text))


def test_prompt_too_long_raises_the_native_message(tts):
    with pytest.raises(CSMError, match="context holds 2048"):
        tts.generate("word " * 2100, seed=1, max_audio_length_ms=MS)
    ctx = [Segment(0, "word " * 1100), Segment(1, "word " * 1000)]  # text-only context
    with pytest.raises(CSMError, match="context holds 2048"):
        tts.generate("Hello.", context=ctx, max_audio_length_ms=MS)


# ---------------------------------------------------------------------------------------------
# voice context
# ---------------------------------------------------------------------------------------------

def test_context_from_generated_audio_uses_its_codes(tts):  # codec
    first = tts.generate("How are you?", speaker=1, seed=2, max_audio_length_ms=MS)
    seg = Segment(1, "How are you?", first)
    assert seg.codes is first.codes or np.array_equal(seg.codes, first.codes)  # taken as is, no encoding
    a = tts.generate("Fine, thanks.", context=[seg], seed=3, max_audio_length_ms=MS)
    b = tts.generate("Fine, thanks.", context=[Segment(1, "How are you?", first.codes)], seed=3,
                     max_audio_length_ms=MS)
    c = tts.generate("Fine, thanks.", context=[(1, "How are you?", first)], seed=3, max_audio_length_ms=MS)
    plain = tts.generate("Fine, thanks.", seed=3, max_audio_length_ms=MS)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codes, c.codes)
    assert not np.array_equal(a.codes, plain.codes)


def test_context_audio_is_encoded_once(tts):  # codec (encoder)
    seg = Segment(0, "A short sound.", sine(0.5))
    assert seg.codes is None
    a = tts.generate("Hello.", context=[seg], seed=4, max_audio_length_ms=MS)
    codes = seg.codes
    assert codes is not None and codes.dtype == np.int32
    assert codes.shape == (math.ceil(0.5 * 24000 / SPF), 32)
    assert codes.min() >= 0 and codes.max() < 2048
    b = tts.generate("Hello.", context=[seg], seed=4, max_audio_length_ms=MS)
    assert seg.codes is codes  # cached, not encoded again
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(tts.encode(sine(0.5)), codes)


def test_context_from_file_any_rate(tts, tmp_path):  # codec (encoder)
    path = tmp_path / "voice.flac"
    x = sine(0.6, 44100)
    sf.write(path, np.stack([x, x], axis=1), 44100)
    seg = Segment.from_file(path, "A short sound.", speaker=0)
    a = tts.generate("Hello.", context=[seg], seed=5, max_audio_length_ms=MS)
    assert a.codes.shape == (N, 32)
    assert seg.codes.shape[0] == math.ceil(len(resample(x, 44100, 24000)) / SPF)


def test_segment_from_file_resamples_and_downmixes(tmp_path):
    rate = 44100
    left, right = sine(0.3, rate, 300), sine(0.3, rate, 500)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")
    seg = Segment.from_file(path, "text", speaker=2)
    assert seg.speaker == 2 and seg.text == "text"
    expected = resample((left.astype(np.float64) + right) / 2, rate, 24000)
    assert seg.audio.dtype == np.float32 and seg.audio.shape == expected.shape == (7200,)
    np.testing.assert_allclose(seg.audio, expected, atol=1e-6)
    np.testing.assert_allclose(read_audio(path), expected, atol=1e-6)
    # and the result is the mixed tones at 24 kHz (the resampler keeps what is under 12 kHz)
    t = np.arange(7200) / 24000
    ideal = 0.15 * (np.sin(2 * np.pi * 300 * t) + np.sin(2 * np.pi * 500 * t))
    np.testing.assert_allclose(seg.audio[300:-300], ideal[300:-300], atol=2e-3)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000])
@pytest.mark.parametrize("n", [1, 7, 4410, 20011])
def test_resampler_length_and_dtype(rate, n):
    x = np.random.default_rng(n).standard_normal(n)
    got = resample(x, rate, 24000)
    assert got.dtype == np.float32 and got.shape == ((2 * n * 24000 + rate) // (2 * rate),)  # rounded half up


@pytest.mark.parametrize("rate_in, rate_out", [(48000, 24000), (24000, 16000), (22050, 24000), (24000, 44100)])
def test_resampler_keeps_a_tone_and_removes_what_cannot_be_held(rate_in, rate_out):
    y = resample(sine(1.0, rate_in, 1000.0), rate_in, rate_out)
    np.testing.assert_allclose(y[200:-200], sine(1.0, rate_out, 1000.0)[200:-200], atol=2e-3)
    if rate_out < rate_in:  # a tone above the new Nyquist frequency is filtered out, not folded back
        alias = resample(sine(1.0, rate_in, (rate_in + rate_out) / 4), rate_in, rate_out)
        assert np.abs(alias[200:-200]).max() < 1e-3


def test_resampler_bounds_the_rates():
    for bad in [0, 999, 768_001, 2**31, 44100.0, True]:
        with pytest.raises(ValueError, match="sample rate"):
            resample(np.zeros(10), bad, 24000)
        with pytest.raises(ValueError, match="sample rate"):
            resample(np.zeros(10), 24000, bad)


def test_audio_resample_and_save_at_another_rate(tmp_path):
    a = Audio(sine(0.5), codes=np.zeros((7, 32), dtype=np.int32), seed=3)
    b = a.resample(16000)
    assert b.sample_rate == 16000 and len(b) == 8000 and b.seed == 3 and b.codes is a.codes
    assert np.abs(b.samples - sine(0.5, 16000)).max() < 2e-3 * 10  # edges included
    a.save(tmp_path / "a.wav", sample_rate=16000)
    info = sf.info(tmp_path / "a.wav")
    assert info.samplerate == 16000 and info.frames == 8000


def test_segment_validation(tmp_path):
    with pytest.raises(ValueError, match="NaN or infinite"):
        Segment(0, "x", np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        Segment(0, "x", np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="empty"):
        Segment(0, "x", np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        Segment(0, "x", np.zeros((100, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        Segment(0, "x", np.zeros((3, 31), dtype=np.int32))
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        Segment(0, "x", np.full((3, 32), 2048, dtype=np.int32))
    with pytest.raises(ValueError, match="speaker"):
        Segment(-1, "x")
    with pytest.raises(TypeError):
        Segment(0, None)
    with pytest.raises(TypeError):
        Segment(0, "x", "audio.wav")
    with pytest.raises(FileNotFoundError):
        Segment.from_file(tmp_path / "missing.wav", "x")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio" * 10)
    with pytest.raises(ValueError, match="cannot read audio file"):
        Segment.from_file(junk, "x")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 24000)
    with pytest.raises(ValueError, match="empty"):
        Segment.from_file(empty, "x")
    bad = tmp_path / "nan.wav"
    sf.write(bad, np.array([0.0, np.nan, 0.1], dtype=np.float32), 24000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN"):
        Segment.from_file(bad, "x")


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

def test_audio_int16_and_save(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.7, -3.0], dtype=np.float32)
    a = Audio(np.tile(x, 500))
    assert a.duration == pytest.approx(3500 / 24000)
    i16 = a.to_int16()
    assert i16.dtype == np.int16
    np.testing.assert_array_equal(i16[:7], [0, 16384, -16384, 32767, -32767, 32767, -32767])
    for suffix in [".wav", ".flac", ".WAV"]:
        path = a.save(tmp_path / f"a{suffix}")
        data, rate = sf.read(path, dtype="int16")
        assert rate == 24000
        np.testing.assert_array_equal(data, i16)
    path = a.save(tmp_path / "a.ogg")
    data, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and sf.info(path).format == "OGG" and abs(len(data) - 3500) < 1000
    with pytest.raises(ValueError, match="unknown audio file type"):
        a.save(tmp_path / "a.aiff")
    with pytest.raises(ValueError, match="unknown audio file type"):
        a.save(tmp_path / "noext")
    with pytest.raises(FileNotFoundError):
        a.save(tmp_path / "no" / "such" / "dir.wav")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.WAV", "a.flac", "a.ogg", "a.wav"]  # nothing partial left behind


@pytest.mark.parametrize("suffix, fmt, subtype", [(".mp3", "MP3", "MPEG_LAYER_III"), (".opus", "OGG", "OPUS"),
                                                  (".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS")])
@pytest.mark.parametrize("rate", [24000, 16000])
def test_compressed_formats_read_back_at_the_rate_and_length(tmp_path, suffix, fmt, subtype, rate):
    a = Audio(sine(1.0, 24000, 440.0))
    path = a.save(tmp_path / f"a{suffix}", sample_rate=rate)
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt, subtype, rate, 1)
    data, got_rate = sf.read(path, dtype="float32")
    assert got_rate == rate
    # lossy codecs add encoder delay / padding of a few ms; the length is the audio's within 60 ms
    assert abs(len(data) - rate) <= 0.06 * rate, len(data)
    assert 0.15 < np.sqrt(np.mean(data ** 2)) < 0.26  # the 0.3-amplitude tone (RMS 0.21) is there


def test_format_rates_are_checked_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"\.opus cannot hold 44100 Hz"):
        Audio(sine(0.1)).save(tmp_path / "a.opus", sample_rate=44100)
    with pytest.raises(ValueError, match=r"\.mp3 cannot hold 96000 Hz"):
        Audio(sine(0.1)).save(tmp_path / "a.mp3", sample_rate=96000)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_nan_samples(tmp_path):
    bad = Audio(np.array([0.0, np.nan, 0.5], dtype=np.float32))
    for suffix in [".wav", ".flac", ".mp3"]:
        with pytest.raises(ValueError, match="NaN or infinite"):
            bad.save(tmp_path / f"x{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_outputs_are_found_before_any_work(tmp_path):
    from pycsm.audio import check_writable

    (tmp_path / "d.wav").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_writable(tmp_path / "d.wav")
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        check_writable(tmp_path / "missing" / "x.wav")
    with pytest.raises(OSError, match="cannot write to /proc"):  # refused even to root
        check_writable("/proc/x.wav")
    check_writable(tmp_path / "fine.wav")
    check_writable("-")
    assert [p.name for p in tmp_path.iterdir()] == ["d.wav"]  # the probe leaves nothing


def test_wav_to_standard_output_declares_an_unknown_length(monkeypatch, tmp_path):
    import io
    import sys

    from pycsm.audio import AudioWriter

    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    x = sine(0.3)
    with AudioWriter("-") as w:
        w.write(x[:1000])
        assert len(out.getvalue()) == 44 + 2000  # the header and the first chunk are out already
        w.write(x[1000:])
    data = out.getvalue()
    assert data[40:44] == b"\x00\xf0\xff\x7f"  # sox's "unknown length"
    got, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000
    np.testing.assert_array_equal(got, Audio(x).to_int16())
    import wave

    with wave.open(io.BytesIO(data)) as w:
        assert w.getframerate() == 24000 and w.readframes(10**6) == Audio(x).to_int16().tobytes()


def test_audio_rejects_multichannel():
    with pytest.raises(ValueError, match="1-D"):
        Audio(np.zeros((10, 2)))


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_frames", [1, 2, 4])
def test_stream_equals_generate(tts, chunk_frames):  # codec (streaming decoder)
    ref = tts.generate("Streaming works.", seed=11, max_audio_length_ms=MS)
    st = tts.stream("Streaming works.", seed=11, max_audio_length_ms=MS, chunk_frames=chunk_frames)
    chunks = list(st)
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert [len(c) for c in chunks[:-1]] == [chunk_frames * SPF] * (len(chunks) - 1)
    assert len(chunks) == math.ceil(N / chunk_frames)
    np.testing.assert_allclose(np.concatenate(chunks), ref.samples, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(st.codes, ref.codes)
    assert st.stop_reason == "max_length" and st.seed == 11


def test_stream_closed_early_stops_generation(tts):  # codec (streaming decoder)
    st = tts.stream("This would go on until the context is full.", seed=1, max_audio_length_ms=None,
                    chunk_frames=2)
    first = next(st)
    assert first.shape == (2 * SPF,)
    t0 = time.perf_counter()
    st.close()
    assert time.perf_counter() - t0 < 1.0
    assert st.stop_reason == "aborted"
    assert 2 <= len(st.codes) < 2000
    # the lock is free again, and a call from inside a running stream is refused, not deadlocked
    with tts.stream("Again.", seed=1, max_audio_length_ms=MS) as st2:
        next(st2)
        with pytest.raises(RuntimeError, match="busy"):
            tts.generate("Nested.", max_audio_length_ms=MS)
    assert tts.generate("After.", seed=1, max_audio_length_ms=MS).codes.shape == (N, 32)


def test_concurrent_calls_are_serialised(tts):  # codec
    texts = [f"Thread number {i}." for i in range(4)]
    expected = [tts.generate(t, seed=i, max_audio_length_ms=MS).codes for i, t in enumerate(texts)]
    got = [None] * 4

    def work(i):
        got[i] = tts.generate(texts[i], seed=i, max_audio_length_ms=MS).codes

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


# ---------------------------------------------------------------------------------------------
# long text and batches
# ---------------------------------------------------------------------------------------------

PARAGRAPH = ("The sun rose over the hills. Birds began to sing! Was it morning already? Mr. Brown thought so. "
             "He made tea at 6.30 a.m. sharp. The kettle whistled.\nOutside, the dog barked. "
             "It wanted a walk… The neighbours waved. Then the day began.")


def test_split_sentences():
    s = split_sentences(PARAGRAPH)
    assert s == ["The sun rose over the hills.", "Birds began to sing!", "Was it morning already?",
                 "Mr. Brown thought so.", "He made tea at 6.30 a.m. sharp.", "The kettle whistled.",
                 "Outside, the dog barked.", "It wanted a walk…", "The neighbours waved.", "Then the day began."]
    assert split_sentences("See e.g. the U.S. report, i.e. No. 5. Pi is 3.14. Dr. J. R. R. Tolkien wrote.") == \
        ["See e.g. the U.S. report, i.e. No. 5.", "Pi is 3.14.", "Dr. J. R. R. Tolkien wrote."]
    assert split_sentences("Wait... what?! \"Yes.\" She left.\n\nEnd") == \
        ["Wait... what?!", "\"Yes.\"", "She left.", "End"]
    assert split_sentences("  \n ") == []
    assert split_sentences("one   two\tthree") == ["one two three"]


def test_split_sentences_bounds_long_sentences():
    clause = "and then it went on for a while"
    text = ", ".join([clause] * 30) + "."
    parts = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in parts) and len(parts) > 5
    assert all(p.endswith(",") for p in parts[:-1])  # cut at commas when there are some
    assert " ".join(parts) == text
    words = split_sentences("word " * 100, max_chars=42)
    assert all(len(p) <= 42 for p in words) and " ".join(words) == ("word " * 100).strip()
    assert split_sentences("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_generate_long_joins_sentences(tts):  # codec
    calls = []
    a = tts.generate_long(PARAGRAPH, seed=20, max_audio_length_ms=MS, pause_ms=150,
                          progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 10) for i in range(11)]
    pause = 150 * 24
    assert a.samples.shape == (10 * N * SPF + 9 * pause,)
    assert a.codes.shape == (10 * N, 32)
    assert a.stop_reason == "max_length" and a.seed == 20
    np.testing.assert_array_equal(a.samples[N * SPF:N * SPF + pause], 0)
    # sentence 2 was spoken with sentence 1 (text and codes) as context, with seed + 1
    s = split_sentences(PARAGRAPH)
    first = tts.generate(s[0], seed=20, max_audio_length_ms=MS)
    np.testing.assert_array_equal(a.codes[:N], first.codes)
    second = tts.generate(s[1], context=[Segment(0, s[0], first.codes)], seed=21, max_audio_length_ms=MS)
    np.testing.assert_array_equal(a.codes[N:2 * N], second.codes)
    # the streaming variant gives the same audio
    st = tts.stream_long(PARAGRAPH, seed=20, max_audio_length_ms=MS, pause_ms=150, chunk_frames=3)
    # same codes; the audio agrees to F16 rounding (ggml picks other F16 matmul kernels for other
    # chunk sizes; with the F32 file streamed and one-shot Mimi agree to 1e-6, see test_mimi.py)
    np.testing.assert_allclose(np.concatenate(list(st)), a.samples, rtol=0, atol=2e-3)
    np.testing.assert_array_equal(st.codes, a.codes)


def test_generate_long_progress_can_stop(tts):  # codec
    a = tts.generate_long(PARAGRAPH, seed=1, max_audio_length_ms=MS, pause_ms=100,
                          progress=lambda done, total: done < 3)
    assert a.stop_reason == "aborted"
    assert a.codes.shape == (3 * N, 32)
    assert a.samples.shape == (3 * N * SPF + 2 * 2400,)
    b = tts.generate_long(PARAGRAPH, seed=1, max_audio_length_ms=MS, progress=lambda done, total: False)
    assert b.stop_reason == "aborted" and b.samples.shape == (0,) and b.codes.shape == (0, 32)


def test_generate_long_with_user_context(tts):  # codec
    ctx = [Segment(1, "Earlier words.", tts.generate("Earlier words.", speaker=1, seed=2, max_audio_length_ms=MS))]
    a = tts.generate_long("One. Two.", context=ctx, seed=5, max_audio_length_ms=MS)
    first = tts.generate("One.", context=ctx, seed=5, max_audio_length_ms=MS)
    second = tts.generate("Two.", context=ctx + [Segment(0, "One.", first.codes)], seed=6, max_audio_length_ms=MS)
    np.testing.assert_array_equal(a.codes, np.concatenate([first.codes, second.codes]))


def test_generate_batch_matches_generate(tts):  # codec
    texts = ["First line.", "Second line, longer.", "Third.", "Fourth one here.", "Fifth."]
    out = tts.generate_batch(texts, seed=30, max_audio_length_ms=MS)
    assert len(out) == 5
    for i, (t, a) in enumerate(zip(texts, out)):
        ref = tts.generate(t, seed=30 + i, max_audio_length_ms=MS)
        assert a.seed == 30 + i and a.stop_reason == "max_length"
        np.testing.assert_array_equal(a.codes, ref.codes)
        np.testing.assert_allclose(a.samples, ref.samples, rtol=0, atol=1e-6)
    per_speaker = tts.generate_batch(texts[:2], speaker=[1, 0], seed=30, max_audio_length_ms=MS)
    np.testing.assert_array_equal(per_speaker[0].codes,
                                  tts.generate(texts[0], speaker=1, seed=30, max_audio_length_ms=MS).codes)
    assert tts.generate_batch([], max_audio_length_ms=MS) == []
    with pytest.raises(TypeError):
        tts.generate_batch("one text", max_audio_length_ms=MS)
    with pytest.raises(ValueError, match="empty"):
        tts.generate_batch(["ok", " "], max_audio_length_ms=MS)
    with pytest.raises(ValueError, match="speakers"):
        tts.generate_batch(["a", "b"], speaker=[0], max_audio_length_ms=MS)


# ---------------------------------------------------------------------------------------------
# saved voices
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def voice(tts, tmp_path_factory) -> Voice:
    path = tmp_path_factory.mktemp("voice") / "ref.wav"
    sf.write(path, sine(0.5, 16000), 16000)
    return Voice.from_file(path, "A low hum.", speaker=1, tts=tts)


def test_voice_from_file_encodes_once_and_is_context(tts, voice, tmp_path):  # codec (encoder)
    assert voice.speaker == 1 and voice.text == "A low hum." and voice.model == "tiny-f16.gguf"
    assert voice.codes.shape == (math.ceil(0.5 * 24000 / SPF), 32) and voice.duration == pytest.approx(0.56)
    seg = Segment(1, "A low hum.", voice.codes)
    ref = tts.generate("Reply.", speaker=1, context=[seg], seed=4, max_audio_length_ms=MS)
    # a Voice alone, or in a list, is context; without speaker= the voice's speaker speaks
    for ctx in (voice, [voice]):
        np.testing.assert_array_equal(tts.generate("Reply.", context=ctx, seed=4, max_audio_length_ms=MS).codes,
                                      ref.codes)
    np.testing.assert_array_equal(tts.generate_batch(["Reply."], context=voice, seed=4, max_audio_length_ms=MS)[0]
                                  .codes, ref.codes)
    other = tts.generate("Reply.", speaker=0, context=voice, seed=4, max_audio_length_ms=MS)
    assert not np.array_equal(other.codes, ref.codes)


def test_voice_file_round_trip(voice, tmp_path):
    path = voice.save(tmp_path / "v.csmvoice")
    data = path.read_bytes()
    assert data[:8] == b"CSMVOICE" and len(data) < 2048  # a small file: 7 frames of 32 u16 codes + header
    back = Voice.load(path)
    assert (back.speaker, back.text, back.model) == (voice.speaker, voice.text, voice.model)
    np.testing.assert_array_equal(back.codes, voice.codes)
    with pytest.raises(FileExistsError):
        voice.save(path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.csmvoice"]


def test_voice_made_with_one_quantisation_works_with_another(tiny_dir, voice, tmp_path):  # codec
    q8 = tmp_path / "q8.gguf"
    pycsm.quantize(tiny_dir / "tiny-f32.gguf", q8, "q8_0")
    with CSM(q8, n_threads=1) as t:
        a = t.generate("Reply.", context=Voice.load(voice.save(tmp_path / "v.csmvoice")), seed=4,
                       max_audio_length_ms=MS)
        b = t.generate("Reply.", speaker=1, context=[Segment(1, "A low hum.", voice.codes)], seed=4,
                       max_audio_length_ms=MS)
    np.testing.assert_array_equal(a.codes, b.codes)


def _corrupt(data: bytes):
    import json
    import struct

    n = struct.unpack_from("<I", data, 10)[0]
    head = json.loads(data[14:14 + n])

    def with_head(**kw):
        h = json.dumps(head | kw).encode()
        return data[:10] + struct.pack("<I", len(h)) + h + data[14 + n:]

    codes = bytearray(data[14 + n:])
    codes[0:2] = struct.pack("<H", 4000)
    return [
        (b"", "shorter than its fixed header"),
        (b"NOTAVOICE" + data[9:], "wrong magic"),
        (data[:8] + b"\x02\x00" + data[10:], "format version 2"),
        (data[:10] + struct.pack("<I", 2**31) + data[14:], "header length"),
        (data[:14] + b"{" * n + data[14 + n:], "not UTF-8 JSON"),
        (data[:-2], "truncated or padded"),
        (data + b"\0\0", "truncated or padded"),
        (with_head(frames=0), "frame count 0"),
        (with_head(frames=10**9), "frame count"),
        (with_head(codebooks=8), "codebooks"),
        (with_head(speaker=-1), "speaker"),
        (with_head(speaker="x"), "speaker"),
        (with_head(text=7), "transcript"),
        (data[:14 + n] + bytes(codes), r"codes must be in \[0, 2048\)"),
    ]


def test_a_corrupt_voice_file_is_one_clear_error(voice, tmp_path):
    from pycsm.voices import VoiceFileError

    for i, (data, match) in enumerate(_corrupt(voice.to_bytes())):
        path = tmp_path / f"bad{i}.csmvoice"
        path.write_bytes(data)
        with pytest.raises(VoiceFileError, match=match) as e:
            Voice.load(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "not a valid .csmvoice file" in msg
    with pytest.raises(FileNotFoundError, match="voice file not found"):
        Voice.load(tmp_path / "missing.csmvoice")


def test_voices_folder(voice, tmp_path, monkeypatch):
    from pycsm import voices

    monkeypatch.setenv("PYCSM_VOICES", str(tmp_path / "vs"))
    assert voices.voices_dir() == tmp_path / "vs" and voices.list_voices() == []
    voices.save_voice(voice, "alice")
    voices.save_voice(voice, "bob-2.x")
    assert voices.list_voices() == ["alice", "bob-2.x"]
    with pytest.raises(FileExistsError):
        voices.save_voice(voice, "alice")
    np.testing.assert_array_equal(voices.find_voice("alice").codes, voice.codes)
    np.testing.assert_array_equal(voices.find_voice(str(tmp_path / "vs" / "bob-2.x.csmvoice")).codes, voice.codes)
    for bad in ["", ".hidden", "a/b", "x" * 65, "v.csmvoice", "a b"]:
        with pytest.raises(ValueError, match="invalid voice name"):
            voices.voice_path(bad)
    voices.remove_voice("alice")
    assert voices.list_voices() == ["bob-2.x"]
    with pytest.raises(FileNotFoundError, match="no voice named 'alice'"):
        voices.remove_voice("alice")
    with pytest.raises(FileNotFoundError, match="voice list"):
        voices.find_voice("alice")
    monkeypatch.delenv("PYCSM_VOICES")
    assert voices.voices_dir().parts[-2:] == ("pycsm", "voices")


def test_context_audio_is_bounded_before_any_work(tts, tmp_path):
    # a 4 KB WAV that declares 1 Hz would be 33 minutes at 24 kHz; 2**31 Hz cannot be allocated
    for rate, match in [(1, "sample rate"), (500, "sample rate"), (2**31 - 1, "sample rate")]:
        path = tmp_path / f"r{rate}.wav"
        path.write_bytes(b"RIFF" + (4036).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
                         + (1).to_bytes(2, "little") * 2 + rate.to_bytes(4, "little")
                         + (2 * rate % 2**32).to_bytes(4, "little") + (2).to_bytes(2, "little")
                         + (16).to_bytes(2, "little") + b"data" + (4000).to_bytes(4, "little") + bytes(4000))
        with pytest.raises(ValueError, match=match):
            Segment.from_file(path, "x")
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(170 * 8000, dtype=np.int16), 8000)  # 170 s: more than 2048 frames of 80 ms
    with pytest.raises(ValueError, match="at most 163.84 s"):
        Segment.from_file(long, "x")
    with pytest.raises(ValueError, match="at most 163.84 s"):
        Voice.from_file(long, "x", tts=tts)
    with pytest.raises(ValueError, match="context holds at most 163.84 s"):
        tts.encode(np.zeros(170 * 8000, dtype=np.float32), 8000)
    with pytest.raises(ValueError, match="context holds at most 163.84 s"):
        tts.generate("Hi.", context=[Segment(0, "x", np.zeros(170 * 24000, dtype=np.float32))],
                     max_audio_length_ms=MS)
