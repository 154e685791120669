"""Scale-out on Ray (extra `[ray]`): a Ray Serve deployment of the speech server and a callable
class for Ray Data.

    from ray import serve
    from pycsm.ray import SpeechServer
    serve.run(SpeechServer.options(num_replicas=2, ray_actor_options={"num_cpus": 4})
              .bind(model="/models/csm-1b-q8_0.gguf"), route_prefix="/")
    # POST http://HOST:8000/v1/audio/speech, as `pycsm serve`

    import ray
    from pycsm.ray import Synthesizer
    ds = ray.data.from_items([{"text": t, "seed": i} for i, t in enumerate(texts)])
    ds = ds.map_batches(Synthesizer, fn_constructor_kwargs={"model": path}, concurrency=2, batch_size=8,
                        num_cpus=4)   # adds "audio" (float32 arrays) and "sample_rate"

Each replica or actor is one process holding its model, a native continuous batch and as many
threads as Ray allots it CPUs (bounded by the process's CPU affinity and cgroup quota; never the
host's core count when Ray says less).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from ray import serve

from .batch import Batch
from .codec import decode
from .model import Model
from .options import GenerationOptions
from .prompt import build_prompt
from .voices import find_voice


def _cgroup_cpus() -> int | None:
    """The CPU quota of this process's cgroup, rounded up (None: no quota or no cgroup)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def allotted_cpus() -> int:
    """CPU threads for this process: the CPUs Ray assigned to the current actor or task (at least 1),
    bounded by the CPU affinity and the cgroup quota of the process."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, quota)
    import ray

    if ray.is_initialized():
        cpu = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpu:
            n = min(n, max(1, int(cpu)))
    return max(1, n)


# ---------------------------------------------------------------------------------------------
# Ray Serve
# ---------------------------------------------------------------------------------------------

@serve.ingress()
class _SpeechServer:
    """One replica: a model, an engine (continuous batch) and the server's FastAPI app."""

    def __init__(self, model: str, max_batch: int = 4, max_queue: int = 16, max_audio_length: float = 60.0,
                 max_input_chars: int = 4096, voices: str | None = None, voice_map: dict[str, str] | None = None,
                 api_key: str | None = None, prefill_chunk: int = 0):
        from .server.app import ServerConfig, create_app
        from .server.engine import Engine
        from .server.voices import Voices
        from .voices import voices_dir

        path = Path(model)
        self.n_threads = allotted_cpus()
        self._model = Model(path)
        self._engine = Engine(self._model, max_batch=max_batch, max_queue=max_queue, n_threads=self.n_threads,
                              prefill_chunk=prefill_chunk)
        name = path.name[:-5] if path.name.endswith(".gguf") else path.name
        config = ServerConfig(model_name=name, max_input_chars=max_input_chars, max_audio_seconds=max_audio_length,
                              api_key=api_key)
        self._app = create_app(self._engine, config, Voices(voices if voices is not None else voices_dir(),
                                                            voice_map))

    def __serve_build_asgi_app__(self):
        return self._app

    def __del__(self):  # Ray Serve calls it when the replica stops
        engine, model = getattr(self, "_engine", None), getattr(self, "_model", None)
        if engine is not None:
            engine.close(timeout=0)
        if model is not None:
            model.close()


#: The speech server as a Ray Serve deployment: the routes of `pycsm serve` (see pycsm.server);
#: bind(model=PATH, max_batch=4, max_queue=16, max_audio_length=60.0, max_input_chars=4096,
#: voices=DIR, voice_map={"alloy": "0"}, api_key=None). Replicas, autoscaling and CPUs per replica
#: come from Ray's own .options(...).
SpeechServer = serve.deployment(name="pycsm-speech")(_SpeechServer)


# ---------------------------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------------------------

class Synthesizer:
    """For `Dataset.map_batches`: each batch's `text` column (optional `speaker`, `voice`, `seed`
    columns) becomes `audio` (float32 arrays at 24 kHz) and `sample_rate`. Rows run through a native
    continuous batch of `max_batch` streams: a new row joins as soon as another one ends.

    Row i gives the audio of `CSM.generate(text, speaker, context=voice, options=options, seed=seed)`.
    Without a seed column, options.seed (None: a random seed per row) is used.
    """

    def __init__(self, model: str, max_batch: int = 4, options: GenerationOptions | None = None,
                 n_threads: int | None = None):
        self.options = options if options is not None else GenerationOptions()
        self.n_threads = n_threads or allotted_cpus()
        self.max_batch = max_batch
        self._model = Model(model)
        self._batch = Batch(self._model, max_streams=max_batch, n_threads=self.n_threads)
        hp = self._model.hparams
        self.sample_rate = int(hp.sample_rate)
        self._max_frames = self.options.max_frames(1000.0 / float(hp.frame_rate), int(hp.bb_max_pos))
        self._sampling = self.options.sampling(int(hp.audio_vocab_size))

    def _prompt(self, text: str, speaker, voice) -> np.ndarray:
        context = []
        if voice:
            v = find_voice(str(voice))
            context = [(v.speaker, v.text, v.codes)]
            if speaker is None:
                speaker = v.speaker
        return build_prompt(self._model.tokenizer, str(text).strip(), int(speaker or 0), context,
                            parse_special=self.options.parse_special)

    def __call__(self, batch: dict) -> dict:
        texts = list(batch["text"])
        n = len(texts)
        column = lambda name: list(batch[name]) if name in batch else [None] * n  # noqa: E731
        speakers, voices, seeds = column("speaker"), column("voice"), column("seed")
        prompts = [self._prompt(t, s, v) for t, s, v in zip(texts, speakers, voices)]
        row_seeds = [int(s) if s is not None else self.options.with_seed().seed for s in seeds]
        codes: list[list] = [[] for _ in range(n)]
        stream_row: dict[int, int] = {}
        next_row = 0
        while next_row < n or self._batch.n_streams:
            while next_row < n and self._batch.n_streams < self.max_batch:
                sid = self._batch.add(prompts[next_row], seed=row_seeds[next_row], max_frames=self._max_frames,
                                      stop_at_eos=True, **self._sampling)
                stream_row[sid] = next_row
                next_row += 1
            for ev in self._batch.step():
                if ev.codes is not None:
                    codes[stream_row[ev.stream]].append(ev.codes)
        audio = np.empty(n, dtype=object)
        for i, frames in enumerate(codes):
            pcm = decode(self._model.handle, np.array(frames, dtype=np.int32), self.n_threads) if frames else []
            audio[i] = np.asarray(pcm, dtype=np.float32).reshape(-1)
        out = dict(batch)
        out["audio"] = audio
        out["sample_rate"] = np.full(n, self.sample_rate, dtype=np.int32)
        return out
