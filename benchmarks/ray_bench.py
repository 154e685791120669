"""Ray numbers: pycsm.ray's Data and Serve paths on a local Ray cluster (127.0.0.1 only), each against
the same work without Ray, in one run.

    python benchmarks/ray_bench.py -m /work/models/q8_0.gguf --texts 8 --audio 2 --requests 2

Data: `--texts` sentences (fixed seeds, speakers 0 and 1) through `Dataset.map_batches(Synthesizer,
concurrency=1, batch_size=4)` with all the cluster's CPUs for the actor, against `Synthesizer`
called in this process on the same batches. Prints the audio seconds per second of each (the Ray
job timed from submission to its last row, the actor's model load included; the direct one with and
without its load), and checks that both give the same audio.

Serve: `SpeechServer` as one replica with all the cluster's CPUs, then 1 and 4 concurrent clients,
each sending `--requests` streamed pcm requests one after another (load.py's clients, which measure
`pycsm serve` the same way without Ray): audio seconds per second, time to first byte, errors.

Random-weight files never emit the end frame: every row and request runs to its `--audio` cap.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# load.py: its texts, free_port() and client(), which measure `pycsm serve` the same way without Ray
_spec = importlib.util.spec_from_file_location("pycsm_load", REPO / "benchmarks" / "load.py")
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)


def data_part(ray, model: str, n_texts: int, audio_s: float, cpus: int) -> None:
    import numpy as np

    from pycsm.options import GenerationOptions
    from pycsm.ray import Synthesizer

    options = GenerationOptions(max_audio_length_ms=audio_s * 1000)
    rows = [{"text": load.TEXTS[i % len(load.TEXTS)], "seed": 100 + i, "speaker": i % 2} for i in range(n_texts)]
    t0 = time.monotonic()
    ds = ray.data.from_items(rows)
    out = ds.map_batches(Synthesizer, fn_constructor_kwargs={"model": model, "options": options},
                         concurrency=1, batch_size=4, num_cpus=cpus).take_all()
    ray_wall = time.monotonic() - t0
    ray_audio = {int(r["seed"]): np.asarray(r["audio"], dtype=np.float32) for r in out}

    t0 = time.monotonic()
    synth = Synthesizer(model, options=options, n_threads=cpus)
    t_loaded = time.monotonic()
    direct = {}
    for b in range(0, n_texts, 4):
        chunk = rows[b:b + 4]
        res = synth({k: np.array([r[k] for r in chunk]) for k in ("text", "seed", "speaker")})
        for seed, audio in zip(res["seed"], res["audio"]):
            direct[int(seed)] = np.asarray(audio, dtype=np.float32)
    t_end = time.monotonic()
    audio_total = sum(a.size for a in direct.values()) / 24000
    same = len(ray_audio) == len(direct) and all(np.array_equal(ray_audio[s], direct[s]) for s in direct)
    print(f"Ray Data, {n_texts} texts of {audio_s:g} s, batch_size 4, one actor with {cpus} CPUs: "
          f"{len(out)} rows in {ray_wall:.1f} s ({audio_total / ray_wall:.3f} audio s/s, the actor's model load "
          f"included); the same batches in this process: {t_end - t0:.1f} s with the load "
          f"({audio_total / (t_end - t0):.3f} audio s/s), {t_end - t_loaded:.1f} s without "
          f"({audio_total / (t_end - t_loaded):.3f}); Ray / direct with the loads: "
          f"{(audio_total / ray_wall) / (audio_total / (t_end - t0)):.2f}; same audio: {same}", flush=True)


def serve_part(serve, model: str, audio_s: float, cpus: int, n_requests: int) -> None:
    import httpx

    from pycsm.ray import SpeechServer

    port = load.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = SpeechServer.options(ray_actor_options={"num_cpus": cpus}).bind(model=model, max_audio_length=audio_s)
    serve.run(app, name="speech", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    expected = -(-round(audio_s * 12.5 * 1e6) // 10**6) * 1920 * 2
    try:
        httpx.post(url + "/v1/audio/speech", timeout=600, json={"model": "csm-1b", "voice": "0", "input": "Warm up.",
                                                               "response_format": "pcm"})
        base = None
        print("\n| clients | requests | audio s/s | x 1 client | TTFB p50 / p95 s | errors |\n|---|---|---|---|---|---|")
        for n in (1, 4):
            level = load.Level()
            t0 = time.monotonic()
            threads = [threading.Thread(target=load.client, args=(url, level, n_requests, t0 + 600, i, expected))
                       for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rate = sum(level.audio_s) / (time.monotonic() - t0)
            base = base or rate
            print(f"| {n} | {len(level.ttfb)} | {rate:.3f} | {rate / base:.2f} | {load.pct(level.ttfb, 50):.2f} / "
                  f"{load.pct(level.ttfb, 95):.2f} | {level.errors} |", flush=True)
    finally:
        serve.delete("speech")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--texts", type=int, default=8, help="rows of the Data job (default 8)")
    ap.add_argument("--audio", type=float, default=2.0, help="seconds of audio per row and request (default 2)")
    ap.add_argument("--requests", type=int, default=2, help="requests per Serve client (default 2)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster, all given to the actor (default 2)")
    args = ap.parse_args()
    if not 1 <= args.texts <= 256 or not 0 < args.audio <= 60 or not 1 <= args.requests <= 20 or not 1 <= args.cpus <= 64:
        ap.error("texts in [1, 256], audio in (0, 60], requests in [1, 20], cpus in [1, 64]")

    import ray
    from ray import serve

    ray.init(num_cpus=args.cpus, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        data_part(ray, args.model, args.texts, args.audio, args.cpus)
        serve_part(serve, args.model, args.audio, args.cpus, args.requests)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
