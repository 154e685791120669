"""Continuous batching (pycsm.batch): streams join and leave between frames, and each one's codes equal
a single `generate` with the same prompt, options and seed, whatever else is in the batch."""

from __future__ import annotations

import numpy as np
import pytest

from pycsm.batch import Batch
from pycsm.errors import CSMError
from pycsm.generator import Generator
from pycsm.model import Model, quantize
from pycsm.prompt import audio_rows, text_rows


@pytest.fixture(scope="module", params=["f16", "f32", "q8_0", "q4_k"])
def model(request, tiny_dir, tmp_path_factory):
    """The tiny model as f16 / f32, and quantised: pycsm's kernels give a column the same products
    whatever the number of columns (batch-invariant), so the batch equals generate for every file."""
    path = tiny_dir / f"tiny-{request.param}.gguf"
    if request.param in ("q8_0", "q4_k"):
        path = tmp_path_factory.mktemp("quant") / path.name
        quantize(tiny_dir / "tiny-f32.gguf", path, request.param)
    with Model(path) as m:
        yield m


@pytest.fixture(scope="module")
def prompts(ref):
    plain, ctx = ref["prompt_plain"], ref["prompt_ctx"]
    return {"plain": plain, "ctx": ctx, "long": np.concatenate([ctx, plain, ctx])}


def run_schedule(batch, schedule, max_steps=200):
    """schedule: {step: [("add", name, prompt, opts) | ("remove", name)]} applied before that step.
    Returns {name: (codes (frames, 32), stop_reason or "removed")}."""
    ids, codes, ended = {}, {}, {}
    step = 0
    while step < max_steps and (batch.n_streams or any(s >= step for s in schedule)):
        for action in schedule.get(step, []):
            if action[0] == "add":
                _, name, prompt, opts = action
                ids[batch.add(prompt, **opts)] = name
                codes[name] = []
            else:
                sid = next(i for i, n in ids.items() if n == action[1] and n not in ended)
                batch.remove(sid)
                ended[action[1]] = "removed"
        for ev in batch.step():
            name = ids[ev.stream]
            assert name not in ended, f"event for {name} after it ended"
            if ev.frame_index is not None:
                assert ev.frame_index == len(codes[name])
                codes[name].append(ev.codes)
            if ev.stop_reason is not None:
                ended[name] = ev.stop_reason
        step += 1
    assert batch.n_streams == 0, "streams left after the schedule"
    return {n: (np.array(c, dtype=np.int32).reshape(-1, 32), ended.get(n)) for n, c in codes.items()}


def single(model, prompt, opts):
    with Generator(model, n_threads=2) as g:
        return g.generate(prompt, **opts)


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_streams_equal_single_generate_whatever_joins_and_leaves(model, prompts, reuse):
    check_schedule(model, prompts, prefill_chunk=3, reuse_prompt=reuse)


def test_a_saved_voice_is_prefilled_once(model):
    """Streams whose prompts start with the same voice rows take them from a sequence that holds
    them (in place after the previous stream left, copied from a running one), and still equal
    their single generate."""
    rng = np.random.default_rng(1)
    voice = np.concatenate([text_rows(rng.integers(0, 128000, 7)), audio_rows(rng.integers(0, 2048, (30, 32)))])
    p1, p2 = (np.concatenate([voice, text_rows(rng.integers(0, 128000, n))]) for n in (5, 9))
    opts = dict(temperature=0.9, top_k=50, stop_at_eos=False, max_frames=4)
    schedule = {0: [("add", "s1", p1, dict(opts, seed=1))],   # alone: all 42 rows
                8: [("add", "s2", p2, dict(opts, seed=2))],   # s1 has left: its sequence holds the voice
                9: [("add", "s3", p1, dict(opts, seed=3))]}   # from s2's sequence while s2 runs
    with Batch(model, max_streams=2, n_threads=2, prefill_chunk=4) as batch:
        got = run_schedule(batch, schedule)
        reused = batch.rows_reused
    for name, prompt, seed in (("s1", p1, 1), ("s2", p2, 2), ("s3", p1, 3)):
        np.testing.assert_array_equal(got[name][0], single(model, prompt, dict(opts, seed=seed)).codes, err_msg=name)
    assert reused == 2 * len(voice)


def test_measured_prefill_chunks_change_nothing(tiny_dir, prompts):
    with Model(tiny_dir / "tiny-f16.gguf") as m:
        check_schedule(m, prompts, prefill_chunk=0)


def check_schedule(model, prompts, prefill_chunk, reuse_prompt=True):
    base = dict(temperature=0.9, top_k=50, stop_at_eos=False)
    opts = {
        "a": dict(base, seed=11, max_frames=9),                        # leaves while b prefills
        "b": dict(base, seed=22, max_frames=14, temperature=0.6, top_k=7),
        "c": dict(base, seed=33, max_frames=40),                       # removed while running
        "d": dict(base, seed=44, max_frames=6, depth_temperature=1.2, depth_top_k=3),
        "e": dict(base, seed=55, max_frames=5, temperature=0.0),
        "f": dict(base, seed=66, max_frames=4),                        # removed while waiting to join
    }
    # alone, a prefills at once; then one prefill at a time, in chunks of 3 rows (or measured)
    schedule = {
        0: [("add", "a", prompts["plain"], opts["a"])],
        1: [("add", "c", prompts["ctx"], opts["c"])],
        2: [("add", "b", prompts["long"], opts["b"])],
        5: [("add", "d", prompts["plain"], opts["d"])],
        16: [("remove", "c")],
        17: [("add", "e", prompts["ctx"], opts["e"]), ("add", "f", prompts["long"], opts["f"])],
        18: [("remove", "f")],
    }
    with Batch(model, max_streams=4, n_threads=2, prefill_chunk=prefill_chunk, reuse_prompt=reuse_prompt) as batch:
        got = run_schedule(batch, schedule)
        # c, e and f start with ctx, and b with ctx too: later ones find it held
        assert (batch.rows_reused > 0) == reuse_prompt
    assert got["c"][1] == "removed" and got["f"][1] == "removed"
    for name in "abde":
        want = single(model, prompts_of(schedule, name), opts[name])
        assert got[name][1] == want.stop_reason == "max_frames", name
        np.testing.assert_array_equal(got[name][0], want.codes, err_msg=name)
    # the removed running stream produced a prefix of its single run before it left
    want_c = single(model, prompts["ctx"], opts["c"]).codes
    assert 0 < len(got["c"][0]) < len(want_c)
    np.testing.assert_array_equal(got["c"][0], want_c[:len(got["c"][0])])


def test_short_prompts_added_together_join_in_one_step(model, prompts):
    """The step's prefill chunk serves the joining streams in turn: prompts that fit it together
    start in the same step (into an empty batch, whose chunk is 256 rows, or beside running
    streams), and each still equals its single generate."""
    opts = dict(temperature=0.9, top_k=50, stop_at_eos=False, max_frames=5)
    plain, ctx = prompts["plain"], prompts["ctx"]
    added = [("s1", plain, 1), ("s2", ctx, 2), ("s3", plain, 3)]
    with Batch(model, max_streams=4, n_threads=2) as batch:
        got = run_schedule(batch, {0: [("add", n, p, dict(opts, seed=s)) for n, p, s in added]}, max_steps=5)
    for name, p, s in added:  # five steps made all five frames of each: all three started in the first
        np.testing.assert_array_equal(got[name][0], single(model, p, dict(opts, seed=s)).codes, err_msg=name)
    with Batch(model, max_streams=4, n_threads=2, prefill_chunk=2 * plain.shape[0], reuse_prompt=False) as batch:
        a = batch.add(plain, **dict(opts, seed=1))
        assert [ev.frame_index for ev in batch.step()] == [0]
        b, c, d = (batch.add(plain, **dict(opts, seed=s)) for s in (2, 3, 4))
        assert {ev.stream: ev.frame_index for ev in batch.step()} == {a: 1, b: 0, c: 0}  # d waits: chunk full
        assert batch.n_running == 3 and batch.n_streams == 4
        assert {ev.stream: ev.frame_index for ev in batch.step()} == {a: 2, b: 1, c: 1, d: 0}


def test_removing_a_joining_stream_mid_prefill(model, prompts):
    opts = dict(temperature=0.9, top_k=50, stop_at_eos=False, max_frames=8)
    schedule = {
        0: [("add", "x", prompts["plain"], dict(opts, seed=1))],
        1: [("add", "y", prompts["long"], dict(opts, seed=2))],   # 3 rows a step: removed half way
        4: [("remove", "y"), ("add", "z", prompts["ctx"], dict(opts, seed=3))],
    }
    with Batch(model, max_streams=2, n_threads=2, prefill_chunk=3) as batch:
        got = run_schedule(batch, schedule)
    assert len(got["y"][0]) == 0 and got["y"][1] == "removed"
    for name, prompt, seed in (("x", prompts["plain"], 1), ("z", prompts["ctx"], 3)):
        want = single(model, prompt, dict(opts, seed=seed))
        np.testing.assert_array_equal(got[name][0], want.codes, err_msg=name)


def prompts_of(schedule, name):
    return next(a[2] for acts in schedule.values() for a in acts if a[0] == "add" and a[1] == name)


def test_a_stream_joining_a_full_context_stops_like_generate(model, prompts):
    prompt = prompts["plain"]
    opts = dict(temperature=0.9, top_k=50, seed=5, max_frames=50, stop_at_eos=False)
    with Batch(model, max_streams=2, n_threads=2, max_pos=prompt.shape[0] + 3) as batch:
        got = run_schedule(batch, {0: [("add", "x", prompt, opts)], 1: [("add", "y", prompt, dict(opts, seed=6))]})
    with Generator(model, n_threads=2, max_pos=prompt.shape[0] + 3) as g:
        for name, seed in (("x", 5), ("y", 6)):
            want = g.generate(prompt, **dict(opts, seed=seed))
            assert got[name][1] == want.stop_reason == "context_full"
            np.testing.assert_array_equal(got[name][0], want.codes)


def test_eos_ends_a_stream_without_a_frame(model, prompts):
    """Greedy sampling at temperature 0 of the tiny model: when a generate run ends at EOS, the
    batch stream ends there too, its last event carrying no frame."""
    opts = dict(temperature=0.0, top_k=1, seed=0, max_frames=40, stop_at_eos=True)
    want = single(model, prompts["plain"], opts)
    with Batch(model, max_streams=1, n_threads=2) as batch:
        sid = batch.add(prompts["plain"], **opts)
        events = []
        while batch.n_streams:
            events += batch.step()
    assert all(e.stream == sid for e in events)
    assert events[-1].stop_reason == want.stop_reason
    frames = [e.codes for e in events if e.codes is not None]
    np.testing.assert_array_equal(np.array(frames).reshape(-1, 32), want.codes)
    if want.stop_reason == "eos":
        assert events[-1].codes is None


def test_batch_errors(model, prompts):
    with pytest.raises(CSMError, match="max_streams"):
        Batch(model, max_streams=0)
    with pytest.raises(CSMError, match="prefill_chunk"):
        Batch(model, max_streams=1, prefill_chunk=257)
    with Batch(model, max_streams=2, n_threads=1) as batch:
        a = batch.add(prompts["plain"], seed=1, max_frames=2)
        batch.add(prompts["plain"], seed=2, max_frames=2)
        with pytest.raises(CSMError, match="full"):
            batch.add(prompts["plain"], seed=3)
        with pytest.raises(CSMError, match="no stream 99"):
            batch.remove(99)
        batch.remove(a)
        with pytest.raises(CSMError, match="no stream"):
            batch.remove(a)
        with pytest.raises(CSMError, match="outside"):
            batch.add(np.full((2, 33), 10**7, np.int32))
        with pytest.raises(CSMError, match="temperature"):
            batch.add(prompts["plain"], temperature=float("nan"))
        assert batch.n_streams == 1
        while batch.n_streams:
            batch.step()
        assert batch.step() == []
