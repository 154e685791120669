"""Hardening: fuzzed GGUF files and bad arguments at the C API end in a clean error, never a crash,
a hang or an absurd allocation.

The GGUF cases run in worker processes (tests/fuzz_gguf.py), so a crash is reported as a finding
with the file that caused it instead of taking pytest down. The argument tests call the C API
through ctypes in this process. Longer runs: see docs/hardening.md.
"""

from __future__ import annotations

import ctypes
import math
import os
import re

import numpy as np
import pytest

import fuzz_gguf as F
from pycsm import _native as N

FUZZ_CASES = int(os.environ.get("PYCSM_FUZZ_CASES", "2500"))
FUZZ_SEED = int(os.environ.get("PYCSM_FUZZ_SEED", "0"))
# Seconds before a case counts as a hang (a sanitizer build is several times slower).
CASE_TIMEOUT = float(os.environ.get("PYCSM_FUZZ_TIMEOUT", "30"))


@pytest.fixture(scope="session")
def bases(tiny_dir):
    """The fuzzing bases, built once next to the tiny fixture."""
    return F.make_bases(tiny_dir / "tiny-f32.gguf", tiny_dir / "fuzz-bases")


def report(s: F.Summary) -> str:
    return s.text() + "\n" + "\n".join(f"{f['kind']} {f.get('file', '')}: {f['detail'][-1500:]}" for f in s.findings)


# ---------------------------------------------------------------------------------------------
# fuzzed files
# ---------------------------------------------------------------------------------------------

def test_fuzzed_files_fixed_seed(bases, tmp_path):
    s = F.run(FUZZ_CASES, seed=FUZZ_SEED, workers=2, bases=bases, findings_dir=tmp_path / "findings",
              timeout=CASE_TIMEOUT)
    print(s.text())
    assert s.cases == FUZZ_CASES
    assert not s.findings, report(s)
    # the mutations reach past ggml's parser into the loader's checks and into valid models
    assert s.outcomes.get("ok", 0) >= FUZZ_CASES // 20, s.text()
    assert len(s.signatures) >= min(30, FUZZ_CASES // 40), s.text()
    assert any("generated" in k for k in s.steps), s.text()


def test_every_ggml_type_in_every_role(bases, tmp_path):
    """One tensor of each kind of use retyped to each ggml type (and one past the last): loads and
    runs, or is rejected."""
    files = F.type_matrix(bases, tmp_path / "types")
    s = F.run(0, files=files, workers=2, bases=bases, findings_dir=tmp_path / "findings", timeout=CASE_TIMEOUT)
    assert not s.findings, report(s)
    assert s.outcomes.get("ok", 0) > 50 and s.outcomes.get("rejected", 0) > 50, s.text()


def test_regressions(bases, tmp_path):
    """Hand-made files for what fuzzing found: each gives its expected outcome, quickly."""
    cases = F.regression_files(bases, tmp_path / "reg")
    s = F.run(0, files=[(p, d, q) for p, d, q, _, _ in cases], workers=2, bases=bases,
              findings_dir=tmp_path / "findings", timeout=min(CASE_TIMEOUT, 20))
    assert not s.findings, report(s)
    got = {r["desc"]: r for r in s.results}
    for path, desc, _, expect, match in cases:
        r = got[desc]
        if expect != "any":
            assert r["outcome"] == expect, (desc, r)
        if match:
            assert re.search(match, r.get("msg", "")), (desc, r)
        if r["outcome"] == "rejected":  # strings quoted from the file are cut short
            assert r["msg_len"] < 2000, (desc, r["msg_len"], r["msg"][:200])
        assert r["ms"] < 10_000 * (CASE_TIMEOUT / 30), (desc, r["ms"])


# ---------------------------------------------------------------------------------------------
# arguments at the C API
# ---------------------------------------------------------------------------------------------

lib = N.lib
I32P = ctypes.POINTER(ctypes.c_int32)
F32P = ctypes.POINTER(ctypes.c_float)


def i32p(a):
    return a.ctypes.data_as(I32P)


def f32p(a):
    return a.ctypes.data_as(F32P)


def fails(value, *words):
    """The call failed (a NULL handle or a negative status) with a message containing one of `words`."""
    failed = value is None or value < 0
    assert failed, f"expected a failure, got {value}"
    msg = N.last_error()
    assert msg, "failed without a message"
    assert not words or any(w.lower() in msg.lower() for w in words), msg
    return msg


@pytest.fixture(scope="module")
def model(bases):
    p = lib.csm_model_default_params()
    p.device = N.CSM_DEVICE_CPU
    m = lib.csm_model_load(os.fsencode(bases["micro-f32"]), p)
    assert m, N.last_error()
    yield m
    lib.csm_model_free(m)


@pytest.fixture
def ctx(model):
    p = lib.csm_context_default_params()
    p.n_threads = 1
    p.max_pos = 64
    p.n_batch = 2
    c = lib.csm_context_new(model, p)
    assert c, N.last_error()
    yield c
    lib.csm_context_free(c)


def text_prompt(n=3):
    p = np.full((n, N.CSM_N_COLUMNS), -1, np.int32)
    p[:, N.CSM_TEXT_COLUMN] = np.arange(1, n + 1)
    return p


def gen_params(**kw):
    gp = lib.csm_generate_default_params()
    gp.max_frames = 1
    gp.stop_at_eos = False
    for k, v in kw.items():
        if hasattr(gp.sampling, k):
            setattr(gp.sampling, k, v)
        else:
            setattr(gp, k, v)
    return gp


def test_null_handles_are_harmless():
    lib.csm_model_free(None)
    lib.csm_context_free(None)
    h = lib.csm_model_hparams(None)
    assert h.bb_d_model == 0 and h.n_codebooks == 0
    assert lib.csm_model_name(None) == b"" and lib.csm_model_device(None) == b""
    assert lib.csm_model_n_params(None) == 0 and lib.csm_model_n_bytes(None) == 0
    assert lib.csm_model_n_tensors(None) == 0 and lib.csm_model_file_type(None) == -1
    fails(lib.csm_context_new(None, lib.csm_context_default_params()), "model")
    fails(lib.csm_generate(None, None, 0, gen_params(), None, 0, None), "context")
    fails(lib.csm_generate_batch(None, 1, None, None, gen_params(), None, 0, None), "context")
    fails(lib.csm_eval_frame_logits(None, None, 0, None, None, None), "context")


def test_model_load_arguments(bases):
    p = lib.csm_model_default_params()
    fails(lib.csm_model_load(None, p), "path")
    fails(lib.csm_model_load(b"", p), "path")
    for device in (-1, 3, 1 << 30):
        p = lib.csm_model_default_params()
        p.device = device
        fails(lib.csm_model_load(os.fsencode(bases["micro-f32"]), p), "device")
    if "GPU" not in lib.csm_system_info().decode().upper().split("DEVICES:")[1].split(";")[0]:
        p = lib.csm_model_default_params()
        p.device = N.CSM_DEVICE_GPU
        fails(lib.csm_model_load(os.fsencode(bases["micro-f32"]), p), "gpu")
    p = lib.csm_model_default_params()
    p.gpu_index = -5  # ignored without a GPU, clamped with one
    m = lib.csm_model_load(os.fsencode(bases["micro-f32"]), p)
    assert m, N.last_error()
    lib.csm_model_free(m)


@pytest.mark.parametrize("field, value, word", [
    ("max_pos", -1, "max_pos"), ("max_pos", 1 << 30, "max_pos"), ("n_batch", 0, "n_batch"),
    ("n_batch", -3, "n_batch"), ("n_batch", 100_000, "n_batch"),
])
def test_context_arguments(model, field, value, word):
    p = lib.csm_context_default_params()
    p.n_threads = 1
    setattr(p, field, value)
    fails(lib.csm_context_new(model, p), word)


@pytest.mark.parametrize("n_threads", [-7, 0, 1, 2])
def test_context_thread_counts(model, n_threads):
    """<= 0 means all cores."""
    p = lib.csm_context_default_params()
    p.n_threads = n_threads
    p.max_pos = 16
    c = lib.csm_context_new(model, p)
    if not c:
        fails(c, "thread")
        return
    try:
        prompt = text_prompt()
        out = np.zeros((1, 32), np.int32)
        n = lib.csm_generate(c, i32p(prompt), len(prompt), gen_params(temperature=0.0), i32p(out), 1, None)
        assert n == 1, N.last_error()
    finally:
        lib.csm_context_free(c)


ABSURD_THREADS = """
import ctypes, os, sys, time
import numpy as np
from pycsm import _native as N
lib = N.lib
m = lib.csm_model_load(os.fsencode(sys.argv[1]), lib.csm_model_default_params())
assert m, N.last_error()
for n in (3, 64, 4096, 1 << 20):
    t0 = time.monotonic()
    cp = lib.csm_context_default_params(); cp.n_threads = n; cp.max_pos = 16
    c = lib.csm_context_new(m, cp)
    if c:
        p = np.full((3, 33), -1, np.int32); p[:, 32] = [1, 2, 3]
        out = np.zeros((1, 32), np.int32)
        gp = lib.csm_generate_default_params(); gp.max_frames = 1
        r = lib.csm_generate(c, p.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 3, gp,
                             out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 1, None)
        assert r == 1, N.last_error()
        lib.csm_context_free(c)
    else:
        assert N.last_error()
    codes = np.zeros((1, 32), np.int32); pcm = np.zeros(1920, np.float32)
    r = lib.csm_mimi_decode(m, codes.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 1,
                            pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), pcm.size, n)
    assert r == 1920 or N.last_error()
    qp = lib.csm_quantize_default_params(); qp.type = 8; qp.n_threads = n
    r = lib.csm_quantize(os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]), qp)
    assert r == 0 or N.last_error()
    print(n, round(time.monotonic() - t0, 2), flush=True)
"""


def test_absurd_thread_counts(bases, tmp_path):
    """More threads than cores (up to a million) are capped or refused: with ggml's spinning thread
    pool, 4096 threads took minutes to start on 2 cores, and a thread that could not be created
    aborted the process (GGML_ASSERT in ggml_threadpool_new; std::terminate in csm_quantize)."""
    import subprocess
    import sys

    env = dict(os.environ, GGML_NO_BACKTRACE="1", PYTHONPATH=str(F.REPO))
    r = subprocess.run([sys.executable, "-c", ABSURD_THREADS, str(bases["micro-f32"]), str(tmp_path / "q.gguf")],
                       capture_output=True, text=True, timeout=120 * (CASE_TIMEOUT / 30), env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_pointer_and_size_arguments(ctx):
    prompt = text_prompt()
    out = np.zeros((4, 32), np.int32)
    res = N.csm_generate_result()
    gp = gen_params(temperature=0.0)
    fails(lib.csm_generate(ctx, None, 3, gp, i32p(out), 4, None), "empty")
    fails(lib.csm_generate(ctx, i32p(prompt), 0, gp, i32p(out), 4, None), "empty")
    fails(lib.csm_generate(ctx, i32p(prompt), -5, gp, i32p(out), 4, None), "empty")
    fails(lib.csm_generate(ctx, i32p(prompt), 1 << 30, gp, i32p(out), 4, None), "context holds")
    fails(lib.csm_generate(ctx, i32p(prompt), 3, gp, None, 4, None), "null")
    fails(lib.csm_generate(ctx, i32p(prompt), 3, gp, i32p(out), -1, None), "max_out")
    fails(lib.csm_generate(ctx, i32p(prompt), 3, gp, i32p(out), -(1 << 31), None), "max_out")
    # max_out 0 with no buffer: nothing to write, no error
    assert lib.csm_generate(ctx, i32p(prompt), 3, gp, None, 0, ctypes.byref(res)) == 0, N.last_error()
    assert res.stop_reason == N.CSM_STOP_MAX_FRAMES
    # max_out bounds the frames however large max_frames is; the result may be NULL
    gp = gen_params(temperature=0.0, max_frames=1 << 30)
    assert lib.csm_generate(ctx, i32p(prompt), 3, gp, i32p(out), 2, None) == 2
    assert out.min() >= 0 and out.max() < 2048


@pytest.mark.parametrize("field, value, word", [
    ("temperature", math.nan, "temperature"), ("temperature", math.inf, "temperature"),
    ("temperature", -math.inf, "temperature"), ("temperature", -1e-30, "temperature"),
    ("depth_temperature", math.nan, "temperature"), ("depth_temperature", math.inf, "temperature"),
])
def test_generate_non_finite_sampling(ctx, field, value, word):
    prompt = text_prompt()
    out = np.zeros((1, 32), np.int32)
    fails(lib.csm_generate(ctx, i32p(prompt), 3, gen_params(**{field: value}), i32p(out), 1, None), word)


@pytest.mark.parametrize("top_k, depth_top_k", [(-(1 << 31), -(1 << 31)), (1 << 30, 1 << 30), (0, 0), (1, -1)])
def test_generate_extreme_top_k(ctx, top_k, depth_top_k):
    prompt = text_prompt()
    out = np.zeros((2, 32), np.int32)
    gp = gen_params(temperature=1.0, top_k=top_k, depth_top_k=depth_top_k, seed=(1 << 64) - 1, max_frames=2)
    assert lib.csm_generate(ctx, i32p(prompt), 3, gp, i32p(out), 2, None) == 2, N.last_error()
    assert out.min() >= 0 and out.max() < 64  # the micro model's codebooks hold 64 codes


def test_generate_batch_arguments(ctx):
    prompt = text_prompt()
    outs = [np.zeros((1, 32), np.int32) for _ in range(2)]
    P = (I32P * 2)(i32p(prompt), i32p(prompt))
    O = (I32P * 2)(*[i32p(o) for o in outs])
    n = (ctypes.c_int32 * 2)(3, 3)
    gp = gen_params(temperature=0.0)
    for nb in (0, -1, 3, 1 << 30):
        fails(lib.csm_generate_batch(ctx, nb, P, n, gp, O, 1, None), "n_batch")
    fails(lib.csm_generate_batch(ctx, 2, None, n, gp, O, 1, None), "required")
    fails(lib.csm_generate_batch(ctx, 2, P, None, gp, O, 1, None), "required")
    fails(lib.csm_generate_batch(ctx, 2, P, n, gp, None, 1, None), "required")
    fails(lib.csm_generate_batch(ctx, 2, (I32P * 2)(i32p(prompt), None), n, gp, O, 1, None), "empty")
    fails(lib.csm_generate_batch(ctx, 2, P, (ctypes.c_int32 * 2)(3, -1), gp, O, 1, None), "empty")
    fails(lib.csm_generate_batch(ctx, 2, P, n, gp, (I32P * 2)(i32p(outs[0]), None), 1, None), "null")
    fails(lib.csm_generate_batch(ctx, 2, P, n, gp, O, -1, None), "max_out")
    assert lib.csm_generate_batch(ctx, 2, P, n, gp, O, 1, None) == 0, N.last_error()


def test_eval_frame_logits_arguments(ctx, model):
    V = lib.csm_model_hparams(model).audio_vocab_size
    prompt = text_prompt()
    l0 = np.zeros(V, np.float32)
    dl = np.zeros((31, V), np.float32)
    codes = np.zeros(32, np.int32)
    fails(lib.csm_eval_frame_logits(ctx, i32p(prompt), 3, None, None, None), "logits0")
    fails(lib.csm_eval_frame_logits(ctx, i32p(prompt), 3, None, f32p(l0), f32p(dl)), "codes")
    for bad in (-1, V, 1 << 30):
        c = codes.copy()
        c[7] = bad
        fails(lib.csm_eval_frame_logits(ctx, i32p(prompt), 3, i32p(c), f32p(l0), f32p(dl)), "range")
    fails(lib.csm_eval_frame_logits(ctx, None, 3, i32p(codes), f32p(l0), f32p(dl)), "empty")
    assert lib.csm_eval_frame_logits(ctx, i32p(prompt), 3, i32p(codes), f32p(l0), f32p(dl)) == 0
    assert np.isfinite(l0).all() and np.isfinite(dl).all()


def test_quantize_arguments(bases, tmp_path):
    src = os.fsencode(bases["micro-f32"])
    out = os.fsencode(tmp_path / "q.gguf")
    p = lib.csm_quantize_default_params()
    p.n_threads = 1
    fails(lib.csm_quantize(None, out, p), "path")
    fails(lib.csm_quantize(src, None, p), "path")
    fails(lib.csm_quantize(b"", out, p), "cannot", "not a valid", "open")
    for t in (-1, 4, 5, 9, 15, 16, 24, 31, 43, 1 << 20):  # negative, removed, activation-only, imatrix, ints
        p.type = t
        fails(lib.csm_quantize(src, out, p), "type", "importance")
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "q.gguf.part").exists()
    p.type = 8
    p.n_threads = -3  # all cores
    assert lib.csm_quantize(src, out, p) == 0, N.last_error()
    fails(lib.csm_quantize(src, os.fsencode(tmp_path / "missing-dir" / "q.gguf"), p), "cannot create")


# The Mimi entry points (NULL handles and buffers, short outputs, bad codes and samples) are
# covered in tests/test_mimi.py; the fuzz workers above and .ci/sanitize run them on every file
# that loads.
