"""The `pycsm` command: text to speech, plus `voice`, `convert`, `quantize` and `info`.

    pycsm "Hello there." -o hello.wav                 # csm-1b-q8_0.gguf from the Hugging Face hub
    pycsm -m csm-1b-q8_0.gguf -f story.txt -o story.mp3 --sample-rate 16000
    echo "Hi." | pycsm -m model.gguf -o - | play -      # a WAV on standard output, as it is made
    pycsm --output-dir out/ -f lines.txt               # one file per line, generated in batches
    pycsm voice create alice --audio ref.wav --text "What ref.wav says."; pycsm "Hi." --voice alice
    pycsm --backend csm -m csm --auto-download --tts "Hi." --tts-output hi.wav -t 4 --seed 42  # crispasr

Every crispasr spelling keeps its crispasr meaning (docs/cli.md has the whole table): -t/--threads,
-tp/--temperature, --seed 0 = a random seed, -m NAME[:QUANT] with --auto-download, --tts,
--tts-output, --tts-stream; crispasr flags that mean nothing here are accepted with a notice.

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
SUBCOMMANDS = ("convert", "quantize", "info", "voice", "dialogue")
DEFAULT_BATCH = 4

# crispasr flags with no meaning for pycsm: accepted (with their value) and named in one notice.
# flag -> (takes a value, why it does nothing here)
CRISPASR_NO_EFFECT = {
    "-p": (True, "one process only"), "--processors": (True, "one process only"),
    "-fa": (False, "attention is always fused here"), "--flash-attn": (False, "attention is always fused here"),
    "-nfa": (False, "attention is always fused here"), "--no-flash-attn": (False, "attention is always fused here"),
    "--gpu-backend": (True, "ggml picks the GPU backend it was built with (--device gpu)"),
    "-l": (True, "CSM speaks English"), "--language": (True, "CSM speaks English"),
    "--tts-steps": (True, "CSM has no diffusion steps"), "--tts-cfg-scale": (True, "CSM has no guidance"),
    "--tts-speed": (True, "CSM has no speed control"), "--tts-min-speech-tokens": (True, "not a CSM option"),
    "--instruct": (True, "CSM takes no instruction"), "--tts-phonemes": (True, "CSM reads text"),
    "--g2p-dict": (True, "CSM reads text"), "--codec-model": (True, "Mimi is inside the GGUF"),
    "--codec-quant": (True, "Mimi is inside the GGUF"), "--ref-asr": (True, "give the transcript (--ref-text)"),
    "--tts-trim-silence": (False, "not implemented"), "--tts-max-input-chars": (True, "long text is split"),
    "--tts-play": (False, "no playback; pipe `-o -` to a player"),
    "--tts-play-device": (True, "no playback; pipe `-o -` to a player"),
    "--watermark-model": (True, "pycsm adds no watermark"), "--no-watermark": (False, "pycsm adds no watermark"),
    "--no-c2pa": (False, "pycsm writes no C2PA manifest"), "--c2pa-cert": (True, "pycsm writes no C2PA manifest"),
    "--c2pa-key": (True, "pycsm writes no C2PA manifest"),
    "--no-spoken-disclaimer": (False, "pycsm speaks no disclaimer"),
    "--speaker-identity": (True, "pycsm writes no provenance record"),
    "--consent-log": (True, "pycsm writes no consent log"), "--i-have-rights": (False, "no consent gate here"),
    "--accept-marking-responsibility": (False, "no marking gate here"),
    "--accept-license": (True, "no license gate here"), "--dry-run-resolve": (False, "not implemented"),
}


class UsageError(Exception):
    """Bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; main() turns it into exit status 2
        raise UsageError(message)


def _err(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _number(kind, minimum=None, strict: bool = False, maximum=None):
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
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text!r}")
        return value
    return parse


def _backend(text: str) -> str:
    from .hub import MODEL_NAMES

    if text.lower() not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"pycsm runs only CSM-1B ({', '.join(MODEL_NAMES)}), got {text!r}")
    return text.lower()


def _device(text: str) -> str:
    """auto / cpu / gpu, or crispasr's GPU index (ggml's first GPU is used)."""
    if text in ("auto", "cpu", "gpu"):
        return text
    if text.isdigit():
        return f"gpu:{text}"
    raise argparse.ArgumentTypeError(f"expected auto, cpu, gpu or a GPU index, got {text!r}")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """-m and the flags that find and run a model: shared by speaking and `voice create`."""
    from ._native import CSM_MAX_THREADS
    from .hub import DEFAULT_REPO, QUANTS

    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH|NAME",
                   help="a CSM GGUF file, or a model name (csm, csm-1b, sesame, sesame-csm, csm-tts; optionally "
                        "NAME:QUANT) found in the Hugging Face cache (default: csm-1b-q8_0.gguf from the hub)")
    g.add_argument("--auto-download", action="store_true",
                   help="let -m NAME download the file into the Hugging Face cache when it is not there")
    g.add_argument("--quant", "--model-quant", choices=QUANTS, default=None, type=str.lower,
                   help="published file to use: %(choices)s (default q8_0)")
    g.add_argument("--repo", default=None, help=f"Hugging Face repository (default {DEFAULT_REPO})")
    g.add_argument("--hf-repo", "-hfr", metavar="REPO[:FILE]",
                   help="crispasr's: --repo REPO (and --hf-file FILE), implying --auto-download")
    g.add_argument("--hf-file", "-hff", metavar="FILE",
                   help="crispasr's: the published file csm-1b-QUANT.gguf, implying --auto-download")
    g.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HOME's)")
    g.add_argument("--backend", type=_backend, default="csm",
                   help="crispasr's backend name: csm and its aliases are accepted")
    g.add_argument("-t", "--threads", type=_number(int, 1, maximum=CSM_MAX_THREADS), default=None,
                   help="CPU threads (default: all cores)")
    g.add_argument("--device", "-dev", type=_device, default="auto",
                   help="compute device: auto (default), cpu, gpu (or crispasr's GPU index)")
    g.add_argument("-ng", "--no-gpu", action="store_true", help="run on the CPU (as --device cpu)")


def _speak_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, allow_abbrev=False,
        description="Speak text with Sesame's CSM-1B (24 kHz mono).",
        epilog="subcommands: `pycsm voice create|list|remove`, `pycsm dialogue SCRIPT -o OUT`, "
               "`pycsm convert CHECKPOINT_DIR -o OUT.gguf`, "
               "`pycsm quantize IN.gguf OUT.gguf TYPE`, `pycsm info MODEL` (each with --help). Without -m the "
               "model comes from the Hugging Face hub (HF_HOME cache; HF_HUB_OFFLINE=1 uses only the cache). "
               "docs/cli.md lists every flag and its crispasr equivalent.")
    p.add_argument("text", nargs="*", help="text to speak (else -f FILE, --tts TEXT or standard input)")
    p.add_argument("--tts", metavar="TEXT", dest="tts_text", help="text to speak (crispasr spelling)")
    p.add_argument("-f", "--file", "--text-file", metavar="FILE", help="read the text from FILE ('-' = standard input)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", "--tts-output", metavar="PATH", default=None,
                   help="output file: .wav, .flac, .ogg, .opus or .mp3; '-' = a WAV on standard output "
                        "(default: out.wav; tts_output.wav with --tts, as crispasr)")
    o.add_argument("--output-raw", action="store_true",
                   help="write raw s16le mono to standard output instead of a file "
                        "(e.g. | aplay -r 24000 -f S16_LE -c 1)")
    o.add_argument("--tts-stream", action="store_true",
                   help="crispasr's stream: raw s16le mono to standard output, sentence by sentence")
    o.add_argument("--sample-rate", metavar="HZ", type=_number(int, 1000, maximum=768_000), default=None,
                   help="resample the output to HZ (libsoxr; default 24000)")
    o.add_argument("--stream", action="store_true", help="decode and write audio while it is generated")
    o.add_argument("--output-dir", metavar="DIR",
                   help="one file per input line (stdin or -f; blank lines skipped) in DIR, numbered "
                        "0001.wav...; generated --batch lines at a time")
    o.add_argument("--json-input", action="store_true",
                   help='with --output-dir: each line is {"text": ..., "speaker": ..., "voice": ..., '
                        '"output_file": ...} (only "text" is needed)')
    o.add_argument("--batch", metavar="N", type=_number(int, 1, maximum=64), default=DEFAULT_BATCH,
                   help=f"with --output-dir: utterances generated together (default {DEFAULT_BATCH})")
    o.add_argument("--output-format", choices=["wav", "flac", "ogg", "opus", "mp3"], default="wav",
                   help="with --output-dir: the numbered files' format (default wav)")
    _model_flags(p)
    s = p.add_argument_group("speech")
    s.add_argument("--speaker", type=_number(int, 0), default=None,
                   help="speaker id (default: the voice's, else 0)")
    s.add_argument("-tp", "--temperature", dest="temperature", type=_number(float, 0, maximum=10),
                   default=0.9, help="sampling temperature, 0 = greedy (default 0.9)")
    s.add_argument("--top-k", type=_number(int, 0), default=50, help="top-k sampling, 0 = off (default 50)")
    s.add_argument("--seed", type=_number(int, 0, maximum=2**64 - 1), default=0,
                   help="random seed; 0 (default) = a fresh random seed, printed at the end")
    s.add_argument("--max-audio-length", metavar="SECONDS", type=_number(float, 0, strict=True),
                   default=90.0, help="cap on the audio of one utterance/sentence in seconds (default 90; "
                                      "at most what the context holds)")
    s.add_argument("--pause", metavar="MS", type=_number(float, 0, maximum=59_999), default=150.0,
                   help="silence between sentences of a long text, in ms (default 150)")
    s.add_argument("--parse-special", action=argparse.BooleanOptionalAction, default=None,
                   help="read special-token text such as <|end_of_text|> as tokens (default: yes for one "
                        "text, as the reference does; no for --output-dir lines)")
    c = p.add_argument_group("voice")
    c.add_argument("--voice", metavar="NAME|FILE",
                   help="a saved voice (`pycsm voice list`) or a .csmvoice file as context; an audio file "
                        "with --ref-text works too (crispasr)")
    c.add_argument("--voice-dir", metavar="DIR", help="where saved voices are (default: PYCSM_VOICES or the "
                                                      "user data folder)")
    c.add_argument("--ref-text", metavar="TEXT", help="transcript of --voice when it is an audio file")
    c.add_argument("--context-audio", action="append", default=[], metavar="FILE",
                   help="audio of an earlier utterance (any rate; resampled to 24 kHz); repeatable")
    c.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="its transcript")
    c.add_argument("--context-speaker", action="append", default=[], type=_number(int, 0),
                   metavar="ID", help="its speaker id (default: --speaker)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("-v", "--verbose", action="store_true",
                   help="print the thread count, the native library's log and details")
    v.add_argument("-q", "--quiet", "-np", "--no-prints", action="store_true", help="print nothing but errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    for flag, (takes_value, _why) in CRISPASR_NO_EFFECT.items():
        p.add_argument(flag, dest=f"ignored{flag}", help=argparse.SUPPRESS,
                       **({"metavar": "VALUE"} if takes_value else {"action": "store_true"}))
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _ignored_notice(args) -> None:
    given = [flag for flag in CRISPASR_NO_EFFECT if getattr(args, f"ignored{flag}") not in (None, False)]
    if given and not args.quiet:
        _note("ignoring " + "; ".join(f"{f} ({CRISPASR_NO_EFFECT[f][1]})" for f in given))


# ---------------------------------------------------------------------------------------------
# Input text
# ---------------------------------------------------------------------------------------------

def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                         "(convert it first, e.g. `iconv -f latin1 -t utf-8`)") from None


def _stdin_text() -> str:
    if sys.stdin is None:
        return ""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (an embedding program's)
        return sys.stdin.read()
    return _decode(buffer.read(), "standard input")


def _read_input(args) -> str:
    """The text from TEXT, --tts, -f FILE or standard input (exactly one of them)."""
    sources = [name for name, given in (("TEXT", bool(args.text)), ("--tts", args.tts_text is not None),
                                        ("-f", args.file is not None)) if given]
    if len(sources) > 1:
        raise UsageError(f"give the text once ({' and '.join(sources)} were both given)")
    if args.text or args.tts_text is not None:
        text = " ".join(args.text) if args.text else args.tts_text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
            raise UsageError("the text argument is not UTF-8 text (check the terminal's encoding)") from None
    elif args.file is not None and args.file != "-":
        try:
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise RuntimeError(f"cannot read text file {args.file}: {e.strerror or e}") from None
        text = _decode(data, f"text file {args.file}")
    else:
        if args.file is None and (sys.stdin is None or sys.stdin.isatty()):
            raise UsageError("no text: give TEXT, --tts TEXT, -f FILE, or pipe text on standard input")
        text = _stdin_text()
    if not text.strip():
        raise UsageError("the text is empty")
    return text


def _context_flags(args) -> list[tuple[str, str, int | None]]:
    """(audio file, text, speaker or None) of each --context-audio/--context-text(/--context-speaker) pair."""
    audio, texts, speakers = args.context_audio, args.context_text, args.context_speaker
    if len(audio) != len(texts):
        raise UsageError(f"--context-audio and --context-text must be paired: got {len(audio)} audio file(s) "
                         f"and {len(texts)} text(s)")
    if speakers and len(speakers) != len(audio):
        raise UsageError(f"--context-speaker must be given for every context pair or not at all: got "
                         f"{len(speakers)} for {len(audio)} pair(s)")
    return list(zip(audio, texts, speakers or [None] * len(audio)))


_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au")


def _voice_spec(args):
    """--voice as ("voice", spec) for a saved voice, ("audio", path) for crispasr's reference audio,
    or None."""
    if args.voice is None:
        if args.ref_text is not None:
            raise UsageError("--ref-text is the transcript of --voice AUDIO_FILE; give --voice too")
        return None
    if Path(args.voice).suffix.lower() in _AUDIO_SUFFIXES:
        if args.ref_text is None:
            raise UsageError(f"--voice {args.voice} is an audio file: give its transcript with --ref-text "
                             "(or save it once with `pycsm voice create`)")
        return "audio", args.voice
    if args.ref_text is not None:
        raise UsageError("--ref-text goes with --voice AUDIO_FILE; a saved voice has its transcript")
    return "voice", args.voice


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def _model_path(args) -> Path:
    """The GGUF file of -m PATH / -m NAME[:QUANT] / the hub default (downloaded when allowed)."""
    from .hub import DEFAULT_QUANT, DEFAULT_REPO, cached_path, download, model_filename, parse_model_name

    repo = args.repo or DEFAULT_REPO
    if args.model is None:  # pycsm's default: the published file, downloaded on first use
        return download(args.quant or DEFAULT_QUANT, repo, cache_dir=args.cache_dir, progress=not args.quiet)
    path = Path(args.model)
    if path.is_file():
        if args.quant is not None or args.repo is not None:
            raise UsageError("--quant/--repo pick a file from the hub; they cannot be combined with a model file")
        return path
    try:
        is_name, quant = parse_model_name(args.model)
    except ValueError as e:
        raise UsageError(f"-m {args.model}: {e}") from None
    if not is_name:
        raise FileNotFoundError(f"model file not found: {args.model} (or use a model name: -m csm[:QUANT] "
                                "--auto-download)")
    if quant is not None and args.quant is not None and quant != args.quant:
        raise UsageError(f"-m {args.model} and --quant {args.quant} name different files")
    quant = quant or args.quant or DEFAULT_QUANT
    found = cached_path(quant, repo, cache_dir=args.cache_dir)
    if found is not None:
        return found
    if not args.auto_download:
        raise FileNotFoundError(
            f"{model_filename(quant)} ({repo}) is not downloaded yet: add --auto-download to download it into "
            f"the Hugging Face cache (`pycsm -m {args.model.split(':')[0]}:{quant} --auto-download ...`), "
            "or give a GGUF file with -m PATH")
    return download(quant, repo, cache_dir=args.cache_dir, progress=not args.quiet)


def _hub_flags(args) -> None:
    """crispasr's --hf-repo REPO[:FILE] / --hf-file FILE as --repo / --quant, with --auto-download."""
    import re

    repo, _, file = (args.hf_repo or "").partition(":")
    file = args.hf_file or file
    if repo:
        if args.repo is not None and args.repo != repo:
            raise UsageError(f"--repo {args.repo} and --hf-repo {repo} name different repositories")
        args.repo = repo
    if file:
        m = re.fullmatch(r"csm-1b-(f16|q8_0|q4_k)\.gguf", file, re.IGNORECASE)
        if m is None:
            raise UsageError(f"--hf-file {file}: pycsm finds the published files csm-1b-{{f16,q8_0,q4_k}}.gguf")
        if args.quant is not None and args.quant != m.group(1).lower():
            raise UsageError(f"--quant {args.quant} and --hf-file {file} name different files")
        args.quant = m.group(1).lower()
    if repo or file:
        args.auto_download = True
        if args.model is None:
            args.model = "csm"


def threads_in_use(n_threads: int | None) -> int:
    """The CPU threads a context runs with for `n_threads` (None: all cores), by the library's rule
    (csm_default_threads in native/src/csm_backend.cpp: at most the cores; 512 when asked, 64 by
    default)."""
    cores = os.cpu_count() or 4
    return min(n_threads, cores, 512) if n_threads else min(cores, 64)


def _load(args):
    from .api import CSM

    device = "cpu" if args.no_gpu else args.device
    if device.startswith("gpu:"):
        if not args.quiet:
            _note(f"--device {device[4:]}: using ggml's first GPU (set CUDA_VISIBLE_DEVICES to choose one)")
        device = "gpu"
    _hub_flags(args)
    path = _model_path(args)
    return CSM(path, n_threads=args.threads, device=device)


# ---------------------------------------------------------------------------------------------
# Speaking
# ---------------------------------------------------------------------------------------------

def _options(args, bulk: bool):
    """The GenerationOptions of the command line; ValueError (a usage error) for a bad value."""
    from .options import GenerationOptions

    parse_special = (not bulk) if args.parse_special is None else args.parse_special
    return GenerationOptions(temperature=args.temperature, top_k=args.top_k,
                             seed=None if args.seed == 0 else args.seed,  # crispasr: 0 = non-deterministic
                             max_audio_length_ms=args.max_audio_length * 1000.0, parse_special=parse_special)


class _Bar:
    """A tqdm bar counting seconds of audio generated, on a terminal only (else every call is a no-op)."""

    def __init__(self, args, total_items: int | None = None, item: str = ""):
        self._bar = None
        self.total_items, self.item = total_items, item
        if not args.quiet and sys.stderr is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="s", desc=PROG, file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc}: {n:.1f} s of audio [{elapsed}, {rate_fmt}]{postfix}")

    def audio(self, seconds: float) -> None:
        if self._bar is not None:
            self._bar.update(seconds)

    def items(self, done: int) -> None:
        if self._bar is not None and self.total_items:
            self._bar.set_postfix_str(f"{self.item} {done}/{self.total_items}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _raw_out():
    return getattr(sys.stdout, "buffer", sys.stdout)


def _speak_one(tts, text: str, args, opts, context, speaker, output, bar: _Bar):
    """Generate one text (sentence by sentence when long) and write it. Returns (seconds, seed, reason)."""
    import numpy as np

    from .audio import AudioWriter, float_to_int16
    from .resample import StreamResampler
    from .text import split_sentences

    sentences = split_sentences(text)
    long = len(sentences) > 1
    bar.total_items, bar.item = len(sentences), "sentence"
    frame_s = tts.frame_ms / 1000.0
    kw = dict(speaker=speaker, context=context, options=opts, on_frame=lambda _i, _c: bar.audio(frame_s))
    long_kw = dict(pause_ms=args.pause, progress=lambda done, _total: bar.items(done))
    if args.verbose:
        _note(f"generating {len(sentences)} sentence(s), {len(text.strip())} characters")
    raw = args.output_raw or args.tts_stream
    if not (args.stream or raw or output == "-"):
        audio = tts.generate_long(text, **kw, **long_kw) if long else tts.generate(text, **kw)
        audio.save(output, sample_rate=args.sample_rate)
        return audio.duration, audio.seed, audio.stop_reason
    if args.tts_stream:  # crispasr's stream: whole sentences
        st = tts.stream_long(text, chunk_frames=None, **kw, **long_kw)
    else:
        st = tts.stream_long(text, **kw, **long_kw) if long else tts.stream(text, **kw)
    with st:
        if raw:
            out, n = _raw_out(), 0
            rs = None if args.sample_rate in (None, tts.sample_rate) else StreamResampler(tts.sample_rate,
                                                                                         args.sample_rate)
            for chunk in st:
                n += chunk.shape[0]
                out.write(float_to_int16(chunk if rs is None else rs(chunk)).tobytes())
                out.flush()
            if rs is not None:
                out.write(float_to_int16(rs(np.zeros(0, dtype=np.float32), last=True)).tobytes())
                out.flush()
        else:
            with AudioWriter(output, tts.sample_rate, args.sample_rate) as w:
                for chunk in st:
                    w.write(chunk)
            n = w.frames
    return n / tts.sample_rate, st.seed, st.stop_reason


def _check_output(args) -> str | None:
    """The output path (None for raw standard output), checked before anything is generated."""
    from .audio import check_writable, output_format

    raw = args.output_raw or args.tts_stream
    if raw:
        if args.output is not None:
            raise UsageError(f"{'--tts-stream' if args.tts_stream else '--output-raw'} writes to standard output; "
                             "do not give -o/--output too")
        if sys.stdout is None or sys.stdout.isatty():
            raise UsageError("raw audio goes to standard output: redirect it to a file or a player")
        return None
    output = args.output or ("tts_output.wav" if args.tts_text is not None else "out.wav")
    if output == "-" and (sys.stdout is None or sys.stdout.isatty()):
        raise UsageError("-o - writes a WAV to standard output: redirect it to a file or a player")
    try:
        output_format(output, args.sample_rate or 24000)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_writable(output)  # before generating, not after
    return output


def _speak(argv) -> int:
    args = _speak_parser().parse_args(argv)
    _ignored_notice(args)
    if args.output_dir is not None:
        return _speak_lines(args)
    if args.json_input:
        raise UsageError("--json-input reads lines for --output-dir; give --output-dir DIR")
    text = _read_input(args)
    output = _check_output(args)
    ctx_flags = _context_flags(args)
    voice_spec = _voice_spec(args)
    try:
        opts = _options(args, bulk=False)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    if opts.temperature > 2 and not args.quiet:
        _note(f"warning: temperature {opts.temperature:g} is very high (the usual range is 0.5-1.2)")

    # runtime from here on: failures are exit status 1
    from .api import Segment

    context, voice_speaker = _voice_context(voice_spec, args)
    speaker = next(s for s in (args.speaker, voice_speaker, 0) if s is not None)
    context += [Segment.from_file(path, t, speaker if spk is None else spk) for path, t, spk in ctx_flags]
    with _native_log(args.verbose):
        t0 = time.perf_counter()
        tts = _load(args)
        with tts:
            if args.verbose:
                _note(f"threads: {threads_in_use(tts.n_threads)}")
                _note(f"model {tts.path} on {tts.model.device} ({tts.model.file_type}), "
                      f"loaded in {time.perf_counter() - t0:.2f} s")
            t1 = time.perf_counter()
            bar = _Bar(args)
            try:
                seconds, seed, reason = _speak_one(tts, text, args, opts, context, speaker, output, bar)
            finally:
                bar.close()
            elapsed = time.perf_counter() - t1
    if not args.quiet:
        where = "standard output" if output in (None, "-") else output
        hint = {"max_length": " (cut at --max-audio-length)",
                "context_full": " (the model's context is full: shorten the text or the context)",
                "aborted": " (aborted)"}.get(reason, "")
        _note(f"wrote {seconds:.2f} s of audio to {where}; seed {seed}{hint}")
        if args.verbose:
            _note(f"generated in {elapsed:.2f} s ({elapsed / max(seconds, 1e-9):.2f} s per second of audio), "
                  f"stop reason {reason}")
    return 0


def _voice_context(spec, args) -> tuple[list, int | None]:
    """The --voice as context items and the speaker it speaks as (None: no voice given)."""
    if spec is None:
        return [], None
    kind, value = spec
    if kind == "audio":  # crispasr's --voice AUDIO --ref-text TEXT
        from .api import Segment

        speaker = args.speaker or 0
        return [Segment.from_file(value, args.ref_text, speaker)], speaker
    from .voices import find_voice

    voice = find_voice(value, args.voice_dir)
    return [voice], voice.speaker


class _native_log:
    """With -v: the native library's log on stderr while the block runs."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            from .model import set_log_callback

            set_log_callback(lambda level, msg: sys.stderr.write(msg))

    def __exit__(self, *exc):
        if self.on:
            from .model import set_log_callback

            set_log_callback(None)


# ---------------------------------------------------------------------------------------------
# Many prompts: --output-dir
# ---------------------------------------------------------------------------------------------

class _Line:
    __slots__ = ("number", "text", "speaker", "voice", "output")

    def __init__(self, number, text, speaker=None, voice=None, output=None):
        self.number, self.text, self.speaker, self.voice, self.output = number, text, speaker, voice, output


def _parse_lines(args, text: str) -> list[_Line]:
    """The utterances of --output-dir input, every line checked before anything is generated."""
    import json

    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        if not args.json_input:
            lines.append(_Line(number, raw.strip()))
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {number}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"line {number}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"text", "speaker", "voice", "output_file"})
        if unknown:
            raise ValueError(f"line {number}: unknown key {unknown[0]!r} (keys: text, speaker, voice, output_file)")
        t, spk, voice, out = obj.get("text"), obj.get("speaker"), obj.get("voice"), obj.get("output_file")
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"line {number}: \"text\" must be a non-empty string")
        if spk is not None and (not isinstance(spk, int) or isinstance(spk, bool) or not 0 <= spk < 2**31):
            raise ValueError(f"line {number}: \"speaker\" must be an integer >= 0, got {spk!r}")
        if voice is not None and (not isinstance(voice, str) or not voice):
            raise ValueError(f"line {number}: \"voice\" must be a voice name or a .csmvoice path")
        if out is not None:
            out = _check_output_file(out, number, args)
        lines.append(_Line(number, t.strip(), spk, voice, out))
    if not lines:
        raise UsageError("no text: every input line is blank")
    return lines


def _check_output_file(out, number: int, args) -> str:
    """A JSON line's output_file: a relative path inside --output-dir with a known suffix."""
    from .audio import output_format

    p = Path(out) if isinstance(out, str) and out else None
    if p is None or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"line {number}: \"output_file\" must be a relative path inside --output-dir, got {out!r}")
    try:
        output_format(p, args.sample_rate or 24000)
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None
    return out


def _speak_lines(args) -> int:
    from .audio import check_writable, output_format

    for flag, given in (("-o", args.output is not None), ("--output-raw", args.output_raw),
                        ("--tts-stream", args.tts_stream), ("--stream", args.stream), ("--tts", args.tts_text),
                        ("TEXT", args.text), ("--ref-text", args.ref_text), ("--context-audio", args.context_audio)):
        if given:
            raise UsageError(f"--output-dir reads one utterance per line from -f or standard input; {flag} "
                             "does not go with it")
    if args.file is None and (sys.stdin is None or sys.stdin.isatty()):
        raise UsageError("no text: give -f FILE or pipe lines on standard input")
    text = _read_input(args)
    try:
        opts = _options(args, bulk=True)
        output_format(f"x.{args.output_format}", args.sample_rate or 24000)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    lines = _parse_lines(args, text)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(lines[-1].number)))
    for line in lines:
        line.output = folder / (line.output or f"{line.number:0{width}d}.{args.output_format}")
        line.output.parent.mkdir(parents=True, exist_ok=True)
        check_writable(line.output)

    from .voices import find_voice

    voices = {spec: find_voice(spec, args.voice_dir) for spec in {line.voice or args.voice for line in lines} - {None}}
    with _native_log(args.verbose):
        tts = _load(args)
        with tts:
            if args.verbose:
                _note(f"threads: {threads_in_use(tts.n_threads)}")
                _note(f"{len(lines)} line(s) in batches of {args.batch}")
            seconds, seed = _run_batches(tts, lines, voices, opts, args)
    if not args.quiet:
        _note(f"wrote {len(lines)} file(s), {seconds:.2f} s of audio, to {folder}; seed {seed}")
    return 0


def _run_batches(tts, lines, voices, opts, args):
    """generate_batch over groups of --batch consecutive lines (split where the voice changes);
    line i of a group uses the group's seed + i. Returns (seconds written, first seed)."""
    opts = opts.with_seed()
    bar = _Bar(args, len(lines), "files")
    total, done = 0.0, 0
    try:
        for start in range(0, len(lines), args.batch):
            group = lines[start:start + args.batch]
            runs = []
            for line in group:  # consecutive lines of one voice go to one generate_batch call
                key = line.voice or args.voice
                if runs and runs[-1][0] == key:
                    runs[-1][1].append(line)
                else:
                    runs.append((key, [line]))
            offset = start
            for key, run in runs:
                voice = voices.get(key)
                default = args.speaker if args.speaker is not None else (voice.speaker if voice else 0)
                speakers = [default if line.speaker is None else line.speaker for line in run]
                seed = (opts.seed + offset) % 2**64
                audios = tts.generate_batch([line.text for line in run], speakers, context=voice or (),
                                            options=opts, seed=seed)
                for line, audio in zip(run, audios):
                    audio.save(line.output, sample_rate=args.sample_rate)
                    total += audio.duration
                    bar.audio(audio.duration)
                offset += len(run)
                done += len(run)
                bar.items(done)
    finally:
        bar.close()
    return total, opts.seed


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------

def _dialogue(argv) -> int:
    from .dialogue_cli import main as dialogue_main

    return dialogue_main(argv)


def _convert(argv) -> int:
    from .convert import main as convert_main

    return convert_main(argv)


def _voice(argv) -> int:
    from .voices import SUFFIX, Voice, is_voice_file, list_voices, remove_voice, save_voice, voices_dir

    p = _Parser(prog=f"{PROG} voice", allow_abbrev=False,
                description="Saved voices: a reference recording encoded once, reused with --voice NAME.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    c = sub.add_parser("create", help="encode a recording and save it as a voice", allow_abbrev=False)
    c.add_argument("name", help=f"the voice's name (or a path ending in {SUFFIX})")
    c.add_argument("--audio", required=True, metavar="FILE", help="the reference recording (any rate)")
    c.add_argument("--text", required=True, help="what the recording says")
    c.add_argument("--speaker", type=_number(int, 0), default=0, help="the speaker id it speaks as (default 0)")
    c.add_argument("--force", action="store_true", help="replace a voice of that name")
    c.add_argument("--voice-dir", metavar="DIR", help="voices folder (default: PYCSM_VOICES or the user data folder)")
    q = c.add_mutually_exclusive_group()
    q.add_argument("-q", "--quiet", action="store_true")
    q.add_argument("-v", "--verbose", action="store_true")
    _model_flags(c)
    ls = sub.add_parser("list", help="list the saved voices", allow_abbrev=False)
    ls.add_argument("--voice-dir", metavar="DIR")
    rm = sub.add_parser("remove", help="delete a saved voice", allow_abbrev=False)
    rm.add_argument("name")
    rm.add_argument("--voice-dir", metavar="DIR")
    args = p.parse_args(argv)
    folder = args.voice_dir
    if args.action == "list":
        names = list_voices(folder)
        for name in names:
            try:
                v = Voice.load(Path(folder or voices_dir()) / f"{name}{SUFFIX}")
                text = v.text if len(v.text) <= 60 else v.text[:57] + "..."
                print(f"{name}\tspeaker {v.speaker}\t{v.duration:.2f} s\t{text}")
            except ValueError as e:  # one bad file does not hide the others
                print(f"{name}\t(unreadable: {e})")
        if not names:
            _note(f"no saved voices in {folder or voices_dir()}")
        return 0
    if args.action == "remove":
        _note(f"removed {remove_voice(args.name, folder)}")
        return 0
    if is_voice_file(args.name):
        target = Path(args.name)
        if target.suffix != SUFFIX:
            raise UsageError(f"a voice file's name ends in {SUFFIX}; a voice name has no '/' ({args.name!r})")
        if not target.parent.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {target.parent}")
        if target.exists() and not args.force:
            raise FileExistsError(f"voice file already exists: {target} (--force replaces it)")
    else:
        from .voices import check_name, voice_path

        try:
            target = voice_path(check_name(args.name), folder)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if target.exists() and not args.force:
            raise FileExistsError(f"a voice named {args.name!r} exists ({target}); --force replaces it")
    if not args.text.strip():
        raise UsageError("--text is empty: give the transcript of the recording")
    from .audio import read_audio

    samples = read_audio(args.audio)  # a bad recording fails before the model loads
    tts = _load(args)
    with tts:
        if args.verbose:
            _note(f"threads: {threads_in_use(tts.n_threads)}")
        voice = Voice(args.speaker, args.text, tts.encode(samples), model=tts.path.name)
    if is_voice_file(args.name):
        path = voice.save(target)
    else:
        path = save_voice(voice, args.name, overwrite=args.force, folder=folder)
    if not args.quiet:
        _note(f"saved voice {args.name!r} ({voice.duration:.2f} s, speaker {voice.speaker}) to {path}")
    return 0


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
            return {"convert": _convert, "quantize": _quantize, "info": _info, "voice": _voice,
                    "dialogue": _dialogue}[argv[0]](argv[1:])
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
