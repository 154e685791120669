"""`pycsm dialogue SCRIPT -o talk.wav`: speak a dialogue script turn by turn (`CSM.stream_converse`).

    pycsm dialogue talk.txt -o talk.wav --voice Ann=ann --voice Bob=voices/bob.csmvoice
    pycsm dialogue - -o talk.flac --turn-dir turns/ --gap 400 < talk.txt

The script format is pycsm.dialogue_script's. Each turn is generated after the earlier ones, within
the context budget (pycsm.budget); the joined conversation is written to -o (a temporary name,
renamed when complete: Ctrl-C or an error leaves no partial file) and, with --turn-dir, each turn to
DIR/NNN-SPEAKER.<suffix of -o> as soon as it is spoken.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from .cli import PROG, UsageError, _load, _note, _number, _Parser
from .conversation import DEFAULT_GAP_MS, DEFAULT_TURN_MS, TurnError
from .dialogue_script import ScriptError, parse_script

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _parser() -> _Parser:
    from .hub import DEFAULT_REPO, QUANTS

    p = _Parser(prog=f"{PROG} dialogue", allow_abbrev=False,
                description="Speak a dialogue script (one 'SPEAKER: text' turn per line, or JSON lines), each "
                            "turn after the earlier ones.")
    p.add_argument("script", metavar="SCRIPT", help="the script file ('-' = standard input)")
    p.add_argument("-o", "--output", metavar="PATH", default="dialogue.wav",
                   help="the whole conversation: .wav / .flac / .ogg / .opus / .mp3, '-' = WAV on standard output "
                        "(default dialogue.wav)")
    p.add_argument("--turn-dir", metavar="DIR", help="also write each turn to DIR/NNN-SPEAKER.<suffix of -o>")
    p.add_argument("--voice", action="append", default=[], metavar="NAME_OR_ID=VOICE",
                   help="the voice of a speaker: a saved voice's name or a .csmvoice file; a number maps a name "
                        "to that speaker id (repeatable; overrides the script's header lines)")
    p.add_argument("--gap", metavar="MS", type=_number(float, 0), default=float(DEFAULT_GAP_MS),
                   help=f"silence between turns in ms (default {DEFAULT_GAP_MS})")
    p.add_argument("--pause", metavar="MS", type=_number(float, 0), default=150.0,
                   help="silence between the sentences of a long turn in ms (default 150)")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH", help="local CSM GGUF file (default: download from the hub)")
    g.add_argument("--quant", choices=QUANTS, default=None, help="published file to use: %(choices)s (default q8_0)")
    g.add_argument("--repo", default=None, help=f"Hugging Face repository (default {DEFAULT_REPO})")
    g.add_argument("--threads", type=_number(int, 1), default=None, help="CPU threads (default: all)")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="compute device (default auto)")
    s = p.add_argument_group("speech")
    s.add_argument("-t", "--temperature", "-tp", dest="temperature", type=_number(float, 0),
                   default=0.9, help="sampling temperature, 0 = greedy (default 0.9)")
    s.add_argument("--top-k", type=_number(int, 0), default=50, help="top-k sampling, 0 = off (default 50)")
    s.add_argument("--seed", type=int, default=None,
                   help="random seed; turn piece k uses seed + k (default: a random one, printed at the end)")
    s.add_argument("--max-audio-length", metavar="SECONDS", type=_number(float, 0, strict=True),
                   default=DEFAULT_TURN_MS / 1000, help="cap on a turn (each sentence of a long turn) in seconds "
                                                        f"(default {DEFAULT_TURN_MS / 1000:g})")
    o = p.add_mutually_exclusive_group()
    o.add_argument("-v", "--verbose", action="store_true", help="print the native library's log and details")
    o.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def _read_script(path: str) -> str:
    if path == "-":
        if sys.stdin is None:
            raise UsageError("no standard input to read the script from")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        what = "the script on standard input"
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise RuntimeError(f"cannot read script {path}: {e.strerror or e}") from None
        what = f"script {path}"
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x})") from None


def _voice_flags(items) -> dict:
    """--voice NAME_OR_ID=VOICE items -> {speaker: spec}, speaker an id (int) or a name."""
    out = {}
    for item in items:
        key, sep, spec = item.partition("=")
        key, spec = key.strip(), spec.strip()
        if not sep or not key or not spec:
            raise UsageError(f"--voice {item!r}: expected NAME_OR_ID=VOICE")
        speaker = int(key) if key.isdecimal() else key
        if speaker in out:
            raise UsageError(f"--voice {key} is given twice")
        out[speaker] = spec
    return out


def _cast(script, flags: dict):
    """The turns as (speaker, text) for converse, and {speaker: voice spec or None} with where each
    spec came from (for error messages). Names mapped to an id speak as that id."""
    named = {k for k, _, _ in script.turns}
    for k in flags:
        if k not in named:
            raise UsageError(f"--voice {k}: no turn of the script is spoken by {k}")
    ids = dict(script.ids)
    specs = {k: (spec, f"line {line}") for k, (spec, line) in script.voices.items()}
    for k, spec in flags.items():
        if isinstance(k, str) and spec.isdecimal():
            ids[k] = int(spec)
            specs.pop(k, None)
        else:
            specs[k] = (spec, f"--voice {k}")
    turns = [(ids.get(k, k), text) for k, text, _ in script.turns]
    spoken = {k for k, _ in turns}
    voices = {}
    for k, (spec, where) in specs.items():
        speaker = ids.get(k, k)
        if speaker not in spoken:
            raise UsageError(f"{where}: no turn of the script is spoken by {k}")
        voices[speaker] = (spec, where)
    return turns, voices


def _load_voices(voices: dict) -> dict:
    """{speaker: Voice} from {speaker: (spec, where)}; one error naming where a bad spec came from."""
    if not voices:
        return {}
    from .voices import find_voice

    out = {}
    for speaker, (spec, where) in voices.items():
        try:
            out[speaker] = find_voice(spec)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{where}: {e}") from None
    return out


def _turn_path(folder: Path, index: int, speaker, suffix: str) -> Path:
    name = _UNSAFE.sub("_", str(speaker)).strip("._") or "speaker"
    return folder / f"{index + 1:03d}-{name}{suffix}"


def main(argv) -> int:
    import numpy as np

    from .audio import STDOUT, Audio, AudioWriter, check_writable, output_format

    args = _parser().parse_args(argv)
    if args.model is not None and (args.quant is not None or args.repo is not None):
        raise UsageError("--quant/--repo pick a file from the hub; they cannot be combined with --model")
    try:
        output_format(args.output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    to_stdout = args.output == STDOUT
    if to_stdout and (sys.stdout is None or sys.stdout.isatty()):
        raise UsageError("-o - writes binary audio; redirect standard output to a file or a player")
    check_writable(args.output)  # before generating, not after
    suffix = ".wav" if to_stdout else Path(args.output).suffix
    turn_dir = None
    if args.turn_dir is not None:
        turn_dir = Path(args.turn_dir)
        if not turn_dir.parent.is_dir():
            raise FileNotFoundError(f"the folder of --turn-dir does not exist: {turn_dir.parent}")
        if turn_dir.exists() and not turn_dir.is_dir():
            raise FileExistsError(f"--turn-dir {turn_dir} exists and is not a folder")
    flags = _voice_flags(args.voice)
    text = _read_script(args.script)
    source = "standard input" if args.script == "-" else args.script
    try:
        script = parse_script(text, mapped={k for k in flags if isinstance(k, str)})
    except ScriptError as e:
        raise UsageError(f"{source}: {e}") from None
    turns, voice_specs = _cast(script, flags)

    # runtime from here on: failures are exit status 1
    voices = _load_voices(voice_specs)
    if turn_dir is not None:
        turn_dir.mkdir(exist_ok=True)
    if args.verbose:
        from .model import set_log_callback

        set_log_callback(lambda level, msg: sys.stderr.write(msg))
    bar = None
    try:
        t0 = time.perf_counter()
        with _load(args) as tts:
            if args.verbose:
                _note(f"model {tts.path} on {tts.model.device} ({tts.model.file_type}), "
                      f"loaded in {time.perf_counter() - t0:.2f} s")
                _note(f"speaking {len(turns)} turn(s)")
            if not args.quiet and sys.stderr is not None and sys.stderr.isatty():
                from tqdm import tqdm

                bar = tqdm(total=len(turns), unit="turn", file=sys.stderr, dynamic_ncols=True, desc=PROG)
            st = tts.stream_converse(turns, voices, chunk_frames=None, gap_ms=args.gap, pause_ms=args.pause,
                                     temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                     max_audio_length_ms=args.max_audio_length * 1000.0,
                                     progress=None if bar is None else lambda done, total: bar.update(done - bar.n))
            t1 = time.perf_counter()
            with st, AudioWriter(args.output, tts.sample_rate) as writer:
                current, parts = None, []

                def save_turn():
                    if turn_dir is not None and parts:
                        Audio(np.concatenate(parts), tts.sample_rate).save(
                            _turn_path(turn_dir, current, script.turns[current][0], suffix))

                try:
                    for chunk in st:
                        writer.write(chunk.samples)
                        if chunk.gap:
                            continue
                        if chunk.turn != current:
                            save_turn()
                            current, parts = chunk.turn, []
                        parts.append(chunk.samples)
                except TurnError as e:  # checked before any audio is made
                    raise ValueError(f"{source}: line {script.turns[e.turn][2]}: {e}") from None
                save_turn()
            elapsed = time.perf_counter() - t1
    finally:
        if bar is not None:
            bar.close()
        if args.verbose:
            from .model import set_log_callback

            set_log_callback(None)
    seconds = writer.frames / tts.sample_rate
    if not args.quiet:
        where = ("standard output" if to_stdout else args.output) + \
            (f" and {len(turns)} turn file(s) to {turn_dir}" if turn_dir is not None else "")
        _note(f"wrote {seconds:.2f} s of audio ({len(turns)} turns) to {where}; seed {st.seed}")
        if args.verbose:
            prompts = [p.n_prompt for p in st.pieces]
            _note(f"generated in {elapsed:.2f} s ({elapsed / max(seconds, 1e-9):.2f} s per second of audio); "
                  f"prompts of {min(prompts)}..{max(prompts)} positions; stop reason {st.stop_reason}")
    return 0
