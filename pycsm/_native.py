"""ctypes mirror of native/include/csm.h, kept 1:1 with the header (same names, same order).

Nothing idiomatic lives here: the Python API is in pycsm.model / pycsm.codec. Every function is
declared with its argument and result types; `check_*` helpers turn C failures into CSMError
carrying csm_last_error().
"""

from __future__ import annotations

import ctypes
import os
import sys
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_uint64,
    c_void_p,
)
from pathlib import Path

from .errors import CSMError

CSM_N_CODEBOOKS = 32
CSM_N_COLUMNS = 33
CSM_TEXT_COLUMN = 32

CSM_MAX_THREADS = 1024
CSM_MAX_KV_BYTES = 8 << 30
CSM_API_VERSION = 2

# enum csm_log_level
CSM_LOG_DEBUG = 0
CSM_LOG_INFO = 1
CSM_LOG_WARN = 2
CSM_LOG_ERROR = 3

# enum csm_struct
CSM_STRUCT_MODEL_PARAMS = 0
CSM_STRUCT_HPARAMS = 1
CSM_STRUCT_QUANTIZE_PARAMS = 2
CSM_STRUCT_CONTEXT_PARAMS = 3
CSM_STRUCT_SAMPLING_PARAMS = 4
CSM_STRUCT_GENERATE_PARAMS = 5
CSM_STRUCT_GENERATE_RESULT = 6
CSM_STRUCT_BATCH_PARAMS = 7
CSM_STRUCT_STREAM_PARAMS = 8
CSM_STRUCT_BATCH_EVENT = 9

# enum csm_device
CSM_DEVICE_AUTO = 0
CSM_DEVICE_CPU = 1
CSM_DEVICE_GPU = 2

# enum csm_stop_reason
CSM_STOP_EOS = 0
CSM_STOP_MAX_FRAMES = 1
CSM_STOP_CONTEXT_FULL = 2
CSM_STOP_ABORTED = 3

csm_log_callback = CFUNCTYPE(None, c_int32, c_char_p, c_void_p)
csm_progress_callback = CFUNCTYPE(c_bool, c_int32, c_int32, c_void_p)
csm_frame_callback = CFUNCTYPE(c_bool, c_int32, POINTER(c_int32), c_void_p)


class csm_model_params(Structure):
    _fields_ = [
        ("device", c_int32),
        ("gpu_index", c_int32),
        ("use_mmap", c_bool),
        ("use_repack", c_bool),
    ]


class csm_hparams(Structure):
    _fields_ = [
        ("bb_n_layers", c_int32),
        ("bb_d_model", c_int32),
        ("bb_n_heads", c_int32),
        ("bb_n_kv_heads", c_int32),
        ("bb_head_dim", c_int32),
        ("bb_ff_dim", c_int32),
        ("bb_max_pos", c_int32),
        ("bb_rope_theta", c_float),
        ("rms_norm_eps", c_float),
        ("dp_n_layers", c_int32),
        ("dp_d_model", c_int32),
        ("dp_n_heads", c_int32),
        ("dp_n_kv_heads", c_int32),
        ("dp_head_dim", c_int32),
        ("dp_ff_dim", c_int32),
        ("dp_rope_theta", c_float),
        ("text_vocab_size", c_int32),
        ("audio_vocab_size", c_int32),
        ("n_codebooks", c_int32),
        ("audio_eos_token_id", c_int32),
        ("audio_token_id", c_int32),
        ("bos_token_id", c_int32),
        ("codebook_eos_token_id", c_int32),
        ("codebook_pad_token_id", c_int32),
        ("mimi_dim", c_int32),
        ("mimi_n_heads", c_int32),
        ("mimi_n_layers", c_int32),
        ("mimi_codebook_dim", c_int32),
        ("mimi_codebook_size", c_int32),
        ("mimi_n_quantizers", c_int32),
        ("mimi_n_semantic", c_int32),
        ("sample_rate", c_int32),
        ("samples_per_frame", c_int32),
        ("frame_rate", c_float),
    ]


class csm_quantize_params(Structure):
    _fields_ = [
        ("type", c_int32),
        ("n_threads", c_int32),
        ("progress", csm_progress_callback),
        ("progress_user_data", c_void_p),
    ]


class csm_context_params(Structure):
    _fields_ = [
        ("n_threads", c_int32),
        ("max_pos", c_int32),
        ("n_batch", c_int32),
    ]


class csm_sampling_params(Structure):
    _fields_ = [
        ("temperature", c_float),
        ("top_k", c_int32),
        ("depth_temperature", c_float),
        ("depth_top_k", c_int32),
        ("seed", c_uint64),
    ]


class csm_generate_params(Structure):
    _fields_ = [
        ("sampling", csm_sampling_params),
        ("max_frames", c_int32),
        ("stop_at_eos", c_bool),
        ("reuse_prompt", c_bool),
        ("on_frame", csm_frame_callback),
        ("user_data", c_void_p),
    ]


class csm_generate_result(Structure):
    _fields_ = [
        ("n_frames", c_int32),
        ("stop_reason", c_int32),
        ("n_prompt", c_int32),
        ("n_prompt_reused", c_int32),
        ("t_prefill_ms", c_double),
        ("t_backbone_ms", c_double),
        ("t_depth_ms", c_double),
    ]


class csm_batch_params(Structure):
    _fields_ = [
        ("n_threads", c_int32),
        ("max_pos", c_int32),
        ("max_streams", c_int32),
        ("prefill_chunk", c_int32),
        ("reuse_prompt", c_bool),
    ]


class csm_stream_params(Structure):
    _fields_ = [
        ("sampling", csm_sampling_params),
        ("max_frames", c_int32),
        ("stop_at_eos", c_bool),
    ]


class csm_batch_event(Structure):
    _fields_ = [
        ("stream", c_int64),
        ("frame_index", c_int32),
        ("stop_reason", c_int32),
        ("codes", c_int32 * CSM_N_CODEBOOKS),
    ]


csm_model_p = c_void_p
csm_context_p = c_void_p
csm_mimi_codec_p = c_void_p
csm_mimi_batch_decoder_p = c_void_p
csm_batch_p = c_void_p

# name: (restype, argtypes), in header order
_SIGNATURES = {
    "csm_log_set": (None, [csm_log_callback, c_void_p]),
    "csm_last_error": (c_char_p, []),
    "csm_version": (c_char_p, []),
    "csm_ggml_version": (c_char_p, []),
    "csm_ggml_build_version": (c_char_p, []),
    "csm_system_info": (c_char_p, []),
    "csm_api_version": (c_int32, []),
    "csm_struct_size": (c_int64, [c_int32]),
    "csm_model_default_params": (csm_model_params, []),
    "csm_model_load": (csm_model_p, [c_char_p, csm_model_params]),
    "csm_model_free": (None, [csm_model_p]),
    "csm_model_hparams": (csm_hparams, [csm_model_p]),
    "csm_model_file_type": (c_int32, [csm_model_p]),
    "csm_model_name": (c_char_p, [csm_model_p]),
    "csm_model_n_params": (c_uint64, [csm_model_p]),
    "csm_model_n_bytes": (c_uint64, [csm_model_p]),
    "csm_model_n_tensors": (c_int32, [csm_model_p]),
    "csm_model_device": (c_char_p, [csm_model_p]),
    "csm_quantize_default_params": (csm_quantize_params, []),
    "csm_quantize": (c_int32, [c_char_p, c_char_p, csm_quantize_params]),
    "csm_context_default_params": (csm_context_params, []),
    "csm_context_new": (csm_context_p, [csm_model_p, csm_context_params]),
    "csm_context_free": (None, [csm_context_p]),
    "csm_generate_default_params": (csm_generate_params, []),
    "csm_generate": (
        c_int32,
        [csm_context_p, POINTER(c_int32), c_int32, csm_generate_params, POINTER(c_int32), c_int32,
         POINTER(csm_generate_result)],
    ),
    "csm_generate_batch": (
        c_int32,
        [csm_context_p, c_int32, POINTER(POINTER(c_int32)), POINTER(c_int32), csm_generate_params,
         POINTER(POINTER(c_int32)), c_int32, POINTER(csm_generate_result)],
    ),
    "csm_eval_frame_logits": (
        c_int32,
        [csm_context_p, POINTER(c_int32), c_int32, POINTER(c_int32), POINTER(c_float), POINTER(c_float)],
    ),
    "csm_mimi_decode": (c_int64, [csm_model_p, POINTER(c_int32), c_int32, POINTER(c_float), c_int64, c_int32]),
    "csm_mimi_encode": (c_int32, [csm_model_p, POINTER(c_float), c_int64, POINTER(c_int32), c_int32, c_int32]),
    "csm_mimi_codec_new": (csm_mimi_codec_p, [csm_model_p, c_int32]),
    "csm_mimi_codec_free": (None, [csm_mimi_codec_p]),
    "csm_mimi_codec_reset": (None, [csm_mimi_codec_p]),
    "csm_mimi_codec_decode": (c_int64, [csm_mimi_codec_p, POINTER(c_int32), c_int32, POINTER(c_float), c_int64]),
    "csm_mimi_batch_decoder_new": (csm_mimi_batch_decoder_p, [csm_model_p, c_int32, c_int32]),
    "csm_mimi_batch_decoder_free": (None, [csm_mimi_batch_decoder_p]),
    "csm_mimi_batch_decoder_n_slots": (c_int32, [csm_mimi_batch_decoder_p]),
    "csm_mimi_batch_decoder_reset": (c_int32, [csm_mimi_batch_decoder_p, c_int32]),
    "csm_mimi_batch_decoder_decode": (
        c_int64,
        [csm_mimi_batch_decoder_p, POINTER(c_int32), c_int32, POINTER(c_int32), c_int32, POINTER(c_float), c_int64],
    ),
    "csm_batch_default_params": (csm_batch_params, []),
    "csm_stream_default_params": (csm_stream_params, []),
    "csm_batch_new": (csm_batch_p, [csm_model_p, csm_batch_params]),
    "csm_batch_free": (None, [csm_batch_p]),
    "csm_batch_add": (c_int64, [csm_batch_p, POINTER(c_int32), c_int32, csm_stream_params]),
    "csm_batch_remove": (c_int32, [csm_batch_p, c_int64]),
    "csm_batch_step": (c_int32, [csm_batch_p, POINTER(csm_batch_event), c_int32]),
    "csm_batch_n_streams": (c_int32, [csm_batch_p]),
    "csm_batch_n_running": (c_int32, [csm_batch_p]),
    "csm_batch_rows_reused": (c_int64, [csm_batch_p]),
}


def _library_candidates(platform: str = sys.platform) -> list[Path]:
    env = os.environ.get("PYCSM_LIBRARY")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    names = {"linux": "libcsm.so", "darwin": "libcsm.dylib", "win32": "csm.dll"}
    name = names.get(platform, "libcsm.so")
    found = [here / name]
    # a development build next to the sources (cmake -B build/dev first); sanitizer builds need
    # their runtime preloaded, so they are only used through PYCSM_LIBRARY
    builds = sorted(here.parent.glob(f"build/*/{name}"), key=lambda p: (p.parent.name != "dev", str(p)))
    found += [p for p in builds if "san" not in p.parent.name]
    return found


def _ggml_library_dirs() -> list[Path]:
    """The libggml package's folders of ggml libraries: lib64 / lib (Linux, macOS), bin (Windows DLLs)."""
    try:
        import libggml
    except ImportError:
        return []
    root = Path(libggml.__file__).resolve().parent
    return [root / sub for sub in ("bin", "lib64", "lib") if (root / sub).is_dir()]


_dll_directories = []  # os.add_dll_directory handles: the folders stay searchable while these live


def _prepare_ggml(platform: str = sys.platform) -> None:
    """Make libggml-python's libraries findable by the library about to be loaded.

    Linux: load them first (global symbols), so that a libcsm whose RUNPATH does not point at them
    (a build-tree library) still finds libggml*.so.0 by soname. Windows: Python does not search PATH
    for a DLL's dependencies, so ggml's folder is added with os.add_dll_directory. macOS: nothing,
    libcsm.dylib finds them through its @loader_path rpath."""
    dirs = _ggml_library_dirs()
    if platform == "win32":
        for d in dirs:
            _dll_directories.append(os.add_dll_directory(str(d)))
        return
    if not platform.startswith("linux"):
        return
    for d in dirs:
        if d.name == "bin":
            continue
        for name in ("libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0"):
            if (d / name).exists():
                try:
                    ctypes.CDLL(str(d / name), mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    return
        return


def _check_abi(lib: ctypes.CDLL, path: Path) -> None:
    """Refuse a library built from another csm.h than these declarations (a stale build tree): a
    struct of another size would be passed by value and read as garbage on either side."""
    rebuild = "rebuild it from these sources (cmake --build build/dev) or reinstall pycsm"
    if not hasattr(lib, "csm_api_version") or not hasattr(lib, "csm_struct_size"):
        raise ImportError(f"{path} is older than this pycsm (it has no ABI version): {rebuild}")
    lib.csm_api_version.restype = c_int32
    lib.csm_api_version.argtypes = []
    lib.csm_struct_size.restype = c_int64
    lib.csm_struct_size.argtypes = [c_int32]
    version = lib.csm_api_version()
    if version != CSM_API_VERSION:
        raise ImportError(f"{path} has C API version {version}, this pycsm expects {CSM_API_VERSION}: {rebuild}")
    for which, struct in _STRUCTS.items():
        size = lib.csm_struct_size(which)
        if size != ctypes.sizeof(struct):
            raise ImportError(f"{path}: struct {struct.__name__} is {size} bytes in the library but "
                              f"{ctypes.sizeof(struct)} in pycsm: {rebuild}")


_STRUCTS = {CSM_STRUCT_MODEL_PARAMS: csm_model_params, CSM_STRUCT_HPARAMS: csm_hparams,
            CSM_STRUCT_QUANTIZE_PARAMS: csm_quantize_params, CSM_STRUCT_CONTEXT_PARAMS: csm_context_params,
            CSM_STRUCT_SAMPLING_PARAMS: csm_sampling_params, CSM_STRUCT_GENERATE_PARAMS: csm_generate_params,
            CSM_STRUCT_GENERATE_RESULT: csm_generate_result, CSM_STRUCT_BATCH_PARAMS: csm_batch_params,
            CSM_STRUCT_STREAM_PARAMS: csm_stream_params, CSM_STRUCT_BATCH_EVENT: csm_batch_event}


def _load() -> ctypes.CDLL:
    # ggml_abort attaches gdb to print a backtrace unless this is set (it reads the variable when it
    # aborts); a user's own setting wins
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    _prepare_ggml()
    errors = []
    for path in _library_candidates():
        if not path.exists():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            break
        except OSError as e:  # e.g. libggml missing
            errors.append(f"{path}: {e}")
    else:
        detail = "; ".join(errors) or "not found next to the package (was it built? `pip install .`)"
        raise ImportError(f"cannot load pycsm's native library: {detail}")
    # PYCSM_SKIP_ABI_CHECK=1 loads an older library anyway, leaving out what it lacks: only for
    # replaying a finding against an old build (docs/hardening.md), never for use
    skip_abi = os.environ.get("PYCSM_SKIP_ABI_CHECK") == "1"
    if not skip_abi:
        _check_abi(lib, path)
    for fname, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, fname, None)
        if fn is None and skip_abi:
            continue
        fn = getattr(lib, fname)
        fn.restype = restype
        fn.argtypes = argtypes
    built, loaded = lib.csm_ggml_build_version().decode(), lib.csm_ggml_version().decode()
    if built != loaded:
        raise ImportError(
            f"pycsm was compiled against ggml {built} but ggml {loaded} is loaded; "
            f"reinstall pycsm against the installed libggml-python (or pin libggml-python to {built})"
        )
    return lib


lib = _load()


def last_error() -> str:
    return (lib.csm_last_error() or b"").decode("utf-8", "replace")


def check_ptr(ptr, what: str):
    """Raise CSMError with the C message when a constructor returned NULL."""
    if not ptr:
        raise CSMError(f"{what}: {last_error() or 'unknown error'}")
    return ptr


def check_status(value: int, what: str) -> int:
    """Raise CSMError with the C message when a call returned a negative value."""
    if value < 0:
        raise CSMError(f"{what}: {last_error() or 'unknown error'}")
    return value
