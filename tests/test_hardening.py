"""Hardening, second wave (issue 17): files the loader accepts generate and decode or are refused
with a message; objects in use are never freed; hostile files, paths, callers and environments get
one clear error instead of a crash, a hang or minutes of work.

Every case that crashed, aborted or hung before its fix runs in a subprocess (run_py), so that a
regression is reported as a failed test with the child's output rather than taking pytest down.
Races are made deterministic: the close comes from inside the frame or log callback of the call it
races with.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fuzz_gguf as F
import gguf_edit

REPO = Path(__file__).resolve().parents[1]
# seconds a child may take; a sanitizer build is several times slower
TIMEOUT = 120 * float(os.environ.get("PYCSM_FUZZ_TIMEOUT", "30")) / 30


@pytest.fixture(scope="session")
def bases(tiny_dir):
    """The micro models of the fuzzer (text vocabulary 64, Mimi codebooks of 64 codes)."""
    return F.make_bases(tiny_dir / "tiny-f32.gguf", tiny_dir / "fuzz-bases", quant=False)


def run_py(body: str, *args, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Runs PRELUDE + `body` in a fresh interpreter with pycsm importable; returns the finished process."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_ok(r: subprocess.CompletedProcess, expect: str = "OK") -> None:
    assert r.returncode == 0 and expect in r.stdout, (
        f"exit status {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


# A prompt of three text rows and helpers, shared by the child scripts.
PRELUDE = """
import ctypes, gc, os, sys, threading
import numpy as np
import pycsm, pycsm.codec, pycsm.model
from pycsm import _native as N
from pycsm.errors import CSMError
from pycsm.generator import Generator
from pycsm.model import Model
lib = N.lib
I32P = ctypes.POINTER(ctypes.c_int32)
F32P = ctypes.POINTER(ctypes.c_float)
PROMPT = np.full((3, 33), -1, np.int32)
PROMPT[:, 32] = [1, 2, 3]
def expect_error(fn, *words):
    try:
        fn()
    except (CSMError, ValueError) as e:
        assert all(w in str(e) for w in words), str(e)
        return str(e)
    raise AssertionError("no error")
"""


def edited(src: Path, dst: Path, **kw) -> Path:
    if not dst.exists():
        tmp = dst.with_suffix(".part")
        gguf_edit.rewrite(src, tmp, **kw)
        tmp.rename(dst)
    return dst


def layer_copies(src: Path, prefix: str, n_from: int, n_to: int) -> dict:
    """Tensors of blocks n_from..n_to-1 of `prefix`, copies of block 0 (a deeper model of the same widths)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    block0 = {t.name[len(prefix) + 2:]: np.array(t.data) for t in r.tensors if t.name.startswith(prefix + "0.")}
    return {f"{prefix}{i}.{k}": v for i in range(n_from, n_to) for k, v in block0.items()}


# ---------------------------------------------------------------------------------------------
# 1. graph sizes follow the hyper-parameters
# ---------------------------------------------------------------------------------------------

GENERATE_AND_DECODE = """
m = Model(sys.argv[1])
with Generator(m, n_threads=1, max_pos=32) as g:
    r = g.generate(PROMPT, temperature=0.0, max_frames=2, stop_at_eos=False)
assert r.codes.shape == (2, 32), r.codes.shape
codes = r.codes % m.hparams.mimi_codebook_size
pcm = pycsm.codec.decode(m, codes, n_threads=1)
assert pcm.shape == (2 * 1920,) and np.isfinite(pcm).all()
with pycsm.codec.MimiStreamDecoder(m, n_threads=1) as d:
    np.testing.assert_allclose(np.concatenate([d.decode(codes[:1]), d.decode(codes[1:])]), pcm, rtol=1e-5, atol=1e-5)
enc = pycsm.codec.encode(m, np.sin(np.arange(3000) / 7.0).astype(np.float32) * 0.3, n_threads=1)
assert enc.shape == (2, 32), enc.shape
print("OK")
"""


def deep_file(bases) -> Path:
    """The f16 micro model with 140 backbone and 140 depth blocks (46 MB, built once)."""
    src = bases["micro-f16"]
    dst = src.parent / "deep-140.gguf"
    if dst.exists():
        return dst
    adds = {**layer_copies(src, "backbone.blk.", 2, 140), **layer_copies(src, "depth.blk.", 2, 140)}
    return edited(src, dst, set_kv={"csm.backbone.n_layers": 140, "csm.depth.n_layers": 140}, add_tensors=adds)


def test_deep_backbone_and_depth_generate(bases):
    """140 backbone and 140 depth blocks (the loader allows 1024): the graphs of 4096 nodes aborted
    in ggml_new_tensor (GGML_ASSERT(obj_new)) on the first generate."""
    assert_ok(run_py(GENERATE_AND_DECODE, deep_file(bases)))


def test_deep_mimi_decodes(bases):
    """200 Mimi transformer layers: the Mimi graph of 8192 nodes and the state context of 512
    tensors aborted in ggml_new_tensor."""
    src = bases["micro-f32"]
    adds = {**layer_copies(src, "mimi.dec_tfm.layers.", 2, 200), **layer_copies(src, "mimi.enc_tfm.layers.", 2, 200)}
    p = edited(src, src.parent / "mimi-200.gguf", set_kv={"csm.mimi.n_layers": 200}, add_tensors=adds)
    assert_ok(run_py(GENERATE_AND_DECODE, p))


def test_mimi_latent_stride_1920_decodes(bases):
    """A Mimi whose SEANet strides are all 1 and whose latent upsampling does the whole 1920x: the
    upsampling's 1920 steps overflowed the graph, and a 25-frame chunk would have attended over
    48 000 positions."""
    import gguf

    src = bases["micro-f32"]
    dst = src.parent / "stride-1920.gguf"
    if not dst.exists():
        r = gguf.GGUFReader(str(src))
        data = {t.name: np.array(t.data) for t in r.tensors}
        repl = {}
        for name, a in data.items():
            conv = name.endswith(".conv2.weight") and a.shape[-1] > 2 and a.shape[-1] % 2 == 0
            if conv and (name.startswith("mimi.decoder.") or name.startswith("mimi.encoder.")):
                repl[name] = np.ascontiguousarray(a[..., :2])  # stride-1 stages: kernel 2
        rng = np.random.default_rng(0)
        repl["mimi.upsample.conv3.weight"] = (rng.standard_normal((64, 1, 3840)) * 0.02).astype(np.float32)
        repl["mimi.downsample.conv3.weight"] = (rng.standard_normal((64, 64, 3840)) * 0.002).astype(np.float16)
        gguf_edit.rewrite(src, dst.with_suffix(".part"), drop_tensors=list(repl), add_tensors=repl)
        dst.with_suffix(".part").rename(dst)
    assert_ok(run_py(GENERATE_AND_DECODE, dst))


# ---------------------------------------------------------------------------------------------
# 2. objects in use are never freed
# ---------------------------------------------------------------------------------------------

def test_context_free_inside_frame_callback_waits_for_the_call(bases):
    """csm_context_free from inside the context's own on_frame: the C reference count defers it
    to the end of csm_generate (heap-use-after-free of the depth KV before)."""
    assert_ok(run_py("""
    mp = lib.csm_model_default_params()
    m = lib.csm_model_load(os.fsencode(sys.argv[1]), mp)
    cp = lib.csm_context_default_params(); cp.n_threads = 1; cp.max_pos = 32
    c = lib.csm_context_new(m, cp)
    lib.csm_model_free(m)                 # the context keeps the model
    seen = []
    def on_frame(i, codes, ud):
        seen.append(i)
        if i == 0:
            lib.csm_context_free(c)       # deferred: this call still runs
        return True
    cb = N.csm_frame_callback(on_frame)
    gp = lib.csm_generate_default_params(); gp.max_frames = 4; gp.stop_at_eos = False; gp.on_frame = cb
    out = np.zeros((4, 32), np.int32)
    n = lib.csm_generate(c, PROMPT.ctypes.data_as(I32P), 3, gp, out.ctypes.data_as(I32P), 4, None)
    assert n == 4 and seen == [0, 1, 2, 3], (n, seen, N.last_error())
    print("OK")
    """, bases["micro-f32"]))


def test_generator_close_inside_frame_callback(bases):
    """Generator.close() from its own on_frame: generation finishes; the generator then says it is
    closed."""
    assert_ok(run_py("""
    m = Model(sys.argv[1])
    g = Generator(m, n_threads=1, max_pos=32)
    r = g.generate(PROMPT, max_frames=3, stop_at_eos=False, on_frame=lambda i, c: g.close())
    assert len(r.codes) == 3
    expect_error(lambda: g.generate(PROMPT, max_frames=1), "generator is closed")
    print("OK")
    """, bases["micro-f32"]))


def test_model_close_while_its_generator_generates(bases):
    """Model.close() while a Generator of it generates (from the frame callback, so the timing is
    fixed): SIGSEGV before; now the generator keeps the native model."""
    assert_ok(run_py("""
    m = Model(sys.argv[1])
    g = Generator(m, n_threads=1, max_pos=32)
    def on_frame(i, c):
        if i == 0:
            m.close()
            gc.collect()
    r = g.generate(PROMPT, max_frames=3, stop_at_eos=False, on_frame=on_frame)
    assert len(r.codes) == 3
    r = g.generate(PROMPT, max_frames=2, stop_at_eos=False)     # and after it too
    assert len(r.codes) == 2
    expect_error(lambda: m.n_tensors, "model is closed")
    expect_error(lambda: Generator(m), "model is closed")
    print("OK")
    """, bases["micro-f32"]))


def test_stream_decoder_outlives_its_model(bases):
    """MimiStreamDecoder(model.handle), then the model is closed and dropped, then decode():
    SIGSEGV before."""
    assert_ok(run_py("""
    m = Model(sys.argv[1])
    codes = np.arange(64, dtype=np.int32).reshape(2, 32) % 64
    want = pycsm.codec.decode(m.handle, codes, n_threads=1)
    d = pycsm.codec.MimiStreamDecoder(m.handle, n_threads=1)
    m.close(); del m; gc.collect()
    got = np.concatenate([d.decode(codes[:1]), d.decode(codes[1:])])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)   # chunked as test_mimi checks it
    d.close()
    expect_error(lambda: d.decode(codes), "decoder is closed")
    print("OK")
    """, bases["micro-f32"]))


# ---------------------------------------------------------------------------------------------
# 3. log callback replaced while messages are delivered
# ---------------------------------------------------------------------------------------------

def test_log_callback_replaced_while_logging(bases, tmp_path):
    """A log callback that replaces or clears itself while it runs, and threads that log while
    another one swaps callbacks: the ctypes thunk being called was dropped (SIGSEGV)."""
    assert_ok(run_py("""
    from pycsm.model import set_log_callback
    got = []
    def swapper(level, text):
        got.append(text)
        set_log_callback(None if len(got) % 2 else swapper)   # replace the running callback
        gc.collect()
    set_log_callback(swapper)
    for _ in range(50):
        lib.csm_model_load(b"/nonexistent/model.gguf", lib.csm_model_default_params())
        set_log_callback(swapper)
    assert got
    stop = threading.Event()
    def logger():
        while not stop.is_set():
            lib.csm_model_load(b"/nonexistent/model.gguf", lib.csm_model_default_params())
    ts = [threading.Thread(target=logger) for _ in range(2)]
    for t in ts: t.start()
    for i in range(2000):
        set_log_callback((lambda l, t: None) if i % 3 else None)
        gc.collect(0)
    # at the C API: a message reaches each callback with its own user data, never the other's
    wrong = []
    def make(mine):
        return N.csm_log_callback(lambda level, text, ud: wrong.append(ud) if ud != mine else None)
    pairs = [(make(1), ctypes.c_void_p(1)), (make(2), ctypes.c_void_p(2))]
    for i in range(3000):
        lib.csm_log_set(*pairs[i % 2])
    stop.set()
    for t in ts: t.join()
    lib.csm_log_set(N.csm_log_callback(), None)
    assert not wrong, wrong[:5]
    print("OK")
    """))


# ---------------------------------------------------------------------------------------------
# 4. a thread the system refuses
# ---------------------------------------------------------------------------------------------

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

/* pthread_create that succeeds PTHREAD_SHIM_OK times, then fails with EAGAIN (as under a pids
   limit or RLIMIT_NPROC). */
typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
static int calls;

int pthread_create(pthread_t * t, const pthread_attr_t * a, void * (*f)(void *), void * arg) {
    static create_fn real;
    if (!real) real = (create_fn) dlsym(RTLD_NEXT, "pthread_create");
    const char * ok = getenv("PTHREAD_SHIM_OK");
    if (__atomic_fetch_add(&calls, 1, __ATOMIC_SEQ_CST) >= (ok ? atoi(ok) : 0)) return EAGAIN;
    return real(t, a, f, arg);
}
"""


@pytest.fixture(scope="session")
def pthread_shim(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        pytest.fail("a C compiler (cc or gcc) is needed to build the pthread_create shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"], check=True)
    return d / "shim.so"


@pytest.mark.parametrize("n_ok", [0, 1])
def test_refused_threads_are_errors(bases, pthread_shim, tmp_path, n_ok):
    """With pthread_create failing after n_ok threads: loading (packing threads) works on the
    threads it got, and contexts, Mimi codecs and quantisation fail with a message. Before, the
    load called std::terminate and context creation hit GGML_ASSERT(rc == 0) in ggml."""
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), str(pthread_shim)]))
    r = run_py("""
    m = Model(sys.argv[1])                       # f16: packed on several threads where the CPU can
    msg = expect_error(lambda: Generator(m, n_threads=4), "refused a thread")
    expect_error(lambda: pycsm.codec.decode(m, np.zeros((1, 32), np.int32), n_threads=4), "refused a thread")
    expect_error(lambda: pycsm.codec.MimiStreamDecoder(m, n_threads=4), "refused a thread")
    with Generator(m, n_threads=1, max_pos=16) as g:   # one thread needs none
        assert len(g.generate(PROMPT, max_frames=1, stop_at_eos=False).codes) == 1
    pycsm.model.quantize(sys.argv[1], sys.argv[2], "q8_0", n_threads=4)
    print("OK", msg)
    """, bases["micro-f16"], tmp_path / "q.gguf", env={"LD_PRELOAD": preload, "PTHREAD_SHIM_OK": str(n_ok)})
    assert_ok(r)


# ---------------------------------------------------------------------------------------------
# 5-7. the model file: rewritten, not a regular file, unaligned
# ---------------------------------------------------------------------------------------------

def test_truncated_model_file_after_load(bases, tmp_path):
    """The file is truncated after the load: with the default use_repack the weights are read,
    not mapped, so the next frame and decode still work (SIGBUS before)."""
    p = tmp_path / "m.gguf"
    shutil.copy(bases["micro-f32"], p)
    assert_ok(run_py("""
    m = Model(sys.argv[1])
    g = Generator(m, n_threads=1, max_pos=32)
    a = g.generate(PROMPT, temperature=0.0, max_frames=2, stop_at_eos=False).codes
    os.truncate(sys.argv[1], 0)
    with open(sys.argv[1], "r+b") as f:
        f.write(b"\\0" * 4096)
    b = g.generate(PROMPT, temperature=0.0, max_frames=2, stop_at_eos=False).codes
    assert np.array_equal(a, b)
    pycsm.codec.decode(m, a % 64, n_threads=1)
    print("OK")
    """, p))


def test_fifo_model_path_is_refused_without_blocking(tmp_path):
    """A FIFO as the model path: open() blocked for ever waiting for a writer."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = run_py("""
    expect_error(lambda: Model(sys.argv[1]), "not a regular file")
    assert lib.csm_quantize(os.fsencode(sys.argv[1]), os.fsencode(sys.argv[1] + ".q"), lib.csm_quantize_default_params()) == -1
    assert "regular file" in N.last_error(), N.last_error()
    print("OK")
    """, fifo, timeout=30)
    assert_ok(r)


def test_alignment_1_with_odd_offsets_loads_and_matches(bases, tmp_path):
    """general.alignment = 1 with tensors at odd offsets: the mapped weights made permute_host and
    the kernels load misaligned elements (UBSan in .ci/sanitize). Such a file is read into an
    aligned buffer and gives the codes and samples of the aligned original."""
    mut = F.Mutator({"micro-f32": bases["micro-f32"]})
    base = mut.bases["micro-f32"]
    for pad in range(4):
        g = base[2].copy()
        g.kvs.append([b"general.alignment", F.T_U32, F.enc_value(F.T_U32, 1)])
        g.kvs.append([b"test.pad", F.T_STR, F.enc_str(b"x" * pad)])
        g.alignment = 1
        p = tmp_path / f"align1-{pad}.gguf"
        mut.write("micro-f32", mut.build(base, g, ["alignment 1"], relayout=True), p)
        import gguf

        r = gguf.GGUFReader(str(p))
        if any(t.data_offset % 4 for t in r.tensors):  # absolute offsets
            break
    else:
        pytest.fail("could not lay out a file with unaligned tensors")
    assert_ok(run_py("""
    out = []
    for path in sys.argv[1:]:
        for mmap in (True, False):
            m = Model(path, use_mmap=mmap, use_repack=False)
            with Generator(m, n_threads=1, max_pos=32) as g:
                codes = g.generate(PROMPT, temperature=0.0, max_frames=2, stop_at_eos=False).codes
            out.append((codes, pycsm.codec.decode(m, codes % 64, n_threads=1)))
    for codes, pcm in out[1:]:
        assert np.array_equal(codes, out[0][0]) and np.array_equal(pcm, out[0][1])
    print("OK")
    """, bases["micro-f32"], p))


# ---------------------------------------------------------------------------------------------
# 12-14. sizes from the file and the caller
# ---------------------------------------------------------------------------------------------

def test_kv_memory_beyond_the_limit_is_refused(bases):
    """max_pos 65536 on a 140-block backbone asks for 4.7 GB of KV per sequence: two sequences
    (9.4 GB) are refused with the size in the message, before anything is allocated."""
    deep = deep_file(bases)
    p = edited(deep, deep.parent / "deep-140-64k.gguf", set_kv={"csm.backbone.max_pos": 65536})
    assert_ok(run_py("""
    m = Model(sys.argv[1])
    msg = expect_error(lambda: Generator(m, n_threads=1, n_batch=2), "KV caches would take", "limit")
    with Generator(m, n_threads=1, max_pos=64, n_batch=2) as g:   # a shorter context fits
        assert len(g.generate(PROMPT, max_frames=1, stop_at_eos=False).codes) == 1
    print("OK", msg)
    """, p))


@pytest.mark.parametrize("kv, match", [
    ({"csm.mimi.sample_rate": 8000}, "samples per frame"),
    ({"csm.mimi.frame_rate": 25.0}, "samples per frame"),
])
def test_sample_rate_must_match_the_frame(bases, tmp_path, kv, match):
    """8000 Hz at 12.5 frames/s would label 1920-sample frames as 8 kHz audio (3x slow)."""
    from pycsm import Model
    from pycsm.errors import CSMError

    p = edited(bases["micro-f32"], tmp_path / "rate.gguf", set_kv=kv)
    with pytest.raises(CSMError, match=match):
        Model(p)


def test_tokenizer_arrays_bounded_by_the_vocabulary(bases, tmp_path):
    """More token strings than csm.text_vocab_size (3 M extra took 3.3 GB and 27 s to build): the
    loader refuses them before the tokenizer is built; as many as the vocabulary load."""
    from pycsm import Model
    from pycsm.errors import CSMError
    from pycsm.tokenizer import Tokenizer

    tokens = [f"t{i}" for i in range(F.MICRO_TEXT_VOCAB)]
    ok = edited(bases["micro-f32"], tmp_path / "tok-ok.gguf",
                set_kv={"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["t0 t1"]})
    Model(ok).close()
    bad = edited(bases["micro-f32"], tmp_path / "tok-bad.gguf",
                 set_kv={"tokenizer.ggml.tokens": tokens + ["extra"], "tokenizer.ggml.merges": ["t0 t1"]})
    with pytest.raises(CSMError, match="tokenizer.ggml.tokens.*65 entries"):
        Model(bad)
    with pytest.raises(ValueError, match="more than 64"):
        Tokenizer.from_gguf(bad)


def test_thread_count_rule_is_checked_before_any_work(bases):
    """n_threads = 10**6 was capped for generation, then refused by the Mimi decode after the
    frames were made. One rule now (0 or None: all cores; 1..1024), in C and in Python."""
    from pycsm import _native as N
    from pycsm import codec
    from pycsm.generator import Generator
    from pycsm.model import Model, check_n_threads, quantize

    lib = N.lib
    m = Model(bases["micro-f32"])
    try:
        cp = lib.csm_context_default_params()
        cp.n_threads = 4096
        assert not lib.csm_context_new(m.handle, cp)
        assert "n_threads 4096 is out of range" in N.last_error()
        codes = np.zeros((1, 32), np.int32)
        pcm = np.zeros(1920, np.float32)
        assert lib.csm_mimi_decode(m.handle, codes.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 1,
                                   pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1920, 4096) == -1
        assert "n_threads 4096 is out of range" in N.last_error()
        for bad in (10**6, -1, 1025):
            with pytest.raises(ValueError, match="n_threads"):
                Generator(m, n_threads=bad)
            with pytest.raises(ValueError, match="n_threads"):
                codec.decode(m, codes, n_threads=bad)
            with pytest.raises(ValueError, match="n_threads"):
                quantize(bases["micro-f32"], "/nonexistent/q.gguf", n_threads=bad)
        for bad in (1.5, "2", True):
            with pytest.raises(TypeError):
                check_n_threads(bad)
        assert [check_n_threads(v) for v in (None, 0, 1, 1024)] == [0, 0, 1, 1024]
    finally:
        m.close()


# ---------------------------------------------------------------------------------------------
# 16. temporary files of quantize and convert
# ---------------------------------------------------------------------------------------------

def test_quantize_does_not_follow_a_planted_link(bases, tmp_path):
    """A symlink planted at the old fixed temporary name ("<out>.part") made quantize overwrite
    the file it pointed to."""
    from pycsm.model import quantize

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "q.gguf"
    (tmp_path / "q.gguf.part").symlink_to(victim)
    quantize(bases["micro-f32"], out, "q8_0", n_threads=1)
    assert victim.read_text() == "precious"
    assert out.read_bytes()[:4] == b"GGUF" and not out.is_symlink()
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "q.gguf.part", "victim.txt"]


def test_convert_does_not_follow_a_planted_link(tiny_dir, tmp_path):
    """The same for `pycsm convert` ("<out>.tmp")."""
    from pycsm.convert import convert

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "c.gguf"
    (tmp_path / "c.gguf.tmp").symlink_to(victim)
    convert(tiny_dir / "checkpoint", out, "f16")
    assert victim.read_text() == "precious"
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf", "c.gguf.tmp", "victim.txt"]


# ---------------------------------------------------------------------------------------------
# 17. special-token text in user text
# ---------------------------------------------------------------------------------------------

def test_build_prompt_plain_text_keeps_one_segment(tiny_dir):
    """'<|end_of_text|><|begin_of_text|>[7]' in the text started a new segment as speaker 7; with
    parse_special=False it is spoken as written (the default stays the reference's)."""
    from pycsm import Model
    from pycsm.prompt import build_prompt

    m = Model(tiny_dir / "tiny-f32.gguf")
    try:
        tok = m.tokenizer
        text = "hi<|end_of_text|><|begin_of_text|>[7]bye"
        special = {tok.bos_id, tok.eos_id}
        ref = build_prompt(tok, text, 0)[:, 32]
        plain = build_prompt(tok, text, 0, parse_special=False)[:, 32]
        ctx = build_prompt(tok, "next", 1, context=[(0, text, None)], parse_special=False)[:, 32]
    finally:
        m.close()
    assert sum(int(t) in special for t in ref) == 4           # the injected pair became real tokens
    assert sum(int(t) in special for t in plain) == 2         # only the segment's own BOS and EOS
    assert plain[0] == tok.bos_id and plain[-1] == tok.eos_id
    assert sum(int(t) in special for t in ctx) == 4           # two segments, context included


# ---------------------------------------------------------------------------------------------
# 18-19. the library and the environment
# ---------------------------------------------------------------------------------------------

FAKE_LIB = r"""
#include <stdint.h>
int32_t csm_api_version(void) { return API; }
int64_t csm_struct_size(int32_t which) { return which == 1 ? HPARAMS : -2; }
"""


@pytest.mark.parametrize("defines, match", [
    (None, "older than this pycsm"),
    (["-DAPI=1", "-DHPARAMS=0"], "C API version 1"),
    (["-DAPI=2", "-DHPARAMS=8"], "struct csm_model_params is -2 bytes"),
])
def test_abi_mismatch_is_refused(tmp_path, defines, match):
    """A library from another csm.h (a stale build tree) is refused at import with the reason."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    src = tmp_path / "fake.c"
    src.write_text(FAKE_LIB if defines else "int csm_version_of_nothing;\n")
    lib = tmp_path / "libcsm.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src), *(defines or [])], check=True)
    r = run_py("", env={"PYCSM_LIBRARY": str(lib)})
    assert r.returncode != 0 and "ImportError" in r.stderr and match in r.stderr, r.stderr[-2000:]


def test_real_library_passes_the_handshake():
    from pycsm import _native as N

    assert N.lib.csm_api_version() == N.CSM_API_VERSION
    for which, struct in N._STRUCTS.items():
        assert N.lib.csm_struct_size(which) == ctypes.sizeof(struct), struct.__name__
    assert N.lib.csm_struct_size(1000) == -1


@pytest.mark.parametrize("user, want", [(None, "1"), ("0", "0")])
def test_ggml_no_backtrace_set_unless_the_user_did(user, want):
    """ggml_abort attaches gdb for a backtrace unless GGML_NO_BACKTRACE is set."""
    env = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    if user is not None:
        env["GGML_NO_BACKTRACE"] = user
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", "import os, pycsm; print(os.environ.get('GGML_NO_BACKTRACE'))"],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0 and r.stdout.strip() == want, r.stdout + r.stderr
