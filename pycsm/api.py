"""The high-level API: `CSM` (text -> speech), `Segment` (voice context), `AudioStream`.

>>> import pycsm
>>> with pycsm.CSM.from_pretrained(quant="q8_0") as tts:
...     audio = tts.generate("Hello from pycsm.", speaker=0, seed=42)
...     audio.save("hello.wav")

Every method takes the sampling options as one `GenerationOptions` (pycsm/options.py) and/or as
keywords; `context=` takes `Segment`s and saved voices (`Voice`, pycsm/voices.py).

Threads: a `CSM` holds one generation context. Its methods take an internal lock, so calls from
several threads on one `CSM` are safe but run one after another; for parallel synthesis create one
`CSM` per thread (each loads its own copy of the weights) or use `generate_batch`. A method called
from inside a callback or a stream loop of the same `CSM` (same thread) raises RuntimeError instead of
deadlocking.
"""

from __future__ import annotations

import numbers
import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._native import CSM_N_CODEBOOKS
from .audio import SAMPLE_RATE, Audio, check_samples, read_audio
from .budget import ContextBudget
from .errors import CSMError
from .generator import Generator
from .model import Model, check_n_threads
from .options import SEED_BITS, GenerationOptions
from .prompt import build_prompt
from .resample import check_rate, resample
from .text import DEFAULT_MAX_CHARS, split_sentences
from .voices import Voice

MAX_BATCH = 4  # utterances per native batch in generate_batch

# Generator's stop reasons -> the names of this API
_STOP_REASONS = {"eos": "eos", "max_frames": "max_length", "context_full": "context_full", "aborted": "aborted"}
# for generate_long: the reason reported when sentences ended differently (most notable first)
_STOP_RANK = ["aborted", "context_full", "max_length", "eos"]
_SEED_MASK = (1 << SEED_BITS) - 1  # seed + i wraps around, as the native uint64 does


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_speaker(speaker) -> int:
    if not _is_int(speaker) or speaker < 0:
        raise ValueError(f"speaker must be an integer >= 0, got {speaker!r}")
    return int(speaker)


def _check_text(text, what: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{what} is empty")
    try:
        stripped.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, decoded with surrogateescape
        raise ValueError(f"{what} is not valid Unicode text (character {e.start} is a lone surrogate, "
                         "as bytes that are not UTF-8 become)") from None
    return stripped


# ---------------------------------------------------------------------------------------------
# Voice context
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Segment:
    """One earlier utterance of the conversation: who said what, and how it sounded.

    audio may be
      - an `Audio` (from `CSM.generate`: its codes are used directly, no re-encoding; other Audio
        objects are resampled to 24 kHz if needed and encoded),
      - a 1-D float array of mono samples at 24 kHz (use `Segment.from_file` for files),
      - an integer array of Mimi codes, shape (frames, 32), values in [0, 2048),
      - None: text only.
    Audio is encoded by the Mimi encoder the first time the segment is used, and the codes are kept
    (`codes`).
    """

    speaker: int
    text: str
    audio: object = None
    _codes: np.ndarray | None = field(default=None, init=False, repr=False)
    _samples: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.speaker = _check_speaker(self.speaker)
        if not isinstance(self.text, str):
            raise TypeError(f"Segment text must be str, not {type(self.text).__name__}")
        a = self.audio
        if a is None:
            return
        if isinstance(a, Audio):
            if a.codes is not None and a.codes.shape[0] > 0:
                self._codes = _check_codes(a.codes)
            else:
                check_samples(a.samples, "Segment audio")
                self._samples = a.samples if a.sample_rate == SAMPLE_RATE else \
                    resample(a.samples, a.sample_rate, SAMPLE_RATE)
            return
        arr = np.asarray(a)
        if arr.dtype.kind in "iu":
            self._codes = _check_codes(arr)
        elif arr.dtype.kind == "f":
            if arr.ndim != 1:
                raise ValueError(f"Segment audio samples must be 1-D mono at 24 kHz, got shape {arr.shape} "
                                 "(average the channels, or use Segment.from_file)")
            check_samples(arr, "Segment audio")
            self._samples = np.ascontiguousarray(arr, dtype=np.float32)
        else:
            raise TypeError("Segment audio must be an Audio, a float array of samples, an int array of codes "
                            f"or None, not {type(a).__name__}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, text: str, speaker: int = 0) -> "Segment":
        """A segment from a sound file of any rate (resampled to 24 kHz; channels averaged). Its
        header is checked first: a rate outside [1000, 768000] Hz or more audio than the published
        model's context holds (163.84 s) is a ValueError before any samples are read."""
        return cls(speaker, text, read_audio(path, SAMPLE_RATE))

    @property
    def codes(self) -> np.ndarray | None:
        """The Mimi codes (frames, 32) once known (given, or encoded on first use); else None."""
        return self._codes

    def _resolve(self, encode) -> tuple[int, str, np.ndarray | None]:
        if self._codes is None and self._samples is not None:
            self._codes = _check_codes(encode(self._samples))
            self._samples = None
        return self.speaker, self.text, self._codes


def _check_codes(codes) -> np.ndarray:
    c = np.asarray(codes)
    if c.dtype.kind not in "iu" or c.ndim != 2 or c.shape[1] != CSM_N_CODEBOOKS:
        raise ValueError(f"audio codes must be an integer array of shape (frames, {CSM_N_CODEBOOKS}), "
                         f"got {c.dtype} {c.shape}")
    if c.shape[0] == 0:
        raise ValueError("audio codes are empty (0 frames)")
    if c.min() < 0 or c.max() >= 2048:
        raise ValueError("audio codes must be in [0, 2048)")
    return np.ascontiguousarray(c, dtype=np.int32)


def _as_segment(seg) -> Segment:
    if isinstance(seg, Segment):
        return seg
    if isinstance(seg, Voice):
        return seg.segment()
    if isinstance(seg, tuple) and len(seg) == 3:
        return Segment(*seg)
    raise TypeError(f"context items must be Segment, Voice or (speaker, text, audio) tuples, not "
                    f"{type(seg).__name__}")


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------

class AudioStream:
    """Iterator of float32 chunks (24 kHz mono) from `CSM.stream` / `CSM.stream_long`.

    After the iteration ends, `codes`, `stop_reason` and `seed` describe the whole utterance (as
    the fields of `Audio`). `close()` (or leaving a `with` block, or dropping the iterator) stops
    generation within a frame.
    """

    def __init__(self, body, sample_rate: int, seed: int):
        self.sample_rate = sample_rate
        self.seed = seed
        # filled by the body; a plain dict, so the running generator does not reference this object
        # (no cycle: dropping the stream finalises the generator at once, which stops generation)
        self._result: dict = {}
        self._it = body(self._result)

    @property
    def codes(self) -> np.ndarray | None:
        """The Mimi codes (frames, 32) generated, once the stream has ended or was closed."""
        return self._result.get("codes")

    @property
    def stop_reason(self) -> str | None:
        """Why generation ended (as `Audio.stop_reason`), once the stream has ended or was closed."""
        return self._result.get("stop_reason")

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_DONE = object()


class _Job:
    """A generation running in a worker thread (see CSM._start)."""

    def __init__(self):
        self.stop = threading.Event()   # set: the worker's next frame callback stops generation
        self.ended = threading.Event()  # set by the worker as its last act
        self.thread: threading.Thread | None = None
        self.codes: np.ndarray | None = None
        self.stop_reason: str | None = None
        self.error: BaseException | None = None

    def finish(self, wait: bool) -> None:
        """wait=True: let it run to its end (Ctrl-C meanwhile stops it, then re-raises); False: stop
        it now. Either way the worker has ended on return. (Event.wait, not Thread.join: a join
        interrupted by Ctrl-C marks the thread as finished while it still runs.)"""
        try:
            if wait:
                self.ended.wait()
        finally:
            self.stop.set()
            self.ended.wait()

    def result(self):
        if self.error is not None:
            raise self.error
        return self.codes, self.stop_reason


# ---------------------------------------------------------------------------------------------
# CSM
# ---------------------------------------------------------------------------------------------

class CSM:
    """Sesame's CSM-1B text-to-speech on a local GGUF file.

    path: a CSM GGUF (`cstr/csm-1b-GGUF` files, or `pycsm convert` / `pycsm quantize` output).
    n_threads: CPU threads (None: all cores). device: "auto" (a GPU backend when ggml has one),
        "cpu" or "gpu".

    Use `CSM.from_pretrained()` to download a published file. Close it (or use `with`) to free the
    weights promptly.

    Thread safety: calls on one CSM from several threads are serialised by an internal lock (safe,
    one at a time). For parallel synthesis use one CSM per thread, or `generate_batch`.
    """

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, device: str = "auto"):
        n_threads = check_n_threads(n_threads) or None  # pycsm.model's rule, once, before any work
        self.n_threads = n_threads
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._batch_gen: Generator | None = None
        self._stream_dec = None
        self._active: _Job | None = None  # the latest generation job (a stream's may be suspended)
        self._gen = None
        self.model = Model(path, device=device)
        try:
            self._gen = Generator(self.model, n_threads=n_threads)
        except BaseException:
            self.model.close()
            raise
        hp = self.model.hparams
        self.sample_rate = int(hp.sample_rate)
        self.frame_ms = 1000.0 / float(hp.frame_rate)

    @classmethod
    def from_pretrained(cls, repo_id: str = "cstr/csm-1b-GGUF", quant: str = "q8_0", *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        **kw) -> "CSM":
        """Download ``csm-1b-{quant}.gguf`` (f16, q8_0 or q4_k) from `repo_id` into the Hugging Face
        cache (or reuse the cached copy) and load it. `kw` go to `CSM(path, ...)`.

        Honours HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 and HF_TOKEN. ValueError for an unknown
        quant; CSMError when the file is not cached and cannot be downloaded.
        """
        from .hub import download

        path = download(quant, repo_id, revision=revision, token=token, cache_dir=cache_dir,
                        local_files_only=local_files_only)
        return cls(path, **kw)

    # ------------------------------------------------------------------ resources

    def close(self) -> None:
        """Free the generation contexts, the streaming decoder and the weights.

        Waits for calls running in other threads; a stream suspended in this thread is stopped."""
        if not hasattr(self, "_lock"):  # __init__ failed early
            return
        if self._owner == threading.get_ident():  # a stream of this thread holds the lock
            self._free()
        else:
            with self._lock:
                self._free()

    def _free(self) -> None:
        if self._active is not None:  # a suspended stream's worker
            self._active.finish(wait=False)
        for name in ("_stream_dec", "_batch_gen", "_gen"):
            obj = getattr(self, name)
            if obj is not None:
                setattr(self, name, None)
                obj.close()
        if getattr(self, "model", None) is not None:
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def path(self) -> Path:
        return self.model.path

    def __repr__(self) -> str:
        return f"CSM({str(self.model.path)!r}, n_threads={self.n_threads!r})"

    @contextmanager
    def _locked(self):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this CSM is already busy in this thread (a call from inside a stream loop or "
                               "a callback of the same CSM); finish or close that first")
        with self._lock:
            if self._gen is None:
                raise CSMError("this CSM is closed")
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # ------------------------------------------------------------------ codec

    def encode(self, samples, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Mimi codes (frames, 32) of mono float samples (resampled to 24 kHz if needed)."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"samples must be 1-D (mono), got shape {x.shape}")
        check_samples(x)
        rate = check_rate(sample_rate)
        self._check_context_length(x.shape[0] / rate)  # before resampling: the work is bounded too
        if rate != self.sample_rate:
            x = resample(x, rate, self.sample_rate)
        with self._locked():
            return self._encode(x)

    @property
    def max_context_seconds(self) -> float:
        """The longest audio the model's context can hold (all its positions as 80 ms frames)."""
        return self.model.hparams.bb_max_pos * self.frame_ms / 1000.0

    def _check_context_length(self, seconds: float) -> None:
        if seconds > self.max_context_seconds:
            raise ValueError(f"context audio of {seconds:.1f} s cannot fit: the model's context holds at most "
                             f"{self.max_context_seconds:g} s of audio")

    def _encode(self, pcm) -> np.ndarray:
        from . import codec

        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        self._check_context_length(pcm.shape[0] / self.sample_rate)
        return np.asarray(codec.encode(self.model.handle, pcm, self.n_threads), dtype=np.int32)

    def decode(self, codes) -> Audio:
        """The 24 kHz audio of Mimi codes (frames, 32)."""
        codes = _check_codes(codes)
        with self._locked():
            return Audio(self._decode(codes), self.sample_rate, codes=codes)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        from . import codec

        return np.asarray(codec.decode(self.model.handle, codes, self.n_threads), dtype=np.float32).reshape(-1)

    def _stream_decoder(self):
        if self._stream_dec is None:
            from . import codec

            self._stream_dec = codec.MimiStreamDecoder(self.model.handle, self.n_threads)
        else:
            self._stream_dec.reset()
        return self._stream_dec

    # ------------------------------------------------------------------ requests

    def _request(self, options, overrides: dict) -> tuple[GenerationOptions, dict]:
        """The call's options (`options` with the keyword overrides; seed fixed) and the arguments of
        `Generator.generate` they give on this model (top-k clamped to the codebook size, the frame
        cap to the context)."""
        opts = GenerationOptions.resolve(options, **overrides).with_seed()
        hp = self.model.hparams
        native = opts.sampling(int(hp.audio_vocab_size))
        native["max_frames"] = opts.max_frames(self.frame_ms, int(hp.bb_max_pos))
        return opts, native

    def _context(self, context) -> list:
        if isinstance(context, Voice):
            return [context.segment()]
        if isinstance(context, (Segment, str, bytes)):
            raise TypeError("context must be a Voice or a sequence of Segment / Voice (wrap a single Segment "
                            "in a list)")
        return [_as_segment(s) for s in context]

    def _prompt(self, text: str, speaker: int, segments: list, parse_special: bool, extra=()) -> np.ndarray:
        ctx = [s._resolve(self._encode) for s in segments] + list(extra)
        return build_prompt(self.model.tokenizer, text, speaker, ctx, parse_special=parse_special)

    def _budget(self, segments: list, parse_special: bool, history_limit: int | None = None) -> ContextBudget:
        """The context budget (pycsm.budget) of a growing conversation after `segments`."""
        return ContextBudget(self.model.tokenizer, self.model.hparams.bb_max_pos,
                             [s._resolve(self._encode) for s in segments], history_limit, parse_special)

    def _start(self, prompt: np.ndarray, native: dict, seed: int, on_frame=None, done=None) -> _Job:
        """Start one utterance on the main context in a worker thread (lock held by the caller).

        Generation never runs in the calling thread: a Ctrl-C there (KeyboardInterrupt, main thread
        only) would otherwise land inside the per-frame ctypes callback, where it cannot propagate.
        on_frame(index, codes) runs in the worker (returning False stops generation); done() is
        called there when it ends.
        """
        if self._gen is None:  # closed from a callback of this very call
            raise CSMError("this CSM is closed")
        job = _Job()

        def cb(index, codes):
            if job.stop.is_set():
                return False
            return on_frame is None or on_frame(index, codes) is not False

        def work():
            try:
                r = self._gen.generate(prompt, seed=seed, stop_at_eos=True, on_frame=cb, **native)
                job.codes, job.stop_reason = r.codes, _STOP_REASONS.get(r.stop_reason, r.stop_reason)
            except BaseException as e:  # noqa: BLE001 - re-raised by the waiting thread
                job.error = e
            finally:
                if done is not None:
                    done()
                job.ended.set()

        job.thread = threading.Thread(target=work, name="pycsm-generate", daemon=True)
        self._active = job
        job.thread.start()
        return job

    def _run(self, prompt: np.ndarray, native: dict, seed: int, on_frame=None):
        """One utterance (lock held). Returns (codes, stop_reason)."""
        job = self._start(prompt, native, seed, on_frame=on_frame)
        job.finish(wait=True)
        return job.result()

    # ------------------------------------------------------------------ generate

    def generate(self, text: str, speaker: int | None = None, context=(), options: GenerationOptions | None = None,
                 *, on_frame=None, **option_kw) -> Audio:
        """Speak `text` as `speaker` after the `context` (a `Voice`, or a list of `Segment` / `Voice`,
        oldest first).

        speaker: None = the speaker of the first `Voice` in the context, else 0.
        options / option_kw: the sampling options (`GenerationOptions`: temperature, top_k,
            depth_temperature, depth_top_k, max_audio_length_ms, seed, parse_special), as an object,
            as keywords, or both (keywords win). seed=None draws a random seed (`Audio.seed`).
        on_frame(index, codes): called after each frame (in a worker thread); returning False stops
            (stop_reason "aborted").
        The utterance ends when the model emits the all-zero end frame (Sesame's rule: all 32 codes
        0), at the length cap, or when the context is full (`Audio.stop_reason`). CSMError with the
        native message when the prompt (text plus context) does not fit the context.
        """
        text = _check_text(text)
        speaker = _speaker(speaker, context)
        opts, native = self._request(options, option_kw)
        segments = self._context(context)
        with self._locked():
            prompt = self._prompt(text, speaker, segments, opts.parse_special)
            codes, reason = self._run(prompt, native, opts.seed, on_frame)
            return Audio(self._decode(codes), self.sample_rate, codes=codes, stop_reason=reason, seed=opts.seed)

    def stream(self, text: str, speaker: int | None = None, context=(), options: GenerationOptions | None = None,
               *, chunk_frames: int = 4, on_frame=None, **option_kw) -> AudioStream:
        """Like `generate`, but yields float32 chunks of `chunk_frames` frames (80 ms each; the last
        may be shorter) while the model is still speaking. Generation runs in a worker thread; the
        chunks are decoded by a streaming Mimi decoder, and joined they equal `generate(...)` with
        the same seed. Closing the stream early stops generation. on_frame: as for `generate`.
        """
        text = _check_text(text)
        speaker = _speaker(speaker, context)
        opts, native = self._request(options, option_kw)
        chunk_frames = _check_chunk(chunk_frames)
        segments = self._context(context)

        def body(result: dict):
            with self._locked():
                prompt = self._prompt(text, speaker, segments, opts.parse_special)
                yield from self._stream_chunks(prompt, native, opts.seed, chunk_frames, result, on_frame)

        return AudioStream(body, self.sample_rate, opts.seed)

    def _stream_chunks(self, prompt, native, seed, chunk_frames, out, on_frame=None):
        """Generate in a worker thread, decode here; yields chunks. Lock held by the caller."""
        frames: queue.Queue = queue.Queue()
        decoder = self._stream_decoder()

        def put(index, codes):
            frames.put(codes)
            return on_frame is None or on_frame(index, codes) is not False

        job = self._start(prompt, native, seed, on_frame=put, done=lambda: frames.put(_DONE))
        try:
            pending = []
            while True:
                item = frames.get()
                if item is _DONE:
                    break
                if self._gen is None:
                    raise CSMError("this CSM was closed during the stream")
                pending.append(item)
                if len(pending) == chunk_frames:
                    yield _decode_chunk(decoder, pending)
                    pending = []
            codes, reason = job.result()
            if pending:
                yield _decode_chunk(decoder, pending)
        finally:
            job.finish(wait=False)  # closed early / failed: stop the worker within a frame
            if job.codes is not None:
                out["codes"], out["stop_reason"] = job.codes, job.stop_reason

    # ------------------------------------------------------------------ long text

    def generate_long(self, text: str, speaker: int | None = None, context=(),
                      options: GenerationOptions | None = None, *, pause_ms: float = 150, progress=None,
                      max_chars: int = DEFAULT_MAX_CHARS, on_frame=None, **option_kw) -> Audio:
        """Speak a long text sentence by sentence (`pycsm.text.split_sentences`).

        Each sentence is generated with the user's `context` followed by the previous sentence (its
        text and codes) as context, and the sentences are joined with `pause_ms` of silence. The
        previous sentence is left out when it does not fit beside the sentence's own length cap
        (`pycsm.budget`), so a long text never fails for a full context; ValueError before anything
        is generated when a sentence does not fit even alone with `context`.
        options / option_kw: as for `generate` (max_audio_length_ms caps each sentence); sentence i
        uses seed + i.
        progress(done, total) is called before the first sentence and after each one; returning
        False stops (the audio made so far is returned with stop_reason "aborted"). on_frame(index,
        codes) is called after each frame of each sentence (index counts within the sentence).
        stop_reason otherwise: "eos" when every sentence ended on its own, else the most notable
        other reason of a sentence ("context_full", then "max_length").
        """
        pieces = []
        st = self.stream_long(text, speaker, context, options, pause_ms=pause_ms, progress=progress,
                              max_chars=max_chars, chunk_frames=None, on_frame=on_frame, **option_kw)
        with st:
            for chunk in st:
                pieces.append(chunk)
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return Audio(samples, self.sample_rate, codes=st.codes, stop_reason=st.stop_reason, seed=st.seed)

    def stream_long(self, text: str, speaker: int | None = None, context=(),
                    options: GenerationOptions | None = None, *, pause_ms: float = 150, progress=None,
                    max_chars: int = DEFAULT_MAX_CHARS, chunk_frames: int | None = 4, on_frame=None,
                    **option_kw) -> AudioStream:
        """`generate_long` as a stream of float32 chunks (pauses included); joined, they equal
        `generate_long(...)` with the same seed. chunk_frames=None yields whole sentences."""
        text = _check_text(text)
        speaker = _speaker(speaker, context)
        opts, native = self._request(options, option_kw)
        if chunk_frames is not None:
            chunk_frames = _check_chunk(chunk_frames)
        if isinstance(pause_ms, bool) or not isinstance(pause_ms, numbers.Real) or not 0 <= pause_ms < 60_000:
            raise ValueError(f"pause_ms must be a number in [0, 60000), got {pause_ms!r}")
        seed = opts.seed
        segments = self._context(context)
        sentences = split_sentences(text, max_chars) or [text]
        silence = np.zeros(int(round(pause_ms * self.sample_rate / 1000)), dtype=np.float32)

        def body(result: dict):
            total = len(sentences)
            all_codes, reasons = [], []
            with self._locked():
                try:
                    budget = self._budget(segments, opts.parse_special, history_limit=1)
                    for i, sentence in enumerate(sentences):  # before any work: each must fit
                        budget.check(speaker, sentence, f"sentence {i + 1}")
                    if progress is not None and progress(0, total) is False:
                        reasons.append("aborted")
                        return
                    for i, sentence in enumerate(sentences):
                        if i and silence.size:
                            yield silence
                        prompt, _ = budget.prompt(speaker, sentence, native["max_frames"])
                        s_seed = (seed + i) & _SEED_MASK
                        if chunk_frames is None:
                            codes, reason = self._run(prompt, native, s_seed, on_frame)
                            yield self._decode(codes)
                        else:
                            out = {}
                            yield from self._stream_chunks(prompt, native, s_seed, chunk_frames, out, on_frame)
                            codes, reason = out["codes"], out["stop_reason"]
                        all_codes.append(codes)
                        reasons.append(reason)
                        budget.add(speaker, sentence, codes)
                        if progress is not None and progress(i + 1, total) is False and i + 1 < total:
                            reasons.append("aborted")
                            return
                finally:
                    result["codes"] = np.concatenate(all_codes) if all_codes else \
                        np.zeros((0, CSM_N_CODEBOOKS), dtype=np.int32)
                    result["stop_reason"] = min(reasons, key=_STOP_RANK.index) if reasons else "aborted"

        return AudioStream(body, self.sample_rate, seed)

    # ------------------------------------------------------------------ dialogue

    def converse(self, turns, voices=None, options: GenerationOptions | None = None, **kw):
        """Speak a dialogue turn by turn, each turn after the earlier ones; returns a
        `pycsm.conversation.Conversation` (`.audio` joined, `.turns` one Audio per turn, `.pieces`).

        turns: (speaker, text) pairs, {"speaker", "text"} dicts or text-only Segments; a speaker is
            an id or a name (names are numbered in order of appearance). voices: speaker -> Voice
            or Segment, that speaker's reference, kept in every prompt under the dialogue's id.
        options / option keywords: as for `generate`; without `options` the dialogue defaults
            apply (max_audio_length_ms 10 s per turn or sentence, parse_special False). Piece k (a
            turn, or a sentence of a long turn) uses seed + k.
        kw also: gap_ms (between turns, default 300), pause_ms (between the sentences of a long
            turn, 150), max_chars, progress(done_turns, total) (returning False stops),
            on_frame(index, codes) (after each frame of each piece, in a worker thread; returning
            False stops that piece).
        Each prompt holds the voice references and the most recent turns that fit beside the
        piece's own cap (`pycsm.budget`); see `pycsm.conversation` and docs/dialogue.md.
        """
        from .conversation import converse

        return converse(self, turns, voices, options, **kw)

    def stream_converse(self, turns, voices=None, options: GenerationOptions | None = None, *,
                        chunk_frames: int | None = 4, **kw):
        """`converse` as a stream of `pycsm.conversation.DialogueChunk` (turn, speaker, samples,
        gap), yielded as the frames are generated; chunk_frames=None yields whole pieces. Joined,
        the samples are the conversation; the stream's `pieces` fill as pieces end."""
        from .conversation import stream_converse

        return stream_converse(self, turns, voices, options, chunk_frames=chunk_frames, **kw)

    # ------------------------------------------------------------------ batch

    def generate_batch(self, texts, speaker=None, context=(), options: GenerationOptions | None = None,
                       **option_kw) -> list[Audio]:
        """Speak several texts together (up to 4 at a time share every weight read; faster than one
        by one). speaker: one for all or one per text (None: as for `generate`); context: shared by
        all; options / option_kw: as for `generate`. Text i uses seed + i and gives the same audio as
        `generate(texts[i], ..., seed=seed + i)`."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str (use generate() for one text)")
        texts = [_check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        opts, native = self._request(options, option_kw)
        if not texts:
            return []
        if speaker is None or isinstance(speaker, numbers.Integral):
            speakers = [_speaker(speaker, context)] * len(texts)
        else:
            speakers = list(speaker)
        if len(speakers) != len(texts):
            raise ValueError(f"{len(speakers)} speakers for {len(texts)} texts")
        speakers = [_check_speaker(s) for s in speakers]
        segments = self._context(context)
        results = []
        with self._locked():
            prompts = [self._prompt(t, s, segments, opts.parse_special) for t, s in zip(texts, speakers)]
            need = min(MAX_BATCH, len(texts))
            if self._batch_gen is None or self._batch_gen.n_batch < need:
                if self._batch_gen is not None:
                    self._batch_gen.close()
                    self._batch_gen = None
                self._batch_gen = Generator(self.model, n_threads=self.n_threads, n_batch=need)
            for start in range(0, len(texts), MAX_BATCH):
                b_seed = (opts.seed + start) & _SEED_MASK
                for j, r in enumerate(self._batch_gen.generate_batch(prompts[start:start + MAX_BATCH], seed=b_seed,
                                                                     stop_at_eos=True, **native)):
                    results.append(Audio(self._decode(r.codes), self.sample_rate, codes=r.codes,
                                         stop_reason=_STOP_REASONS.get(r.stop_reason, r.stop_reason),
                                         seed=(b_seed + j) & _SEED_MASK))
        return results


def _speaker(speaker, context) -> int:
    """The speaker of a call: as given, else the first Voice's in the context, else 0."""
    if speaker is not None:
        return _check_speaker(speaker)
    if isinstance(context, Voice):
        return context.speaker
    if isinstance(context, (list, tuple)):
        for item in context:
            if isinstance(item, Voice):
                return item.speaker
    return 0


def _check_chunk(chunk_frames) -> int:
    if not _is_int(chunk_frames) or chunk_frames < 1:
        raise ValueError(f"chunk_frames must be an integer >= 1, got {chunk_frames!r}")
    return int(chunk_frames)


def _decode_chunk(decoder, frames: list) -> np.ndarray:
    codes = np.ascontiguousarray(np.stack(frames), dtype=np.int32)
    return np.asarray(decoder.decode(codes), dtype=np.float32).reshape(-1)
