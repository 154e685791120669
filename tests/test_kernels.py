"""pycsm's kernels (native/src/kernels/) for Q8_0, Q4_K (int8) and F16 weights against numpy, on
every x86 kernel this CPU runs.

Each kernel is compiled here with a small driver (tests/native/kernel_check.cpp), each kernel file
with its own instruction-set flags as in CMakeLists.txt. Its products must equal the exact products
of the dequantised weights with its own quantised activations, its activation quantisation must be
Q8_0's (per 32 values, scale max|x| / 127, round to nearest), and a column's result must be the same
bits whether it is multiplied alone or with others (batch invariance)."""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {  # name: (source, compiler flags, /proc/cpuinfo flags the kernel needs)
    "avx512": ("avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"],
               ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")),
    "avx2": ("avx2.cpp", ["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
}


def _cpu_has(flags):
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(f in have for f in flags)


@pytest.fixture(scope="module")
def driver_exe(tmp_path_factory):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86 kernels; other CPUs have their own drivers (.ci/neon)")
    cxx = shutil.which("g++") or shutil.which("clang++")
    assert cxx, "a C++ compiler is needed to build the kernel driver"
    tmp = tmp_path_factory.mktemp("kernels")
    exe = tmp / "kernel_check"
    inc = ["-I", str(ROOT / "native/src")]
    san = os.environ.get("PYCSM_KERNEL_SANITIZE", "").split()  # .ci/sanitize: the driver under ASan + UBSan
    objs, defs = [], []
    # only each kernel's file gets its flags (as in CMakeLists.txt); the rest runs anywhere
    for name, (src, flags, _) in KERNELS.items():
        obj = tmp / f"{name}.o"
        subprocess.run([cxx, "-O2", "-std=c++17", *flags, *san, "-ffp-contract=off", *inc, "-c",
                        str(ROOT / "native/src/kernels" / src), "-o", str(obj)], check=True)
        objs.append(str(obj))
        defs.append(f"-DCSM_KERNEL_{name.upper()}")
    subprocess.run([cxx, "-O2", "-std=c++17", *san, *defs, *inc, str(ROOT / "tests/native/kernel_check.cpp"),
                    str(ROOT / "native/src/kernels/formats.cpp"), str(ROOT / "native/src/kernels/select.cpp"),
                    *objs, "-o", str(exe)], check=True)
    return exe


@pytest.fixture(params=list(KERNELS))
def driver(request, driver_exe):
    """(executable, kernel name); skips a kernel this CPU cannot run, after checking that the driver
    says so too."""
    name = request.param
    out = subprocess.run([str(driver_exe), name], input=np.array([1, 0, 0, 0, 2], np.int64).tobytes() + bytes(8),
                         capture_output=True, check=True).stdout
    available = np.frombuffer(out[:4], np.int32)[0] == 1
    assert available == _cpu_has(KERNELS[name][2]), f"kernel {name}: available={available} disagrees with the CPU flags"
    if not available:
        pytest.skip(f"this CPU cannot run the {name} kernel")
    return driver_exe, name


def _q8_0_blocks(rng, rows, cols):
    """Random Q8_0 data: fp16 scales of varied magnitude, int8 quants over the full range."""
    nb = cols // 32
    d = (rng.lognormal(-6, 1.5, size=(rows, nb))).astype(np.float16)
    q = rng.integers(-128, 128, size=(rows, nb, 32), dtype=np.int8)
    blocks = np.zeros((rows, nb, 34), np.uint8)
    blocks[:, :, :2] = d.view(np.uint8).reshape(rows, nb, 2)
    blocks[:, :, 2:] = q.view(np.uint8)
    return blocks, d.astype(np.float64), q.astype(np.float64)


def _q4_k_blocks_raw(rng, rows, cols):
    """Random Q4_K blocks: every byte random but the scales (fp16 d and dmin of varied magnitude)."""
    ns = cols // 256
    blocks = rng.integers(0, 256, size=(rows, ns, 144), dtype=np.uint8)
    d = rng.lognormal(-7, 1.0, size=(rows, ns, 2)).astype(np.float16)
    blocks[:, :, :4] = d.view(np.uint8).reshape(rows, ns, 4)
    return blocks


def _q4_k_blocks(rng, rows, cols):
    """Random Q4_K data (every byte random but the scales: fp16 d and dmin of varied magnitude);
    returns the blocks and their values dequantised by gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    blocks = _q4_k_blocks_raw(rng, rows, cols)
    w = dequantize(blocks.reshape(-1), GGMLQuantizationType.Q4_K).reshape(rows, cols).astype(np.float64)
    return blocks, w


def _call(driver, header, *arrays):
    exe, name = driver
    out = subprocess.run([str(exe), name], input=np.array(header, np.int64).tobytes() + b"".join(a.tobytes() for a in arrays),
                         capture_output=True, check=True).stdout
    assert np.frombuffer(out[:4], np.int32)[0] == 1
    return out[4:]


def _run(driver, blocks, x, n_split, fmt):
    """fmt 0: Q8_0, 1: Q4_K, 3: F16. Returns the results (all columns in one call per row range),
    after checking that one call per column gives the same bits, and for Q8_0 / Q4_K the quantised
    activations and their scales."""
    rows, n_col, cols = blocks.shape[0], x.shape[0], x.shape[1]
    out = _call(driver, [rows, cols, n_col, n_split, fmt], blocks, x.astype(np.float32))
    n = 4 * n_col * rows
    res = np.frombuffer(out[:n], np.float32).reshape(n_col, rows)
    alone = np.frombuffer(out[n:2 * n], np.float32).reshape(n_col, rows)
    assert np.array_equal(res.view(np.uint32), alone.view(np.uint32)), "a column alone differs from it in a batch"
    if fmt == 3:
        return res
    o = 2 * n
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
    res, yq, dy = _run(driver, blocks, x, n_split, 0)
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
    res, yq, dy = _run(driver, blocks, x, n_split, 1)
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
    res = _run(driver, w, x, n_split, 3)
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
    res = np.frombuffer(_call(driver, [n, 0, 0, 0, 2], g.astype(np.float32), u.astype(np.float32)), np.float32)
    assert res[n] == np.float32(-12345.0)
    g64, u64 = g.astype(np.float32).astype(np.float64), u.astype(np.float32).astype(np.float64)
    want = g64 / (1.0 + np.exp(np.minimum(-g64, 700.0))) * u64
    assert np.all(np.isfinite(res[:n]))
    assert np.all(np.abs(res[:n] - want) <= 2e-6 * np.abs(want) + 1e-30), np.max(np.abs(res[:n] - want) / (np.abs(want) + 1e-30))


@pytest.mark.parametrize("n", [1, 7, 16, 17, 1000])
def test_elu_matches_numpy(driver, n):
    """Mimi's ELU: x above 0, expm1(x) below, within 1e-6 relative of float64 expm1 (near 0 too,
    where exp(x) - 1 would lose its digits), -1 far below; in place as well; no write past n."""
    rng = np.random.default_rng(n)
    x = np.concatenate([[-1e30, -100.0, -88.5, -87.2, -1e-7, -0.0, 0.0, 3e-8, 1e30], rng.standard_normal(n) * 3,
                        -rng.random(n) * 1e-3])[:n].astype(np.float32)
    out = np.frombuffer(_call(driver, [n, 0, 0, 0, 4], x), np.float32)
    res, inplace = out[:n], out[n + 1:]
    assert out[n] == np.float32(-12345.0)
    x64 = x.astype(np.float64)
    want = np.where(x64 > 0, x64, np.expm1(np.minimum(x64, 0.0)))
    assert np.all(np.isfinite(res))
    assert np.all(np.abs(res - want) <= 1e-6 * np.abs(want) + 1e-38), np.max(np.abs(res - want) / (np.abs(want) + 1e-38))
    assert np.array_equal(inplace.view(np.uint32), res.view(np.uint32))


@pytest.mark.parametrize("n_q,hd,n_kv", [(1, 64, 1), (4, 64, 37), (16, 64, 200), (13, 8, 9), (16, 128, 64)])
def test_attention_matches_numpy_and_each_query_stands_alone(driver, n_q, hd, n_kv):
    """The attention kernel: softmax(scale q.k) v over each query's own keys, within 2e-6 of float64
    numpy (scores up to about +-30); each query gives the same bits alone as in a block of 16, and
    when the keys and values past its own are NaN; no write past its scratch."""
    rng = np.random.default_rng(n_q * 1000 + hd + n_kv)
    n_keys = rng.integers(1, n_kv + 1, n_q).astype(np.int32)
    n_keys[0] = n_kv
    if n_q > 2:
        n_keys[1] = 0  # a query that sees nothing gives zeros
    q = (rng.standard_normal((n_q, hd)) * 2).astype(np.float32)
    k = (rng.standard_normal((n_kv, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((n_kv, hd)).astype(np.float32)
    out = np.frombuffer(_call(driver, [n_q, hd, n_kv, 0, 5], n_keys, q, k, np.ascontiguousarray(v.T)), np.float32)
    block, alone, nan_past = (out[i * n_q * hd:(i + 1) * n_q * hd].reshape(n_q, hd) for i in range(3))
    for i in range(n_q):
        L = n_keys[i]
        if L == 0:
            assert np.all(block[i] == 0)
            continue
        s = q[i].astype(np.float64) @ k[:L].astype(np.float64).T / np.sqrt(hd)
        p = np.exp(s - s.max())
        want = (p / p.sum()) @ v[:L].astype(np.float64)
        np.testing.assert_allclose(block[i], want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))
    assert np.array_equal(block.view(np.uint32), alone.view(np.uint32)), "a query alone differs from it in a block"
    assert np.array_equal(block.view(np.uint32), nan_past.view(np.uint32)), "keys past a query's own changed it"


# One backbone and one depth-decoder layer of CSM-1B (rows, cols: q/o, k/v, gate/up, down) and the
# depth heads (2051 rows: a tail of 3).
REAL_SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (1024, 1024), (256, 1024), (8192, 1024),
               (1024, 8192), (2051, 1024)]


@pytest.mark.parametrize("fmt", [0, 1, 3], ids=["q8_0", "q4_k", "f16"])
def test_columns_are_batch_invariant_at_real_widths(driver, fmt):
    """A column's result has the same bits whatever the number of columns multiplied with it (1-8)
    and whichever slot it takes, at the model's widths, with the rows split over 2 threads."""
    rng = np.random.default_rng(fmt)
    for rows, cols in REAL_SHAPES:
        if fmt == 0:
            blocks = _q8_0_blocks(rng, rows, cols)[0]
        elif fmt == 1:
            blocks = _q4_k_blocks_raw(rng, rows, cols)
        else:
            blocks = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
        x8 = rng.standard_normal((8, cols)).astype(np.float32)
        x8[:, :32] *= 30
        ref = _run(driver, blocks, x8, 2, fmt)
        ref = ref if fmt == 3 else ref[0]
        for n in range(1, 8):
            got = _run(driver, blocks, np.roll(x8, -n, axis=0)[:n], 2, fmt)
            got = got if fmt == 3 else got[0]
            want = np.roll(ref, -n, axis=0)[:n]
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (rows, cols, n)


@pytest.mark.parametrize("fmt", [0, 1, 3], ids=["q8_0", "q4_k", "f16"])
def test_x86_kernels_agree_bit_for_bit(driver_exe, fmt):
    """The AVX2 kernel keeps the AVX512 kernel's float order (kernel.h), so a model gives the same
    codes on either: their products, tail rows, 1-5 columns and a prompt's 13 (AVX512's 6-column
    tiles) included, have the same bits."""
    if not all(_cpu_has(KERNELS[k][2]) for k in KERNELS):
        pytest.skip("needs a CPU that runs every x86 kernel")
    rng = np.random.default_rng(100 + fmt)
    for rows, cols, n_col in [(7, 512, 1), (130, 1024, 5), (2051, 256, 3), (66, 2048, 13)]:
        if fmt == 0:
            blocks = _q8_0_blocks(rng, rows, cols)[0]
        elif fmt == 1:
            blocks = _q4_k_blocks_raw(rng, rows, cols)
        else:
            blocks = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
        x = rng.standard_normal((n_col, cols)).astype(np.float32)
        outs = [_call((driver_exe, k), [rows, cols, n_col, 2, fmt], blocks, x) for k in KERNELS]
        assert all(o == outs[0] for o in outs[1:]), (rows, cols, n_col)
