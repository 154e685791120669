"""Play speech while it is being generated, or write it to a file as it comes.

    python examples/streaming.py --raw "Hello there." | aplay -r 24000 -f S16_LE -c 1
    python examples/streaming.py "Hello there." -o streamed.wav [--model csm-1b-q8_0.gguf]

Chunks arrive every --chunk-frames frames (80 ms each); the first one after the prompt is processed
and a few frames are generated, so playback starts long before the whole utterance is done.
Long text is spoken sentence by sentence (stream_long).
"""

import argparse
import sys
import time

import pycsm
from pycsm.audio import AudioWriter, float_to_int16
from pycsm.text import split_sentences


def main():
    ap = argparse.ArgumentParser(description="Stream speech to a player (stdout) or a file.")
    ap.add_argument("text", nargs="?", default="Streaming lets you hear the first words while the rest is still "
                                               "being generated. It keeps going sentence by sentence.")
    ap.add_argument("--model", help="local CSM GGUF file (default: csm-1b-q8_0.gguf from the Hugging Face hub)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--raw", action="store_true", help="raw s16le mono 24 kHz to standard output")
    out.add_argument("-o", "--output", default="streaming.wav", help="file to write as audio arrives")
    ap.add_argument("--chunk-frames", type=int, default=4, help="frames per chunk (80 ms each)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="cap per sentence")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.raw and sys.stdout.isatty():
        ap.error("--raw writes binary audio: pipe it into a player, e.g. | aplay -r 24000 -f S16_LE -c 1")

    tts = pycsm.CSM(args.model, n_threads=args.threads) if args.model else pycsm.CSM.from_pretrained(quant="q8_0")
    opts = dict(seed=args.seed, max_audio_length_ms=args.max_seconds * 1000, chunk_frames=args.chunk_frames)
    with tts:
        t0 = time.perf_counter()
        long = len(split_sentences(args.text)) > 1
        stream = tts.stream_long(args.text, **opts) if long else tts.stream(args.text, **opts)
        first = None
        with stream:
            if args.raw:
                sink = sys.stdout.buffer
                for chunk in stream:
                    first = first or time.perf_counter() - t0
                    sink.write(float_to_int16(chunk).tobytes())
                    sink.flush()
            else:
                with AudioWriter(args.output, tts.sample_rate) as w:
                    for chunk in stream:
                        first = first or time.perf_counter() - t0
                        w.write(chunk)
        total = time.perf_counter() - t0
    seconds = stream.codes.shape[0] * 0.08
    print(f"first audio after {first or 0:.2f} s; {seconds:.2f} s of speech in {total:.2f} s "
          f"(seed {stream.seed}, stop: {stream.stop_reason})"
          + ("" if args.raw else f" -> {args.output}"), file=sys.stderr)


if __name__ == "__main__":
    main()
