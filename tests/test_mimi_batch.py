"""The batched streaming Mimi decoder (csm_mimi_batch_decoder, pycsm.codec.MimiBatchDecoder): each
slot's audio equals a single-stream MimiStreamDecoder's, whichever slots share its calls, in which
order, and whenever streams join, leave, or reuse a reset slot.

Tiny model: the session fixture `tiny_dir` (tests/conftest.py).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from pycsm import codec
from pycsm._native import lib
from pycsm.errors import CSMError

SPF = 1920


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    err = np.sum((ref.astype(np.float64) - x) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(err, 1e-30)))


def assert_same_audio(ref: np.ndarray, x: np.ndarray) -> None:
    assert x.shape == ref.shape
    assert np.max(np.abs(ref - x)) < 1e-5
    assert snr_db(ref, x) > 100.0


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    handle = lib.csm_model_load(str(tiny_dir / "tiny-f32.gguf").encode(), lib.csm_model_default_params())
    assert handle, lib.csm_last_error().decode()
    yield handle
    lib.csm_model_free(handle)


def single(model, codes: np.ndarray) -> np.ndarray:
    """What one MimiStreamDecoder makes of the frames, fed one at a time (as the server feeds them)."""
    with codec.MimiStreamDecoder(model) as dec:
        return np.concatenate([dec.decode(codes[i]) for i in range(len(codes))])


def test_streams_join_leave_and_reuse_slots(tiny):
    """Five streams of different lengths through three slots, one frame per stream per call: streams
    start at different steps, leave when done, and a later stream takes a freed (reset) slot."""
    rng = np.random.default_rng(11)
    lengths = [9, 4, 14, 6, 5]
    starts = [0, 1, 3, 5, 9]      # stream 3 waits for a slot: 1 leaves at step 5; stream 4 takes 3's
    streams = [rng.integers(0, 2048, size=(n, 32)).astype(np.int32) for n in lengths]
    out = [[] for _ in streams]
    slot_of: dict[int, int] = {}
    done = [0] * len(streams)
    with codec.MimiBatchDecoder(tiny, n_slots=3, n_threads=2) as dec:
        step = 0
        reused = 0
        while any(d < n for d, n in zip(done, lengths)):
            for s, start in enumerate(starts):  # join: the lowest free slot, reset
                if s not in slot_of and done[s] == 0 and step >= start and len(slot_of) < dec.n_slots:
                    slot = min(set(range(dec.n_slots)) - set(slot_of.values()))
                    reused += dec.frames[slot] > 0
                    dec.reset(slot)
                    assert dec.frames[slot] == 0
                    slot_of[s] = slot
            running = list(slot_of)
            if running:
                pcm = dec.decode([slot_of[s] for s in running], np.stack([streams[s][done[s]] for s in running]))
                assert pcm.shape == (len(running), SPF)
                for row, s in zip(pcm, running):
                    out[s].append(row)
                    done[s] += 1
                    if done[s] == lengths[s]:
                        del slot_of[s]
            step += 1
        assert reused >= 2
    for s, codes in enumerate(streams):
        assert_same_audio(single(tiny, codes), np.concatenate(out[s]))


def test_any_slot_order_and_multi_frame_calls(tiny):
    """Slots in any order (non-consecutive lanes), several frames per call, calls crossing the
    internal chunk and the 250-position attention window, and slots skipped in some calls."""
    rng = np.random.default_rng(12)
    n = 150
    streams = {s: rng.integers(0, 2048, size=(n, 32)).astype(np.int32) for s in (0, 1, 3)}
    got = {s: [] for s in streams}
    pos = {s: 0 for s in streams}
    with codec.MimiBatchDecoder(tiny, n_slots=4) as dec:
        plan = [([3, 0, 1], 2), ([1], 1), ([0, 3], 30), ([1, 3, 0], 1), ([3, 1], 40), ([0, 1], 80),
                ([3, 0], 3), ([1, 0, 3], 7), ([0, 3, 1], 30)]
        for slots, k in plan:
            k = min(k, min(n - pos[s] for s in slots))
            pcm = dec.decode(slots, np.stack([streams[s][pos[s]:pos[s] + k] for s in slots]))
            assert pcm.shape == (len(slots), k * SPF)
            for row, s in zip(pcm, slots):
                got[s].append(row)
                pos[s] += k
        assert dec.frames == [pos[0], pos[1], 0, pos[3]]
    for s, codes in streams.items():
        ref = codec.decode(tiny, codes[:pos[s]])
        assert_same_audio(ref, np.concatenate(got[s]))
    assert max(pos.values()) > 125  # past the attention window


def test_bad_arguments_change_nothing(tiny):
    rng = np.random.default_rng(13)
    codes = rng.integers(0, 2048, size=(2, 3, 32)).astype(np.int32)
    with codec.MimiBatchDecoder(tiny, n_slots=2) as dec:
        first = dec.decode([0, 1], codes[:, :1])
        bad = codes[:, 1:].copy()
        bad[1, 1, 7] = 2048
        with pytest.raises(CSMError, match=r"code 2048 at frame 3, codebook 7 is outside \[0, 2048\)"):
            dec.decode([0, 1], bad)
        for slots, msg in [([0, 0], "twice"), ([2], r"slot 2 is outside \[0, 2\)"), ([-1], "outside"),
                           ([], "no slots"), ([2 ** 40], "out of range")]:
            with pytest.raises(CSMError, match=msg):
                dec.decode(slots, codes[:len(slots) or 1, 1:])
        with pytest.raises(CSMError, match="shape"):
            dec.decode([0, 1], codes[:1])
        with pytest.raises(CSMError, match="integers"):
            dec.decode([0, 1], codes.astype(np.float32))
        with pytest.raises(CSMError, match="outside"):
            dec.reset(5)
        assert dec.decode([0, 1], np.zeros((2, 0, 32), np.int32)).shape == (2, 0)
        rest = dec.decode([0, 1], codes[:, 1:])
        assert dec.frames == [3, 3]
    assert dec.closed
    with pytest.raises(CSMError, match="closed"):
        dec.decode([0], codes[:1])
    for s in range(2):
        assert_same_audio(codec.decode(tiny, codes[s]), np.concatenate([first[s], rest[s]]))
    for n_slots in (0, 257, True):
        with pytest.raises(CSMError, match="n_slots"):
            codec.MimiBatchDecoder(tiny, n_slots=n_slots)


def test_c_api_checks(tiny):
    """Checks only reachable through the C API: NULL pointers, counts, short outputs."""
    i32p, f32p = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)

    def err():
        return lib.csm_last_error().decode()

    slots = np.array([1, 0], np.int32)
    codes = np.zeros((2, 2, 32), np.int32)
    out = np.zeros(2 * 2 * SPF, np.float32)
    sp, cp, op = slots.ctypes.data_as(i32p), codes.ctypes.data_as(i32p), out.ctypes.data_as(f32p)
    assert lib.csm_mimi_batch_decoder_new(None, 2, 1) is None and "model is NULL" in err()
    assert lib.csm_mimi_batch_decoder_new(tiny, 0, 1) is None and "n_slots 0 is outside [1, 256]" in err()
    assert lib.csm_mimi_batch_decoder_new(tiny, 2, 100000) is None and "n_threads" in err()
    assert lib.csm_mimi_batch_decoder_decode(None, sp, 2, cp, 2, op, out.size) == -1 and "decoder is NULL" in err()
    assert lib.csm_mimi_batch_decoder_reset(None, 0) == -1 and "decoder is NULL" in err()
    assert lib.csm_mimi_batch_decoder_n_slots(None) == -1
    d = lib.csm_mimi_batch_decoder_new(tiny, 2, 1)
    assert d
    try:
        assert lib.csm_mimi_batch_decoder_n_slots(d) == 2
        assert lib.csm_mimi_batch_decoder_decode(d, None, 2, cp, 2, op, out.size) == -1 and "slots is NULL" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 3, cp, 2, op, out.size) == -1
        assert "n_slots 3 is outside [1, 2]" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 0, cp, 2, op, out.size) == -1 and "n_slots 0" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 2, None, 2, op, out.size) == -1 and "codes is NULL" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 2, cp, 2, None, out.size) == -1 and "out_pcm is NULL" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 2, cp, -1, op, out.size) == -1 and "negative" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 2, cp, 1 << 30, op, out.size) == -1 and "absurd" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 2, cp, 2, op, out.size - 1) == -1
        assert f"max_samples {out.size - 1} is too small: 4 frames decode to {out.size} samples" in err()
        assert lib.csm_mimi_batch_decoder_reset(d, 2) == -1 and "slot 2 is outside [0, 2)" in err()
        assert lib.csm_mimi_batch_decoder_reset(d, -1) == -1 and "slot -1" in err()
        assert lib.csm_mimi_batch_decoder_decode(d, sp, 2, cp, 2, op, out.size) == out.size and err() == ""
        assert lib.csm_mimi_batch_decoder_reset(d, 1) == 0
    finally:
        lib.csm_mimi_batch_decoder_free(d)
    lib.csm_mimi_batch_decoder_free(None)


def test_keeps_model_alive(tiny_dir):
    """The decoder holds its model: freeing the model's handle first leaves the decoder working."""
    m = lib.csm_model_load(str(tiny_dir / "tiny-f32.gguf").encode(), lib.csm_model_default_params())
    codes = np.random.default_rng(14).integers(0, 2048, size=(1, 2, 32)).astype(np.int32)
    ref = codec.decode(m, codes[0])
    dec = codec.MimiBatchDecoder(m, n_slots=1)
    lib.csm_model_free(m)
    assert_same_audio(ref, dec.decode([0], codes)[0])
    dec.close()
