"""pycsm.ray on a real local Ray cluster (127.0.0.1 only, 2 CPUs, one cluster for the module):
a Ray Serve request returns audio, a Ray Data job's audio equals CSM.generate, threads follow
Ray's CPU allotment."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import pycsm  # noqa: E402
from pycsm.options import GenerationOptions  # noqa: E402
from pycsm.ray import SpeechServer, Synthesizer, allotted_cpus  # noqa: E402

FRAMES = 5
SPF = 1920


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_f16(tiny_dir):
    return str(tiny_dir / "tiny-f16.gguf")


def test_threads_follow_the_cpu_allotment(cluster):
    @ray.remote(num_cpus=1)
    def one():
        return allotted_cpus()

    @ray.remote(num_cpus=2)
    def two():
        return allotted_cpus()

    host = len(os.sched_getaffinity(0))
    assert ray.get(one.remote()) == 1
    assert ray.get(two.remote()) == min(2, host)


def test_serve_request_returns_audio(cluster, tiny_f16):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = SpeechServer.options(ray_actor_options={"num_cpus": 1}).bind(
        model=tiny_f16, max_audio_length=FRAMES * 0.08, voice_map={"alloy": "0"})
    serve.run(app, name="speech", route_prefix="/")
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech", timeout=300,
                       json={"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "pcm",
                             "seed": 3})
        assert r.status_code == 200
        pcm = np.frombuffer(r.content, dtype="<i2")
        assert pcm.size == FRAMES * SPF and np.abs(pcm).max() > 0
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech", timeout=60,
                         json={"model": "tts-1", "voice": "alloy", "input": "Hi.", "speed": 2})
        assert bad.status_code == 400 and "speed" in bad.json()["error"]["message"]
    finally:
        serve.delete("speech")


def test_data_job_equals_generate(cluster, tiny_f16):
    texts = [f"Sentence number {i}." for i in range(8)]
    options = GenerationOptions(max_audio_length_ms=FRAMES * 80)
    ds = ray.data.from_items([{"text": t, "seed": 100 + i, "speaker": i % 2} for i, t in enumerate(texts)])
    rows = ds.map_batches(Synthesizer, fn_constructor_kwargs={"model": tiny_f16, "options": options},
                          concurrency=1, batch_size=4, num_cpus=1).take_all()
    assert len(rows) == 8
    by_text = {r["text"]: r for r in rows}
    with pycsm.CSM(tiny_f16, n_threads=1) as tts:
        for i, t in enumerate(texts):
            want = tts.generate(t, speaker=i % 2, seed=100 + i, options=options).samples
            got = by_text[t]
            assert got["sample_rate"] == 24000
            audio = np.asarray(got["audio"], dtype=np.float32)
            assert audio.shape == want.shape == (FRAMES * SPF,)
            np.testing.assert_allclose(audio, want, atol=1e-4)
