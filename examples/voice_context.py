"""Continue in the voice of a recording: a WAV file and its transcript become the context.

    python examples/voice_context.py --context-audio me.wav --context-text "What I say in me.wav." \
        --text "And this is new text in the same voice." -o cloned.wav [--model csm-1b-q8_0.gguf]

The recording may have any sample rate and channel count (it is resampled to 24 kHz mono) and is
encoded to Mimi codes once. The reply is generated again with the first reply as more context, to
show how a conversation grows: each generated Audio already carries its codes.
"""

import argparse

import numpy as np

import pycsm


def main():
    ap = argparse.ArgumentParser(description="Speak new text in the voice of a recording.")
    ap.add_argument("--model", help="local CSM GGUF file (default: csm-1b-q8_0.gguf from the Hugging Face hub)")
    ap.add_argument("--context-audio", required=True, help="a recording of the voice (wav/flac/ogg, any rate)")
    ap.add_argument("--context-text", required=True, help="what is said in the recording")
    ap.add_argument("--speaker", type=int, default=0, help="speaker id for the recording and the new text")
    ap.add_argument("--text", default="This sentence was never recorded, but it should sound like the recording.")
    ap.add_argument("--follow-up", default="And the conversation can go on from here.")
    ap.add_argument("-o", "--output", default="voice_context.wav")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    voice = pycsm.Segment.from_file(args.context_audio, args.context_text, speaker=args.speaker)
    tts = pycsm.CSM(args.model, n_threads=args.threads) if args.model else pycsm.CSM.from_pretrained(quant="q8_0")
    with tts:
        opts = dict(speaker=args.speaker, seed=args.seed, max_audio_length_ms=args.max_seconds * 1000)
        first = tts.generate(args.text, context=[voice], **opts)
        # the first reply joins the context as it is (its codes are reused, nothing is re-encoded)
        second = tts.generate(args.follow_up, context=[voice, pycsm.Segment(args.speaker, args.text, first)], **opts)
    pause = np.zeros(int(0.3 * first.sample_rate), dtype=np.float32)
    both = pycsm.Audio(np.concatenate([first.samples, pause, second.samples]), first.sample_rate)
    both.save(args.output)
    print(f"{args.output}: {both.duration:.2f} s (context: {voice.codes.shape[0]} frames of {args.context_audio})")


if __name__ == "__main__":
    main()
