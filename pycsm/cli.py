"""The `pycsm` command: text to speech, plus `convert`, `quantize` and `info`.

    pycsm "Hello there." -o hello.wav                 # csm-1b-q8_0.gguf from the Hugging Face hub
    pycsm -m csm-1b-q8_0.gguf -f story.txt -o story.flac
    echo "Hi." | pycsm -m model.gguf --output-raw | aplay -r 24000 -f S16_LE -c 1
    pycsm --tts "Hi." --tts-output hi.wav -tp 0.8 --seed 1 -m model.gguf   # crispasr's spellings

Exit status: 0 ok, 1 runtime failure (model, files, generation), 2 usage error, 130 interrupted.
Errors are one line on stderr: `pycsm: error: ...`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

PROG = "pycsm"
SUBCOMMANDS = ("convert", "quantize", "info", "dialogue")


class UsageError(Exception):
    """Bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() turns it into exit status 2
        raise UsageError(message)


def _err(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _number(kind, minimum=None, strict: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text!r}")
        return value
    return parse


def _speak_parser() -> argparse.ArgumentParser:
    from .hub import DEFAULT_REPO, QUANTS

    p = _Parser(
        prog=PROG, allow_abbrev=False,
        description="Speak text with Sesame's CSM-1B (24 kHz mono).",
        epilog="subcommands: `pycsm convert CHECKPOINT_DIR -o OUT.gguf`, `pycsm quantize IN.gguf OUT.gguf TYPE`, "
               "`pycsm info MODEL` (each with --help). Without -m the model comes from the Hugging Face hub "
               "(HF_HOME cache; HF_HUB_OFFLINE=1 uses only the cache).")
    p.add_argument("text", nargs="*", help="text to speak (else -f FILE, --tts TEXT or standard input)")
    p.add_argument("--tts", metavar="TEXT", dest="tts_text", help="text to speak (crispasr spelling)")
    p.add_argument("-f", "--file", metavar="FILE", help="read the text from FILE ('-' = standard input)")
    p.add_argument("-o", "--output", "--tts-output", metavar="PATH", default=None,
                   help="output file, .wav / .flac / .ogg (default: out.wav)")
    p.add_argument("--output-raw", action="store_true",
                   help="write raw s16le mono 24 kHz to standard output instead of a file "
                        "(e.g. | aplay -r 24000 -f S16_LE -c 1)")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH", help="local CSM GGUF file (default: download from the hub)")
    g.add_argument("--quant", choices=QUANTS, default=None, help="published file to use: %(choices)s (default q8_0)")
    g.add_argument("--repo", default=None, help=f"Hugging Face repository (default {DEFAULT_REPO})")
    g.add_argument("--backend", choices=["csm"], default="csm", help=argparse.SUPPRESS)  # crispasr compatibility
    g.add_argument("--threads", type=_number(int, 1), default=None, help="CPU threads (default: all)")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="compute device (default auto)")
    s = p.add_argument_group("speech")
    s.add_argument("--speaker", type=_number(int, 0), default=0, help="speaker id (default 0)")
    s.add_argument("-t", "--temperature", "-tp", dest="temperature", type=_number(float, 0),
                   default=0.9, help="sampling temperature, 0 = greedy (default 0.9)")
    s.add_argument("--top-k", type=_number(int, 0), default=50, help="top-k sampling, 0 = off (default 50)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed at the end)")
    s.add_argument("--max-audio-length", metavar="SECONDS", type=_number(float, 0, strict=True),
                   default=90.0, help="cap on the audio of one utterance/sentence in seconds (default 90)")
    s.add_argument("--pause", metavar="MS", type=_number(float, 0), default=150.0,
                   help="silence between sentences of a long text, in ms (default 150)")
    s.add_argument("--stream", action="store_true", help="decode and write audio while it is generated")
    c = p.add_argument_group("voice context (repeatable, paired in order)")
    c.add_argument("--context-audio", action="append", default=[], metavar="FILE",
                   help="audio of an earlier utterance (any rate; resampled to 24 kHz)")
    c.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="its transcript")
    c.add_argument("--context-speaker", action="append", default=[], type=_number(int, 0),
                   metavar="ID", help="its speaker id (default: --speaker)")
    o = p.add_mutually_exclusive_group()
    o.add_argument("-v", "--verbose", action="store_true", help="print the native library's log and details")
    o.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _read_text(args) -> str:
    sources = [name for name, given in (("TEXT", bool(args.text)), ("--tts", args.tts_text is not None),
                                        ("-f", args.file is not None)) if given]
    if len(sources) > 1:
        raise UsageError(f"give the text once ({' and '.join(sources)} were both given)")
    if args.text:
        text = " ".join(args.text)
    elif args.tts_text is not None:
        text = args.tts_text
    elif args.file is not None and args.file != "-":
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RuntimeError(f"cannot read text file {args.file}: {getattr(e, 'strerror', None) or e}") from None
    else:
        if args.file is None and (sys.stdin is None or sys.stdin.isatty()):
            raise UsageError("no text: give TEXT, --tts TEXT, -f FILE, or pipe text on standard input")
        text = sys.stdin.read() if sys.stdin is not None else ""
    if not text.strip():
        raise UsageError("the text is empty")
    return text


def _context_flags(args) -> list[tuple[str, str, int]]:
    """(audio file, text, speaker) of each --context-audio/--context-text(/--context-speaker) pair."""
    audio, texts, speakers = args.context_audio, args.context_text, args.context_speaker
    if len(audio) != len(texts):
        raise UsageError(f"--context-audio and --context-text must be paired: got {len(audio)} audio file(s) "
                         f"and {len(texts)} text(s)")
    if speakers and len(speakers) != len(audio):
        raise UsageError(f"--context-speaker must be given for every context pair or not at all: got "
                         f"{len(speakers)} for {len(audio)} pair(s)")
    return list(zip(audio, texts, speakers or [args.speaker] * len(audio)))


def _load(args):
    from .api import CSM

    if args.model is not None:
        return CSM(args.model, n_threads=args.threads, device=args.device)
    from .hub import DEFAULT_QUANT, DEFAULT_REPO

    return CSM.from_pretrained(args.repo or DEFAULT_REPO, args.quant or DEFAULT_QUANT,
                               n_threads=args.threads, device=args.device)


def _synthesize(tts, text: str, long: bool, gen: dict, args, output: str):
    """Generate and write the audio (file via a temporary name, or raw to stdout).
    Returns (seconds written, seed, stop reason)."""
    from .audio import AudioWriter, float_to_int16

    if not (args.stream or args.output_raw):
        audio = tts.generate_long(text, **gen) if long else tts.generate(text, **gen)
        audio.save(output)
        return audio.duration, audio.seed, audio.stop_reason
    with (tts.stream_long(text, **gen) if long else tts.stream(text, **gen)) as st:
        if args.output_raw:
            out = getattr(sys.stdout, "buffer", sys.stdout)
            n = 0
            for chunk in st:
                out.write(float_to_int16(chunk).tobytes())
                out.flush()
                n += chunk.shape[0]
        else:
            with AudioWriter(output, tts.sample_rate) as w:
                for chunk in st:
                    w.write(chunk)
            n = w.frames
    return n / tts.sample_rate, st.seed, st.stop_reason


def _speak(argv) -> int:
    from .audio import output_format
    from .text import split_sentences

    args = _speak_parser().parse_args(argv)
    text = _read_text(args)
    output = args.output or "out.wav"
    if args.output_raw:
        if args.output is not None:
            raise UsageError("--output-raw writes to standard output; do not give -o/--output too")
        if sys.stdout is None or sys.stdout.isatty():
            raise UsageError("--output-raw writes binary audio; redirect standard output to a file or a player")
    else:
        try:
            output_format(output)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if not Path(output).parent.is_dir():  # before generating, not after
            raise FileNotFoundError(f"output folder does not exist: {Path(output).parent}")
    ctx_flags = _context_flags(args)
    if args.model is not None and (args.quant is not None or args.repo is not None):
        raise UsageError("--quant/--repo pick a file from the hub; they cannot be combined with --model")
    if args.temperature > 2 and not args.quiet:
        _note(f"warning: temperature {args.temperature:g} is very high (in crispasr -t sets threads; "
              "here that is --threads)")

    # runtime from here on: failures are exit status 1
    from .api import Segment

    context = [Segment.from_file(path, t, spk) for path, t, spk in ctx_flags]
    if args.verbose:
        from .model import set_log_callback

        set_log_callback(lambda level, msg: sys.stderr.write(msg))
    try:
        t0 = time.perf_counter()
        tts = _load(args)
        with tts:
            if args.verbose:
                _note(f"model {tts.path} on {tts.model.device} ({tts.model.file_type}), "
                      f"loaded in {time.perf_counter() - t0:.2f} s")
            sentences = split_sentences(text)
            long = len(sentences) > 1
            gen = dict(speaker=args.speaker, context=context, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, max_audio_length_ms=args.max_audio_length * 1000.0)
            bar = None
            if long:
                gen["pause_ms"] = args.pause
                if not args.quiet and sys.stderr is not None and sys.stderr.isatty():
                    from tqdm import tqdm

                    bar = tqdm(total=len(sentences), unit="sentence", file=sys.stderr, dynamic_ncols=True,
                               desc=PROG)

                    def progress(done, total):
                        bar.update(done - bar.n)

                    gen["progress"] = progress
            if args.verbose:
                _note(f"generating {len(sentences)} sentence(s), {len(text.strip())} characters")
            t1 = time.perf_counter()
            try:
                seconds, seed, reason = _synthesize(tts, text, long, gen, args, output)
            finally:
                if bar is not None:
                    bar.close()
            elapsed = time.perf_counter() - t1
    finally:
        if args.verbose:
            from .model import set_log_callback

            set_log_callback(None)
    if not args.quiet:
        where = "standard output" if args.output_raw else output
        hint = {"max_length": " (cut at --max-audio-length)",
                "context_full": " (the model's context is full: shorten the text or the context)",
                "aborted": " (aborted)"}.get(reason, "")
        _note(f"wrote {seconds:.2f} s of audio to {where}; seed {seed}{hint}")
        if args.verbose:
            _note(f"generated in {elapsed:.2f} s ({elapsed / max(seconds, 1e-9):.2f} s per second of audio), "
                  f"stop reason {reason}")
    return 0


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------

def _dialogue(argv) -> int:
    from .dialogue_cli import main as dialogue_main

    return dialogue_main(argv)


def _convert(argv) -> int:
    from .convert import main as convert_main

    return convert_main(argv)


def _run_abortable(fn, quiet: bool, desc: str, unit: str):
    """Run fn(progress) in a worker thread with a tqdm bar on a terminal. Ctrl-C makes progress()
    return False (the native loop stops and cleans up), waits for the worker, then re-raises.
    (In the main thread, Ctrl-C would land inside the ctypes callback and be lost.)"""
    import threading

    stop, ended, box = threading.Event(), threading.Event(), {}
    show = not quiet and sys.stderr is not None and sys.stderr.isatty()

    def progress(done, total):
        if show:
            if "bar" not in box:
                from tqdm import tqdm

                box["bar"] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
            box["bar"].update(done - box["bar"].n)
        return not stop.is_set()

    def work():
        try:
            fn(progress)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e
        finally:
            ended.set()

    threading.Thread(target=work, name=f"pycsm-{desc}", daemon=True).start()
    try:
        ended.wait()
    finally:
        stop.set()
        ended.wait()
        if "bar" in box:
            box["bar"].close()
    if "error" in box:
        raise box["error"]


def _quantize(argv) -> int:
    from .audio import partial_path
    from .model import quantize

    p = _Parser(prog=f"{PROG} quantize", allow_abbrev=False,
                description="Quantise a CSM GGUF with ggml (the published files' per-tensor rule).")
    p.add_argument("input", help="input .gguf (f32/f16/bf16)")
    p.add_argument("output", help="output .gguf")
    p.add_argument("type", help="q8_0, q4_k, q4_0, q5_0, q5_k, q6_k, f16, ...")
    p.add_argument("--threads", type=_number(int, 1), default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise FileNotFoundError(f"input model not found: {src}")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {dst.parent}")
    tmp = partial_path(dst)
    try:
        try:
            _run_abortable(lambda progress: quantize(src, tmp, args.type.lower(), n_threads=args.threads,
                                                     progress=progress), args.quiet, "quantize", "tensor")
        except ValueError as e:  # unknown type
            raise UsageError(str(e)) from None
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not args.quiet:
        _note(f"wrote {dst} ({args.type.lower()}, {dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.0f} {unit}" if prefix == "" else f"{n:.2f} {prefix}{unit}"
        n /= 1024
    return f"{n} {unit}"


def _info(argv) -> int:
    from .hub import DEFAULT_REPO, QUANTS, download
    from .model import Model, system_info

    p = _Parser(prog=f"{PROG} info", allow_abbrev=False,
                description="Show a CSM GGUF's hyper-parameters, quantisation and size.")
    p.add_argument("model", help=f"a .gguf path, or a published quant ({', '.join(QUANTS)}) fetched from the hub")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"repository for a quant name (default {DEFAULT_REPO})")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    path = Path(args.model)
    if not path.exists() and args.model.lower() in QUANTS:
        path = download(args.model, args.repo)
    with Model(path, device="cpu") as m:
        info = m.info()
    info["file_bytes"] = path.stat().st_size
    info["system"] = system_info()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    head = [("path", info["path"]), ("name", info["name"] or "-"), ("quant", info["file_type"]),
            ("file size", f"{_human(info['file_bytes'])} ({info['file_bytes']} bytes)"),
            ("tensors", f"{info['n_tensors']} ({_human(info['n_bytes'])})"),
            ("parameters", f"{info['n_params'] / 1e6:.1f} M")]
    skip = {"path", "name", "file_type", "file_bytes", "n_tensors", "n_bytes", "n_params", "device"}
    rows = head + [(k, v) for k, v in info.items() if k not in skip]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, 1 runtime error, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return {"convert": _convert, "quantize": _quantize, "info": _info, "dialogue": _dialogue}[argv[0]](argv[1:])
        return _speak(argv)
    except UsageError as e:
        _err(e)
        return 2
    except KeyboardInterrupt:
        _note("interrupted")
        return 130
    except BrokenPipeError:
        try:  # the reader went away (e.g. the audio player): keep Python from complaining at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1  # silently, like other tools whose reader went away
    except SystemExit as e:  # --help / --version, or a delegated parser
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (OSError, RuntimeError, ValueError, TypeError) as e:  # CSMError is a RuntimeError
        _err(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
