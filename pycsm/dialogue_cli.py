"""`pycsm dialogue SCRIPT -o talk.wav`: speak a dialogue script turn by turn (`CSM.stream_converse`).

    pycsm dialogue talk.txt -o talk.wav --voice Ann=ann --voice Bob=voices/bob.csmvoice
    pycsm dialogue - -o talk.flac --turn-dir turns/ --gap 400 < talk.txt

The script format is pycsm.dialogue_script's. Each turn is generated after the earlier ones, within
the context budget (pycsm.budget); the joined conversation is written to -o (a temporary name,
renamed when complete: Ctrl-C or an error leaves no partial file) and, with --turn-dir, each turn to
DIR/NNN-SPEAKER.<suffix of -o> as soon as it is spoken.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from .cli import (_AUDIO_SUFFIXES, PROG, UsageError, _Bar, _decode, _load, _model_flags, _native_log, _note,
                  _number, _options, _Parser, _stdin_text, threads_in_use)
from .conversation import DEFAULT_GAP_MS, DEFAULT_TURN_MS, TurnError
from .dialogue_script import ScriptError, parse_script

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _parser() -> _Parser:
    p = _Parser(prog=f"{PROG} dialogue", allow_abbrev=False,
                description="Speak a dialogue script (one 'SPEAKER: text' turn per line, or JSON lines), each "
                            "turn after the earlier ones (docs/dialogue.md).")
    p.add_argument("script", metavar="SCRIPT", help="the script file ('-' = standard input)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", metavar="PATH", default="dialogue.wav",
                   help="the whole conversation: .wav, .flac, .ogg, .opus or .mp3; '-' = a WAV on standard "
                        "output (default dialogue.wav)")
    o.add_argument("--turn-dir", metavar="DIR", help="also write each turn to DIR/NNN-SPEAKER.<suffix of -o>")
    o.add_argument("--sample-rate", metavar="HZ", type=_number(int, 1000, maximum=768_000), default=None,
                   help="resample the output to HZ (libsoxr; default 24000)")
    o.add_argument("--gap", metavar="MS", type=_number(float, 0, maximum=59_999), default=float(DEFAULT_GAP_MS),
                   help=f"silence between turns in ms (default {DEFAULT_GAP_MS})")
    o.add_argument("--pause", metavar="MS", type=_number(float, 0, maximum=59_999), default=150.0,
                   help="silence between the sentences of a long turn in ms (default 150)")
    _model_flags(p)
    s = p.add_argument_group("speech")
    s.add_argument("-tp", "--temperature", dest="temperature", type=_number(float, 0, maximum=10),
                   default=0.9, help="sampling temperature, 0 = greedy (default 0.9)")
    s.add_argument("--top-k", type=_number(int, 0), default=50, help="top-k sampling, 0 = off (default 50)")
    s.add_argument("--seed", type=_number(int, 0, maximum=2**64 - 1), default=0,
                   help="random seed, piece k (a turn or a sentence of a long turn) uses seed + k; 0 (default) "
                        "= a fresh random seed, printed at the end")
    s.add_argument("--max-audio-length", metavar="SECONDS", type=_number(float, 0, strict=True),
                   default=DEFAULT_TURN_MS / 1000, help="cap on a turn (each sentence of a long turn) in seconds "
                                                        f"(default {DEFAULT_TURN_MS / 1000:g})")
    s.add_argument("--parse-special", action=argparse.BooleanOptionalAction, default=None,
                   help="read special-token text such as <|end_of_text|> in the script as tokens (default: no, "
                        "plain text)")
    c = p.add_argument_group("voices")
    c.add_argument("--voice", action="append", default=[], metavar="NAME_OR_ID=VOICE",
                   help="the voice of a speaker: a saved voice's name or a .csmvoice file; a number maps a name "
                        "to that speaker id (repeatable; overrides the script's header lines)")
    c.add_argument("--voice-dir", metavar="DIR", help="where saved voices are (default: PYCSM_VOICES or the "
                                                      "user data folder)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("-v", "--verbose", action="store_true",
                   help="print the thread count, the native library's log, prompt sizes and times")
    v.add_argument("-q", "--quiet", "-np", "--no-prints", action="store_true", help="print nothing but errors")
    return p


def _read_script(path: str) -> str:
    if path == "-":
        return _stdin_text()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RuntimeError(f"cannot read script {path}: {e.strerror or e}") from None
    return _decode(data, f"script {path}")


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


def _load_voices(voices: dict, folder) -> dict:
    """{speaker: Voice} from {speaker: (spec, where)}; one error naming where a bad spec came from."""
    if not voices:
        return {}
    from .voices import find_voice

    out = {}
    for speaker, (spec, where) in voices.items():
        if Path(spec).suffix.lower() in _AUDIO_SUFFIXES:
            raise UsageError(f"{where}: {spec} is an audio file; save it as a voice with its transcript first "
                             f"(`pycsm voice create NAME --audio {spec} --text ...`)")
        try:
            out[speaker] = find_voice(spec, folder)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{where}: {e}") from None
    return out


def _turn_path(folder: Path, index: int, speaker, suffix: str) -> Path:
    name = _UNSAFE.sub("_", str(speaker)).strip("._") or "speaker"
    return folder / f"{index + 1:03d}-{name}{suffix}"


def _check_output(args) -> tuple[str, str]:
    """(output, suffix for the turn files), checked before anything is generated."""
    from .audio import STDOUT, check_writable, output_format

    if args.output == STDOUT and (sys.stdout is None or sys.stdout.isatty()):
        raise UsageError("-o - writes a WAV to standard output: redirect it to a file or a player")
    try:
        output_format(args.output, args.sample_rate or 24000)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_writable(args.output)
    if args.turn_dir is not None:
        turn_dir = Path(args.turn_dir)
        if not turn_dir.parent.is_dir():
            raise FileNotFoundError(f"the folder of --turn-dir does not exist: {turn_dir.parent}")
        if turn_dir.exists() and not turn_dir.is_dir():
            raise FileExistsError(f"--turn-dir {turn_dir} exists and is not a folder")
    return args.output, ".wav" if args.output == STDOUT else Path(args.output).suffix


def main(argv) -> int:
    import numpy as np

    from .audio import STDOUT, Audio, AudioWriter

    args = _parser().parse_args(argv)
    output, suffix = _check_output(args)
    flags = _voice_flags(args.voice)
    source = "standard input" if args.script == "-" else args.script
    try:
        script = parse_script(_read_script(args.script), mapped={k for k in flags if isinstance(k, str)})
    except ScriptError as e:
        raise UsageError(f"{source}: {e}") from None
    turns, voice_specs = _cast(script, flags)
    try:
        opts = _options(args, bulk=True)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    voices = _load_voices(voice_specs, args.voice_dir)

    # runtime from here on: failures are exit status 1
    turn_dir = None if args.turn_dir is None else Path(args.turn_dir)
    if turn_dir is not None:
        turn_dir.mkdir(exist_ok=True)
    with _native_log(args.verbose):
        t0 = time.perf_counter()
        with _load(args) as tts:
            if args.verbose:
                _note(f"threads: {threads_in_use(tts.n_threads)}")
                _note(f"model {tts.path} on {tts.model.device} ({tts.model.file_type}), "
                      f"loaded in {time.perf_counter() - t0:.2f} s")
                _note(f"speaking {len(turns)} turn(s)")
            bar = _Bar(args, len(turns), "turn")
            frame_s = tts.frame_ms / 1000.0
            st = tts.stream_converse(turns, voices, opts, chunk_frames=None, gap_ms=args.gap, pause_ms=args.pause,
                                     progress=lambda done, _total: bar.items(done),
                                     on_frame=lambda _i, _c: bar.audio(frame_s))
            t1 = time.perf_counter()
            try:
                with st, AudioWriter(output, tts.sample_rate, args.sample_rate) as writer:
                    current, parts = None, []

                    def save_turn():  # each turn's file as soon as the turn is complete
                        if turn_dir is not None and parts:
                            Audio(np.concatenate(parts), tts.sample_rate).save(
                                _turn_path(turn_dir, current, script.turns[current][0], suffix), args.sample_rate)

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
            finally:
                bar.close()
            elapsed = time.perf_counter() - t1
    seconds = writer.frames / tts.sample_rate
    if not args.quiet:
        where = ("standard output" if output == STDOUT else output) + \
            (f" and {len(turns)} turn file(s) to {turn_dir}" if turn_dir is not None else "")
        _note(f"wrote {seconds:.2f} s of audio ({len(turns)} turns) to {where}; seed {st.seed}")
        if args.verbose:
            prompts = [p.n_prompt for p in st.pieces]
            _note(f"generated in {elapsed:.2f} s ({elapsed / max(seconds, 1e-9):.2f} s per second of audio); "
                  f"prompts of {min(prompts)}..{max(prompts)} positions; stop reason {st.stop_reason}")
    return 0
