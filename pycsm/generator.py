"""Speech-token generation: a native csm_context (KV caches, graphs, thread pool) around a Model."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from . import _native as N
from ._handle import NativeHandle, NativeOwner
from .model import Model, check_n_threads

STOP_REASONS = {N.CSM_STOP_EOS: "eos", N.CSM_STOP_MAX_FRAMES: "max_frames",
                N.CSM_STOP_CONTEXT_FULL: "context_full", N.CSM_STOP_ABORTED: "aborted"}


@dataclass
class GenerateResult:
    """What one generation produced and why it stopped."""

    codes: np.ndarray          # int32 (frames, 32)
    stop_reason: str           # "eos", "max_frames", "context_full" or "aborted"
    n_prompt: int              # prompt positions
    t_prefill_ms: float
    t_backbone_ms: float
    t_depth_ms: float
    n_prompt_reused: int = 0   # leading prompt positions whose cache rows the previous call left (reuse_prompt)


def _i32p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))


def _check_prompt(prompt) -> np.ndarray:
    p = np.ascontiguousarray(prompt, dtype=np.int32)
    if p.ndim != 2 or p.shape[1] != N.CSM_N_COLUMNS:
        raise ValueError(f"prompt must have shape (positions, {N.CSM_N_COLUMNS}), got {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("the prompt is empty")
    return p


def _fill_params(p, temperature, top_k, depth_temperature, depth_top_k, seed, max_frames, stop_at_eos):
    """Fills the sampling fields, frame cap and EOS rule shared by csm_generate_params and
    csm_stream_params (None depth values: the same as the backbone's); returns p."""
    p.sampling.temperature = float(temperature)
    p.sampling.top_k = int(top_k)
    p.sampling.depth_temperature = -1.0 if depth_temperature is None else float(depth_temperature)
    p.sampling.depth_top_k = -1 if depth_top_k is None else int(depth_top_k)
    p.sampling.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    p.max_frames = int(max_frames)
    p.stop_at_eos = bool(stop_at_eos)
    return p


class Generator(NativeOwner):
    """Generates Mimi codes from prompts. One thread at a time per Generator; a Model can be shared."""

    def __init__(self, model: Model, n_threads: int | None = None, max_pos: int = 0, n_batch: int = 1):
        self.model = model
        params = N.lib.csm_context_default_params()
        params.n_threads = check_n_threads(n_threads)
        params.max_pos = int(max_pos)
        params.n_batch = int(n_batch)
        self.n_batch = int(n_batch)
        with model._native.use() as mh:
            ptr = N.check_ptr(N.lib.csm_context_new(mh, params), "cannot create a context")
        self._native = NativeHandle(ptr, N.lib.csm_context_free, "generator")

    @property
    def handle(self):
        return self._native.get()

    def _params(self, temperature, top_k, depth_temperature, depth_top_k, seed, max_frames, stop_at_eos):
        return _fill_params(N.lib.csm_generate_default_params(), temperature, top_k, depth_temperature,
                            depth_top_k, seed, max_frames, stop_at_eos)

    def generate(self, prompt, *, temperature: float = 0.9, top_k: int = 50, depth_temperature=None,
                 depth_top_k=None, seed: int = 0, max_frames: int = 0, stop_at_eos: bool = True,
                 on_frame=None, reuse_prompt: bool = True) -> GenerateResult:
        """Generate frames after `prompt` (int32 (positions, 33)).

        reuse_prompt: the leading rows this prompt shares with this Generator's previous prompt (a
        saved voice, a conversation's earlier turns) keep their cached keys and values and are not
        computed again; the codes are the same with it off, only the prefill takes longer.

        on_frame(index, codes) is called after each frame with its 32 codes; returning False stops
        (stop_reason "aborted"); an exception in it stops generation and is re-raised here.
        max_frames <= 0 means until EOS or a full context.
        """
        p = _check_prompt(prompt)
        params = self._params(temperature, top_k, depth_temperature, depth_top_k, seed, max_frames, stop_at_eos)
        params.reuse_prompt = bool(reuse_prompt)
        cap = max_frames if max_frames > 0 else self.model.hparams.bb_max_pos
        out = np.zeros((cap, N.CSM_N_CODEBOOKS), dtype=np.int32)
        failure, user_stop = [], []

        # Always called once per frame, so that Ctrl-C stops generation within a frame. A
        # KeyboardInterrupt can surface as the callback starts, before its try: ctypes then
        # swallows it and returns False; an abort that neither on_frame nor an exception asked
        # for is therefore that interrupt, re-raised below.
        def _cb(idx, codes_ptr, _ud):
            try:
                if on_frame is None:
                    return True
                codes = np.ctypeslib.as_array(codes_ptr, shape=(N.CSM_N_CODEBOOKS,)).copy()
                if on_frame(int(idx), codes) is False:
                    user_stop.append(True)
                    return False
                return True
            except BaseException as e:  # KeyboardInterrupt included: stop within this frame
                failure.append(e)
                return False

        cb = N.csm_frame_callback(_cb)
        params.on_frame = cb
        res = N.csm_generate_result()
        with self._native.use() as h:  # a close() meanwhile (even from on_frame) waits for the return
            n = N.lib.csm_generate(h, _i32p(p), p.shape[0], params, _i32p(out), cap, ctypes.byref(res))
        if failure:
            raise failure[0]
        if n >= 0 and res.stop_reason == N.CSM_STOP_ABORTED and not user_stop:
            raise KeyboardInterrupt
        N.check_status(n, "generation failed")
        return GenerateResult(out[:n].copy(), STOP_REASONS.get(res.stop_reason, "unknown"), res.n_prompt,
                              res.t_prefill_ms, res.t_backbone_ms, res.t_depth_ms, res.n_prompt_reused)

    def generate_batch(self, prompts, *, temperature: float = 0.9, top_k: int = 50, depth_temperature=None,
                       depth_top_k=None, seed: int = 0, max_frames: int = 0,
                       stop_at_eos: bool = True, reuse_prompt: bool = True) -> list[GenerateResult]:
        """Generate several utterances together (utterance b uses seed + b). With reuse_prompt,
        utterance b reuses what it shares with the prompt in slot b of the previous call."""
        ps = [_check_prompt(p) for p in prompts]
        if not 1 <= len(ps) <= self.n_batch:
            raise ValueError(f"between 1 and {self.n_batch} prompts per batch (n_batch of this generator)")
        params = self._params(temperature, top_k, depth_temperature, depth_top_k, seed, max_frames, stop_at_eos)
        params.reuse_prompt = bool(reuse_prompt)
        cap = max_frames if max_frames > 0 else self.model.hparams.bb_max_pos
        outs = [np.zeros((cap, N.CSM_N_CODEBOOKS), dtype=np.int32) for _ in ps]
        B = len(ps)
        prompt_ptrs = (ctypes.POINTER(ctypes.c_int32) * B)(*[_i32p(p) for p in ps])
        out_ptrs = (ctypes.POINTER(ctypes.c_int32) * B)(*[_i32p(o) for o in outs])
        n_pos = (ctypes.c_int32 * B)(*[p.shape[0] for p in ps])
        results = (N.csm_generate_result * B)()
        with self._native.use() as h:
            status = N.lib.csm_generate_batch(h, B, prompt_ptrs, n_pos, params, out_ptrs, cap, results)
        N.check_status(status, "batched generation failed")
        return [GenerateResult(o[:r.n_frames].copy(), STOP_REASONS.get(r.stop_reason, "unknown"), r.n_prompt,
                               r.t_prefill_ms, r.t_backbone_ms, r.t_depth_ms, r.n_prompt_reused)
                for o, r in zip(outs, results)]

    def frame_logits(self, prompt, codes=None):
        """Codebook-0 logits after the prompt and, given a frame's 32 codes, the depth decoder's
        teacher-forced logits of codebooks 1..31. Returns (logits0, depth_logits or None)."""
        p = _check_prompt(prompt)
        V = self.model.hparams.audio_vocab_size
        l0 = np.zeros(V, dtype=np.float32)
        fp = ctypes.POINTER(ctypes.c_float)
        if codes is None:
            with self._native.use() as h:
                status = N.lib.csm_eval_frame_logits(h, _i32p(p), p.shape[0], None, l0.ctypes.data_as(fp), None)
            N.check_status(status, "evaluation failed")
            return l0, None
        c = np.ascontiguousarray(codes, dtype=np.int32).reshape(-1)
        if c.shape[0] != N.CSM_N_CODEBOOKS:
            raise ValueError(f"codes must hold {N.CSM_N_CODEBOOKS} values")
        dl = np.zeros((N.CSM_N_CODEBOOKS - 1, V), dtype=np.float32)
        with self._native.use() as h:
            status = N.lib.csm_eval_frame_logits(h, _i32p(p), p.shape[0], _i32p(c), l0.ctypes.data_as(fp),
                                                 dl.ctypes.data_as(fp))
        N.check_status(status, "evaluation failed")
        return l0, dl
