"""pycsm speed benchmark on full-size random-weight csm-1b GGUFs, with peers (CrispASR, transformers).

    python3 benchmarks/bench.py                          # f16, q8_0, q4_k + peers, 38 frames, 2 threads
    python3 benchmarks/bench.py --files q8_0,q4_k --no-transformers --json out.json
    python3 benchmarks/bench.py --no-peers --frames 20

Every configuration runs in a fresh subprocess (so peak RSS is its own: VmHWM of /proc/self/status).
Missing model files are made with benchmarks/make_model.py (random weights: speed does not depend on
the values, but random weights never end speech, so every system makes exactly --frames frames).
See benchmarks/README.md for what each column means. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # a source checkout: import this pycsm
    sys.path.insert(0, str(REPO))
TEXT = "Hello from the benchmark, this is a test."
SPEAKER = 0
FRAME_MS = 80.0  # one Mimi frame is 80 ms of audio (12.5 frames/s)
RESULT_TAG = "BENCH-RESULT "
BUSY_ROUNDS = 3  # rounds of the busy row (worker_pycsm_busy)


# ------------------------------------------------------------------------------------------
# Small helpers (used by the parent and the workers)
# ------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """VmHWM (peak resident set) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def cpu_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(max_wait_s: float, log, busy_limit: float = 0.15, quiet_s: int = 3) -> float:
    """Wait (up to max_wait_s) until the machine is idle: busy < busy_limit cores for quiet_s
    consecutive seconds. Returns the seconds waited."""
    t0 = time.perf_counter()
    quiet, told, peak = 0, False, 0.0
    while time.perf_counter() - t0 < max_wait_s:
        b0, w0 = cpu_busy_seconds(), time.perf_counter()
        time.sleep(1.0)
        busy = (cpu_busy_seconds() - b0) / (time.perf_counter() - w0)
        peak = max(peak, busy)
        quiet = quiet + 1 if busy < busy_limit else 0
        if quiet >= quiet_s:
            return time.perf_counter() - t0
        if not told and time.perf_counter() - t0 > 5:
            log(f"[bench] machine busy (up to {peak:.1f} cores used by other processes): "
                f"waiting up to {max_wait_s:.0f} s")
            told = True
    log("[bench] still busy: measuring anyway (the row is flagged)")
    return time.perf_counter() - t0


def emit(result: dict) -> None:
    result["peak_rss"] = peak_rss_bytes()
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def gguf_tensor_infos(path) -> list[tuple[str, list[int], int, int]]:
    """(name, ne, ggml type, n_bytes) of every tensor of a GGUF, reading only the header.

    (gguf.GGUFReader also works but takes several seconds on the 408k tokenizer strings.)"""
    import gguf

    with open(path, "rb") as f:
        head = f.read(64 << 20)  # the header of a CSM GGUF is ~7 MB
    buf = memoryview(head)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(p, vtype):
        if vtype == 8:  # string
            return p + 8 + struct.unpack_from("<Q", buf, p)[0]
        if vtype == 9:  # array
            etype, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if etype in fixed:
                return p + count * fixed[etype]
            for _ in range(count):
                p = skip(p, etype)
            return p
        return p + fixed[vtype]

    for _ in range(n_kv):
        pos = skip(pos, 8)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos = skip(pos + 4, vtype)
    out = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", buf, pos)
        name = bytes(buf[pos + 8:pos + 8 + n]).decode()
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", buf, pos)
        ne = list(struct.unpack_from(f"<{nd}Q", buf, pos + 4))
        (ttype,) = struct.unpack_from("<I", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        n_el = 1
        for d in ne:
            n_el *= d
        out.append((name, ne, ttype, n_el // block * size))
    return out


def per_frame_reads(path) -> dict:
    """Weights read per generated frame (bytes and elements), from the file's actual tensor sizes.

    backbone blocks + final norm + codebook-0 head: once; depth blocks + final norm + projection:
    31 times (one pass per codebook 1..31); depth heads: one [1024, 2051] slice per pass = the whole
    [2051, 1024, 31] tensor once. Embedding rows (a few KB) are left out."""
    bb = bb_el = dd = dd_el = heads = heads_el = 0
    for name, ne, _, nbytes in gguf_tensor_infos(path):
        n_el = 1
        for d in ne:
            n_el *= d
        if name.startswith("backbone.blk.") or name in ("backbone.output_norm.weight",
                                                        "backbone.codebook0_head.weight"):
            bb += nbytes
            bb_el += n_el
        elif name.startswith("depth.blk.") or name in ("depth.output_norm.weight", "depth.projection.weight"):
            dd += nbytes
            dd_el += n_el
        elif name == "depth.codebooks_head.weight":
            heads += nbytes
            heads_el += n_el
    n_passes = 31
    return {"bytes": bb + n_passes * dd + heads, "elements": bb_el + n_passes * dd_el + heads_el,
            "backbone_bytes": bb, "depth_bytes": n_passes * dd + heads}


# ------------------------------------------------------------------------------------------
# Workers (each runs in its own process: `bench.py --worker KIND ...`)
# ------------------------------------------------------------------------------------------

def worker_bandwidth(args) -> dict:
    """Memory read bandwidth: numpy reductions over a 1.5 GB array, 1 and `threads` Python threads
    (numpy drops the GIL inside reductions), best of 5 runs per method. The best figure is reported."""
    import numpy as np

    a = np.ones((1536 << 20) // 8, dtype=np.uint64)  # touched: all pages resident
    methods = {"sum_i64": lambda p: p.view(np.int64).sum(), "or_u64": lambda p: np.bitwise_or.reduce(p),
               "max_f32": lambda p: p.view(np.float32).max(), "max_u8": lambda p: p.view(np.uint8).max()}
    results = {}
    for nt in sorted({1, args.threads}):
        parts = np.array_split(a, nt)
        for mname, fn in methods.items():
            best = 0.0
            for _ in range(5):
                ths = [threading.Thread(target=fn, args=(p,)) for p in parts]
                t = time.perf_counter()
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                best = max(best, a.nbytes / (time.perf_counter() - t))
            results[f"{mname}_{nt}t"] = best
    key = max((k for k in results if k.endswith(f"_{args.threads}t")), key=results.get)
    return {"kind": "bandwidth", "bytes_per_s": results[key], "method": key, "all": results,
            "array_bytes": int(a.nbytes)}


def _pycsm_prompt(model):
    from pycsm.prompt import build_prompt

    return build_prompt(model.tokenizer, TEXT, SPEAKER)


def _mimi_stream(model, codes, threads):
    """Streaming Mimi decode, one frame at a time: pycsm.codec.MimiStreamDecoder when pycsm has it,
    else the C API (csm_mimi_codec_*) directly. Returns (first frame ms, mean ms per frame, note)."""
    import numpy as np

    try:
        from pycsm.codec import MimiStreamDecoder
    except ImportError:
        MimiStreamDecoder = None
    pcm_all, times = [], []
    try:
        if MimiStreamDecoder is not None:
            note = "pycsm.codec.MimiStreamDecoder, one frame per call"
            with MimiStreamDecoder(model.handle, n_threads=threads) as dec:
                for f in range(codes.shape[0]):
                    t = time.perf_counter()
                    pcm_all.append(dec.decode(codes[f:f + 1]))
                    times.append((time.perf_counter() - t) * 1e3)
        else:
            import ctypes

            from pycsm import _native as N

            note = "pycsm.codec missing: C API csm_mimi_codec_decode, one frame per call"
            spf = model.hparams.samples_per_frame
            codec = N.lib.csm_mimi_codec_new(model.handle, threads)
            if not codec:
                raise RuntimeError(N.lib.csm_last_error().decode(errors="replace"))
            try:
                for f in range(codes.shape[0]):
                    c = np.ascontiguousarray(codes[f:f + 1], dtype=np.int32)
                    pcm = np.zeros(spf, dtype=np.float32)
                    t = time.perf_counter()
                    n = N.lib.csm_mimi_codec_decode(codec, c.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), 1,
                                                    pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), spf)
                    times.append((time.perf_counter() - t) * 1e3)
                    if n < 0:
                        raise RuntimeError(N.lib.csm_last_error().decode(errors="replace"))
                    pcm_all.append(pcm)
            finally:
                N.lib.csm_mimi_codec_free(codec)
    except Exception as e:  # noqa: BLE001  (not implemented yet, or failing: report, go on)
        return None, None, f"Mimi unavailable: {e}"
    if not all(np.isfinite(p).all() for p in pcm_all):
        note += "; non-finite PCM"
    return times[0], float(np.mean(times)), note


VOICE_TEXT = "This is the reference recording that gives the voice, about ten seconds of a person speaking."


def _prefill(model, gen, threads) -> dict:
    """Prompt prefill with a voice context already encoded (a saved voice): 10 s (125 frames of codes
    and their text) and 40 s (500 frames) before the benchmark's text. Positions/s from the library's
    prefill time of the whole prompt (reuse_prompt off; the fastest of 3); time to first audio with
    the 10 s context = the call to the first frame's callback + that frame's Mimi decode (on a stream
    decoder made beforehand and reset, as CSM.stream keeps one: making it costs 25-35 ms), for a first
    request (whole prefill) and for a later one with the same voice and another text (the voice's
    rows reused); and the Mimi encode of 10 s of audio, which a voice made from a recording costs once."""
    import numpy as np

    from pycsm.codec import MimiStreamDecoder, encode
    from pycsm.prompt import build_prompt

    rng = np.random.default_rng(0)
    out = {}
    for seconds in (10, 40):
        codes = rng.integers(1, 2048, (int(seconds * 1000 / FRAME_MS), 32), dtype=np.int32)
        prompt = build_prompt(model.tokenizer, TEXT, SPEAKER, [(SPEAKER, VOICE_TEXT, codes)])
        other = build_prompt(model.tokenizer, VOICE_TEXT, SPEAKER, [(SPEAKER, VOICE_TEXT, codes)])

        def first_audio(p, seed, reuse):
            stamps = []
            dec.reset()  # CSM.stream keeps one stream decoder and resets it per request
            t0 = time.perf_counter()
            res = gen.generate(p, temperature=0.9, top_k=50, seed=seed, max_frames=1, stop_at_eos=False,
                               reuse_prompt=reuse, on_frame=lambda i, c: stamps.append(time.perf_counter()))
            first = (stamps[0] - t0) * 1e3
            t = time.perf_counter()
            dec.decode(res.codes[:1])
            first += (time.perf_counter() - t) * 1e3
            return res, first

        best, ttfa, ttfa_reused, n_reused = None, None, None, 0
        dec = MimiStreamDecoder(model.handle, n_threads=threads)
        for rep in range(3):
            res, first = first_audio(prompt, 7 + rep, False)
            ttfa = first if ttfa is None else min(ttfa, first)
            best = res.t_prefill_ms if best is None else min(best, res.t_prefill_ms)
            if seconds == 10:  # the same voice with another text after this request: its rows are reused
                res, first = first_audio(other, 17 + rep, True)
                n_reused = res.n_prompt_reused
                ttfa_reused = first if ttfa_reused is None else min(ttfa_reused, first)
        dec.close()
        n = int(prompt.shape[0])
        out[f"{seconds}s"] = {"positions": n, "prefill_ms": round(best, 1), "positions_per_s": round(n / best * 1e3, 1)}
        if seconds == 10:
            out[f"{seconds}s"].update(ttfa_ms=round(ttfa, 1), ttfa_reused_ms=round(ttfa_reused, 1),
                                      reused_positions=n_reused, reused_of=int(other.shape[0]))
    pcm = (rng.standard_normal(240000) * 0.1).astype(np.float32)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        encode(model.handle, pcm, n_threads=threads)
        times.append((time.perf_counter() - t) * 1e3)
    out["mimi_encode_10s_ms"] = round(min(times), 1)
    return out


def worker_pycsm(args) -> dict:
    from pycsm import __version__
    from pycsm.generator import Generator
    from pycsm.model import Model

    N = args.frames
    t = time.perf_counter()
    model = Model(args.file, device="cpu")
    load_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    prompt = _pycsm_prompt(model)
    tok_ms = (time.perf_counter() - t) * 1e3
    gen = Generator(model, n_threads=args.threads)
    from pycsm import _native

    out = {"kind": "pycsm", "file": str(args.file), "file_type": model.file_type, "frames": N,
           "prompt_positions": int(prompt.shape[0]), "load_ms": load_ms, "tokenizer_ms": tok_ms,
           "version": __version__, "library": _native.lib._name}

    def timed(max_frames, seed):
        stamps = []
        t0 = time.perf_counter()
        res = gen.generate(prompt, temperature=0.9, top_k=50, seed=seed, max_frames=max_frames,
                           stop_at_eos=False, reuse_prompt=False, on_frame=lambda i, c: stamps.append(time.perf_counter()))
        return res, (time.perf_counter() - t0) * 1e3, [(s - t0) * 1e3 for s in stamps]

    # cold: the first call after loading (graphs built, weights paged in)
    res, wall, stamps = timed(2, 1)
    out["cold_first_frame_ms"] = stamps[0]
    res, wall, stamps = timed(N, 2)
    n = len(res.codes)
    out.update(n_frames=n, stop_reason=res.stop_reason, wall_ms=wall, prefill_ms=res.t_prefill_ms,
               backbone_ms=res.t_backbone_ms, depth_ms=res.t_depth_ms, first_frame_ms=stamps[0])
    out["ms_per_frame"] = (wall - res.t_prefill_ms) / n
    out["backbone_ms_per_frame"] = res.t_backbone_ms / n
    out["depth_ms_per_frame"] = res.t_depth_ms / n
    out["overhead_ms_per_frame"] = out["ms_per_frame"] - (res.t_backbone_ms + res.t_depth_ms) / n
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    out["frame_gap_ms"] = {"min": min(gaps), "median": sorted(gaps)[len(gaps) // 2], "max": max(gaps)} if gaps else {}
    first, mean, note = _mimi_stream(model, res.codes, args.threads)
    out["mimi_note"] = note
    out["mimi_ms_per_frame"] = mean
    out["ttfa_ms"] = stamps[0] + (first or 0.0)
    out["ttfa_includes_mimi"] = first is not None
    out["kernel"] = system_info_kernel()
    if args.prefill:
        out["prefill"] = _prefill(model, gen, args.threads)
    return out


def system_info_kernel() -> str:
    """Which kernel runs the quantised products in this process (pycsm's system_info, its last field)."""
    from pycsm.model import system_info

    return system_info().rsplit("matmul: ", 1)[-1]


def worker_pycsm_busy(args) -> dict:
    """ms/frame with one busy process beside it (a Python loop spinning, pinned to the last CPU this
    process may use), for the default thread count, 1 thread and --threads threads, and the default
    count on the idle machine, in BUSY_ROUNDS rounds (idle, then the three beside the spinner): the
    host's speed drifts between minutes, so each round's ratios compare neighbouring runs, and the
    medians of the rounds are reported (the ms/frame too, each the median of its runs)."""
    import statistics

    import numpy as np

    from pycsm.generator import Generator
    from pycsm.model import Model

    model = Model(args.file, device="cpu")
    prompt = _pycsm_prompt(model)
    cpus = sorted(os.sched_getaffinity(0))

    def ms_per_frame(n_threads):
        with Generator(model, n_threads=n_threads) as gen:
            gen.generate(prompt, seed=1, max_frames=2, stop_at_eos=False)  # warm-up
            stamps = []
            gen.generate(prompt, temperature=0.9, top_k=50, seed=2, max_frames=args.frames, stop_at_eos=False,
                         on_frame=lambda i, c: stamps.append(time.perf_counter()))
        return float(np.mean(np.diff(stamps))) * 1e3  # the frame loop (the prefill is before frame 0)

    n = args.threads
    rounds = []
    for _ in range(BUSY_ROUNDS):
        r = {"idle_default_ms": ms_per_frame(0)}
        spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpus[-1]}}})\nwhile True: pass"])
        try:
            time.sleep(0.5)
            r["busy_default_ms"] = ms_per_frame(0)
            r["busy_1_ms"] = ms_per_frame(1)
            r[f"busy_{n}_ms"] = ms_per_frame(n)
        finally:
            spin.kill()
            spin.wait()
        time.sleep(0.5)
        r["default_vs_1_thread"] = r["busy_default_ms"] / r["busy_1_ms"]
        r["default_vs_idle"] = r["busy_default_ms"] / r["idle_default_ms"]
        rounds.append(r)
    out = {"kind": "pycsm-busy", "file": str(args.file), "frames": args.frames, "cpus": len(cpus),
           "kernel": system_info_kernel(), "rounds": rounds}
    for key in rounds[0]:
        out[key] = statistics.median(r[key] for r in rounds)
    return out


def _interleaved(model, prompts, threads, n_frames, seed) -> dict:
    """One stream (prompts[0]) and a batch of all prompts, generating n_frames frames each in turns:
    two threads, each with its own context, hand a turn token to each other after every frame step
    (from the frame callback, which csm_generate_batch calls once per utterance per step, in order).
    Each side's step times exclude its first step (which holds its prefill); the prefills are timed by
    the library. Returns frames/s of the frame loop alone and with the prefills, and their ratios."""
    import ctypes

    import numpy as np

    from pycsm import _native as N
    from pycsm.generator import Generator, _i32p

    sides = [(Generator(model, n_threads=threads), prompts[:1]), (Generator(model, n_threads=threads, n_batch=len(prompts)), prompts)]
    cond = threading.Condition()
    turn, finished, steps, prefill, errors = [0], [False, False], [[], []], [0.0, 0.0], []

    def pass_turn(i):  # with cond held
        turn[0] = 1 - i if not finished[1 - i] else i
        cond.notify_all()

    def side(i):
        gen, ps = sides[i]
        B, calls, t0 = len(ps), [0], [None]

        def cb(_idx, _codes, _ud):
            calls[0] += 1
            if calls[0] % B:
                return True
            now = time.perf_counter()
            if t0[0] is not None:
                steps[i].append(now - t0[0])
            with cond:
                pass_turn(i)
                cond.wait_for(lambda: turn[0] == i)
            t0[0] = time.perf_counter()
            return True

        try:
            with cond:
                cond.wait_for(lambda: turn[0] == i)
            gen.generate_batch(ps, seed=1, max_frames=2, stop_at_eos=False)  # warm-up (graphs, pages)
            params = gen._params(0.9, 50, None, None, seed, n_frames, False)
            params.reuse_prompt = False  # each run prefills its prompts whole
            params.on_frame = callback = N.csm_frame_callback(cb)
            arrs = [np.ascontiguousarray(p, dtype=np.int32) for p in ps]
            outs = [np.zeros((n_frames, N.CSM_N_CODEBOOKS), dtype=np.int32) for _ in ps]
            res = (N.csm_generate_result * B)()
            rc = N.lib.csm_generate_batch(
                gen.handle, B, (ctypes.POINTER(ctypes.c_int32) * B)(*[_i32p(a) for a in arrs]),
                (ctypes.c_int32 * B)(*[a.shape[0] for a in arrs]), params,
                (ctypes.POINTER(ctypes.c_int32) * B)(*[_i32p(o) for o in outs]), n_frames, res)
            N.check_status(rc, "batched generation failed")
            del callback
            prefill[i] = sum(r.t_prefill_ms for r in res)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            with cond:
                finished[i] = True
                pass_turn(i)
            gen.close()

    threads_ = [threading.Thread(target=side, args=(i,)) for i in range(2)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    if errors:
        raise errors[0]
    n = min(len(steps[0]), len(steps[1]))
    if n == 0:
        raise RuntimeError("no interleaved steps were timed")
    B = len(prompts)
    loop = [sum(steps[i][:n]) / n * 1e3 for i in range(2)]  # ms per step
    dec = [1e3 / loop[0], B * 1e3 / loop[1]]
    full = [n_frames / (prefill[0] + n_frames * loop[0]) * 1e3,
            B * n_frames / (prefill[1] + n_frames * loop[1]) * 1e3]
    return {"steps": n, "one_ms_per_step": round(loop[0], 2), "batch_ms_per_step": round(loop[1], 2),
            "one_prefill_ms": round(prefill[0], 1), "batch_prefill_ms": round(prefill[1], 1),
            "one_decode_fps": round(dec[0], 3), "batch_decode_fps": round(dec[1], 3),
            "decode_ratio": round(dec[1] / dec[0], 3),
            "one_fps": round(full[0], 3), "batch_fps": round(full[1], 3), "ratio": round(full[1] / full[0], 3)}


def worker_pycsm_batch(args) -> dict:
    from pycsm.generator import Generator
    from pycsm.model import Model
    from pycsm.prompt import build_prompt

    N, B = args.frames, args.batch
    model = Model(args.file, device="cpu")
    prompts = [build_prompt(model.tokenizer, TEXT, s % 4) for s in range(B)]
    out = {"kind": "pycsm-batch", "file": str(args.file), "file_type": model.file_type, "frames": N, "batch": B}
    try:
        gen = Generator(model, n_threads=args.threads, n_batch=B)
        gen.generate_batch(prompts, seed=1, max_frames=2, stop_at_eos=False)  # warm-up
        t = time.perf_counter()
        results = gen.generate_batch(prompts, temperature=0.9, top_k=50, seed=2, max_frames=N, stop_at_eos=False,
                                     reuse_prompt=False)
        wall = (time.perf_counter() - t) * 1e3
        gen.close()  # (its state out of the peak RSS of what follows)
        # One stream and the batch interleaved frame by frame in this process, so both see the same
        # memory bandwidth (on a shared host it drifts by tens of percent within seconds).
        interleaved = [_interleaved(model, prompts, args.threads, N, 3 + i) for i in range(args.interleaved)]
    except Exception as e:  # noqa: BLE001  (unimplemented or failing: report, do not abort the benchmark)
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["interleaved"] = interleaved
    total = sum(len(r.codes) for r in results)
    prefill = sum(r.t_prefill_ms for r in results)  # the prompts are prefilled one after another
    out.update(n_frames=total, wall_ms=wall, prefill_ms=prefill, frames_per_s=total / wall * 1e3,
               ms_per_frame=(wall - prefill) / total,
               backbone_ms_per_frame=results[0].t_backbone_ms / max(1, len(results[0].codes)) / B,
               depth_ms_per_frame=results[0].t_depth_ms / max(1, len(results[0].codes)) / B)
    return out


def _crispasr_lib():
    import ctypes

    import crispasr

    lib = ctypes.CDLL(str(Path(crispasr.__file__).parent / "libcrispasr.so"))

    class Params(ctypes.Structure):
        _fields_ = [("n_threads", ctypes.c_int), ("verbosity", ctypes.c_int), ("use_gpu", ctypes.c_bool),
                    ("temperature", ctypes.c_float), ("topk", ctypes.c_int), ("seed", ctypes.c_uint64),
                    ("max_audio_tokens", ctypes.c_int)]

    lib.csm_tts_context_default_params.restype = Params
    lib.csm_tts_init_from_file.restype = ctypes.c_void_p
    lib.csm_tts_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.csm_tts_run_generate_codes.restype = ctypes.c_int
    lib.csm_tts_run_generate_codes.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32),
                                               ctypes.c_int]
    lib.csm_tts_free.argtypes = [ctypes.c_void_p]
    return lib, Params


class _StderrClock:
    """Redirects fd 2 through a pipe and timestamps lines as they arrive (CrispASR logs
    "csm_tts: generated N audio frames" when generation ends and Mimi decoding starts)."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._r = r
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        with os.fdopen(self._r, "rb", buffering=0) as f:
            pending = b""
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                now = time.perf_counter()
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self.lines.append((now, line.decode(errors="replace")))
                    os.write(self._saved, line + b"\n")

    def last(self, needle: str, after: float) -> float | None:
        time.sleep(0.05)  # let the pump catch up
        hits = [t for t, line in self.lines if needle in line and t >= after]
        return hits[-1] if hits else None


def worker_crispasr(args) -> dict:
    import ctypes

    import crispasr

    N = args.frames
    out = {"kind": "crispasr", "file": str(args.file), "frames": N, "version": getattr(crispasr, "__version__", "?")}
    clock = _StderrClock()
    lib, _ = _crispasr_lib()
    p = lib.csm_tts_context_default_params()
    p.n_threads = args.threads
    p.verbosity = 1
    t = time.perf_counter()
    ctx = lib.csm_tts_init_from_file(os.fsencode(str(args.file)), p)
    out["load_ms"] = (time.perf_counter() - t) * 1e3
    if not ctx:
        out["error"] = "csm_tts_init_from_file failed"
        return out
    text = f"[{SPEAKER}]{TEXT}" if args.crispasr_speaker_prefix else TEXT

    def run(cap):
        codes = (ctypes.c_int32 * (cap * 32))()
        t0 = time.perf_counter()
        n = lib.csm_tts_run_generate_codes(ctx, text.encode(), codes, cap)
        t_end = time.perf_counter()
        t_gen = clock.last("generated", t0)
        return n, t0, t_gen, t_end

    n_small = 2
    run(n_small)  # warm-up (graph allocation, page-in)
    n2, a0, a_gen, a_end = run(n_small)
    n, b0, b_gen, b_end = run(N)
    out["n_frames"] = n
    if n < 0 or n2 < 0:
        out["error"] = f"csm_tts_run_generate_codes returned {n} / {n2}"
        return out
    if a_gen is None or b_gen is None:  # no log line: fall back to whole calls (includes Mimi)
        out["note"] = "no 'generated' log line; ms/frame includes Mimi decode"
        a_gen, b_gen = a_end, b_end
    out["ms_per_frame"] = ((b_gen - b0) - (a_gen - a0)) * 1e3 / (n - n2)
    out["gen_ms"] = (b_gen - b0) * 1e3
    out["prefill_and_first_frames_ms"] = (a_gen - a0) * 1e3
    out["mimi_ms_per_frame"] = (b_end - b_gen) * 1e3 / n
    out["ttfa_ms"] = (b_end - b0) * 1e3  # not streaming: audio comes when the whole utterance is done
    out["ttfa_note"] = "whole utterance (no streaming)"
    lib.csm_tts_free(ctx)
    return out


def _random_transformers_model(dtype):
    """A full-size CsmForConditionalGeneration (transformers' default CsmConfig = csm-1b sizes) with
    random weights of the same scales as make_model.py, built without the (slow) default init."""
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    cfg = CsmConfig()
    t = time.perf_counter()
    with no_init_weights():
        model = CsmForConditionalGeneration._from_config(cfg, dtype=dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, prm in model.named_parameters():
            if prm.ndim >= 2:
                fan_in = prm.shape[1] if "codebooks_head" in name else int(prm[0].numel())
                std = 1.0 if name == "embed_text_tokens.weight" else fan_in ** -0.5
                prm.normal_(0.0, std, generator=g)
            elif "norm" in name:
                prm.fill_(1.0)
            elif "scale" in name:
                prm.fill_(0.05)
            else:
                prm.normal_(0.0, 0.02, generator=g)
        for name, buf in model.named_buffers():
            if name.endswith("embed_sum"):
                buf.normal_(0.0, 0.3, generator=g)
            elif name.endswith(("cluster_usage", "initialized")):
                buf.fill_(1.0)
        # codes 2048..2050 are not Mimi codes (as in make_model.py)
        model.lm_head.weight[2048:] *= 0.01
        model.depth_decoder.codebooks_head.weight[:, :, 2048:] *= 0.01
    model.eval()
    return cfg, model, (time.perf_counter() - t) * 1e3


def worker_transformers(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    N = args.frames
    out = {"kind": "transformers", "dtype": args.dtype, "frames": N, "version": transformers.__version__,
           "torch": torch.__version__}
    _, model, build_ms = _random_transformers_model(dtype)
    out["load_ms"] = build_ms
    out["load_note"] = "random init, not a file load"
    # The prompt pycsm uses (text rows only): the same token ids.
    sys.path.insert(0, str(REPO))
    from pycsm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(args.file)
    ids = torch.tensor([tok.encode_segment(TEXT, SPEAKER)])
    depth_time = [0.0]
    dd_generate = model.depth_decoder.generate

    def timed_dd(*a, **k):
        t = time.perf_counter()
        r = dd_generate(*a, **k)
        depth_time[0] += time.perf_counter() - t
        return r

    model.depth_decoder.generate = timed_dd
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)  # warm-up
        depth_time[0] = 0.0
        t = time.perf_counter()
        codes = model.generate(input_ids=ids, max_new_tokens=N, do_sample=False)
        wall = (time.perf_counter() - t) * 1e3
        n = int(codes.shape[1]) if codes.ndim == 3 else -1
        out.update(n_frames=n, wall_ms=wall, ms_per_frame=wall / max(n, 1),
                   depth_ms_per_frame=depth_time[0] * 1e3 / max(n, 1),
                   backbone_ms_per_frame=(wall - depth_time[0] * 1e3) / max(n, 1))
        try:
            t = time.perf_counter()
            c = (codes[:, :, :32] if codes.shape[-1] > 32 else codes).clamp(0, 2047)
            model.codec_model.decode(c.transpose(1, 2).contiguous())
            out["mimi_ms_per_frame"] = (time.perf_counter() - t) * 1e3 / max(n, 1)
        except Exception as e:  # noqa: BLE001
            out["mimi_note"] = f"Mimi decode failed: {e}"
    return out


WORKERS = {"bandwidth": worker_bandwidth, "pycsm": worker_pycsm, "pycsm-batch": worker_pycsm_batch,
           "crispasr": worker_crispasr, "transformers": worker_transformers, "pycsm-busy": worker_pycsm_busy}


# ------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------

def _speed(r: dict) -> float:
    """Higher is faster: frames per second of a run (batch), else 1 / ms per frame."""
    if "error" in r:
        return -1.0
    if r.get("frames_per_s"):
        return r["frames_per_s"]
    ms = r.get("ms_per_frame")
    return 1e3 / ms if ms else 0.0


def _best(kind: str, runs: list[dict]) -> dict:
    """The fastest of a configuration's runs, with every run's speed (JSON `repeats`)."""
    if len(runs) == 1:
        return runs[0]
    best = max(runs, key=_speed)
    best["repeats"] = [round(1e3 / _speed(r), 2) if _speed(r) > 0 else None for r in runs]
    prefills = [r["prefill"] for r in runs if r.get("prefill")]
    if prefills:  # each prefill measurement the fastest of the runs too, not the fastest frame loop's
        merged = {}
        for key in ("10s", "40s"):
            have = [p[key] for p in prefills if p.get(key, {}).get("positions_per_s")]
            if have:
                merged[key] = dict(max(have, key=lambda x: x["positions_per_s"]))
                for t in ("ttfa_ms", "ttfa_reused_ms"):
                    if any(t in x for x in have):
                        merged[key][t] = min(x[t] for x in have if t in x)
        enc = [p["mimi_encode_10s_ms"] for p in prefills if p.get("mimi_encode_10s_ms")]
        if enc:
            merged["mimi_encode_10s_ms"] = min(enc)
        best["prefill"] = merged
        best["prefill_repeats"] = prefills
    if kind == "pycsm-batch":  # the interleaved comparisons of every run
        best["interleaved"] = [p for r in runs for p in r.get("interleaved", [])]
    return best


def run_worker(kind: str, args, log, **extra) -> dict:
    """Runs one configuration --repeat times (each as below) and keeps the fastest run: memory
    bandwidth on a shared host drifts by tens of percent over minutes, invisibly to the CPU check,
    and every system gets the same best-of-N treatment. The speeds of all runs are kept in the JSON."""
    if kind == "bandwidth" or args.repeat <= 1:
        return _run_worker_undisturbed(kind, args, log, **extra)
    return _best(kind, [_run_worker_undisturbed(kind, args, log, **extra) for _ in range(args.repeat)])


def run_round_robin(configs: list[tuple[str, dict]], args, log) -> list[dict]:
    """Like run_worker for several configurations (kind, worker options) of one file, taking turns: one
    run of each, then the next round, so that each one's best-of-N comes from the same stretch of time
    (the systems compared on a file see the same bandwidth drift)."""
    runs = [[] for _ in configs]
    for _ in range(max(1, args.repeat)):
        for i, (k, extra) in enumerate(configs):
            # the bandwidth of this moment, for this run's bound (it drifts between runs)
            bw = _run_worker_undisturbed("bandwidth", args, log).get("bytes_per_s")
            r = _run_worker_undisturbed(k, args, log, **extra)
            r["bandwidth_before"] = bw
            runs[i].append(r)
    return [_best(k, runs[i]) for i, (k, _) in enumerate(configs)]


def _run_worker_undisturbed(kind: str, args, log, **extra) -> dict:
    """Runs one configuration; re-runs it (up to --retries times) when other processes used more than
    0.15 cores meanwhile, and keeps the least disturbed run."""
    best = None
    for attempt in range(1 + max(0, args.retries)):
        r = _run_worker_once(kind, args, log, **extra)
        if best is None or ("error" not in r and r.get("foreign_cores", 0) < best.get("foreign_cores", 1e9)) \
                or "error" in best:
            best = r
        if "error" in r or r.get("foreign_cores", 0) <= 0.15:
            break
        if attempt < args.retries:
            log(f"[bench] disturbed ({r['foreign_cores']:.2f} cores used by others): running it again")
    best["attempts"] = attempt + 1
    return best


def _run_worker_once(kind: str, args, log, **extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--frames", str(args.frames),
           "--threads", str(args.threads), "--batch", str(args.batch), "--interleaved", str(args.interleaved)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.crispasr_speaker_prefix:
        cmd.append("--crispasr-speaker-prefix")
    if args.no_prefill:
        cmd.append("--no-prefill")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    label = (f"{kind} {extra.get('file', '') and Path(extra['file']).name} {extra.get('dtype', '')} "
             f"{extra.get('use_kernel', '')}").strip()
    waited = wait_until_idle(args.wait_idle, log) if args.wait_idle > 0 else 0.0
    log(f"[bench] running {label} ...")
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = cpu_busy_seconds()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    dt = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # CPU used by other processes while this worker ran, in cores (0 = the machine was ours)
    foreign = max(0.0, (cpu_busy_seconds() - busy0 - own) / dt)
    results = [json.loads(line[len(RESULT_TAG):]) for line in p.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if p.returncode != 0 or not results:
        tail = (p.stdout + p.stderr)[-2000:]
        log(f"[bench] {label} failed (exit {p.returncode}):\n{tail}")
        return {"kind": kind, "error": f"exit {p.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                **extra}
    r = results[-1]
    r["worker_s"] = dt
    r["foreign_cores"] = foreign
    r["waited_idle_s"] = waited
    log(f"[bench] {label} done in {dt:.0f} s (other processes used {foreign:.2f} cores meanwhile)")
    return r


def fmt(v, spec=".0f", dash="-"):
    return dash if v is None else format(v, spec)


def build_rows(results, reads, bandwidth, files, kernels=None):
    crisp = {r["file"]: r for r in results if r["kind"] == "crispasr" and "ms_per_frame" in r}
    rows = []
    order = {"pycsm": 0, "pycsm-batch": 1, "crispasr": 2, "transformers": 3}
    kindex = {k: i for i, k in enumerate(kernels or [])}
    findex = {f: i for i, f in enumerate(files)}
    results = sorted(results, key=lambda r: (r["kind"] == "transformers", findex.get(r.get("file"), 99),
                                             kindex.get(r.get("use_kernel"), -1), order.get(r["kind"], 9),
                                             r.get("dtype") or ""))
    for r in results:
        kind = r["kind"]
        if kind in ("bandwidth", "pycsm-busy"):  # the busy rows have their own notes
            continue
        if kind == "transformers":
            name, ftype = f"transformers {r['dtype']}", r["dtype"]
            elements = reads[files[0]]["elements"] if files else None
            nbytes = elements * (4 if r["dtype"] == "fp32" else 2) if elements else None
        else:
            ftype = Path(r.get("file", "?")).stem.rsplit("-", 1)[-1]
            name = {"pycsm": "pycsm", "pycsm-batch": f"pycsm batch x{r.get('batch', '?')}",
                    "crispasr": "CrispASR", "pycsm-busy": "pycsm busy"}[kind]
            if r.get("use_kernel"):
                name += f" {r['use_kernel']}"
            nbytes = reads.get(r.get("file"), {}).get("bytes")
        ms = r.get("ms_per_frame")
        bw = r.get("bandwidth_before") or bandwidth  # measured just before this run, when it was
        bound = nbytes / bw * 1e3 if nbytes and bw else None
        if kind == "pycsm-batch" and bound:
            bound /= r.get("batch", 1)  # one weight read serves the whole batch
        vs = None
        if kind in ("pycsm", "pycsm-batch") and r.get("file") in crisp and ms:
            vs = crisp[r["file"]]["ms_per_frame"] / ms
        rows.append(dict(system=name, file=ftype, ms=ms, bb=r.get("backbone_ms_per_frame"),
                         dd=r.get("depth_ms_per_frame"), mimi=r.get("mimi_ms_per_frame"),
                         rtf=ms / FRAME_MS if ms else None, bw=bw, bound=bound,
                         x_bound=ms / bound if ms and bound else None, vs_crisp=vs, ttfa=r.get("ttfa_ms"),
                         load=r.get("load_ms"), rss=r.get("peak_rss"), error=r.get("error"),
                         frames=r.get("n_frames"), foreign=r.get("foreign_cores"), kernel=r.get("use_kernel"),
                         kind=kind, path=r.get("file")))
    return rows


def print_table(rows, bandwidth, bw_method, args, out=print):
    out("")
    out(f"CSM-1B random weights, {args.frames} frames ({args.frames * FRAME_MS / 1000:.2f} s of audio), "
        f"{args.threads} threads, {platform.processor() or platform.machine()}; memory read bandwidth at the start "
        f"{bandwidth / 1e9:.1f} GB/s ({bw_method}; column bw: measured just before the row's run, its bound's basis)"
        + (f"; each row the fastest of {args.repeat} runs" if int(getattr(args, "repeat", 1) or 1) > 1 else ""))
    hdr = ["system", "file", "ms/frame", "backbone", "depth", "Mimi", "RTF", "bw GB/s", "bound", "x bound",
           "vs CrispASR", "TTFA ms", "load ms", "peak RSS", "frames", "busy"]
    table = []
    for r in rows:
        if r["error"]:
            table.append([r["system"], r["file"], "error: " + r["error"][:60]] + [""] * (len(hdr) - 3))
            continue
        table.append([r["system"], r["file"], fmt(r["ms"], ".1f"), fmt(r["bb"], ".1f"), fmt(r["dd"], ".1f"),
                      fmt(r["mimi"], ".1f"), fmt(r["rtf"], ".2f"),
                      fmt(r["bw"] / 1e9 if r.get("bw") else None, ".1f"), fmt(r["bound"], ".0f" if (r["bound"] or 0) >= 10 else ".2f"),
                      fmt(r["x_bound"], ".2f"), fmt(r["vs_crisp"], ".2f", ""), fmt(r["ttfa"], ".0f"),
                      fmt(r["load"], ".0f"), fmt(r["rss"] / 1e9 if r["rss"] else None, ".2f") + " GB",
                      fmt(r["frames"], "d"), fmt(r["foreign"], ".2f")])
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *table)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out(line(hdr))
    out("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        out(line(row))
    out("")


def _median(xs):
    return sorted(xs)[len(xs) // 2] if xs else None


def print_kernel_table(results, rows, files, kernels, out=print):
    """One line per kernel and file: one stream's ms/frame, x bound, x CrispASR (its ms/frame over
    ours), frames/s against the first kernel's, the batch's interleaved ratio to one stream (median;
    with the prefills / frame loop alone), prefill positions/s with a voice context already encoded
    (10 s; 40 s), time to first audio with the 10 s one (a first request; a later one with the same
    voice, whose rows are reused), and the Mimi encode of 10 s of audio."""
    hdr = ["kernel", "file", "ms/frame", "x bound", "x CrispASR", f"fps vs {kernels[0] or 'default'}", "batch ratio",
           "prefill pos/s 10 s", "prefill pos/s 40 s", "TTFA 10 s ms", "TTFA 10 s reused ms", "Mimi encode 10 s ms"]
    table = []
    for f in files:
        base = None
        for k in kernels:
            one = next((r for r in rows if r["kind"] == "pycsm" and r["path"] == f and r["kernel"] == k and r["ms"]), None)
            res = next((r for r in results if r["kind"] == "pycsm" and r.get("file") == f and r.get("use_kernel") == k
                        and "ms_per_frame" in r), None)
            bat = next((r for r in results if r["kind"] == "pycsm-batch" and r.get("file") == f
                        and r.get("use_kernel") == k and r.get("interleaved")), None)
            if not one:
                continue
            base = base or one["ms"]
            pre = (res or {}).get("prefill", {})
            ratio = "-"
            if bat:
                full = _median([p["ratio"] for p in bat["interleaved"]])
                loop = _median([p["decode_ratio"] for p in bat["interleaved"]])
                ratio = f"{full:.2f}x / {loop:.2f}x (x{bat['batch']})"
            table.append([k or "default", Path(f).stem.rsplit("-", 1)[-1], fmt(one["ms"], ".1f"), fmt(one["x_bound"], ".2f"),
                          fmt(one["vs_crisp"], ".2f"), fmt(base / one["ms"], ".2f"), ratio,
                          fmt(pre.get("10s", {}).get("positions_per_s"), ".0f"),
                          fmt(pre.get("40s", {}).get("positions_per_s"), ".0f"),
                          fmt(pre.get("10s", {}).get("ttfa_ms"), ".0f"), fmt(pre.get("10s", {}).get("ttfa_reused_ms"), ".0f"),
                          fmt(pre.get("mimi_encode_10s_ms"), ".0f")])
    if not table:
        return
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *table)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out("Per kernel (batch ratio: batch frames/s over one stream's, interleaved, median; with the prefills / "
        "frame loop alone):")
    out(line(hdr))
    out("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        out(line(row))
    out("")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pycsm benchmark (see benchmarks/README.md)")
    ap.add_argument("--frames", type=int, default=38, help="frames per utterance (default 38 = 3.04 s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--files", default="f16,q8_0,q4_k",
                    help="comma-separated quantisations (made in --models-dir if missing) or .gguf paths")
    ap.add_argument("--models-dir", type=Path, default=HERE / "models")
    ap.add_argument("--no-peers", action="store_true", help="pycsm only")
    ap.add_argument("--no-crispasr", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--transformers-dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=4, help="utterances of the batched run (0: skip)")
    ap.add_argument("--interleaved", type=int, default=2,
                    help="runs of one stream and the batch interleaved frame by frame in the batch worker (0: none)")
    ap.add_argument("--crispasr-speaker-prefix", action="store_true",
                    help="pass '[0]text' to CrispASR instead of 'text' (it adds the speaker itself)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a configuration disturbed by other processes up to this many times")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each configuration this many times and keep the fastest (all systems alike)")
    ap.add_argument("--wait-idle", type=float, default=300,
                    help="before each run, wait up to this many seconds for other processes to leave the CPU "
                         "alone (0: do not wait); ggml's spinning threads slow down badly when cores are shared")
    ap.add_argument("--json", type=Path, help="write all measurements to this JSON file")
    ap.add_argument("--only", help="comma-separated subset of pycsm,batch,busy,crispasr,transformers")
    ap.add_argument("--kernel", default="",
                    help="comma-separated pycsm kernels to run each (avx512, avx2, neon, ggml: PYCSM_KERNEL); "
                         "default: the one pycsm picks")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prompt prefill / TTFA-with-voice measurements")
    ap.add_argument("--merge", type=Path, help="start from this earlier --json run: its results are kept for "
                                               "the configurations this run does not measure again")
    ap.add_argument("--table-from", type=Path, help="print the table of a saved --json file and exit")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--use-kernel", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.prefill = not args.no_prefill

    if args.worker:
        if args.use_kernel:  # read by the library when the model packs its weights
            os.environ["PYCSM_KERNEL"] = args.use_kernel
        r = WORKERS[args.worker](args)
        if args.use_kernel:
            r["use_kernel"] = args.use_kernel
        emit(r)
        return 0
    if args.table_from:
        d = json.loads(args.table_from.read_text())
        bw = d.get("bandwidth_bytes_per_s") or 0
        method = next((r.get("method") for r in d["results"] if r.get("kind") == "bandwidth"), "?")
        args.frames = int(d["args"]["frames"])
        args.threads = int(d["args"]["threads"])
        args.repeat = int(d["args"].get("repeat", 1))
        print_table(d["rows"], bw, method, args)
        kernels = [k for k in d["args"].get("kernel", "").split(",") if k] or [None]
        files = list(dict.fromkeys(r["file"] for r in d["results"] if r.get("kind") == "pycsm" and r.get("file")))
        if all("path" in r for r in d["rows"]):
            print_kernel_table(d["results"], d["rows"], files, kernels)
        return 0

    log = lambda m: print(m, file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    sys.path.insert(0, str(HERE))
    import make_model

    files = []
    for f in args.files.split(","):
        f = f.strip()
        if f.endswith(".gguf"):
            files.append(str(Path(f).resolve()))
        else:
            t = time.perf_counter()
            path = make_model.make("full", f, None, 0, args.models_dir, log=log)
            if time.perf_counter() - t > 1:
                log(f"[bench] made {path} in {time.perf_counter() - t:.0f} s")
            files.append(str(path))
    reads = {f: per_frame_reads(f) for f in files}

    results = [run_worker("bandwidth", args, log)]
    bw = results[0].get("bytes_per_s")
    have_crisp = False
    if not args.no_peers and not args.no_crispasr:
        have_crisp = importlib.util.find_spec("crispasr") is not None
        if not have_crisp:
            log("[bench] crispasr not installed (pip install crispasr): CrispASR skipped")
    def save():  # after every configuration, so an interrupted run keeps what it measured
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "reads": reads,
                                             "bandwidth_bytes_per_s": bw, "results": results,
                                             "rows": build_rows(results, reads, bw or 0, files, kernels)}, indent=1))

    only = set(args.only.split(",")) if args.only else {"pycsm", "batch", "busy", "crispasr", "transformers"}
    kernels = [k.strip() for k in args.kernel.split(",") if k.strip()] or [None]
    if args.merge:  # keep the earlier run's results for what this run does not measure again
        prev = json.loads(args.merge.read_text())
        key = lambda r: (r.get("kind"), r.get("file"), r.get("dtype"), r.get("use_kernel"))
        planned = {("pycsm", f, None, k) for f in files for k in kernels if "pycsm" in only}
        planned |= {("pycsm-batch", f, None, k) for f in files for k in kernels if "batch" in only and args.batch > 1}
        planned |= {("pycsm-busy", f, None, None) for f in files if "busy" in only}
        planned |= {("crispasr", f, None, None) for f in files if "crispasr" in only and have_crisp}
        if "transformers" in only and not args.no_peers and not args.no_transformers:
            planned |= {("transformers", files[0], d, None) for d in args.transformers_dtypes.split(",") if d}
        results += [r for r in prev["results"] if r.get("kind") != "bandwidth" and key(r) not in planned]
        for r in prev["results"]:
            if r.get("kind") != "bandwidth" and key(r) not in planned:
                r["merged_from"] = str(args.merge)
    save()
    for f in files:
        configs = []
        for k in kernels:
            kx = {"use_kernel": k} if k else {}
            if "pycsm" in only:
                configs.append(("pycsm", dict(file=f, **kx)))
            if args.batch > 1 and "batch" in only:
                configs.append(("pycsm-batch", dict(file=f, **kx)))
        if have_crisp and "crispasr" in only:
            configs.append(("crispasr", dict(file=f)))
        results += run_round_robin(configs, args, log)
        save()
        if "busy" in only:  # its spinner is this worker's own child: not counted as a disturbance
            results.append(_run_worker_undisturbed("pycsm-busy", args, log, file=f))
            save()
    if not args.no_peers and not args.no_transformers and "transformers" in only:
        if importlib.util.find_spec("transformers") is None:
            log("[bench] transformers not installed: skipped")
        else:
            for dt in [d for d in args.transformers_dtypes.split(",") if d]:
                results.append(run_worker("transformers", args, log, file=files[0], dtype=dt))
                save()

    rows = build_rows(results, reads, bw or 0, files, kernels)
    print_table(rows, bw or 0, results[0].get("method", "?"), args)
    print_kernel_table(results, rows, files, kernels)
    notes = sorted({r.get("mimi_note") for r in results if r.get("mimi_note")})
    for n in notes:
        print(f"note: Mimi: {n}")
    busy = [r for r in rows if (r.get("foreign") or 0) > 0.1]
    if busy:
        print("note: other processes used CPU during " + ", ".join(f"{r['system']} {r['file']}" for r in busy)
              + " (column busy, in cores): those rows are slower than this machine can do")
    kname = lambda r: f" ({r['use_kernel']})" if r.get("use_kernel") else ""
    for r in results:
        if r.get("kind") == "pycsm-batch" and "frames_per_s" in r:
            single = next((s for s in results if s["kind"] == "pycsm" and s.get("file") == r["file"]
                           and s.get("use_kernel") == r.get("use_kernel") and "ms_per_frame" in s), None)
            if single:
                fps1 = single["n_frames"] / single["wall_ms"] * 1e3
                print(f"note: batch x{r['batch']} on {Path(r['file']).name}{kname(r)}: {r['frames_per_s']:.2f} frames/s "
                      f"vs {fps1:.2f} frames/s for one stream ({r['frames_per_s'] / fps1:.2f}x, fastest runs, with "
                      f"prefill; frame loop alone {single['ms_per_frame'] / r['ms_per_frame']:.2f}x)")
        if r.get("kind") == "pycsm-batch" and r.get("interleaved"):
            for key, what in (("decode_ratio", "frame loop alone"), ("ratio", "with the prefills")):
                ratios = [p[key] for p in r["interleaved"] if key in p]
                if ratios:
                    med = sorted(ratios)[len(ratios) // 2]
                    print(f"note: batch x{r['batch']} on {Path(r['file']).name}{kname(r)} vs one stream, interleaved frame by "
                          f"frame in one process, frames/s {what}: {' '.join(f'{x:.2f}x' for x in ratios)} "
                          f"(median {med:.2f}x)")
    for r in results:
        if r.get("kind") == "pycsm-busy" and "busy_default_ms" in r:
            n = args.threads
            print(f"note: one busy process beside {Path(r['file']).name} ({r['kernel']}, {r['cpus']} CPUs): default threads "
                  f"{r['busy_default_ms']:.0f} ms/frame, 1 thread {r['busy_1_ms']:.0f}, {n} threads "
                  f"{r.get(f'busy_{n}_ms', float('nan')):.0f}; idle, default threads {r['idle_default_ms']:.0f}: "
                  f"default = {r['default_vs_1_thread']:.2f}x one thread's time, {r['default_vs_idle']:.2f}x the idle time"
                  + (f" (medians of {len(r['rounds'])} rounds; per round "
                     + ", ".join(f"{x['default_vs_1_thread']:.2f}x / {x['default_vs_idle']:.2f}x" for x in r["rounds"]) + ")"
                     if r.get("rounds") else ""))
    log(f"[bench] total {time.perf_counter() - t_start:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
