"""Mimi codec: 32 codes per 80 ms frame <-> mono 24 kHz PCM, on pycsm's native library.

These functions take the raw ``csm_model*`` handle (an int, a ``ctypes.c_void_p`` or any object
with an ``_as_parameter_``) so they work with any wrapper that owns the loaded model::

    pcm = decode(model_handle, codes)            # codes: int [frames, 32] -> float32 [frames * 1920]
    codes = encode(model_handle, pcm)            # float [n] -> int32 [frames, 32]

    with MimiStreamDecoder(model_handle) as dec: # chunks of any size; the concatenation equals decode()
        for chunk in chunks:
            play(dec.decode(chunk))

    with MimiBatchDecoder(model_handle, n_slots=4) as dec:  # several streams, one native pass per call
        dec.reset(2)                                         # a new stream takes slot 2
        pcm = dec.decode([0, 2], codes)                      # codes [2, frames, 32] -> [2, frames * 1920]

A pycsm.Model may be passed instead of its handle. A stream decoder keeps its model alive (in C,
and the Model object in Python); a one-shot call must not start after the model was closed.
Each slot of a MimiBatchDecoder gives the audio a MimiStreamDecoder of its own would give.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ._handle import NativeHandle, NativeOwner
from ._native import CSM_N_CODEBOOKS, check_ptr, check_status, lib
from .errors import CSMError
from .model import check_n_threads

__all__ = ["SAMPLES_PER_FRAME", "SAMPLE_RATE", "MimiBatchDecoder", "MimiStreamDecoder", "decode", "encode"]

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 1920

_I32P = ctypes.POINTER(ctypes.c_int32)
_F32P = ctypes.POINTER(ctypes.c_float)


def _handle(model) -> ctypes.c_void_p:
    if model is None:
        raise CSMError("model handle is None")
    if hasattr(model, "_native"):  # a pycsm.Model
        model = model.handle
    model = getattr(model, "_as_parameter_", model)
    if isinstance(model, ctypes.c_void_p):
        if not model.value:
            raise CSMError("model handle is NULL")
        return model
    if isinstance(model, int):
        if model == 0:
            raise CSMError("model handle is NULL")
        return ctypes.c_void_p(model)
    raise TypeError(f"expected a csm_model* handle (int or ctypes.c_void_p), got {type(model).__name__}")


def _threads(n_threads: int | None) -> int:
    return check_n_threads(n_threads)


def _int32_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind not in "iu" and arr.size:
        raise CSMError(f"{what} must be integers, got dtype {arr.dtype}")
    # values that do not fit int32 must not wrap around into valid values in the cast
    i32 = np.iinfo(np.int32)
    if arr.size and (arr.min() < i32.min or arr.max() > i32.max):
        where = tuple(int(i) for i in np.argwhere((arr < i32.min) | (arr > i32.max))[0])
        raise CSMError(f"{what}: {arr[where]} at index {list(where)} is out of range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _codes_array(codes) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim == 1 and arr.size == CSM_N_CODEBOOKS:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != CSM_N_CODEBOOKS:
        raise CSMError(f"codes must have shape [frames, {CSM_N_CODEBOOKS}], got {list(arr.shape)}")
    return _int32_array(arr, "codes")


def _samples_per_frame(model) -> int:
    return int(lib.csm_model_hparams(model).samples_per_frame) or SAMPLES_PER_FRAME


def decode(model, codes, n_threads: int | None = None) -> np.ndarray:
    """Decode codes [frames, 32] into float32 PCM at 24 kHz (frames * 1920 samples).

    Each call prepares the codec afresh (tens of ms at full size); to decode piece by piece, keep a
    MimiStreamDecoder instead.
    """
    h = _handle(model)
    arr = _codes_array(codes)
    n_frames = arr.shape[0]
    spf = _samples_per_frame(h)
    out = np.empty(n_frames * spf, dtype=np.float32)
    n = lib.csm_mimi_decode(h, arr.ctypes.data_as(_I32P), n_frames, out.ctypes.data_as(_F32P), out.size,
                            _threads(n_threads))
    check_status(n, "Mimi decode")
    return out[:n]


def encode(model, pcm, n_threads: int | None = None) -> np.ndarray:
    """Encode mono 24 kHz float PCM (1-D, or [1, n] / [n, 1]) into int32 codes [frames, 32].

    A partial last frame is padded as transformers' MimiModel.encode pads it: ceil(n / 1920) frames.
    """
    h = _handle(model)
    x = np.asarray(pcm)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise CSMError(f"pcm must be mono (1-D), got shape {list(x.shape)}")
    if x.dtype.kind != "f":
        raise CSMError(f"pcm must be floating point samples (about [-1, 1]), got dtype {x.dtype}; "
                       "scale integer PCM first, e.g. int16 / 32768")
    x = np.ascontiguousarray(x, dtype=np.float32)
    spf = _samples_per_frame(h)
    max_frames = -(-x.size // spf) + 1  # ceil(n / spf) frames, plus room
    out = np.empty((max_frames, CSM_N_CODEBOOKS), dtype=np.int32)
    n = lib.csm_mimi_encode(h, x.ctypes.data_as(_F32P), x.size, out.ctypes.data_as(_I32P), max_frames,
                            _threads(n_threads))
    check_status(n, "Mimi encode")
    return out[:n].copy()


class MimiStreamDecoder(NativeOwner):
    """Streaming Mimi decoder: feed frames in chunks of any size; the outputs, concatenated, equal
    decode() of all frames. Holds native state (caches, thread pool): close() it, or use ``with``.
    """

    def __init__(self, model, n_threads: int | None = None):
        self._owner = model  # a pycsm.Model stays referenced (the native codec holds its model too)
        h = _handle(model)
        n_threads = _threads(n_threads)
        self._spf = _samples_per_frame(h)
        self._native = NativeHandle(check_ptr(lib.csm_mimi_codec_new(h, n_threads), "Mimi stream decoder"),
                                    lib.csm_mimi_codec_free, "Mimi stream decoder")
        self.frames = 0  # frames decoded since creation or the last reset()

    def decode(self, codes) -> np.ndarray:
        """Decode the next frames ([frames, 32] or one frame [32]); returns frames * 1920 samples."""
        self._native.get()  # closed: say so before looking at the codes
        arr = _codes_array(codes)
        out = np.empty(arr.shape[0] * self._spf, dtype=np.float32)
        if arr.shape[0] == 0:
            return out
        with self._native.use() as codec:
            n = lib.csm_mimi_codec_decode(codec, arr.ctypes.data_as(_I32P), arr.shape[0],
                                          out.ctypes.data_as(_F32P), out.size)
        check_status(n, "Mimi stream decode")
        self.frames += arr.shape[0]
        return out[:n]

    def reset(self) -> None:
        """Forget the streamed state: the next decode() starts a new utterance."""
        with self._native.use() as codec:
            lib.csm_mimi_codec_reset(codec)
        self.frames = 0


class MimiBatchDecoder(NativeOwner):
    """Streaming Mimi decoder for up to n_slots streams at once: each slot keeps the streaming state
    of one stream, and one decode() call runs the next frames of any set of slots in a single native
    pass (every weight product serves all of them). A slot's outputs, concatenated, equal what a
    MimiStreamDecoder fed the same frames returns. reset(slot) when a new stream takes a slot.
    Holds native state (caches, thread pool): close() it, or use ``with``.
    """

    def __init__(self, model, n_slots: int, n_threads: int | None = None):
        self._owner = model  # a pycsm.Model stays referenced (the native decoder holds its model too)
        h = _handle(model)
        n_threads = _threads(n_threads)
        if not isinstance(n_slots, int) or isinstance(n_slots, bool):
            raise CSMError(f"n_slots must be an int, got {type(n_slots).__name__}")
        if not 1 <= n_slots <= 256:
            raise CSMError(f"n_slots {n_slots} is outside [1, 256]")
        self._spf = _samples_per_frame(h)
        self._native = NativeHandle(check_ptr(lib.csm_mimi_batch_decoder_new(h, n_slots, n_threads),
                                              "Mimi batch decoder"),
                                    lib.csm_mimi_batch_decoder_free, "Mimi batch decoder")
        self.n_slots = n_slots
        self.frames = [0] * n_slots  # per slot: frames decoded since creation or its last reset()

    def _slots(self, slots) -> np.ndarray:
        arr = np.asarray(slots).reshape(-1) if np.ndim(slots) else np.asarray([slots])
        arr = _int32_array(arr, "slots")
        if arr.size == 0:
            raise CSMError("no slots given")
        bad = (arr < 0) | (arr >= self.n_slots)
        if bad.any():
            raise CSMError(f"slot {arr[bad][0]} is outside [0, {self.n_slots})")
        if np.unique(arr).size != arr.size:
            raise CSMError(f"a slot is given twice in {arr.tolist()}")
        return arr

    def decode(self, slots, codes) -> np.ndarray:
        """Decode the next frames of each slot in `slots`: codes [len(slots), frames, 32] (every slot
        the same number of frames; [len(slots), 32] for one frame each). Returns float32
        [len(slots), frames * 1920], row i the audio of slots[i]."""
        self._native.get()  # closed: say so before looking at the arguments
        sl = self._slots(slots)
        arr = np.asarray(codes)
        if arr.ndim == 2 and arr.shape == (sl.size, CSM_N_CODEBOOKS):
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[0] != sl.size or arr.shape[2] != CSM_N_CODEBOOKS:
            raise CSMError(f"codes must have shape [{sl.size} slots, frames, {CSM_N_CODEBOOKS}], "
                           f"got {list(arr.shape)}")
        arr = _int32_array(arr, "codes")
        n_frames = arr.shape[1]
        out = np.empty((sl.size, n_frames * self._spf), dtype=np.float32)
        if n_frames == 0:
            return out
        with self._native.use() as dec:
            n = lib.csm_mimi_batch_decoder_decode(dec, sl.ctypes.data_as(_I32P), sl.size, arr.ctypes.data_as(_I32P),
                                                  n_frames, out.ctypes.data_as(_F32P), out.size)
        check_status(n, "Mimi batch decode")
        for s in sl.tolist():
            self.frames[s] += n_frames
        return out

    def reset(self, slot: int) -> None:
        """Forget one slot's streamed state: its next frames start a new utterance."""
        s = int(self._slots(slot)[0])
        with self._native.use() as dec:
            check_status(lib.csm_mimi_batch_decoder_reset(dec, s), "Mimi batch decoder reset")
        self.frames[s] = 0
