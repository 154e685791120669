"""Load test of `pycsm serve`: N concurrent clients against a local server, over loopback only.

    python benchmarks/load.py -m /work/models/q8_0.gguf --clients 1 2 4 8 --requests 3 --audio 4

Starts the server (`python -m pycsm.server`, --max-batch 4 unless told otherwise) on 127.0.0.1,
then for each client count N runs N clients, each sending `--requests` streamed requests one after
another (or until `--duration` seconds have passed), and prints a markdown table: requests/s, audio
seconds per second, p50/p95 time to first byte and total time, errors, the server's RSS after the
level, and from the server's /metrics how full its batch ran (frames per step) and the shares of the
level's time its engine thread spent stepping the batch, decoding audio and idle. Before the server
starts, `--batch-ratio FRAMES` measures the native batch alone the way benchmarks/bench.py does
(its own function: a batch of 4 and one stream generating FRAMES frames, interleaved frame by frame
in this process, frames per second with the prefills and of the frame loop alone; the median of
`--batch-ratio-runs` such runs), the bound a 4-client level can approach;
after the table it prints the 4-client level's gain over 1 client as a fraction of that ratio.

`--rounds R` runs the levels R times over and reports the median gain: on a host whose speed
drifts between minutes, levels run one after the other compare different minutes. With
`--batch-ratio`, the native ratio is measured once more before each round (a single run, in this
process, the model loaded once; the server idles meanwhile), and each round's 4-client gain is also
given as a share of its own round's ratio: on the 2-core VM the ratio itself moves with the host
(about 2.7 in minutes when one stream runs fast, 3.0 when it runs slow). When the levels
start with 1 client, one more 1-client level closes the run, and each round's gains are taken
against the mean of the 1-client levels before and after it (its own and the next round's), which
cancels a drift that is steady over the round; the table's "x 1 client" column is against the
round's own 1-client level alone.

`--voice-seconds S` gives every request a saved voice of S seconds (the server prefills its rows
once and reuses them for later requests; `--no-prompt-reuse` turns that off, for comparison).

Random-weight benchmark files never emit the end frame: every request runs to its --audio cap, so
each level moves the same audio per request.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "To be or not to be, that is the question.",
]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


RATIO_KEYS = ("one_fps", "batch_fps", "ratio", "one_decode_fps", "batch_decode_fps", "decode_ratio")


class NativeRatio:
    """bench.py's batch x4 measurement (benchmarks/bench.py, _interleaved, with its prompts), in this
    process with the model loaded once: one stream and a batch of 4 interleaved frame by frame,
    frames/s with the prefills ("ratio") and of the frame loop alone ("decode_ratio")."""

    def __init__(self, model: str, threads: int | None, frames: int):
        spec = importlib.util.spec_from_file_location("pycsm_bench", REPO / "benchmarks" / "bench.py")
        self.bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.bench)  # puts this checkout first on sys.path
        from pycsm.model import Model
        from pycsm.prompt import build_prompt

        self.model = Model(model, device="cpu")
        self.prompts = [build_prompt(self.model.tokenizer, self.bench.TEXT, s % 4) for s in range(4)]
        self.threads, self.frames, self.runs_done = threads, frames, 0

    def measure(self, runs: int) -> dict:
        """The medians of `runs` runs."""
        results = []
        for _ in range(runs):
            results.append(self.bench._interleaved(self.model, self.prompts, self.threads, self.frames, 3 + self.runs_done))
            self.runs_done += 1
        return {key: statistics.median(r[key] for r in results) for key in RATIO_KEYS}

    def close(self) -> None:
        self.model.close()


class Level:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttfb, self.total, self.audio_s = [], [], []
        self.errors = 0


def client(url: str, level: Level, n_requests: int, deadline: float, index: int, audio_bytes: int,
           voice: str | None = None) -> None:
    with httpx.Client(timeout=600) as c:
        for k in range(n_requests):
            if time.monotonic() > deadline:
                return
            body = {"model": "csm-1b", "voice": voice or str(index % 2), "input": TEXTS[(index + k) % len(TEXTS)],
                    "response_format": "pcm", "stream_format": "audio", "seed": 1000 * index + k}
            t0 = time.monotonic()
            ttfb, n = None, 0
            try:
                with c.stream("POST", url + "/v1/audio/speech", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
                    for chunk in r.iter_bytes():
                        if ttfb is None and chunk:
                            ttfb = time.monotonic() - t0
                        n += len(chunk)
                if n != audio_bytes:
                    raise RuntimeError(f"{n} bytes of audio, expected {audio_bytes}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                print(f"  client {index}: {e}", file=sys.stderr)
                with level.lock:
                    level.errors += 1
                continue
            with level.lock:
                level.ttfb.append(ttfb)
                level.total.append(time.monotonic() - t0)
                level.audio_s.append(n / 2 / 24000)


def engine_counters(url: str) -> dict:
    """The server's engine counters from /metrics: steps, stream frames, step and decode seconds."""
    keys = {"pycsm_engine_steps_total": "steps", "pycsm_engine_stream_frames_total": "stream_frames",
            'pycsm_engine_seconds_total{phase="step"}': "step_s", 'pycsm_engine_seconds_total{phase="decode"}': "decode_s"}
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in keys:
            out[keys[name]] = float(value)
    return out


def pct(values, q) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=3, help="requests per client per level (default 3)")
    ap.add_argument("--duration", type=float, default=300, help="most seconds per level (default 300)")
    ap.add_argument("--audio", type=float, default=4.0, help="seconds of audio per request (default 4)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-ratio", type=int, default=0, metavar="FRAMES",
                    help="first measure the native batch x4 against one stream over FRAMES frames, as bench.py does")
    ap.add_argument("--batch-ratio-runs", type=int, default=1, metavar="N",
                    help="interleaved runs of that measurement, their median is used (default 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the client levels this many times over, each round's gains against its own 1-client "
                         "level (the host's speed drifts between minutes); the median gain is reported")
    ap.add_argument("--voice-seconds", type=float, default=0, metavar="S",
                    help="every request speaks with a saved voice of S seconds (random codes, as a voice made "
                         "from a recording costs the same), instead of a bare speaker id")
    ap.add_argument("--no-prompt-reuse", action="store_true", help="start the server with --no-prompt-reuse")
    args = ap.parse_args()
    if not 1 <= max(args.clients) <= 64 or args.requests < 1 or args.duration <= 0 or not 1 <= args.rounds <= 20:
        ap.error("clients in [1, 64], requests >= 1, duration > 0")
    if not 0 <= args.batch_ratio <= 10000 or not 1 <= args.batch_ratio_runs <= 100:
        ap.error("--batch-ratio in [0, 10000] frames, --batch-ratio-runs in [1, 100]")

    native, bench, round_bench = None, None, []
    if args.batch_ratio:
        native = NativeRatio(args.model, args.threads, args.batch_ratio)
        bench = native.measure(args.batch_ratio_runs)
        print(f"native batch x4 as bench.py measures it ({args.batch_ratio} frames, median of "
              f"{args.batch_ratio_runs}): with the prefills 1 stream {bench['one_fps']:.2f} frames/s, 4 streams "
              f"{bench['batch_fps']:.2f} frames/s, ratio {bench['ratio']:.2f}; frame loop alone "
              f"{bench['one_decode_fps']:.2f} / {bench['batch_decode_fps']:.2f} frames/s, ratio "
              f"{bench['decode_ratio']:.2f}", flush=True)
        if args.rounds == 1:
            native.close()
            native = None

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    assert url.split("//")[1].split(":")[0] in LOOPBACK
    cmd = [sys.executable, "-m", "pycsm.server", "-m", args.model, "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-queue", "64", "--max-audio-length", str(args.audio), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_prompt_reuse:
        cmd.append("--no-prompt-reuse")
    voice = None
    if args.voice_seconds > 0:
        import numpy as np

        sys.path.insert(0, str(REPO))
        from pycsm.voices import Voice, save_voice

        folder = tempfile.mkdtemp(prefix="pycsm-load-voices-")
        codes = np.random.default_rng(0).integers(0, 2048, (round(args.voice_seconds * 12.5), 32), dtype=np.int32)
        save_voice(Voice(0, "This is the reference recording that gives the voice.", codes), "bench", folder=folder)
        cmd += ["--voices", folder]
        voice = "bench"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                print("the server did not start", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        frames = -(-round(args.audio * 12.5 * 1e6) // 10**6)
        audio_bytes = frames * 1920 * 2
        # one request first: loads the tokenizer and the decoders, not measured
        client(url, Level(), 1, time.monotonic() + 600, 0, audio_bytes, voice)
        print(f"\n{args.model}: {args.audio:g} s of audio per request, --max-batch {args.max_batch}"
              + (f", a saved voice of {args.voice_seconds:g} s" if voice else "")
              + (", --no-prompt-reuse" if args.no_prompt_reuse else "") + "\n")
        print("| clients | requests | req/s | audio s/s | x 1 client | TTFB p50 / p95 s | total p50 / p95 s "
              "| errors | server RSS MiB | streams per step | engine: step / decode / idle |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        rates = []  # rates[round][n]: audio seconds per second of each level
        flanked = args.clients[0] == 1
        for rnd in range(args.rounds + flanked):
            closing = rnd == args.rounds
            rates.append({})
            base = None
            if native is not None and not closing:
                round_bench.append(native.measure(1))
                print(f"native batch x4 before round {rnd + 1}: ratio {round_bench[-1]['ratio']:.2f} with the "
                      f"prefills, {round_bench[-1]['decode_ratio']:.2f} frame loop alone", file=sys.stderr, flush=True)
            for n in args.clients[:1] if closing else args.clients:
                level = Level()
                before = engine_counters(url)
                t0 = time.monotonic()
                end = t0 + args.duration
                threads = [threading.Thread(target=client, args=(url, level, args.requests, end, i, audio_bytes, voice))
                           for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.monotonic() - t0
                after = engine_counters(url)
                d = {k: after[k] - before[k] for k in before}
                step_f, decode_f = d["step_s"] / wall, d["decode_s"] / wall
                rate = sum(level.audio_s) / wall
                rates[rnd][n] = rate
                base = base or rate
                name = "closing" if closing else f"round {rnd + 1}"
                print(f"| {n if args.rounds == 1 and not flanked else f'{n} ({name})'} | {len(level.total)} "
                      f"| {len(level.total) / wall:.3f} | {rate:.3f} | {rate / base:.2f} "
                      f"| {pct(level.ttfb, 50):.2f} / {pct(level.ttfb, 95):.2f} "
                      f"| {pct(level.total, 50):.1f} / {pct(level.total, 95):.1f} | {level.errors} "
                      f"| {rss_mib(server.pid):.0f} | {d['stream_frames'] / max(d['steps'], 1):.2f} "
                      f"| {step_f:.0%} / {decode_f:.0%} / {max(0.0, 1 - step_f - decode_f):.0%} |", flush=True)
        if flanked and 4 in args.clients:
            gains = [rates[r][4] / ((rates[r][1] + rates[r + 1][1]) / 2) for r in range(args.rounds)]
            g4 = statistics.median(gains)
            each = ", ".join(f"{g:.2f}" for g in gains)
            line = (f"\n4 clients / 1 client: {g4:.2f}x audio s/s (each round's 4-client level against the mean of "
                    f"the 1-client levels around it" + (f"; median of the rounds: {each})" if args.rounds > 1 else ")"))
            if bench:
                line += (f"; bench.py's batch x4 ratio in this run: {bench['ratio']:.2f} with the prefills, "
                         f"{bench['decode_ratio']:.2f} frame loop alone; load / bench: {g4 / bench['ratio']:.0%} of the "
                         f"ratio with the prefills, {g4 / bench['decode_ratio']:.0%} of the frame loop's")
            print(line)
            if round_bench:
                ratios = [b["ratio"] for b in round_bench]
                shares = [g / r for g, r in zip(gains, ratios)]
                print(f"bench.py's ratio measured before each round: {', '.join(f'{r:.2f}' for r in ratios)} (median "
                      f"{statistics.median(ratios):.2f}); each round's 4-client gain as a share of its own: "
                      f"{', '.join(f'{x:.0%}' for x in shares)} (median {statistics.median(shares):.0%})")
    finally:
        if native is not None:
            native.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
