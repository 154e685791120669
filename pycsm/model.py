"""The loaded model: a native csm_model handle, its hyper-parameters and its tokenizer."""

from __future__ import annotations

import functools
import numbers
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from . import _native as N
from ._handle import NativeHandle, NativeOwner

DEVICES = {"auto": N.CSM_DEVICE_AUTO, "cpu": N.CSM_DEVICE_CPU, "gpu": N.CSM_DEVICE_GPU}

# general.file_type values (llama.cpp numbering) of the files people have.
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
              12: "q3_k", 15: "q4_k", 17: "q5_k", 18: "q6_k", 32: "bf16"}


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a CSM GGUF (mirror of struct csm_hparams)."""

    bb_n_layers: int
    bb_d_model: int
    bb_n_heads: int
    bb_n_kv_heads: int
    bb_head_dim: int
    bb_ff_dim: int
    bb_max_pos: int
    bb_rope_theta: float
    rms_norm_eps: float
    dp_n_layers: int
    dp_d_model: int
    dp_n_heads: int
    dp_n_kv_heads: int
    dp_head_dim: int
    dp_ff_dim: int
    dp_rope_theta: float
    text_vocab_size: int
    audio_vocab_size: int
    n_codebooks: int
    audio_eos_token_id: int
    audio_token_id: int
    bos_token_id: int
    codebook_eos_token_id: int
    codebook_pad_token_id: int
    mimi_dim: int
    mimi_n_heads: int
    mimi_n_layers: int
    mimi_codebook_dim: int
    mimi_codebook_size: int
    mimi_n_quantizers: int
    mimi_n_semantic: int
    sample_rate: int
    samples_per_frame: int
    frame_rate: float

    @classmethod
    def from_native(cls, h: N.csm_hparams) -> "HParams":
        return cls(**{f.name: getattr(h, f.name) for f in fields(cls)})


_log_lock = threading.Lock()
_log_target = None  # the Python callback messages go to


def _log_dispatch(level, text, _ud):
    target = _log_target
    if target is None:
        return
    try:
        target(int(level), text.decode("utf-8", "replace"))
    except Exception:  # never let an exception cross into C
        pass


# One C callback for the life of the process: a thread that is delivering a message while another
# replaces the Python callback still calls a live function (a dropped ctypes thunk would be freed
# code), and it reads the new target or the old one, both valid.
_log_thunk = N.csm_log_callback(_log_dispatch)


def set_log_callback(callback) -> None:
    """Route the native library's messages to callback(level: int, text: str); None silences it."""
    global _log_target
    with _log_lock:
        _log_target = callback
        N.lib.csm_log_set(_log_thunk if callback is not None else N.csm_log_callback(), None)


def check_n_threads(n_threads) -> int:
    """The one rule for every thread count in pycsm, applied before any work: None or 0 means all
    cores; otherwise 1 to CSM_MAX_THREADS (1024), and more than the CPUs this process may use
    (its affinity mask and cgroup quota) are capped to them. Returns the value for the C API (0 for all cores)."""
    if n_threads is None:
        return 0
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be an integer or None, got {n_threads!r}")
    if not 0 <= n_threads <= N.CSM_MAX_THREADS:
        raise ValueError(f"n_threads must be between 1 and {N.CSM_MAX_THREADS} (0 or None: all cores), got {n_threads}")
    return int(n_threads)


def system_info() -> str:
    """One line: ggml version, backends, CPU features and which kernel runs Q8_0/Q4_K matrices."""
    return N.lib.csm_system_info().decode()


@functools.lru_cache(maxsize=4)
def _tokenizer_for(path: str, mtime_ns: int, size: int):
    """The tokenizer of a GGUF, built once per file version (building it takes ~0.7 s)."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_gguf(path)


class Model(NativeOwner):
    """A CSM GGUF loaded by the native library.

    device: "auto", "cpu" or "gpu". use_mmap: map the file rather than read it (CPU, and only with
    use_repack=False: a load that copies the matrices reads the file, so that nothing a frame reads
    stays mapped). A mapped file must not be rewritten or truncated while the model lives (SIGBUS).
    use_repack: on the CPU, copy the matrices into faster layouts at load time: Q8_0, Q4_K and F16
    go to pycsm's kernel for this CPU (AVX512-VNNI, AVX2 or NEON; PYCSM_KERNEL forces one; then
    the depth heads of a quantised file run as Q8_0 too, those of an F16 file as F16), Q4_0 to
    ggml's repacked layout. False keeps ggml's plain kernels.
    close() releases this object; generators and stream decoders made from it keep working (they
    hold the native model).

    >>> m = Model("csm-1b-q8_0.gguf")
    >>> m.hparams.bb_d_model
    2048
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", use_mmap: bool = True,
                 use_repack: bool = True):
        path = Path(path)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {path}")
        params = N.lib.csm_model_default_params()
        params.device = DEVICES[device]
        params.use_mmap = bool(use_mmap)
        params.use_repack = bool(use_repack)
        self.path = path
        ptr = N.check_ptr(N.lib.csm_model_load(os.fsencode(path), params), f"cannot load {path}")
        self._native = NativeHandle(ptr, N.lib.csm_model_free, "model")
        with self._native.use() as h:
            self.hparams = HParams.from_native(N.lib.csm_model_hparams(h))
        self._tokenizer = None

    @property
    def handle(self) -> int:
        """The csm_model* for native calls (pycsm.codec). Contexts and codecs made from it keep the
        model alive in C; a call on the bare handle must not start after close()."""
        return self._native.get()

    def _query(self, fn):
        with self._native.use() as h:
            return fn(h)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            st = self.path.stat()
            self._tokenizer = _tokenizer_for(str(self.path.resolve()), st.st_mtime_ns, st.st_size)
        return self._tokenizer

    @property
    def file_type(self) -> str:
        ft = self._query(N.lib.csm_model_file_type)
        return FILE_TYPES.get(ft, "f16/f32 (unset)" if ft < 0 else f"type {ft}")

    @property
    def name(self) -> str:
        return self._query(N.lib.csm_model_name).decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        return int(self._query(N.lib.csm_model_n_params))

    @property
    def n_bytes(self) -> int:
        return int(self._query(N.lib.csm_model_n_bytes))

    @property
    def n_tensors(self) -> int:
        return int(self._query(N.lib.csm_model_n_tensors))

    @property
    def device(self) -> str:
        return self._query(N.lib.csm_model_device).decode()

    def info(self) -> dict:
        """Hyper-parameters, quantisation and size, for `pycsm info`."""
        d = {"path": str(self.path), "name": self.name, "file_type": self.file_type,
             "n_tensors": self.n_tensors, "n_params": self.n_params, "n_bytes": self.n_bytes,
             "device": self.device}
        d.update({f.name: getattr(self.hparams, f.name) for f in fields(HParams)})
        return d



def quantize(in_path: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "q8_0",
             n_threads: int | None = None, progress=None) -> None:
    """Quantise a CSM GGUF with ggml's functions (the published files' per-tensor rule).

    progress(done, total) may return False to abort (the partial output is removed).
    """
    types = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13, "q6_k": 14,
             "q2_k": 10, "q3_k": 11, "f16": 1, "bf16": 30, "f32": 0}
    if qtype not in types:
        raise ValueError(f"unknown quantisation type {qtype!r}; choose from {', '.join(types)}")
    if not Path(in_path).exists():
        raise FileNotFoundError(f"input model not found: {in_path}")
    params = N.lib.csm_quantize_default_params()
    params.type = types[qtype]
    params.n_threads = check_n_threads(n_threads)
    failure, user_stop = [], []

    def _cb(done, total, _ud):  # always set, so that Ctrl-C stops between tensors
        try:
            if progress is not None and progress(int(done), int(total)) is False:
                user_stop.append(True)
                return False
            return True
        except BaseException as e:
            failure.append(e)
            return False

    cb = N.csm_progress_callback(_cb)
    params.progress = cb
    status = N.lib.csm_quantize(os.fsencode(in_path), os.fsencode(out_path), params)
    if failure:
        raise failure[0]
    if status < 0 and "aborted" in N.last_error() and not user_stop:
        raise KeyboardInterrupt
    N.check_status(status, f"cannot quantise {in_path}")
