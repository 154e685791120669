"""The server's engine without HTTP: concurrent requests share the generation batch and the batched
Mimi decoder, and each one's audio equals a single generate of its own, decoded frame by frame by a
MimiStreamDecoder of its own (with f16 weights, streaming differs from a one-shot decode by ~1e-3)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pycsm.codec import MimiStreamDecoder
from pycsm.generator import Generator
from pycsm.model import Model
from pycsm.prompt import build_prompt
from pycsm.server.engine import End, Engine, Request

FRAMES = [6, 3, 8, 4, 5]   # caps of the five requests
TEXTS = ["Hello there.", "One.", "A somewhat longer sentence to say.", "Yes, fine.", "Last one here."]


@pytest.fixture(scope="module")
def model(tiny_dir):
    with Model(tiny_dir / "tiny-f16.gguf") as m:
        yield m


def prompts(m: Model) -> list[np.ndarray]:
    return [np.asarray(build_prompt(m.tokenizer, t, i % 2, parse_special=False)) for i, t in enumerate(TEXTS)]


async def run_requests(engine: Engine, prompt_list) -> list[tuple[np.ndarray, End]]:
    """Five requests through a 3-stream engine, each submitted once the previous one sent audio: they
    join at different frames, two wait for a slot and take the Mimi slot of one that ended."""
    loop = asyncio.get_running_loop()
    reqs = []
    results: list = [None] * len(prompt_list)

    async def collect(i: int, r: Request, started: asyncio.Event):
        chunks = []
        while True:
            item = await r.queue.get()
            if isinstance(item, End):
                results[i] = (np.concatenate(chunks), item)
                started.set()
                return
            if isinstance(item, Exception):
                raise item
            chunks.append(item)
            started.set()

    tasks = []
    for i, p in enumerate(prompt_list):
        r = engine.submit(Request(prompt=p, temperature=0.9, top_k=50, seed=100 + i, max_frames=FRAMES[i], loop=loop))
        reqs.append(r)
        started = asyncio.Event()
        tasks.append(asyncio.create_task(collect(i, r, started)))
        await started.wait()
    await asyncio.gather(*tasks)
    return results


def test_concurrent_requests_equal_single_generate(model):
    ps = prompts(model)
    engine = Engine(model, max_batch=3, max_queue=8, n_threads=2)
    try:
        results = asyncio.run(run_requests(engine, ps))
        # steps that made (and decoded in one Mimi call) frames of several streams at once
        assert max(n for _, n in engine.stats.recent) >= 2
    finally:
        engine.close()
    with Generator(model, n_threads=2) as g:
        for i, (pcm, end) in enumerate(results):
            r = g.generate(ps[i], temperature=0.9, top_k=50, seed=100 + i, max_frames=FRAMES[i])
            with MimiStreamDecoder(model, 2) as dec:
                want = np.concatenate([dec.decode(f) for f in r.codes])
            assert end.n_frames == len(r.codes)
            assert pcm.shape == want.shape
            assert np.abs(pcm - want).max() < 1e-5
            err = np.sum((want.astype(np.float64) - pcm) ** 2)
            assert 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / max(err, 1e-30)) > 100.0
