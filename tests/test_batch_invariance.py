"""generate_batch: item i equals generate(prompt_i, seed=seed+i) bit for bit (api.py promises it), on
f16, q8_0 and q4_k files with each of pycsm's x86 kernels (PYCSM_KERNEL), with prompts on both
sides of the attention's 32-position padding (so a stream's keys are padded differently alone and
in the batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pycsm.generator import Generator
from pycsm.model import Model, system_info
from pycsm.prompt import audio_rows, text_rows

CPU_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"),
             "avx2": ("avx2", "fma", "f16c")}


def _prompt(rng, n_text, n_audio):
    return np.concatenate([text_rows(rng.integers(0, 128000, n_text)),
                           audio_rows(rng.integers(0, 2048, (n_audio, 32)))])


def _cpu_has(flags):
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(f in have for f in flags)


@pytest.mark.parametrize("kernel", list(CPU_FLAGS))
@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_k"])
def test_batch_items_equal_single_streams(tiny_files, monkeypatch, kernel, outtype):
    monkeypatch.setenv("PYCSM_KERNEL", kernel)
    runs = f"pycsm {kernel} (" in system_info()
    assert runs == _cpu_has(CPU_FLAGS[kernel]), system_info()
    if not runs:
        pytest.skip(f"this CPU cannot run the {kernel} kernel")
    rng = np.random.default_rng(7)
    # 20 and 31 positions fit one 32-row block of keys, 45 and 70 need two and three. Codes differ
    # only where a float difference crosses a sampling boundary, so 16 frames: with the kernels' old
    # several-column rounding this caught q8_0 (item 0) within them.
    prompts = [_prompt(rng, 12, 8), _prompt(rng, 40, 5), _prompt(rng, 31, 0), _prompt(rng, 30, 40)]
    with Model(tiny_files[outtype]) as m:
        with Generator(m, n_threads=2, n_batch=len(prompts)) as g:
            batch = g.generate_batch(prompts, temperature=0.9, top_k=50, seed=11, max_frames=16, stop_at_eos=False)
        with Generator(m, n_threads=2) as g:
            single = [g.generate(p, temperature=0.9, top_k=50, seed=11 + i, max_frames=16, stop_at_eos=False)
                      for i, p in enumerate(prompts)]
    for i, (b, s) in enumerate(zip(batch, single)):
        assert b.codes.shape == (16, 32)
        np.testing.assert_array_equal(b.codes, s.codes, err_msg=f"item {i} ({len(prompts[i])} prompt rows)")
