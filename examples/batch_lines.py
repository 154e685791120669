"""Speak many lines, each into its own file, generating up to 4 at a time.

    python examples/batch_lines.py lines.txt --out-dir voiced/ [--model csm-1b-q8_0.gguf]
    python examples/batch_lines.py --out-dir voiced/          # a few built-in lines

generate_batch runs up to 4 utterances together (every weight read serves all of them), which is
faster than one after another. Line i uses seed + i: the same as generate(line, seed=seed + i).
"""

import argparse
from pathlib import Path

import pycsm

LINES = [
    "Welcome aboard.",
    "Please keep your seatbelt fastened while seated.",
    "The next stop is Central Station.",
    "Thank you for travelling with us.",
    "Have a pleasant day.",
]


def main():
    ap = argparse.ArgumentParser(description="Speak each line of a text file into its own WAV file.")
    ap.add_argument("lines", nargs="?", help="text file, one utterance per line (default: built-in lines)")
    ap.add_argument("--model", help="local CSM GGUF file (default: csm-1b-q8_0.gguf from the Hugging Face hub)")
    ap.add_argument("--out-dir", default="batch_lines", help="folder for line_000.wav, line_001.wav, ...")
    ap.add_argument("--speaker", type=int, default=0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-seconds", type=float, default=15.0, help="cap per line")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    lines = LINES
    if args.lines:
        lines = [s.strip() for s in Path(args.lines).read_text(encoding="utf-8").splitlines() if s.strip()]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tts = pycsm.CSM(args.model, n_threads=args.threads) if args.model else pycsm.CSM.from_pretrained(quant="q8_0")
    with tts:
        audios = tts.generate_batch(lines, speaker=args.speaker, seed=args.seed,
                                    max_audio_length_ms=args.max_seconds * 1000)
    for i, (line, audio) in enumerate(zip(lines, audios)):
        path = audio.save(out_dir / f"line_{i:03d}.wav")
        print(f"{path}: {audio.duration:5.2f} s  {line}")


if __name__ == "__main__":
    main()
