"""pycsm's kernels for Q8_0, Q4_K (int8) and F16 weights (native/src/csm_q8_kernel.cpp) against numpy.

The kernel is compiled here with a small driver (tests/native/q8_kernel_check.cpp). Its products
must equal the exact products of the dequantised weights with its own quantised activations, and
its activation quantisation must be Q8_0's (per 32 values, scale max|x| / 127, round to nearest)."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]


def _cpu_has_vnni():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the int8 kernel is x86-64 only; other CPUs use ggml's kernels")
    cxx = shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed to build the kernel driver"
    tmp = tmp_path_factory.mktemp("q8")
    exe = tmp / "q8_kernel_check"
    # only the kernel's file gets the AVX512 flags (as in CMakeLists.txt); the driver runs anywhere
    inc = ["-I", str(ROOT / "native/src")]
    san = os.environ.get("PYCSM_KERNEL_SANITIZE", "").split()  # .ci/sanitize: the driver under ASan + UBSan
    subprocess.run([cxx, "-O2", "-std=c++17", *FLAGS, *san, *inc, "-c", str(ROOT / "native/src/csm_q8_kernel.cpp"),
                    "-o", str(tmp / "kernel.o")], check=True)
    subprocess.run([cxx, "-O2", "-std=c++17", *san, *inc, str(ROOT / "tests/native/q8_kernel_check.cpp"),
                    str(tmp / "kernel.o"), "-o", str(exe)], check=True)
    return exe


def _q8_0_blocks(rng, rows, cols):
    """Random Q8_0 data: fp16 scales of varied magnitude, int8 quants over the full range."""
    nb = cols // 32
    d = (rng.lognormal(-6, 1.5, size=(rows, nb))).astype(np.float16)
    q = rng.integers(-128, 128, size=(rows, nb, 32), dtype=np.int8)
    blocks = np.zeros((rows, nb, 34), np.uint8)
    blocks[:, :, :2] = d.view(np.uint8).reshape(rows, nb, 2)
    blocks[:, :, 2:] = q.view(np.uint8)
    return blocks, d.astype(np.float64), q.astype(np.float64)


def _q4_k_blocks(rng, rows, cols):
    """Random Q4_K data (every byte random but the scales: fp16 d and dmin of varied magnitude);
    returns the blocks and their values dequantised by gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    ns = cols // 256
    blocks = rng.integers(0, 256, size=(rows, ns, 144), dtype=np.uint8)
    d = rng.lognormal(-7, 1.0, size=(rows, ns, 2)).astype(np.float16)
    blocks[:, :, :4] = d.view(np.uint8).reshape(rows, ns, 4)
    w = dequantize(blocks.reshape(-1), GGMLQuantizationType.Q4_K).reshape(rows, cols).astype(np.float64)
    return blocks, w


def _run(driver, blocks, x, n_split, q4k=False):
    rows, n_col = blocks.shape[0], x.shape[0]
    cols = x.shape[1]
    inp = (np.array([rows, cols, n_col, n_split, int(q4k)], np.int64).tobytes() + blocks.tobytes()
           + x.astype(np.float32).tobytes())
    out = subprocess.run([str(driver)], input=inp, capture_output=True, check=True).stdout
    if np.frombuffer(out[:4], np.int32)[0] == 0:
        return None
    o = 4
    res = np.frombuffer(out[o:o + 4 * n_col * rows], np.float32).reshape(n_col, rows); o += 4 * n_col * rows
    yq = np.frombuffer(out[o:o + n_col * cols], np.int8).reshape(n_col, cols); o += n_col * cols
    dy = np.frombuffer(out[o:], np.float32).reshape(n_col, cols // 32)
    return res, yq, dy


@pytest.mark.parametrize("rows,cols,n_col,n_split", [
    (4, 32, 1, 1), (7, 64, 1, 2), (13, 96, 3, 2), (64, 256, 4, 2), (130, 288, 5, 3),
    (2051, 128, 2, 2), (256, 1024, 9, 2), (33, 2048, 1, 4), (8, 8192, 4, 1),
])
def test_kernel_matches_numpy(driver, rows, cols, n_col, n_split):
    rng = np.random.default_rng(rows * 7919 + cols * 31 + n_col)
    blocks, d, q = _q8_0_blocks(rng, rows, cols)
    x = rng.standard_normal((n_col, cols)).astype(np.float32)
    x[:, :32] *= 50  # an outlier block, as in real hidden states
    if cols >= 64:
        x[:, 32:64] = 0  # an all-zero block (scale 0)
    got = _run(driver, blocks, x, n_split)
    if got is None:
        assert not _cpu_has_vnni(), "the CPU has AVX512-VNNI but the kernel says it is unavailable"
        pytest.skip("this CPU lacks AVX512-VNNI; ggml's kernels are used instead")
    res, yq, dy = got
    nb = cols // 32
    # activation quantisation: Q8_0's rule, per 32 values
    xb = x.reshape(n_col, nb, 32)
    amax = np.abs(xb).max(axis=2)
    np.testing.assert_allclose(dy, amax / 127, rtol=1e-6)
    a32 = amax.astype(np.float32)
    inv = np.divide(np.float32(127), a32, out=np.zeros_like(a32), where=a32 > 0)
    want_q = np.round(xb * inv[:, :, None]).astype(np.int8)  # round half to even, as the kernel
    assert np.array_equal(yq.reshape(n_col, nb, 32), want_q)
    # the product: sum over blocks of d_w * d_y * (q_w . q_y), computed exactly in float64
    dots = np.einsum("rbk,cbk->crb", q.reshape(rows, nb, 32), yq.reshape(n_col, nb, 32).astype(np.float64))
    want = np.einsum("crb,rb,cb->cr", dots, d, dy.astype(np.float64))
    scale = np.abs(np.einsum("crb,rb,cb->cr", np.abs(dots), d, dy.astype(np.float64))) + 1e-30
    assert np.all(np.abs(res - want) <= 1e-5 * scale), np.max(np.abs(res - want) / scale)


@pytest.mark.parametrize("rows,cols,n_col,n_split", [
    (4, 256, 1, 1), (5, 512, 2, 2), (61, 1024, 4, 2), (130, 768, 7, 3), (2051, 256, 1, 2), (8, 8192, 4, 1),
])
def test_q4_k_kernel_matches_numpy(driver, rows, cols, n_col, n_split):
    """Q4_K weights (d * scale * q - dmin * min per 32 values) times the kernel's Q8 activations."""
    rng = np.random.default_rng(rows * 131 + cols + n_col)
    blocks, w = _q4_k_blocks(rng, rows, cols)
    x = rng.standard_normal((n_col, cols)).astype(np.float32)
    x[:, :32] *= 50
    got = _run(driver, blocks, x, n_split, q4k=True)
    if got is None:
        assert not _cpu_has_vnni(), "the CPU has AVX512-VNNI but the kernel says it is unavailable"
        pytest.skip("this CPU lacks AVX512-VNNI; ggml's kernels are used instead")
    res, yq, dy = got
    nb = cols // 32
    xq = yq.reshape(n_col, nb, 32).astype(np.float64) * dy.astype(np.float64)[:, :, None]
    want = xq.reshape(n_col, cols) @ w.T
    scale = np.abs(xq.reshape(n_col, cols)) @ np.abs(w.T) + 1e-30
    assert np.all(np.abs(res - want) <= 2e-5 * scale), np.max(np.abs(res - want) / scale)


@pytest.mark.parametrize("rows,cols,n_col,n_split", [
    (4, 16, 1, 1), (7, 48, 1, 2), (13, 96, 3, 2), (61, 1024, 4, 2), (130, 272, 5, 3), (2051, 64, 2, 2),
    (8, 8192, 4, 1),
])
def test_f16_kernel_matches_numpy(driver, rows, cols, n_col, n_split):
    """F16 weights times f32 activations (not rounded to fp16), fp32 accumulation: within 1e-5 of
    the float64 product, relative to the sum of the magnitudes."""
    rng = np.random.default_rng(rows * 17 + cols + n_col)
    w = (rng.standard_normal((rows, cols)) * rng.lognormal(-3, 1.5, size=(rows, 1))).astype(np.float16)
    w[0, :16] = [65504, -65504, 6e-8, -6e-8, 0, -0.0, 1, -1, 0.5, 2, 3, 1e-4, 7, 9, 11, 13][:min(16, cols)]
    x = rng.standard_normal((n_col, cols)).astype(np.float32)
    x[:, :16] *= 50
    inp = (np.array([rows, cols, n_col, n_split, 3], np.int64).tobytes() + w.tobytes() + x.tobytes())
    out = subprocess.run([str(driver)], input=inp, capture_output=True, check=True).stdout
    if np.frombuffer(out[:4], np.int32)[0] == 0:
        assert not _cpu_has_vnni(), "the CPU has AVX512-VNNI but the kernel says it is unavailable"
        pytest.skip("this CPU lacks AVX512-VNNI; ggml's kernels are used instead")
    res = np.frombuffer(out[4:], np.float32).reshape(n_col, rows)
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    want = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64.T) + 1e-30
    assert np.all(np.abs(res - want) <= 1e-5 * scale), np.max(np.abs(res - want) / scale)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000])
def test_silu_mul_matches_numpy(driver, n):
    """The fused feed-forward's silu(g) * u: within 2e-6 relative of float64, over the whole range
    (the exp argument saturates past +-88 without inf/nan: the extreme values come first, so every
    length but 1 has them all), and no write past n."""
    rng = np.random.default_rng(n)
    g = np.concatenate([[-200.0, -88.5, -20.0, 0.0, 1e-8, 30.0, 95.0, 300.0], rng.standard_normal(n) * 4])[:n]
    u = rng.standard_normal(n) * 3
    inp = (np.array([n, 0, 0, 0, 2], np.int64).tobytes() + g.astype(np.float32).tobytes()
           + u.astype(np.float32).tobytes())
    out = subprocess.run([str(driver)], input=inp, capture_output=True, check=True).stdout
    if np.frombuffer(out[:4], np.int32)[0] == 0:
        assert not _cpu_has_vnni(), "the CPU has AVX512-VNNI but the kernel says it is unavailable"
        pytest.skip("this CPU lacks AVX512-VNNI; ggml's kernels are used instead")
    res = np.frombuffer(out[4:], np.float32)
    assert res[n] == np.float32(-12345.0)
    g64, u64 = g.astype(np.float32).astype(np.float64), u.astype(np.float32).astype(np.float64)
    want = g64 / (1.0 + np.exp(np.minimum(-g64, 700.0))) * u64
    assert np.all(np.isfinite(res[:n]))
    assert np.all(np.abs(res[:n] - want) <= 2e-6 * np.abs(want) + 1e-30), np.max(np.abs(res[:n] - want) / (np.abs(want) + 1e-30))
