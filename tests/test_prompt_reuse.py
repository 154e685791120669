"""Prompt reuse (csm_generate_params.reuse_prompt, on by default): a prompt's leading rows that the
same slot's previous prompt shared keep their cached keys and values, and the codes equal those of a
full prefill bit for bit. Prompts cross the attention's 32-position padding; the previous prompts
are longer, shorter, equal and unrelated; slots a smaller batch left unused keep their rows."""

from __future__ import annotations

import numpy as np
import pytest

from pycsm.generator import Generator
from pycsm.model import Model
from pycsm.prompt import audio_rows, text_rows

FRAMES = 8


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """Rows b can reuse after a: the equal leading rows, at most len(b) - 1."""
    n = 0
    while n < min(len(a), len(b) - 1) and np.array_equal(a[n], b[n]):
        n += 1
    return n


def _run(g: Generator, prompt, seed, reuse):
    return g.generate(prompt, temperature=0.9, top_k=50, seed=seed, max_frames=FRAMES, stop_at_eos=False,
                      reuse_prompt=reuse)


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_k"])
def test_reused_prefix_gives_the_same_codes(tiny_files, outtype):
    rng = np.random.default_rng(5)
    voice = np.concatenate([text_rows(rng.integers(0, 128000, 9)), audio_rows(rng.integers(0, 2048, (27, 32)))])
    text_a, text_b = text_rows(rng.integers(0, 128000, 6)), text_rows(rng.integers(0, 128000, 14))
    a = np.concatenate([voice, text_a])          # 42 rows: keys padded to 64
    b = np.concatenate([voice, text_b])          # 50 rows, 36 shared with a
    longer = np.concatenate([a, text_b])         # a and 14 more rows
    sequence = [("a", a), ("b", b), ("a again", a), ("a again", a), ("longer", longer), ("a prefix", a[:30]),
                ("voice alone", voice[:20]), ("unrelated", text_b), ("b", b)]
    with Model(tiny_files[outtype]) as m, Generator(m, n_threads=2) as g, Generator(m, n_threads=2) as fresh:
        prev = None
        for i, (name, p) in enumerate(sequence):
            got = _run(g, p, 100 + i, True)
            want = _run(fresh, p, 100 + i, False)
            expected = 0 if prev is None else _shared(prev, p)
            assert got.n_prompt_reused == expected, name
            assert want.n_prompt_reused == 0
            np.testing.assert_array_equal(got.codes, want.codes, err_msg=f"{name}: {expected} rows reused")
            prev = p


def test_batch_slots_reuse_their_own_prompts_only(tiny_files):
    rng = np.random.default_rng(9)
    voice = audio_rows(rng.integers(0, 2048, (33, 32)))
    prompts = [np.concatenate([voice, text_rows(rng.integers(0, 128000, n))]) for n in (3, 8, 12, 5)]
    swapped = [prompts[1], prompts[0], prompts[2], prompts[3]]
    calls = [prompts, prompts[:2], prompts, swapped]  # the 2-item call leaves slots 2 and 3 alone
    kw = dict(temperature=0.9, top_k=50, max_frames=FRAMES, stop_at_eos=False)
    with Model(tiny_files["q8_0"]) as m, Generator(m, n_threads=2, n_batch=4) as g, \
            Generator(m, n_threads=2, n_batch=4) as fresh:
        reused = []
        for i, call in enumerate(calls):
            got = g.generate_batch(call, seed=7 * i, reuse_prompt=True, **kw)
            want = fresh.generate_batch(call, seed=7 * i, reuse_prompt=False, **kw)
            for j, (x, y) in enumerate(zip(got, want)):
                np.testing.assert_array_equal(x.codes, y.codes, err_msg=f"call {i} item {j}")
            reused.append([r.n_prompt_reused for r in got])
    n = [len(p) for p in prompts]
    assert reused[0] == [0, 0, 0, 0]
    assert reused[1] == [n[0] - 1, n[1] - 1]
    # slots 2 and 3 sat out the 2-item call (it runs only its own sequences): their rows are intact
    assert reused[2] == [n[0] - 1, n[1] - 1, n[2] - 1, n[3] - 1]
    # swapped slots share the voice (and nothing of the text, which differs from the first token)
    assert reused[3][0] == _shared(prompts[0], prompts[1]) and reused[3][0] >= len(voice)
    assert reused[3][2:] == [n[2] - 1, n[3] - 1]


def test_frame_logits_then_generate(tiny_files):
    """frame_logits prefills too; a generate after it reuses those rows and gets the same codes."""
    rng = np.random.default_rng(3)
    p = np.concatenate([text_rows(rng.integers(0, 128000, 10)), audio_rows(rng.integers(0, 2048, (25, 32)))])
    with Model(tiny_files["q8_0"]) as m, Generator(m, n_threads=2) as g, Generator(m, n_threads=2) as fresh:
        l0, _ = g.frame_logits(p)
        got = _run(g, p, 1, True)
        want = _run(fresh, p, 1, False)
        l1, _ = fresh.frame_logits(p)
    assert got.n_prompt_reused == len(p) - 1
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(l0, l1)
