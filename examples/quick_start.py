"""Speak one sentence into a WAV file.

    python examples/quick_start.py                          # downloads csm-1b-q8_0.gguf from the hub
    python examples/quick_start.py --model csm-1b-q8_0.gguf --text "Good morning." -o morning.wav
"""

import argparse

import pycsm


def main():
    ap = argparse.ArgumentParser(description="Speak one sentence into a WAV file.")
    ap.add_argument("--model", help="local CSM GGUF file (default: csm-1b-q8_0.gguf from the Hugging Face hub)")
    ap.add_argument("--text", default="Hello from pycsm: Sesame's speech model, running on ggml.")
    ap.add_argument("-o", "--output", default="quick_start.wav", help=".wav, .flac or .ogg")
    ap.add_argument("--speaker", type=int, default=0)
    ap.add_argument("--seed", type=int, default=42, help="same seed, same audio")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="cap on the audio length")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    tts = pycsm.CSM(args.model, n_threads=args.threads) if args.model else pycsm.CSM.from_pretrained(quant="q8_0")
    with tts:
        audio = tts.generate(args.text, speaker=args.speaker, seed=args.seed,
                             max_audio_length_ms=args.max_seconds * 1000)
    audio.save(args.output)
    print(f"{args.output}: {audio.duration:.2f} s at {audio.sample_rate} Hz ({audio.codes.shape[0]} frames, "
          f"stop: {audio.stop_reason})")


if __name__ == "__main__":
    main()
