"""A two-speaker conversation: each turn is spoken after the earlier ones (their text and audio).

    python examples/dialogue.py -o dialogue.wav [--model csm-1b-q8_0.gguf] [--turn-dir turns/]
    python examples/dialogue.py --voice Ann ann.wav "What ann.wav says." --voice Bob bob.wav "What bob.wav says."

Without voices the model picks a voice for each speaker id and keeps it through the conversation
(the earlier turns are in every prompt). With a recording and its transcript for a speaker, that
speaker sounds like the recording. Prints, per turn, how many earlier turns its prompt kept and the
prompt's size: once the conversation outgrows the context, the oldest turns drop out.
"""

import argparse
from pathlib import Path

import pycsm

SCRIPT = [
    ("Ann", "Did you see the sky this morning?"),
    ("Bob", "I did. Red at dawn. My grandfather always said that meant a storm."),
    ("Ann", "Then maybe we should not take the boat out today."),
    ("Bob", "Agreed. Tea and a long book instead?"),
    ("Ann", "That sounds perfect. I will put the kettle on."),
]


def main():
    ap = argparse.ArgumentParser(description="Speak a two-speaker dialogue with a rolling context.")
    ap.add_argument("--model", help="local CSM GGUF file (default: csm-1b-q8_0.gguf from the Hugging Face hub)")
    ap.add_argument("--voice", nargs=3, action="append", default=[], metavar=("NAME", "AUDIO", "TEXT"),
                    help="a speaker's voice: a recording (any rate) and what it says")
    ap.add_argument("-o", "--output", default="dialogue.wav")
    ap.add_argument("--turn-dir", help="also write each turn to this folder")
    ap.add_argument("--gap", type=float, default=300, help="silence between turns in ms")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="cap on one turn (default 10 s)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    voices = {name: pycsm.Segment.from_file(audio, text) for name, audio, text in args.voice}
    tts = pycsm.CSM(args.model, n_threads=args.threads) if args.model else pycsm.CSM.from_pretrained(quant="q8_0")
    with tts:
        conv = tts.converse(SCRIPT, voices, seed=args.seed, gap_ms=args.gap,
                            max_audio_length_ms=args.max_seconds * 1000)
    conv.audio.save(args.output)
    for t, audio in enumerate(conv.turns):
        first = next(p for p in conv.pieces if p.turn == t)
        kept = sorted({conv.pieces[j].turn + 1 for j in first.context})
        print(f"turn {t + 1} ({SCRIPT[t][0]}, speaker {conv.speakers[SCRIPT[t][0]]}): {audio.duration:.2f} s, "
              f"prompt {first.n_prompt} positions, earlier turns kept: {kept or 'none'}")
        if args.turn_dir:
            Path(args.turn_dir).mkdir(exist_ok=True)
            audio.save(Path(args.turn_dir) / f"{t + 1:03d}-{SCRIPT[t][0]}.wav")
    print(f"{args.output}: {conv.audio.duration:.2f} s, seed {conv.audio.seed}")


if __name__ == "__main__":
    main()
