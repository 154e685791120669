"""Thread safety as csm.h promises it: a model is shared by contexts and codecs on several threads at
once, a context is used by one thread at a time, csm_last_error() is per thread.

ctypes releases the GIL around every native call, so the threads below really run the library
concurrently."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest

from pycsm import _native as N
from pycsm.errors import CSMError
from pycsm.generator import Generator
from pycsm.model import Model

ROUNDS = 3
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def model(tiny_dir):
    with Model(tiny_dir / "tiny-f32.gguf") as m:
        yield m


def run_threads(fns, timeout=300):
    """Runs each fn on its own thread, all released together; returns their results or raises the
    first exception."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def wrap(k, fn):
        try:
            barrier.wait()
            results[k] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(k, fn)) for k, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def sample(g, prompt, seed):
    return g.generate(prompt, temperature=0.9, top_k=50, seed=seed, max_frames=4, stop_at_eos=False).codes


def test_shared_model_two_generators_match_sequential(model, ref):
    prompts = [ref["prompt_plain"], ref["prompt_ctx"]]
    with Generator(model, n_threads=1) as g:
        want = [[sample(g, p, s) for s in SEEDS] for p in prompts]
    gens = [Generator(model, n_threads=1) for _ in prompts]
    try:
        for _ in range(ROUNDS):
            got = run_threads([lambda g=g, p=p: [sample(g, p, s) for s in SEEDS] for g, p in zip(gens, prompts)])
            for w, r in zip(want, got):
                for a, b in zip(w, r):
                    np.testing.assert_array_equal(a, b)
    finally:
        for g in gens:
            g.close()


def test_shared_model_greedy_logits_match_across_threads(model, ref):
    """Four contexts on one model, logits and teacher-forced depth logits bit-identical to one
    context used alone."""
    p, codes = ref["prompt_ctx"], ref["ctx_codes"][0]
    with Generator(model, n_threads=1) as g:
        l0, dl = g.frame_logits(p, codes)
    gens = [Generator(model, n_threads=1) for _ in range(4)]
    try:
        got = run_threads([lambda g=g: g.frame_logits(p, codes) for g in gens])
    finally:
        for g in gens:
            g.close()
    for a, b in got:
        np.testing.assert_array_equal(a, l0)
        np.testing.assert_array_equal(b, dl)


def test_models_load_concurrently(tiny_dir, ref):
    names = ["tiny-f32.gguf", "tiny-f16.gguf", "tiny-f32.gguf", "tiny-f16.gguf"]

    def load_and_generate(name):
        with Model(tiny_dir / name, use_mmap=name.endswith("f16.gguf")) as m, Generator(m, n_threads=1) as g:
            return m.hparams, g.generate(ref["prompt_plain"], temperature=0, max_frames=3, stop_at_eos=False).codes

    got = run_threads([lambda n=n: load_and_generate(n) for n in names])
    for (h, codes), name in zip(got, names):
        assert h == got[0][0]
        twin = got[names.index(name)][1]  # the first load of the same file
        np.testing.assert_array_equal(codes, twin)
    np.testing.assert_array_equal(got[0][1], ref["plain_codes"][:3])


def test_loading_while_another_thread_generates(model, tiny_dir, ref):
    with Generator(model, n_threads=1) as g:
        want = sample(g, ref["prompt_plain"], 5)

        def gen():
            return [sample(g, ref["prompt_plain"], 5) for _ in range(3)]

        def churn():
            for _ in range(3):
                Model(tiny_dir / "tiny-f16.gguf").close()
                with pytest.raises(CSMError):
                    Model(tiny_dir / "reference.npz")

        got, _ = run_threads([gen, churn])
    for c in got:
        np.testing.assert_array_equal(c, want)


def test_last_error_is_per_thread(tmp_path):
    """An error on one thread is not seen by another, and each thread keeps its own message while
    the other fails differently at the same time."""
    lib = N.lib
    (tmp_path / "a.gguf").write_bytes(b"GGUF" + b"\0" * 100)         # version 0
    (tmp_path / "b.gguf").write_bytes(b"nope" * 40)                   # bad magic
    step = threading.Barrier(2)

    def failing(path, n=200):
        msgs = set()
        for _ in range(n):
            assert not lib.csm_model_load(os.fsencode(path), lib.csm_model_default_params())
            msgs.add(N.last_error())
        return msgs

    def clean_thread():
        before = N.last_error()
        step.wait()   # the other thread fails now
        step.wait()
        return before, N.last_error()

    def error_thread():
        step.wait()
        assert not lib.csm_model_load(b"/nonexistent/x.gguf", lib.csm_model_default_params())
        msg = N.last_error()
        step.wait()
        return msg

    (before, after), msg = run_threads([clean_thread, error_thread])
    assert before == "" and after == ""
    assert "cannot open model file" in msg

    a, b = run_threads([lambda: failing(tmp_path / "a.gguf"), lambda: failing(tmp_path / "b.gguf")])
    assert len(a) == 1 and len(b) == 1, (a, b)
    (ma,), (mb,) = a, b
    assert "a.gguf" in ma and "b.gguf" not in ma
    assert "b.gguf" in mb and "not a GGUF" in mb


def test_ggml_error_detail_is_per_thread(tmp_path, tiny_dir):
    """The ggml detail appended to a load error ('... (failed to read ...)') is the one of this
    thread's file even while another thread's ggml call fails differently."""
    good = (tiny_dir / "tiny-f16.gguf").read_bytes()[:4096]
    (tmp_path / "kv.gguf").write_bytes(good[:24] + b"\xff" * 8 + good[32:4096])   # absurd first key length
    (tmp_path / "tr.gguf").write_bytes(good[:1000])                                  # ends in the metadata

    def failing(path):
        msgs = set()
        for _ in range(100):
            assert not N.lib.csm_model_load(os.fsencode(path), N.lib.csm_model_default_params())
            msgs.add(N.last_error())
        return msgs

    alone = [failing(tmp_path / n) for n in ("kv.gguf", "tr.gguf")]
    together = run_threads([lambda: failing(tmp_path / "kv.gguf"), lambda: failing(tmp_path / "tr.gguf")])
    assert together == alone
    assert all(len(m) == 1 for m in together)


def _mimi_or_skip(model):
    codes = np.zeros((2, 32), np.int32)
    pcm = np.zeros(2 * 1920, np.float32)
    n = N.lib.csm_mimi_decode(model.handle, codes.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 2,
                              pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), pcm.size, 1)
    if n < 0 and "not implemented" in N.last_error():
        pytest.skip("the Mimi codec is not built yet")


def _decode(model, codes):
    pcm = np.zeros(len(codes) * 1920, np.float32)
    c = np.ascontiguousarray(codes, np.int32)
    n = N.lib.csm_mimi_decode(model.handle, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(c),
                              pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), pcm.size, 1)
    N.check_status(n, "decode")
    return pcm[:n]


def test_mimi_decode_on_shared_model_from_threads(model, ref):
    _mimi_or_skip(model)
    codes = ref["mimi_codes"]
    want = _decode(model, codes)
    got = run_threads([lambda: [_decode(model, codes) for _ in range(2)] for _ in range(3)])
    for rs in got:
        for pcm in rs:
            np.testing.assert_array_equal(pcm, want)


def test_streaming_codecs_on_shared_model_from_threads(model, ref):
    """One csm_mimi_codec per thread on the same model: each stream gives what it gives alone."""
    _mimi_or_skip(model)
    codes = np.ascontiguousarray(ref["mimi_codes"], np.int32)
    want = _decode(model, codes)

    def stream(chunk):
        codec = N.check_ptr(N.lib.csm_mimi_codec_new(model.handle, 1), "codec")
        try:
            out = []
            for f0 in range(0, len(codes), chunk):
                c = np.ascontiguousarray(codes[f0:f0 + chunk])
                pcm = np.zeros(len(c) * 1920, np.float32)
                n = N.lib.csm_mimi_codec_decode(codec, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(c),
                                                pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), pcm.size)
                out.append(pcm[:N.check_status(n, "stream")])
            return np.concatenate(out)
        finally:
            N.lib.csm_mimi_codec_free(codec)

    chunks = (1, 3, 5)
    alone = [stream(c) for c in chunks]
    for pcm in alone:
        np.testing.assert_allclose(pcm, want, atol=1e-4, rtol=0)
    got = run_threads([lambda c=c: stream(c) for c in chunks])
    for a, b in zip(alone, got):
        np.testing.assert_array_equal(a, b)
