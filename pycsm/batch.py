"""Continuous batching: a native csm_batch whose streams join and leave between frames.

>>> batch = Batch(model, max_streams=4)
>>> a = batch.add(prompt_a, seed=1)
>>> events = batch.step()            # a's prefill (in chunks), then one frame per step
>>> b = batch.add(prompt_b, seed=2)  # joins while a runs
>>> while batch.n_streams:
...     for ev in batch.step(): ...  # StreamEvent(stream, frame_index, codes, stop_reason)

Each stream's codes equal `Generator.generate` with the same prompt, options and seed, whatever
else is in the batch. One thread at a time per Batch; a Model can be shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _native as N
from ._handle import NativeHandle, NativeOwner
from .generator import STOP_REASONS, _check_prompt, _fill_params, _i32p
from .model import Model, check_n_threads


@dataclass
class StreamEvent:
    """What one step did for one stream: a new frame (codes, int32 (32,)) and/or its end."""

    stream: int                  # the id `Batch.add` returned
    frame_index: int | None      # index of `codes` within the stream; None when no frame came
    codes: np.ndarray | None
    stop_reason: str | None      # None while the stream runs on; else "eos", "max_frames", "context_full"


class Batch(NativeOwner):
    """Up to max_streams generations sharing every weight read; streams join at any step.

    prefill_chunk: prompt rows prefilled per step while other streams run (0: about one frame's
    time, from the measured speeds), so a joining stream delays the running ones by about a frame.
    reuse_prompt: a joining stream takes the cached keys and values of the leading rows its prompt
    shares with one the batch prefilled before (a saved voice), from a running or a free sequence,
    instead of prefilling them; the codes are the same (`rows_reused` counts them).
    """

    def __init__(self, model: Model, max_streams: int = 4, n_threads: int | None = None, max_pos: int = 0,
                 prefill_chunk: int = 0, reuse_prompt: bool = True):
        params = N.lib.csm_batch_default_params()
        params.n_threads = check_n_threads(n_threads)
        params.max_pos = int(max_pos)
        params.max_streams = int(max_streams)
        params.prefill_chunk = int(prefill_chunk)
        params.reuse_prompt = bool(reuse_prompt)
        self.model = model
        self.max_streams = int(max_streams)
        self._events = (N.csm_batch_event * self.max_streams)()
        with model._native.use() as mh:  # the native batch holds its model from here on
            ptr = N.check_ptr(N.lib.csm_batch_new(mh, params), "cannot create a batch")
        self._native = NativeHandle(ptr, N.lib.csm_batch_free, "batch")

    def add(self, prompt, *, temperature: float = 0.9, top_k: int = 50, depth_temperature=None, depth_top_k=None,
            seed: int = 0, max_frames: int = 0, stop_at_eos: bool = True) -> int:
        """Add a stream after `prompt` (int32 (positions, 33)); returns its id. CSMError when the
        batch is full (`n_streams == max_streams`) or the prompt does not fit the context."""
        p = _check_prompt(prompt)
        sp = _fill_params(N.lib.csm_stream_default_params(), temperature, top_k, depth_temperature, depth_top_k,
                          seed, max_frames, stop_at_eos)
        with self._native.use() as h:
            return N.check_status(N.lib.csm_batch_add(h, _i32p(p), p.shape[0], sp), "cannot add a stream")

    def remove(self, stream: int) -> None:
        """Remove a stream now (running or joining); no event follows for it."""
        with self._native.use() as h:
            N.check_status(N.lib.csm_batch_remove(h, int(stream)), "cannot remove a stream")

    def step(self) -> list[StreamEvent]:
        """One prefill chunk of the joining streams (first added first: short prompts added
        together start in the same step), then one frame of every running stream.
        On CSMError every stream has left the batch."""
        with self._native.use() as h:
            n = N.check_status(N.lib.csm_batch_step(h, self._events, self.max_streams), "batch step failed")
        out = []
        for ev in self._events[:n]:
            has_frame = ev.frame_index >= 0
            out.append(StreamEvent(int(ev.stream), int(ev.frame_index) if has_frame else None,
                                   np.ctypeslib.as_array(ev.codes).copy() if has_frame else None,
                                   STOP_REASONS.get(ev.stop_reason, "unknown") if ev.stop_reason >= 0 else None))
        return out

    @property
    def n_streams(self) -> int:
        """Streams in the batch, running or joining."""
        with self._native.use() as h:
            return int(N.lib.csm_batch_n_streams(h))

    @property
    def n_running(self) -> int:
        """Streams past their prefill."""
        with self._native.use() as h:
            return int(N.lib.csm_batch_n_running(h))

    @property
    def rows_reused(self) -> int:
        """Prompt rows the streams so far took from cache rows instead of prefilling (reuse_prompt)."""
        with self._native.use() as h:
            return int(N.lib.csm_batch_rows_reused(h))
