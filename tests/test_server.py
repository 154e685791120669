"""`pycsm serve` over loopback: a real uvicorn server process on 127.0.0.1 and OpenAI's own client."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pycsm.codec import decode  # noqa: E402
from pycsm.generator import Generator  # noqa: E402
from pycsm.model import Model  # noqa: E402
from pycsm.prompt import build_prompt  # noqa: E402
from pycsm.voices import Voice  # noqa: E402
from pycsm.server.encoding import to_int16  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
FRAMES = 5            # --max-audio-length 0.4 s: 5 frames of 80 ms
SPF = 1920


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO), PYCSM_API_KEY="")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pycsm.server", "-m", str(model), "--port", str(self.port), "--threads", "2",
             "--log-level", "warning", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=10)
        assert r.status_code == 200
        return r.json()

    def wait_idle(self, limit_s: float = 60) -> dict:
        """Health once no stream is left (a bound for a hung server, not a speed check)."""
        deadline = time.monotonic() + limit_s
        while True:
            h = self.health()
            if h["active_streams"] == 0 and h["queue_depth"] == 0 or time.monotonic() > deadline:
                return h
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_f16(tiny_dir):
    return tiny_dir / "tiny-f16.gguf"


@pytest.fixture(scope="module")
def narrator(tmp_path_factory):
    """A saved voice in a voices folder of its own: 6 frames of codes, a transcript, speaker 1."""
    folder = tmp_path_factory.mktemp("voices")
    codes = np.random.default_rng(0).integers(0, 2048, size=(6, 32), dtype=np.int32)
    voice = Voice(1, "This is how I sound.", codes)
    voice.save(folder / "narrator.csmvoice")
    return folder, voice


@pytest.fixture(scope="module")
def server(tiny_f16, narrator):
    s = Server(tiny_f16, "--api-key", KEY, "--max-batch", "2", "--max-queue", "4", "--max-audio-length", "0.4",
               "--max-input-chars", "200", "--voices", str(narrator[0]), "--voice-map", "alloy=0,echo=1,shimmer=narrator")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(tiny_f16):
    """The audio a request for "Hello there." as speaker 0 with seed 7 must give: generate + decode."""
    with Model(tiny_f16) as m, Generator(m, n_threads=2) as g:
        prompt = build_prompt(m.tokenizer, "Hello there.", 0, parse_special=False)
        r = g.generate(prompt, temperature=0.9, top_k=50, seed=7, max_frames=FRAMES)
        return decode(m.handle, r.codes, 2)


def reused_rows(server) -> int:
    text = httpx.get(server.url + "/metrics").text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("pycsm_prompt_rows_reused_total")))


def test_saved_voice_speaks_with_its_recording_as_context(server, client, tiny_f16, narrator):
    voice = narrator[1]
    with Model(tiny_f16) as m, Generator(m, n_threads=2) as g:
        prompt = build_prompt(m.tokenizer, "Hello there.", voice.speaker, [(voice.speaker, voice.text, voice.codes)],
                              parse_special=False)
        want = decode(m.handle, g.generate(prompt, temperature=0.9, top_k=50, seed=7, max_frames=FRAMES).codes, 2)
    before = reused_rows(server)
    for name in ("narrator", "shimmer"):
        audio = client.audio.speech.create(model="tts-1", voice=name, input="Hello there.", response_format="pcm",
                                           extra_body={"seed": 7})
        assert_same_audio(pcm_samples(audio.content), want)
    # the second request (shimmer maps to narrator) took the voice's rows from the first one's
    assert reused_rows(server) - before >= len(voice.codes)


def pcm_samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def assert_same_audio(pcm: np.ndarray, expected: np.ndarray) -> None:
    # the server decodes frame by frame with a streaming decoder (equal to one-shot up to rounding)
    assert pcm.shape == (expected.size,)
    want = np.frombuffer(to_int16(expected), dtype="<i2").astype(np.int32)
    assert np.abs(pcm.astype(np.int32) - want).max() <= 2


def test_openai_client_create_equals_generate(client, expected):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.", response_format="pcm",
                                       extra_body={"seed": 7})
    assert_same_audio(pcm_samples(audio.content), expected)


def test_openai_client_streaming_response(client, expected):
    chunks = []
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="0", input="Hello there.", response_format="pcm", extra_body={"seed": 7}) as resp:
        assert resp.headers["x-seed"] == "7"
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
    assert len(chunks) >= 1
    assert_same_audio(pcm_samples(b"".join(chunks)), expected)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac"])
def test_response_formats_decode(client, fmt):
    import io

    import soundfile as sf

    audio = client.audio.speech.create(model="tiny-f16", voice="echo", input="Hi.", response_format=fmt,
                                       extra_body={"seed": 1, "temperature": 0.5, "top_k": 10})
    samples, rate = sf.read(io.BytesIO(audio.content))
    assert rate == 24000
    # mp3 and opus add their encoders' delay and padding
    assert FRAMES * SPF <= samples.shape[0] <= FRAMES * SPF + (3000 if fmt in ("mp3", "opus") else 0)
    assert np.abs(samples).max() > 0


def test_sse_stream(server, expected):
    body = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", "response_format": "pcm", "seed": 7,
            "stream_format": "sse"}
    events = []
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == FRAMES
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert_same_audio(pcm_samples(pcm), expected)


def test_special_token_text_is_spoken_as_text(server, tiny_f16):
    with Model(tiny_f16) as m:
        tok = m.tokenizer
        text = "<|begin_of_text|><|AUDIO|><|end_of_text|>"
        ids = build_prompt(tok, text, 0, parse_special=False)[:, 32].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert not set(ids[1:-1]) & set(tok.special_ids)
    r = httpx.post(server.url + "/v1/audio/speech", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tts-1", "voice": "0", "input": text, "response_format": "pcm", "seed": 2})
    assert r.status_code == 200 and len(r.content) == FRAMES * SPF * 2


def test_models_voices_health_metrics(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["tiny-f16", "csm-1b"] and "tts-1" in ids and "gpt-4o-mini-tts" in ids
    r = httpx.get(server.url + "/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"})
    names = [v["id"] for v in r.json()["voices"]]
    assert names == ["0", "1", "narrator", "alloy", "echo", "shimmer"]
    assert server.health()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("pycsm_requests_total{", "pycsm_frames_total ", "pycsm_frames_per_second ",
                 "pycsm_active_streams ", "pycsm_queue_depth ", "pycsm_time_to_first_byte_seconds_count "):
        assert name in text
    assert 'route="/v1/audio/speech",status="200"' in text
    # the engine's counters: requests ran before this test, so it stepped and decoded
    value = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
             if line.startswith("pycsm_engine_")}
    steps, frames = value["pycsm_engine_steps_total"], value["pycsm_engine_stream_frames_total"]
    assert 0 < frames <= steps * 2 and steps == int(steps)  # --max-batch 2
    assert value['pycsm_engine_seconds_total{phase="step"}'] > 0
    assert value['pycsm_engine_seconds_total{phase="decode"}'] > 0


GOOD = {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "pcm"}
BAD_REQUESTS = [
    # (name, headers, body (dict: JSON; bytes: raw), status, message part)
    ("no key", {}, GOOD, 401, "API key"),
    ("wrong key", {"Authorization": "Bearer nope"}, GOOD, 401, "API key"),
    ("bad json", None, b'{"model": "tts-1", "input": ', 400, "not valid JSON"),
    ("not an object", None, b"[1, 2]", 400, "JSON object"),
    ("missing input", None, {"model": "tts-1", "voice": "alloy"}, 422, "missing required field 'input'"),
    ("unknown field", None, dict(GOOD, volume=3), 422, "unknown field 'volume'"),
    ("input not a string", None, dict(GOOD, input=5), 422, "input"),
    ("seed not an integer", None, dict(GOOD, seed="7"), 422, "seed"),
    ("unknown model", None, dict(GOOD, model="whisper-1"), 404, "unknown model 'whisper-1'"),
    ("input too long", None, dict(GOOD, input="a" * 201), 413, "at most 200"),
    ("empty input", None, dict(GOOD, input="   "), 400, "input is empty"),
    ("speed", None, dict(GOOD, speed=1.5), 400, "speed 1.5 is not supported"),
    ("aac", None, dict(GOOD, response_format="aac"), 400, "response_format 'aac' is not supported"),
    ("unknown stream format", None, dict(GOOD, stream_format="ws"), 422, "stream_format"),
    ("unmapped openai voice", None, dict(GOOD, voice="nova"), 400, "--voice-map"),
    ("unknown voice", None, dict(GOOD, voice="17"), 400, "unknown voice '17'"),
    ("temperature", None, dict(GOOD, temperature=-1), 400, "temperature"),
    ("top_k", None, dict(GOOD, top_k=-1), 400, "top_k"),
    ("seed", None, dict(GOOD, seed=2**64), 400, "seed"),
]


@pytest.mark.parametrize("name, headers, body, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, name, headers, body, status, message):
    hdrs = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    kw = {"content": body, "headers": dict(hdrs, **{"content-type": "application/json"})} \
        if isinstance(body, bytes) else {"json": body, "headers": hdrs}
    r = httpx.post(server.url + "/v1/audio/speech", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert server.health()["status"] == "ok"


def test_still_serving_after_bad_requests(client):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Still here.", response_format="pcm")
    assert len(audio.content) == FRAMES * SPF * 2


# ---------------------------------------------------------------------------------------------
# a server of one stream slot and no wait queue: 429, disconnects, SIGTERM
# ---------------------------------------------------------------------------------------------

LONG = {"model": "tts-1", "voice": "0", "input": "A long one.", "response_format": "pcm", "seed": 3}


def frames_total(server) -> int:
    text = httpx.get(server.url + "/metrics").text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("pycsm_frames_total ")))


def test_busy_server_says_429_and_a_disconnect_leaves_the_batch(tiny_f16):
    s = Server(tiny_f16, "--max-batch", "1", "--max-queue", "0", "--max-audio-length", "60")
    try:
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", s.url + "/v1/audio/speech", json=LONG) as r:
                assert r.status_code == 200
                next(r.iter_bytes())  # the stream runs
                busy = c.post(s.url + "/v1/audio/speech", json=LONG)
                assert busy.status_code == 429
                assert int(busy.headers["retry-after"]) >= 1
                assert "busy" in busy.json()["error"]["message"]
            # leaving the block closed the connection mid-stream
        h = s.wait_idle()
        assert h["active_streams"] == 0
        n = frames_total(s)
        assert n < 60 * 12.5  # it stopped long before its 60 s cap
        assert frames_total(s) == n  # and stays stopped
        with httpx.stream("POST", s.url + "/v1/audio/speech", json=LONG, timeout=120) as again:
            assert again.status_code == 200  # the slot is free again
            next(again.iter_bytes())
    finally:
        assert s.stop() == 0


def test_sigterm_lets_a_running_request_finish(tiny_f16):
    s = Server(tiny_f16, "--max-audio-length", "0.4", "--graceful-timeout", "60")
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", s.url + "/v1/audio/speech", json=LONG) as r:
            chunks = r.iter_bytes()
            first = next(chunks)
            s.proc.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)
    assert len(first) + len(rest) == FRAMES * SPF * 2
    assert s.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=5)


def test_sigterm_cuts_a_long_request_with_an_error(tiny_f16):
    s = Server(tiny_f16, "--max-audio-length", "60", "--graceful-timeout", "0.5")
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", s.url + "/v1/audio/speech", json=LONG) as r:
            chunks = r.iter_bytes()
            next(chunks)
            s.proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # no clean end of the chunked body
                for _ in chunks:
                    pass
    assert s.proc.wait(60) == 0
