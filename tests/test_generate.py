"""Speech-token generation in C against the transformers reference (tests/reference/make_tiny.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy import stats

from pycsm.errors import CSMError
from pycsm.generator import Generator
from pycsm.model import Model

PROMPTS = ["plain", "ctx"]


@pytest.fixture(scope="module")
def f32(tiny_dir):
    with Model(tiny_dir / "tiny-f32.gguf") as m:
        yield m


@pytest.fixture(scope="module")
def f16(tiny_dir):
    with Model(tiny_dir / "tiny-f16.gguf") as m:
        yield m


def first_near_tie(frame_logits: np.ndarray, margin: float) -> int:
    """Index (frame * 32 + codebook) of the first reference greedy code whose top-2 logits are
    closer than `margin` (a difference within tolerance may flip it); a large number if none."""
    top2 = np.sort(frame_logits, axis=-1)[..., -2:]
    close = (top2[..., 1] - top2[..., 0]).reshape(-1) < margin
    return int(np.argmax(close)) if close.any() else 10**9


@pytest.mark.parametrize("name", PROMPTS)
def test_f32_logits_match_reference(f32, ref, name):
    with Generator(f32, n_threads=2) as g:
        l0, dl = g.frame_logits(ref[f"prompt_{name}"], ref[f"{name}_codes"][0])
    np.testing.assert_allclose(l0, ref[f"{name}_logits0"], atol=1e-4, rtol=0)
    assert dl.shape == (31, 2051)
    np.testing.assert_allclose(dl, ref[f"{name}_depth_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", PROMPTS)
def test_f32_greedy_frames_match_reference(f32, ref, name):
    codes = ref[f"{name}_codes"]
    assert first_near_tie(ref[f"{name}_frame_logits"], 1e-3) >= 8 * 32, "fixture has a near tie early"
    with Generator(f32, n_threads=2) as g:
        r = g.generate(ref[f"prompt_{name}"], temperature=0, max_frames=len(codes), stop_at_eos=False)
    assert r.stop_reason == "max_frames"
    assert len(codes) >= 8
    np.testing.assert_array_equal(r.codes, codes)


@pytest.mark.parametrize("name", PROMPTS)
def test_f16_logits_and_greedy_frames(f16, ref, name):
    codes = ref[f"{name}_codes"]
    with Generator(f16, n_threads=2) as g:
        l0, dl = g.frame_logits(ref[f"prompt_{name}"], codes[0])
        r = g.generate(ref[f"prompt_{name}"], temperature=0, max_frames=len(codes), stop_at_eos=False)
    # F16 weights against the fp32 reference (with ggml's F16 kernel the activations are rounded to
    # F16 too; pycsm's keeps them f32): within 1e-2 of the logit range (the tiny model's span ~10).
    scale = max(1.0, float(np.abs(ref[f"{name}_logits0"]).max()))
    assert np.abs(l0 - ref[f"{name}_logits0"]).max() <= 1e-2 * scale
    assert np.abs(dl - ref[f"{name}_depth_logits"]).max() <= 1e-2 * scale
    # Greedy codes equal up to the first reference code whose top-2 margin is below 2e-3 of the
    # logit range (random logits have many near ties; past one, a flip is within tolerance).
    n_same = first_near_tie(ref[f"{name}_frame_logits"], 2e-3 * scale)
    got, want = r.codes.reshape(-1), codes.reshape(-1)
    n = min(n_same, len(want))
    assert n >= 16, "the fixture should give at least 16 clear-cut codes"
    np.testing.assert_array_equal(got[:n], want[:n])


@pytest.mark.parametrize("name", PROMPTS)
def test_f16_kernel_is_closer_to_the_reference_than_ggml(tiny_dir, ref, name):
    """pycsm's F16 kernel (AVX512 CPUs) multiplies the F16 weights with f32 activations; ggml's
    rounds the activations to F16 first. Both see the same rounded weights, so the kernel's logits
    are on average at least as close to the fp32 reference."""
    from pycsm import _native
    if b"/f16 matmul: pycsm" not in _native.lib.csm_system_info():
        pytest.skip("this CPU lacks AVX512-VNNI: ggml's F16 kernel is the only one (covered above)")
    err = {}
    for repack in (True, False):
        with Model(tiny_dir / "tiny-f16.gguf", use_repack=repack) as m, Generator(m, n_threads=2) as g:
            l0, dl = g.frame_logits(ref[f"prompt_{name}"], ref[f"{name}_codes"][0])
        err[repack] = (np.abs(l0 - ref[f"{name}_logits0"]).mean(), np.abs(dl - ref[f"{name}_depth_logits"]).mean())
    assert err[True][0] <= err[False][0] and err[True][1] <= err[False][1], err


def test_sampling_is_reproducible_across_runs_and_threads(f32, ref):
    prompt = ref["prompt_plain"]
    runs = []
    for threads in (1, 2, 2):
        with Generator(f32, n_threads=threads) as g:
            runs.append(g.generate(prompt, temperature=0.9, top_k=50, seed=1234, max_frames=6, stop_at_eos=False).codes)
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[1], runs[2])
    with Generator(f32, n_threads=2) as g:
        other = g.generate(prompt, temperature=0.9, top_k=50, seed=1235, max_frames=6, stop_at_eos=False).codes
    assert not np.array_equal(other, runs[0])


def test_sampled_codes_follow_softmax_of_top_k(f32, ref):
    """Chi-square: the empirical distribution of codebook 0 equals softmax(top_k(logits / T)),
    and the same data rejects a wrong temperature or a wrong k."""
    prompt = ref["prompt_plain"]
    T, k, n = 0.7, 6, 1500
    with Generator(f32, n_threads=2) as g:
        logits, _ = g.frame_logits(prompt)
        counts = {}
        for seed in range(n):
            r = g.generate(prompt, temperature=T, top_k=k, depth_temperature=0, seed=seed, max_frames=1,
                           stop_at_eos=False)
            c = int(r.codes[0, 0])
            counts[c] = counts.get(c, 0) + 1
    valid = logits[:2048].astype(np.float64)

    def expected(temp, kk):
        top = np.argsort(-valid, kind="stable")[:kk]
        p = np.exp((valid[top] - valid[top].max()) / temp)
        return dict(zip(top.tolist(), (p / p.sum()).tolist()))

    def pvalue(temp, kk):
        e = expected(temp, kk)
        if set(counts) - set(e):
            return 0.0  # a code outside the top-k was drawn
        obs = np.array([counts.get(c, 0) for c in e])
        exp = np.array([e[c] for c in e]) * (obs.sum() / sum(e.values()))
        return stats.chisquare(obs, exp).pvalue

    assert set(counts) <= set(expected(T, k)), "drew a code outside the top-k"
    assert pvalue(T, k) > 1e-3
    assert pvalue(1.0, k) < 1e-6
    assert pvalue(0.4, k) < 1e-6
    assert pvalue(T, k - 2) < 1e-6
    assert pvalue(T, k + 4) < 1e-6


def test_codes_are_valid_mimi_codes(f32, ref):
    with Generator(f32, n_threads=2) as g:
        r = g.generate(ref["prompt_ctx"], temperature=1.5, top_k=0, seed=7, max_frames=8, stop_at_eos=False)
    assert r.codes.shape == (8, 32)
    assert r.codes.min() >= 0 and r.codes.max() < 2048


def _zero_heads_copy(src, dst):
    """A copy of the GGUF whose audio heads are all zero: every logit ties, argmax picks code 0, so
    greedy generation yields the all-zero end frame."""
    import gguf

    shutil.copy(src, dst)
    reader = gguf.GGUFReader(str(src))
    with open(dst, "r+b") as f:
        for t in reader.tensors:
            if t.name in ("backbone.codebook0_head.weight", "depth.codebooks_head.weight"):
                f.seek(int(t.data_offset))
                f.write(b"\0" * int(t.n_bytes))


def test_eos_frame_ends_generation_and_is_dropped(tiny_dir, ref, tmp_path):
    path = tmp_path / "eos.gguf"
    _zero_heads_copy(tiny_dir / "tiny-f32.gguf", path)
    with Model(path) as m, Generator(m, n_threads=2) as g:
        r = g.generate(ref["prompt_plain"], temperature=0, max_frames=5)
        assert r.stop_reason == "eos"
        assert r.codes.shape == (0, 32)
        r = g.generate(ref["prompt_plain"], temperature=0, max_frames=5, stop_at_eos=False)
        assert r.stop_reason == "max_frames"
        assert r.codes.shape == (5, 32) and not r.codes.any()


def test_max_frames_and_callback_abort(f32, ref):
    seen = []
    with Generator(f32, n_threads=2) as g:
        r = g.generate(ref["prompt_plain"], temperature=0, max_frames=3, stop_at_eos=False,
                       on_frame=lambda i, c: seen.append((i, c.copy())))
        assert r.stop_reason == "max_frames" and len(r.codes) == 3
        assert [i for i, _ in seen] == [0, 1, 2]
        np.testing.assert_array_equal(np.stack([c for _, c in seen]), r.codes)
        r = g.generate(ref["prompt_plain"], temperature=0, max_frames=10, stop_at_eos=False,
                       on_frame=lambda i, c: i < 1)
        assert r.stop_reason == "aborted" and len(r.codes) == 2

        def boom(i, c):
            raise KeyError("from callback")

        with pytest.raises(KeyError):
            g.generate(ref["prompt_plain"], temperature=0, max_frames=10, on_frame=boom)


def test_full_context_stops_generation(f32, ref):
    prompt = ref["prompt_plain"]
    P = prompt.shape[0]
    with Generator(f32, n_threads=2, max_pos=P + 3) as g:
        r = g.generate(prompt, temperature=0, max_frames=50, stop_at_eos=False)
    assert r.stop_reason == "context_full"
    assert len(r.codes) == 4  # one frame from the prefill, then one per free position
    np.testing.assert_array_equal(r.codes, ref["plain_codes"][:4])
    with Generator(f32, n_threads=2, max_pos=P - 1) as g:
        with pytest.raises(CSMError, match="does not fit|context holds"):
            g.generate(prompt, temperature=0, max_frames=5)


def test_batch_equals_single_streams(f32, ref):
    prompts = [ref["prompt_plain"], ref["prompt_ctx"], ref["prompt_plain"]]
    with Generator(f32, n_threads=2, n_batch=3) as g:
        batch = g.generate_batch(prompts, temperature=0.9, top_k=50, seed=99, max_frames=5, stop_at_eos=False)
    with Generator(f32, n_threads=2) as g:
        single = [g.generate(p, temperature=0.9, top_k=50, seed=99 + b, max_frames=5, stop_at_eos=False)
                  for b, p in enumerate(prompts)]
    for b, s in zip(batch, single):
        np.testing.assert_array_equal(b.codes, s.codes)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 33), np.int32), "empty"),
    (np.full((3, 33), -1, np.int32), "no column"),
    (np.array([[-1] * 32 + [10**7]], np.int32), "outside"),
    (np.array([[5000] + [-1] * 32], np.int32), "outside"),
    (np.array([[-7] * 33], np.int32), "outside"),
])
def test_bad_prompts_raise(f32, bad, match):
    with Generator(f32, n_threads=1) as g:
        with pytest.raises((CSMError, ValueError), match=match):
            g.generate(bad, max_frames=1)


def test_bad_sampling_parameters_raise(f32, ref):
    with Generator(f32, n_threads=1) as g:
        with pytest.raises(CSMError, match="temperature"):
            g.generate(ref["prompt_plain"], temperature=float("nan"), max_frames=1)
        with pytest.raises(CSMError, match="temperature"):
            g.generate(ref["prompt_plain"], temperature=-1, max_frames=1)
