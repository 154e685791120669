"""The server's engine: one thread runs a continuous batch (pycsm.batch.Batch) for every request.

Requests wait in a bounded queue, join the batch when a stream slot is free (their prefill split
between the running streams' frames), and leave it at their end, at their cap, or within one frame
of being cancelled (a client that went away). Mimi decoding is batched too: one MimiBatchDecoder
keeps a slot of streaming state per stream, and one native call decodes the frames of all the
streams that have some due: a stream's first frame right after the step that made it (time to first
byte), then `decode_frames` frames at a time (several frames per call cost less per frame: 3.5-3.8
against 4.9-5.0 ms of Mimi per frame with 4 streams on q8_0), and whatever is left when it ends. The audio goes
to the request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..batch import Batch
from ..codec import MimiBatchDecoder
from ..errors import CSMError
from ..model import Model

LOG = logging.getLogger("pycsm.server")


class QueueFull(Exception):
    """The wait queue is full; retry_after: seconds until a slot is likely free."""

    def __init__(self, retry_after: int):
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (or cut this one)."""


@dataclass
class End:
    """The last item of a request's queue: why its stream ended and how many frames it made."""

    stop_reason: str
    n_frames: int


@dataclass
class Request:
    prompt: np.ndarray
    temperature: float
    top_k: int
    seed: int
    max_frames: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # float32 chunks, then End or an exception
    cancelled: bool = False
    stream: int | None = None
    mimi_slot: int | None = None  # its slot of the engine's MimiBatchDecoder while it runs
    pending: list = field(default_factory=list)  # codes made and not decoded yet
    n_frames: int = 0
    t_submit: float = field(default_factory=time.monotonic)

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Stats:
    """Counters the engine keeps for /metrics (read without a lock: single numbers)."""

    def __init__(self):
        self.frames = 0
        self.steps = 0
        self.stream_frames = 0     # frames the steps made, over all streams (/ steps: mean batch occupancy)
        self.step_seconds = 0.0    # in the native batch step (prefill chunks and frames)
        self.decode_seconds = 0.0  # in Mimi decoding
        self.rows_reused = 0   # prompt rows taken from cached rows (a voice prefilled before)
        self.recent = collections.deque(maxlen=64)   # (time, frames) of recent steps
        self.request_seconds = collections.deque(maxlen=64)

    def frames_per_second(self) -> float:
        r = list(self.recent)
        if len(r) < 2 or r[-1][0] <= r[0][0]:
            return 0.0
        return sum(n for _, n in r[1:]) / (r[-1][0] - r[0][0])


class Engine:
    """Runs requests in a continuous batch of up to max_batch streams, up to max_queue waiting."""

    def __init__(self, model: Model, max_batch: int = 4, max_queue: int = 16, n_threads: int | None = None,
                 prefill_chunk: int = 0, decode_frames: int = 4, reuse_prompt: bool = True):
        if max_batch < 1 or max_queue < 0 or not 1 <= decode_frames <= 64:
            raise ValueError("max_batch must be >= 1, max_queue >= 0, decode_frames in [1, 64]")
        self.model = model
        self.decode_frames = decode_frames
        self.max_batch, self.max_queue = max_batch, max_queue
        self.n_threads = n_threads
        self.stats = Stats()
        self._batch = Batch(model, max_streams=max_batch, n_threads=n_threads, prefill_chunk=prefill_chunk,
                            reuse_prompt=reuse_prompt)
        try:
            self._mimi = MimiBatchDecoder(model, n_slots=max_batch, n_threads=n_threads)
        except BaseException:
            self._batch.close()
            raise
        self._free_slots = list(range(max_batch))
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="pycsm-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- called from the event loop

    def submit(self, request: Request) -> Request:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            free = max(0, self.max_batch - len(self._active))
            if len(self._waiting) + 1 - free > self.max_queue:  # it would wait behind max_queue others
                raise QueueFull(self._retry_after())
            self._waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: it leaves the batch before the next frame (a no-op once it ended)."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    @property
    def active_streams(self) -> int:
        return len(self._active)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def _retry_after(self) -> int:
        times = list(self.stats.request_seconds)
        mean = sum(times) / len(times) if times else 5.0
        return max(1, int(round(mean * (len(self._waiting) + 1) / self.max_batch)))

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests; let running and waiting ones finish for up to `timeout` seconds
        (None: wait for them), then cut the rest with ShuttingDown and free the batch."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                with self._cond:
                    for r in list(self._waiting) + list(self._active.values()):
                        r.cancelled = True
                    self._cond.notify()
                self._thread.join()
                break
            self._thread.join(0.1 if left is None else min(0.1, left))
        self._batch.close()
        self._mimi.close()

    # ---------------------------------------------------------------- the engine thread

    def _mimi_slot(self) -> int:
        """The lowest free Mimi slot, reset (at most max_batch streams run, so one is free). Low slots
        first keep the running ones consecutive: the decoder reads and writes their state as a block."""
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        try:
            self._mimi.reset(slot)
        except BaseException:
            self._free_slots.append(slot)
            raise
        return slot

    def _release(self, r: Request) -> None:
        if r.stream is not None:
            self._active.pop(r.stream, None)
        if r.mimi_slot is not None:
            self._free_slots.append(r.mimi_slot)
            r.mimi_slot = None
        self.stats.request_seconds.append(time.monotonic() - r.t_submit)

    def _admit(self) -> list[Request]:
        """(lock held) Cancelled streams leave the batch; waiting requests fill the free slots."""
        for r in [r for r in self._active.values() if r.cancelled]:
            self._batch.remove(r.stream)
            self._release(r)
            r.push(ShuttingDown("cut") if self._closing else End("cancelled", r.n_frames))
        while self._waiting and self._waiting[0].cancelled:
            r = self._waiting.popleft()
            r.push(ShuttingDown("cut") if self._closing else End("cancelled", 0))
        joining = []
        while self._waiting and len(self._active) + len(joining) < self.max_batch:
            r = self._waiting.popleft()
            if r.cancelled:
                r.push(ShuttingDown("cut") if self._closing else End("cancelled", 0))
            else:
                joining.append(r)
        return joining

    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception as e:  # a bug, not a request's fault: fail the running requests, keep serving
                LOG.exception("engine step failed")
                with self._cond:
                    for r in list(self._active.values()):
                        try:
                            self._batch.remove(r.stream)
                        except CSMError:
                            pass  # already gone: the failed step emptied the batch
                        self._release(r)
                        r.push(e)

    def _iterate(self) -> bool:
        """One round: admit, step, deliver. False once closed and drained."""
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._closing):
                    self._cond.wait()
                joining = self._admit()
                if self._closing and not (self._waiting or self._active or joining):
                    return False
            for r in joining:
                try:
                    r.mimi_slot = self._mimi_slot()
                    r.stream = self._batch.add(r.prompt, temperature=r.temperature, top_k=r.top_k, seed=r.seed,
                                               max_frames=r.max_frames, stop_at_eos=True)
                except CSMError as e:  # e.g. the prompt does not fit the context
                    self._release(r)
                    r.push(e)
                    continue
                self._active[r.stream] = r
            if not self._active:
                continue
            t0 = time.perf_counter()
            try:
                events = self._batch.step()
            except CSMError as e:  # every stream has left the batch
                for r in list(self._active.values()):
                    self._release(r)
                    r.push(e)
                continue
            finally:
                self.stats.step_seconds += time.perf_counter() - t0
            self._deliver(events)
            return True

    def _deliver(self, events) -> None:
        now = time.monotonic()
        made = [(ev, self._active[ev.stream]) for ev in events if ev.stream in self._active]
        for ev, r in made:
            if ev.codes is not None:
                r.pending.append(ev.codes)
        # due: a first frame, decode_frames of them, or the last ones; streams with as many frames
        # due share one Mimi call (each weight product serves all of them)
        due = collections.defaultdict(list)
        for ev, r in made:
            k = len(r.pending)
            if k and (r.n_frames == 0 or k >= self.decode_frames or ev.stop_reason is not None):
                due[k].append(r)
        failed, n = None, 0
        for k, rs in due.items():
            rs.sort(key=lambda r: r.mimi_slot)
            t0 = time.perf_counter()
            try:
                pcm = self._mimi.decode([r.mimi_slot for r in rs], np.stack([np.stack(r.pending) for r in rs]))
            except CSMError as e:  # not one stream's fault (the codes come from the model): fail them all
                failed = e
                break
            finally:
                self.stats.decode_seconds += time.perf_counter() - t0
            for r, row in zip(rs, pcm):
                r.pending.clear()
                r.n_frames += k
                r.push(row)
            n += k * len(rs)
        for ev, r in made:
            if failed is not None and (ev.codes is not None or r.pending):
                if ev.stop_reason is None:
                    self._batch.remove(ev.stream)
                self._release(r)
                r.push(failed)
            elif ev.stop_reason is not None:
                self._release(r)
                r.push(End(ev.stop_reason, r.n_frames))
        self.stats.frames += n
        self.stats.steps += 1
        self.stats.stream_frames += sum(ev.codes is not None for ev, _ in made)
        self.stats.recent.append((now, n))
        self.stats.rows_reused = self._batch.rows_reused
